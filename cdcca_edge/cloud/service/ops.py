"""Operator actions on a service's data directory (the CLI's `cloud cohort create` and
`cloud enroll-token` call these; the running service sees their rows at once)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from cdcca_edge.cloud.service.blobs import BlobStore
from cdcca_edge.cloud.service.store import Cohort, EnrollToken, Version, database_url, new_token, open_db, token_hash
from cdcca_edge.core.errors import UsageError

COHORT_NAME_MAX = 64


def create_cohort(data_dir: str | Path, name: str, artifact: str | Path, db_url: str | None = None) -> dict:
    """A cohort whose version 0 is ``artifact`` (a GGUF file, as `cdcca-edge export`
    writes it). Returns its description.

    Raises:
        UsageError: the name is taken or malformed, or the artefact is not a GGUF file
            (ONNX directories and bundles are served once the service packs directories).
    """
    from cdcca_edge.core.artifact import open_artifact
    from cdcca_edge.core.state import current_identity

    data_dir = Path(data_dir)
    if not name or len(name) > COHORT_NAME_MAX or not name.replace("-", "").replace("_", "").isalnum():
        raise UsageError(f"cohort name {name[:80]!r}: use 1-{COHORT_NAME_MAX} letters, digits, '-' or '_'")
    art = open_artifact(artifact)
    if art.format != "gguf":
        raise UsageError(f"{artifact}: the service serves GGUF artefacts so far; this is {art.format}")
    identity, _, _ = current_identity(art)
    data_dir.mkdir(parents=True, exist_ok=True)
    sessions = open_db(database_url(data_dir, db_url))
    with sessions() as s:
        if s.scalar(select(Cohort).where(Cohort.name == name)) is not None:
            raise UsageError(f"cohort {name!r} exists; choose another name")
    sha, size = BlobStore(data_dir / "blobs").put_file(art.path)
    with sessions.begin() as s:
        cohort = Cohort(name=name, artifact_format=art.format)
        s.add(cohort)
        s.flush()
        s.add(Version(cohort_id=cohort.id, number=0, identity=identity, artifact_sha256=sha, artifact_size=size))
    return {"cohort": name, "version": 0, "identity": identity, "artifact_sha256": sha, "bytes": size}


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
        c = s.scalar(select(Cohort).where(Cohort.name == cohort))
        if c is None:
            raise UsageError(f"no cohort {cohort!r}; create it with `cdcca-edge cloud cohort create`")
        s.add(EnrollToken(cohort_id=c.id, token_hash=token_hash(token), uses_left=uses))
    return token
