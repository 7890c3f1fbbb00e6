"""Operator actions on a service's data directory (the CLI's `cloud cohort create` and
`cloud enroll-token` call these; the running service sees their rows at once)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from cdcca_edge.cloud.service.blobs import BlobStore
from cdcca_edge.cloud.service.store import (
    Cohort,
    Delta,
    EnrollToken,
    Version,
    cohort_named,
    database_url,
    latest_version,
    new_token,
    open_db,
    token_hash,
)
from cdcca_edge.cloud.service.tuf_repo import Target
from cdcca_edge.core.errors import CdccaError, UsageError

COHORT_NAME_MAX = 64


def create_cohort(data_dir: str | Path, name: str, artifact: str | Path, sign_key: str | Path,
                  root_key: str | Path, db_url: str | None = None, teacher: str | Path | None = None,
                  student: str | Path | None = None) -> dict:
    """A cohort whose version 0 is ``artifact`` (a GGUF file, as `cdcca-edge export`
    writes it from ``student``). With ``teacher`` and ``student`` (HF directories) the
    cohort runs rounds. ``sign_key`` (the online key: deltas and the TUF targets,
    snapshot and timestamp roles) and ``root_key`` (the TUF root role; needed again only to
    rotate keys) are Ed25519 PEM files, kept by path, never copied. Returns its
    description.

    ``artifact`` may also be an ONNX directory or a multimodal bundle: the service keeps
    and serves it packed (``core.pack``), and devices unpack it.

    Raises:
        UsageError: the name is taken or malformed, or ``artifact`` is no artefact.
    """
    from cdcca_edge.core.artifact import open_artifact
    from cdcca_edge.core.state import current_identity

    data_dir = Path(data_dir)
    if not name or len(name) > COHORT_NAME_MAX or not name.replace("-", "").replace("_", "").isalnum():
        raise UsageError(f"cohort name {name[:80]!r}: use 1-{COHORT_NAME_MAX} letters, digits, '-' or '_'")
    art = open_artifact(artifact)
    identity, _, _ = current_identity(art)
    data_dir.mkdir(parents=True, exist_ok=True)
    sessions = open_db(database_url(data_dir, db_url))
    with sessions() as s:
        if cohort_named(s, name) is not None:
            raise UsageError(f"cohort {name!r} exists; choose another name")
    for what, d in (("teacher", teacher), ("student", student)):
        if d is not None and not (Path(d) / "config.json").is_file():
            raise UsageError(f"--{what} {d}: not a Hugging Face model directory (no config.json)")
    if (teacher is None) != (student is None):
        raise UsageError("a cohort that runs rounds needs both --teacher and --student")
    from cdcca_edge.cloud.service.tuf_repo import CohortRepository, check_keys

    check_keys(root_key, sign_key)  # refuse a bad key now, not at the first round
    repo = CohortRepository(data_dir, name)
    if repo.dir.exists():
        raise UsageError(f"{repo.dir} exists (left by another cohort {name!r}?); move it away first")
    blobs = BlobStore(data_dir / "blobs")
    sha, size = put_artifact(blobs, art.root)
    seed_mirror(data_dir, name, blobs.path(sha), identity, 0, art.format)
    with sessions.begin() as s:
        cohort = Cohort(name=name, artifact_format=art.format,
                        teacher_dir=str(Path(teacher).resolve()) if teacher else None,
                        student_dir=str(Path(student).resolve()) if student else None,
                        sign_key=str(Path(sign_key).resolve()))
        s.add(cohort)
        s.flush()
        s.add(Version(cohort_id=cohort.id, number=0, identity=identity, artifact_sha256=sha, artifact_size=size))
        cohort_id = cohort.id
    with sessions() as s:
        repo.create(root_key, sign_key, cohort_targets(s, cohort_id))
    return {"cohort": name, "version": 0, "identity": identity, "artifact_sha256": sha, "bytes": size}


def cohort_targets(s: Session, cohort_id: int) -> list[Target]:
    """The cohort's TUF targets, from its rows: every version's artefact, every delta."""
    from cdcca_edge.cloud.service.tuf_repo import artifact_target, delta_target

    fmt = s.get(Cohort, cohort_id).artifact_format  # type: ignore[union-attr]
    versions = {v.number: v for v in s.scalars(select(Version).where(Version.cohort_id == cohort_id))}
    out = [Target(artifact_target(v.number, fmt), v.artifact_sha256, v.artifact_size,
                  {"kind": "artifact", "to_version": v.number, "to_identity": v.identity})
           for v in versions.values()]
    for d in s.scalars(select(Delta).where(Delta.cohort_id == cohort_id)):
        out.append(Target(delta_target(d.from_version, d.to_version), d.sha256, d.size,
                          {"kind": "delta", "from_version": d.from_version, "to_version": d.to_version,
                           "from_identity": versions[d.from_version].identity,
                           "to_identity": versions[d.to_version].identity}))
    return out


def sign_targets(data_dir: str | Path, sessions: sessionmaker[Session], cohort: str) -> bool:
    """Bring the cohort's TUF metadata up to its rows (after a version or a delta was
    published). Returns False when it was up to date."""
    from cdcca_edge.cloud.service.tuf_repo import CohortRepository

    with sessions() as s:
        c = cohort_named(s, cohort)
        if c is None or c.sign_key is None:
            raise UsageError(f"no cohort {cohort!r} with a signing key")
        cohort_id, key = c.id, c.sign_key

    def rows() -> list[Target]:
        with sessions() as s:
            return cohort_targets(s, cohort_id)

    return CohortRepository(data_dir, cohort).set_targets(key, rows)


def mirror_path(data_dir: str | Path, cohort: str, fmt: str = "gguf") -> Path:
    """The cloud's byte-exact copy of the cohort's latest published artefact: a GGUF
    file, or an ONNX or bundle directory (``fmt``: the cohort's artefact format)."""
    return Path(data_dir) / "mirrors" / cohort / ("model.gguf" if fmt == "gguf" else "model")


def put_artifact(blobs: BlobStore, artifact: Path) -> tuple[str, int]:
    """Store an artefact as one blob: a GGUF file as it is, a directory packed
    (``core.pack``). Returns (sha256, size)."""
    if not artifact.is_dir():
        return blobs.put_file(artifact)
    import tempfile

    from cdcca_edge.core.pack import pack_directory

    with tempfile.TemporaryDirectory(dir=blobs.root) as tmp:
        pack_directory(artifact, Path(tmp) / "artifact.tar")
        return blobs.put_file(Path(tmp) / "artifact.tar")


def unpacked_artifact(blob: Path, fmt: str, where: Path) -> Path:
    """A path that opens as the artefact stored in ``blob``: the blob itself for GGUF, a
    directory unpacked into ``where`` (a scratch directory) otherwise."""
    if fmt == "gguf":
        return blob
    from cdcca_edge.core.pack import unpack_directory

    unpack_directory(blob, where / "artifact", durable=False)
    return where / "artifact"


def seed_mirror(data_dir: str | Path, cohort: str, artifact: Path, identity: str, version: int,
                fmt: str = "gguf") -> Path:
    """(Re)make the mirror from a published artefact's blob: a copy (unpacked, for a
    directory format) with its state at ``version``, so that the next delta goes from
    that version.

    Raises:
        IntegrityError: the copy does not have ``identity``.
    """
    import shutil

    from cdcca_edge.core.artifact import open_artifact
    from cdcca_edge.core.state import record_export

    mirror = mirror_path(data_dir, cohort, fmt)
    mirror.parent.mkdir(parents=True, exist_ok=True)
    for side in mirror.parent.iterdir():
        shutil.rmtree(side) if side.is_dir() and not side.is_symlink() else side.unlink()
    tmp = mirror.with_name(f".{mirror.name}.tmp")
    if fmt == "gguf":
        shutil.copyfile(artifact, tmp)
    else:
        from cdcca_edge.core.pack import unpack_directory

        unpack_directory(artifact, tmp)
    tmp.rename(mirror)
    record_export(open_artifact(mirror), identity, version)  # checks the bytes give the identity
    return mirror


def enroll_token(data_dir: str | Path, cohort: str, uses: int = 1, db_url: str | None = None) -> str:
    """A new enrollment token for ``cohort``, good for ``uses`` devices (stored hashed;
    shown once).

    Raises:
        UsageError: no such cohort, or uses < 1.
    """
    if uses < 1:
        raise UsageError("--uses must be at least 1")
    if db_url is None and not (Path(data_dir) / "state.sqlite3").is_file():
        raise UsageError(f"{data_dir}: no service data here; create a cohort first "
                         "(`cdcca-edge cloud create-cohort NAME --artifact MODEL --data DIR`)")
    sessions = open_db(database_url(Path(data_dir), db_url))
    token = new_token()
    with sessions.begin() as s:
        c = cohort_named(s, cohort)
        if c is None:
            raise UsageError(f"no cohort {cohort!r}; create it with `cdcca-edge cloud create-cohort`")
        s.add(EnrollToken(cohort_id=c.id, token_hash=token_hash(token), uses_left=uses))
    return token


def revoke_device(data_dir: str | Path, device_id: str, db_url: str | None = None) -> None:
    """Revoke a device's token: every request with it is refused (401) from now on.

    Raises:
        UsageError: no such device.
    """
    from cdcca_edge.cloud.service.store import Device

    sessions = open_db(database_url(Path(data_dir), db_url))
    with sessions.begin() as s:
        dev = s.get(Device, device_id)
        if dev is None:
            raise UsageError(f"no device {device_id[:40]!r} in {data_dir}")
        dev.revoked = True


def publish(data_dir: str | Path, cohort: str, artifact: str | Path, db_url: str | None = None) -> dict:
    """Publish ``artifact`` (built elsewhere: same tensor layout) as the cohort's next
    version, with an exact delta from the latest (``delta diff``, signed with the cohort's
    key); the mirror is re-seeded from it. Returns what was published.

    Raises:
        UsageError: no such cohort, another layout, or the artefact is the latest already.
    """
    import fcntl

    data_dir = Path(data_dir)
    sessions = open_db(database_url(data_dir, db_url))
    with sessions() as s:
        if cohort_named(s, cohort) is None:
            raise UsageError(f"no cohort {cohort!r}")
    with open(data_dir / f"round-{cohort}.lock", "a") as lock:  # rounds and publishes take turns
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        return _publish_locked(data_dir, sessions, cohort, artifact)


def _publish_locked(data_dir: Path, sessions: sessionmaker[Session], cohort: str, artifact: str | Path) -> dict:
    import tempfile

    from cdcca_edge.core.artifact import compute_identity, open_artifact
    from cdcca_edge.core.delta_build import diff_artifacts
    from cdcca_edge.core.delta_format import load_private_key

    blobs = BlobStore(data_dir / "blobs")
    with sessions() as s:
        c = cohort_named(s, cohort)
        assert c is not None
        latest = latest_version(s, c.id)
    assert latest is not None
    art = open_artifact(artifact)
    if art.format != c.artifact_format:
        raise UsageError(f"{artifact} is a {art.format} artefact; cohort {cohort!r} serves {c.artifact_format}")
    identity = compute_identity(art).digest
    if identity == latest.identity:
        raise UsageError(f"{artifact} is the cohort's latest version already")
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        out = Path(tmp) / "delta.cdcd"
        base = unpacked_artifact(blobs.path(latest.artifact_sha256), c.artifact_format, Path(tmp))
        summary = diff_artifacts(base, art.root, out,
                                 sign_key=load_private_key(c.sign_key) if c.sign_key else None,
                                 from_version=latest.number, to_version=latest.number + 1)
        dsha, dsize = blobs.put_file(out)
    asha, asize = put_artifact(blobs, art.root)
    with sessions.begin() as s:
        s.add(Version(cohort_id=c.id, number=latest.number + 1, identity=summary.target_identity,
                      artifact_sha256=asha, artifact_size=asize))
        s.add(Delta(cohort_id=c.id, from_version=latest.number, to_version=latest.number + 1, sha256=dsha,
                    size=dsize))
    seed_mirror(data_dir, cohort, blobs.path(asha), summary.target_identity, latest.number + 1,
                c.artifact_format)
    sign_targets(data_dir, sessions, cohort)
    return {"cohort": cohort, "version": latest.number + 1, "identity": summary.target_identity,
            "delta_sha256": dsha, "delta_bytes": dsize}


def rotate_keys(data_dir: str | Path, cohort: str, root_key: str | Path, new_sign_key: str | Path | None = None,
                new_root_key: str | Path | None = None, db_url: str | None = None) -> dict:
    """Rotate a cohort's online key and/or root key. With a new online key: every
    published delta is re-signed with it (new blobs; the old ones stay for devices that
    fetched them) and the cohort's key path changes, in one transaction; then root
    metadata n+1 signed by the current root key (and the new one) names the new keys, and
    the online roles are re-signed. A crash between leaves the old, valid metadata served
    (the background loop will not sign with a key the root does not name); running the
    command again finishes it. Devices follow through TUF's root chain.

    Raises:
        UsageError: no such cohort, or ``root_key`` is not its root key.
    """
    import fcntl
    import tempfile

    from cdcca_edge.cloud.service.tuf_repo import CohortRepository, check_keys
    from cdcca_edge.core.delta_format import load_private_key, resign_delta

    data_dir = Path(data_dir)
    sessions = open_db(database_url(data_dir, db_url))
    with sessions() as s:
        c = cohort_named(s, cohort)
        if c is None:
            raise UsageError(f"no cohort {cohort!r}")
        cohort_id = c.id
    repo = CohortRepository(data_dir, cohort)
    if new_sign_key is not None:
        root_signer, _ = check_keys(root_key, new_sign_key)  # the new online key is no root key
        if new_root_key is not None:
            check_keys(new_root_key, new_sign_key)
        if root_signer.public_key.keyid not in repo.role_keyids("root"):
            raise UsageError("--root-key is not this cohort's root key; rotation needs the current root key")
        key = load_private_key(new_sign_key)
        blobs = BlobStore(data_dir / "blobs")
        with open(data_dir / f"round-{cohort}.lock", "a") as lock:  # no round publishes meanwhile
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            with sessions.begin() as s, tempfile.TemporaryDirectory(dir=data_dir) as tmp:
                for d in s.scalars(select(Delta).where(Delta.cohort_id == cohort_id)):
                    out = Path(tmp) / "resigned.cdcd"
                    resign_delta(blobs.path(d.sha256), out, key)
                    d.sha256, d.size = blobs.put_file(out)
                row = s.get(Cohort, cohort_id)
                assert row is not None
                row.sign_key = str(Path(new_sign_key).resolve())

    def rows() -> list[Target]:
        with sessions() as s:
            return cohort_targets(s, cohort_id)

    version = repo.rotate(root_key, new_sign_key, new_root_key, targets=rows)
    return {"cohort": cohort, "root_version": version, "online_key_rotated": new_sign_key is not None,
            "root_key_rotated": new_root_key is not None}


def refresh_metadata(data_dir: str | Path, sessions: sessionmaker[Session], force: bool = False) -> dict[str, list[str]]:
    """For every cohort: sign the targets its rows name but its metadata lacks (a crash
    between a commit and the signing), and re-sign online roles near expiry. Returns the
    roles re-signed per cohort."""
    from cdcca_edge.cloud.service.tuf_repo import CohortRepository

    with sessions() as s:
        cohorts = [(c.name, c.sign_key) for c in s.scalars(select(Cohort))]
    done: dict[str, list[str]] = {}
    failed = []
    for name, key in cohorts:
        repo = CohortRepository(data_dir, name)
        if key is None or not repo.exists():
            continue
        try:  # one cohort's missing key or half-done rotation must not starve the others
            roles = ["targets", "snapshot", "timestamp"] if sign_targets(data_dir, sessions, name) else []
            roles = roles or repo.refresh(key, force=force)
        except (CdccaError, OSError) as exc:
            failed.append(f"{name}: {exc}")
            continue
        if roles:
            done[name] = roles
    if failed:
        import sys

        print("cdcca-edge cloud: could not re-sign metadata of " + "; ".join(failed), file=sys.stderr, flush=True)
    return done
