"""The device-side state kept next to an artefact: its identity, version and history.

Computing an artefact's identity reads every tensor byte (about a second for 500 MB).
A patch must know the identity of the model it changes, so the last known identity is
kept in a small JSON sidecar together with a fingerprint (size, mtime, inode) of each
file. While the fingerprints match, the recorded identity is trusted; otherwise it is
recomputed. Writing the sidecar is the commit point of a patch (docs/formats/delta.md,
"Applying"). Spec: docs/formats/delta.md, "Device state".
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdcca_edge.core.artifact import (
    MANIFEST_NAME,
    ONNX_MODEL_NAME,
    Artifact,
    TensorInfo,
    compute_identity,
)

STATE_FORMAT = "cdcca-state"
STATE_VERSION = 1
HISTORY_KEEP = 20  # most recent applied deltas remembered


@dataclass
class ArtifactState:
    identity: str
    version: int = 0
    files: dict[str, dict[str, int]] = field(default_factory=dict)  # key -> fingerprint
    history: list[dict[str, Any]] = field(default_factory=list)
    # the artefact's tensor table, so that a patch need not parse a large header again
    layout: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "identity": self.identity,
            "artifact_version": self.version,
            "files": self.files,
            "history": self.history[-HISTORY_KEEP:],
            "layout": self.layout,
        }


def state_path_for(path: str | Path) -> Path:
    """``model.gguf.cdcca-state.json`` beside a GGUF file; ``cdcca-state.json`` inside an
    ONNX or bundle directory (given as the directory, its model.onnx or its manifest)."""
    path = Path(path)
    if path.is_dir():
        return path / "cdcca-state.json"
    if path.suffix == ".onnx" or path.name == MANIFEST_NAME:
        return path.parent / "cdcca-state.json"
    return path.with_name(path.name + ".cdcca-state.json")


def state_path(artifact: Artifact) -> Path:
    return state_path_for(artifact.path if artifact.format == "gguf" else artifact.root)


def fingerprint(path: Path) -> dict[str, int]:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def read_state(artifact: Artifact | Path) -> ArtifactState | None:
    """The sidecar, or ``None`` if it is missing or unreadable (never an error: the state
    is a cache of facts that can be recomputed)."""
    try:
        where = state_path(artifact) if isinstance(artifact, Artifact) else state_path_for(artifact)
        doc = json.loads(where.read_text())
        if doc.get("format") != STATE_FORMAT or doc.get("version") != STATE_VERSION:
            return None
        return ArtifactState(
            identity=str(doc["identity"]),
            version=int(doc.get("artifact_version", 0)),
            files={str(k): {kk: int(vv) for kk, vv in v.items()} for k, v in doc["files"].items()},
            history=list(doc.get("history", [])),
            layout=doc.get("layout"),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def cached_artifact(path: str | Path) -> tuple[Artifact, ArtifactState] | None:
    """The artefact at ``path`` rebuilt from its sidecar's tensor table, if the sidecar is
    current (every file's fingerprint matches); else None. Saves parsing a GGUF header
    with a 100k-token vocabulary on every patch."""
    path = Path(path)
    state = read_state(path)
    if state is None or not state.layout:
        return None
    try:
        lay = state.layout
        root = path if lay["format"] == "gguf" else (path if path.is_dir() else path.parent)
        def file(key: str) -> Path:
            return root if lay["format"] == "gguf" else (root / key).resolve()
        tensors = [
            TensorInfo(str(n), str(t), tuple(int(d) for d in shape), file(str(k)), int(o), int(b))
            for n, t, shape, k, o, b in lay["tensors"]
        ]
        main = {"gguf": None, "onnx": ONNX_MODEL_NAME, "bundle": MANIFEST_NAME}[lay["format"]]
        art = Artifact(
            path=root if main is None else (root / main).resolve(),
            format=lay["format"], tensors=tensors, metadata=dict(lay.get("metadata", {})),
        )
    except (KeyError, TypeError, ValueError):
        return None
    if not state_is_current(art, state):
        return None
    return art, state


def state_is_current(artifact: Artifact, state: ArtifactState) -> bool:
    """Do the recorded fingerprints still match every file of the artefact?"""
    keys = {artifact.file_key(f): f for f in artifact.files}
    if set(keys) != set(state.files):
        return False
    return all(fingerprint(path) == state.files[key] for key, path in keys.items())


def current_identity(artifact: Artifact, state: ArtifactState | None = None
                     ) -> tuple[str, ArtifactState | None, bool]:
    """(identity, state, trusted): the recorded identity if the sidecar is current, else a
    freshly computed one (``trusted`` False). ``state``: the sidecar if already read."""
    state = state or read_state(artifact)
    if state is not None and state_is_current(artifact, state):
        return state.identity, state, True
    return compute_identity(artifact).digest, state, False


def write_state(artifact: Artifact, state: ArtifactState) -> None:
    """Atomically replace the sidecar (write, fsync, rename, fsync the directory)."""
    state.files = {artifact.file_key(f): fingerprint(f) for f in artifact.files}
    state.layout = {
        "format": artifact.format,
        "metadata": artifact.metadata,
        "tensors": [[t.name, t.type_name, list(t.shape), artifact.file_key(t.file), t.offset, t.nbytes]
                    for t in artifact.tensors],
    }
    path = state_path(artifact)
    fd, tmp = tempfile.mkstemp(prefix=".cdcca-state.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(state.to_json(), f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def record_export(artifact: Artifact, identity: str) -> None:
    """Start a freshly exported artefact's state at version 0."""
    write_state(artifact, ArtifactState(identity=identity, version=0, history=[
        {"event": "export", "identity": identity, "time": _now()}
    ]))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
