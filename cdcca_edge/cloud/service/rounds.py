"""A round of a cohort: AKD from every upload so far (a fresh adapter on the original
student, as the demo does), DWC against the mirror of the latest version, signed, and
version n+1 published only once the mirror advanced and has the delta's target identity.

Rounds of one cohort never run at once (a lock file per cohort), so a job run twice
publishes once: the second finds no new upload, or the version already published.
"""

from __future__ import annotations

import fcntl
import shutil
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import select

from cdcca_edge.cloud.service.blobs import BlobStore
from cdcca_edge.cloud.service.ops import mirror_path, put_artifact, seed_mirror, sign_targets
from cdcca_edge.cloud.service.store import (
    Delta,
    Upload,
    Version,
    cohort_named,
    database_url,
    latest_version,
    open_db,
)
from cdcca_edge.core.errors import UsageError


class NothingNew(UsageError):
    """Fewer new uploads than a round needs (a job that ran twice lands here)."""


def run_round(data_dir: str | Path, cohort: str, db_url: str | None = None, akd: Any = None,
              min_new_uploads: int = 1, progress: Callable[[str], None] | None = None,
              launcher: str | None = None) -> dict[str, Any]:
    """Run one round of ``cohort``; returns what it published. ``launcher``: run the AKD
    stage as ``LAUNCHER -m cdcca_edge.cli distill ...`` (e.g. ``accelerate launch
    --multi_gpu``) instead of in this process.

    Raises:
        UsageError: no such cohort, or the cohort has no teacher/student.
        NothingNew: fewer than ``min_new_uploads`` uploads arrived since the last round.
    """
    data_dir = Path(data_dir)
    say = progress or (lambda _m: None)
    lock_path = data_dir / f"round-{cohort}.lock"
    with open(lock_path, "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        return _round_locked(data_dir, cohort, db_url, akd, min_new_uploads, say, launcher)


def _round_locked(data_dir: Path, cohort: str, db_url: str | None, akd: Any, min_new: int,
                  say: Callable[[str], None], launcher: str | None) -> dict[str, Any]:
    from cdcca_edge.cloud.akd import AKDConfig, distill
    from cdcca_edge.cloud.dwc import make_delta
    from cdcca_edge.core.artifact import open_artifact
    from cdcca_edge.core.delta_format import load_private_key
    from cdcca_edge.core.state import current_identity

    sessions = open_db(database_url(data_dir, db_url))
    blobs = BlobStore(data_dir / "blobs")
    with sessions() as s:
        c = cohort_named(s, cohort)
        if c is None:
            raise UsageError(f"no cohort {cohort!r}")
        if not (c.teacher_dir and c.student_dir):
            raise UsageError(f"cohort {cohort!r} has no teacher and student: it runs no rounds")
        latest = latest_version(s, c.id)
        uploads = list(s.scalars(select(Upload).where(Upload.cohort_id == c.id).order_by(Upload.id)))
    assert latest is not None
    new = [u for u in uploads if u.round_version is None]
    if len(new) < min_new:
        raise NothingNew(f"cohort {cohort!r}: {len(new)} new uploads since the last round, "
                         f"{min_new} needed; nothing published")
    fmt = c.artifact_format
    mirror = mirror_path(data_dir, cohort, fmt)
    have = current_identity(open_artifact(mirror))[0] if mirror.exists() else None
    if have != latest.identity:  # a round died between advancing and publishing: start over
        say("re-seeding the mirror from the published version")
        seed_mirror(data_dir, cohort, blobs.path(latest.artifact_sha256), latest.identity, latest.number, fmt)
    work = data_dir / "rounds" / cohort / f"v{latest.number + 1}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    say(f"AKD from {len(uploads)} uploads ({len(new)} new)")
    bundles = [blobs.path(u.sha256) for u in uploads]
    if launcher:
        _launch_akd(launcher, c.teacher_dir, c.student_dir, bundles, work / "adapter", say)
    else:
        distill(c.teacher_dir, c.student_dir, bundles, work / "adapter", akd or AKDConfig())
    say("DWC against the mirror")
    key = load_private_key(c.sign_key) if c.sign_key else None
    rep = make_delta(mirror, work / "adapter", work / "delta.cdcd", target_base=c.student_dir, sign_key=key,
                     advance_mirror=True, expect_identity=latest.identity, progress=say)
    # make_delta checked that the advanced mirror has the delta's target identity
    delta_sha, delta_size = blobs.put_file(work / "delta.cdcd")
    art_sha, art_size = put_artifact(blobs, mirror)
    with sessions.begin() as s:
        s.add(Version(cohort_id=c.id, number=latest.number + 1, identity=rep.target_identity,
                      artifact_sha256=art_sha, artifact_size=art_size))
        s.add(Delta(cohort_id=c.id, from_version=latest.number, to_version=latest.number + 1,
                    sha256=delta_sha, size=delta_size))
        for u in new:
            s.get(Upload, u.id).round_version = latest.number + 1  # type: ignore[union-attr]
    shutil.rmtree(work, ignore_errors=True)
    sign_targets(data_dir, sessions, cohort)  # a crash before this: the next poll or update check signs
    return {"cohort": cohort, "version": latest.number + 1, "identity": rep.target_identity,
            "delta_sha256": delta_sha, "delta_bytes": delta_size, "uploads": len(uploads),
            "new_uploads": len(new), "probe_kl": rep.probe_kl, "signed": rep.signed}


def _launch_akd(launcher: str, teacher: str, student: str, bundles: list[Path], out: Path,
                say: Callable[[str], None]) -> None:
    import subprocess

    from cdcca_edge.cloud.service.jobs import launch_command
    from cdcca_edge.core.errors import ValidationError

    cmd = launch_command(launcher, teacher, student, bundles, out)
    say(f"AKD under `{launcher}`")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise UsageError(f"the AKD launcher `{launcher}` could not start ({exc}); install it or fix "
                         "--launcher") from None
    if proc.returncode != 0:
        raise ValidationError(f"the AKD launch `{launcher}` failed (exit {proc.returncode}): "
                              f"{proc.stderr.strip()[-800:]}; nothing published")
