"""The device-side state kept next to an artefact: its identity, version and history.

Computing an artefact's identity reads every tensor byte (about a second for 500 MB).
A patch must know the identity of the model it changes, so the last known identity is
kept in a small JSON sidecar together with a fingerprint (size, mtime, ctime, inode) of
each file, the tensor table and each tensor's digest. The sidecar carries a digest over
its own content; while that digest and the fingerprints match, the recorded identity is
trusted, otherwise it is re-derived from the bytes. Writing the sidecar is the commit
point of a patch (docs/formats/delta.md, "Applying"). Spec: docs/formats/delta.md,
section 8.

Beside it, a binary leaf cache holds every tensor's 4 KiB leaf digests (artifact.md,
section 2), so that a patch re-hashes only the chunks it wrote. The cache is not trusted:
each tensor's leaves are checked against the sidecar's digest of that tensor before use,
and re-derived from the bytes when they do not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdcca_edge.core.fileio import atomic_file
from cdcca_edge.core.artifact import (
    ID_CHUNK,
    MANIFEST_NAME,
    ONNX_MODEL_NAME,
    Artifact,
    TensorInfo,
    chunk_count,
    compute_identity,
    digest_from_chunks,
    identity_digest,
    tensor_chunks,
)

STATE_FORMAT = "cdcca-state"
STATE_VERSION = 3  # 3: identity scheme v2 (Merkle tensor digests) and the leaf cache
MIGRATES_FROM = (2,)  # older sidecars whose version and history are carried over
LEAVES_MAGIC = b"CDCLEAF1"
# magic, leaf size, tensor count, layout digest (raw), reserved
LEAVES_HEADER = struct.Struct("<8sII32s16x")
HISTORY_KEEP = 20  # most recent applied deltas remembered


@dataclass
class ArtifactState:
    identity: str
    version: int = 0
    files: dict[str, dict[str, int]] = field(default_factory=dict)  # key -> fingerprint
    history: list[dict[str, Any]] = field(default_factory=list)
    # the artefact's tensor table, so that a patch need not parse a large header again
    layout: dict[str, Any] | None = None
    tensor_digests: dict[str, str] = field(default_factory=dict)  # name -> tensor digest hex
    # not stored in the sidecar: leaf digests known to be right (checked against
    # tensor_digests, or computed from the bytes), and where the state came from
    leaves: dict[str, bytearray] = field(default_factory=dict, repr=False)
    migrated_from: int | None = None
    legacy_identity: str | None = None  # an older sidecar's identity, in its own scheme

    def to_json(self) -> dict[str, Any]:
        doc = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "identity": self.identity,
            "artifact_version": self.version,
            "files": self.files,
            "history": self.history[-HISTORY_KEEP:],
            "layout": self.layout,
            "tensor_digests": self.tensor_digests,
        }
        doc["digest"] = _content_digest(doc)
        return doc


def _content_digest(doc: dict[str, Any]) -> str:
    """SHA-256 over the sidecar's canonical JSON without its ``digest`` key."""
    body = {k: v for k, v in doc.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def layout_digest(artifact: Artifact) -> str:
    """SHA-256 over the tensor table (name, type, shape, file key, offset, bytes), sorted
    by name: binds a journal or a sidecar to exactly this layout of the files."""
    h = hashlib.sha256(b"cdcca-layout-v1\n")
    for t in sorted(artifact.tensors, key=lambda t: t.name):
        dims = ",".join(str(d) for d in t.shape)
        h.update(f"{t.name}\0{t.type_name}\0{dims}\0{artifact.file_key(t.file)}\0{t.offset}\0"
                 f"{t.nbytes}\n".encode())
    return h.hexdigest()


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
    """Size, mtime, ctime and inode of a data file: ctime cannot be set by ``touch``, so
    a file rewritten and re-dated by hand does not pass for the one recorded."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "ino": st.st_ino}


MAX_STATE_BYTES = 256 << 20  # a sidecar larger than this is not ours


def read_state(artifact: Artifact | Path) -> ArtifactState | None:
    """The sidecar, or ``None`` if it is missing, unreadable, of another version, or its
    content digest does not verify (never an error: the state is a cache of facts that
    can be re-derived from the bytes). A sidecar of an older version (MIGRATES_FROM)
    comes back with its version and history but no identity (``migrated_from`` set)."""
    try:
        where = state_path(artifact) if isinstance(artifact, Artifact) else state_path_for(artifact)
        st = os.stat(where)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_STATE_BYTES:
            return None
        doc = json.loads(where.read_text())
        if doc.get("format") != STATE_FORMAT or doc.get("version") not in (STATE_VERSION, *MIGRATES_FROM):
            return None
        if doc.get("digest") != _content_digest(doc):
            return None  # edited or corrupt: re-derive
        old = doc["version"] != STATE_VERSION
        # an older sidecar's identity is of an older scheme: only its version and history
        # carry over, the identity is re-derived once (current_identity)
        digests = {} if old else (doc.get("tensor_digests") or {})
        return ArtifactState(
            migrated_from=int(doc["version"]) if old else None,
            legacy_identity=str(doc["identity"]) if old else None,
            identity="" if old else str(doc["identity"]),
            version=int(doc.get("artifact_version", 0)),
            files={str(k): {kk: int(vv) for kk, vv in v.items()} for k, v in doc["files"].items()},
            history=list(doc.get("history", [])),
            layout=doc.get("layout"),
            tensor_digests={str(k): str(v) for k, v in digests.items()},
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError):
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
        root = root.resolve()

        def file(key: str) -> Path:
            if lay["format"] == "gguf":
                return root
            f = (root / key).resolve()
            if root not in f.parents:  # "../x": never follow a cached key out of the artefact
                raise ValueError(key)
            return f
        tensors = [
            TensorInfo(str(n), str(t), tuple(int(d) for d in shape), file(str(k)), int(o), int(b))
            for n, t, shape, k, o, b in lay["tensors"]
        ]
        main = {"gguf": None, "onnx": ONNX_MODEL_NAME, "bundle": MANIFEST_NAME}[lay["format"]]
        art = Artifact(
            path=root if main is None else (root / main).resolve(),
            format=lay["format"], tensors=tensors, metadata=dict(lay.get("metadata", {})),
        )
    except (KeyError, TypeError, ValueError, OSError):
        return None
    if not state_is_current(art, state) or layout_digest(art) != state.layout.get("digest"):
        return None
    return art, state


def state_is_current(artifact: Artifact, state: ArtifactState) -> bool:
    """Do the recorded fingerprints still match every file of the artefact?"""
    keys = {artifact.file_key(f): f for f in artifact.files}
    if set(keys) != set(state.files):
        return False
    try:
        return all(fingerprint(path) == state.files[key] for key, path in keys.items())
    except OSError:
        return False


def current_identity(artifact: Artifact, state: ArtifactState | None = None
                     ) -> tuple[str, ArtifactState | None, bool]:
    """(identity, state, trusted): the recorded identity if the sidecar is current, else a
    freshly computed one (``trusted`` False; the state's per-tensor digests are then
    replaced by the computed ones). ``state``: the sidecar if already read."""
    state = state or read_state(artifact)
    if state is not None and state_is_current(artifact, state) and _digests_complete(artifact, state):
        return state.identity, state, True
    ident = compute_identity(artifact)
    if state is not None:
        if state.migrated_from is not None and state_is_current(artifact, state):
            state.identity = ident.digest  # same bytes as when the old sidecar was written
        if state.identity != ident.digest:
            state = None  # the state describes other bytes: its version means nothing here
        else:
            state.tensor_digests = dict(ident.tensors)
    if state is None:
        state = ArtifactState(identity=ident.digest, version=-1, tensor_digests=dict(ident.tensors))
    state.leaves = {k: bytearray(v) for k, v in ident.chunks.items()}
    return ident.digest, state, False


def _digests_complete(artifact: Artifact, state: ArtifactState) -> bool:
    """Does the state hold a digest for every tensor, combining to its identity?"""
    d = state.tensor_digests
    if set(d) != {t.name for t in artifact.tensors}:
        return False
    return identity_digest((t.name, t.type_name, t.shape, d[t.name]) for t in artifact.tensors) == state.identity


def temp_prefix(path: Path) -> str:
    """The name prefix of ``path``'s temporary files (``.NAME.``): it names the model, so
    tidying up after one model never touches another's in the same directory."""
    return f".{path.name}."


def leaves_path(artifact: Artifact) -> Path:
    """The leaf cache beside the sidecar: ``model.gguf.cdcca-state.leaves``, or
    ``cdcca-state.leaves`` inside a directory artefact."""
    p = state_path(artifact)
    return p.with_name(p.name.removesuffix(".json") + ".leaves")


def _leaf_table(artifact: Artifact) -> tuple[dict[str, tuple[int, int]], int]:
    """name -> (byte offset, byte length) of its leaves in the cache (tensors sorted by
    name, after the header), and the cache's total size."""
    table, pos = {}, LEAVES_HEADER.size
    for t in sorted(artifact.tensors, key=lambda t: t.name):
        n = 32 * chunk_count(t.nbytes)
        table[t.name] = (pos, n)
        pos += n
    return table, pos


def _open_leaf_cache(artifact: Artifact, write: bool = False) -> int | None:
    """A descriptor on the leaf cache if its header and size fit this layout, else None."""
    try:
        fd = os.open(leaves_path(artifact),
                     (os.O_RDWR if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        head = os.pread(fd, LEAVES_HEADER.size, 0)
        if stat.S_ISREG(st.st_mode) and len(head) == LEAVES_HEADER.size:
            magic, size, count, lay = LEAVES_HEADER.unpack(head)
            if (magic == LEAVES_MAGIC and size == ID_CHUNK and count == len(artifact.tensors)
                    and lay.hex() == layout_digest(artifact) and st.st_size == _leaf_table(artifact)[1]):
                return fd
    except OSError:
        pass
    os.close(fd)
    return None


def load_leaves(artifact: Artifact, state: ArtifactState, names: set[str] | list[str]) -> None:
    """Make ``state.leaves`` hold the leaf digests of the named tensors, the cache read
    only (as :class:`LeafCache` reads it: verified rows, else computed from the bytes)."""
    cache = LeafCache(artifact, state, write=False)
    try:
        for name in names:
            if name not in state.leaves:
                state.leaves[name] = cache.get(name)[0]
    finally:
        cache.close()


class LeafCache:
    """The leaf cache of one artefact, open while a patch re-hashes it: a tensor's leaves
    come from the cache where they give the sidecar's digest of the tensor (else from
    ``state.leaves``, else from the bytes), and go back in place one tensor at a time, so
    memory holds the leaves of the tensors being hashed, not of the model. When the cache
    is missing or does not fit the layout, the new leaves stay in ``state.leaves`` for
    :func:`write_leaves` to write a whole new cache after the patch."""

    def __init__(self, artifact: Artifact, state: ArtifactState, write: bool = True) -> None:
        self.artifact, self.state = artifact, state
        self.table = _leaf_table(artifact)[0]
        self.fd = _open_leaf_cache(artifact, write=write)

    def get(self, name: str) -> tuple[bytearray, bool]:
        """(leaves, computed from the bytes?) of tensor ``name``."""
        if name in self.state.leaves:
            return self.state.leaves[name], False
        t = self.artifact.tensor(name)
        if self.fd is not None:
            pos, n = self.table[name]
            raw = os.pread(self.fd, n, pos)
            if len(raw) == n and digest_from_chunks(t.nbytes, raw) == self.state.tensor_digests.get(name):
                return bytearray(raw), False
        return bytearray(tensor_chunks(t)), True

    def put(self, name: str, leaves: bytearray) -> None:
        """Store a tensor's new leaves: in place in the cache; in ``state.leaves`` too
        when there is no usable cache, or when every tensor's leaves are in memory (a
        cold start, whose whole cache is written from them)."""
        if self.fd is None or name in self.state.leaves:
            self.state.leaves[name] = leaves
        if self.fd is not None:
            try:
                os.pwrite(self.fd, leaves, self.table[name][0])
            except OSError:  # only a cache: a stale row fails its check next time
                pass

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def write_leaves(artifact: Artifact, state: ArtifactState) -> int:
    """Write a whole new leaf cache (temporary file, then rename; no fsync: a torn or
    stale cache only fails its check and is re-derived). Leaves not in ``state.leaves``
    are read from the bytes, one tensor at a time. Returns the model bytes that took.

    Something other than a regular file at the cache's path (a directory, say) is left
    alone, and nothing is hashed: patches then work without a cache."""
    table, _ = _leaf_table(artifact)
    path = leaves_path(artifact)
    if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
        return 0
    hashed = 0
    with atomic_file(path, durable=False, mode=0o644, prefix=temp_prefix(path)) as f:
        f.write(LEAVES_HEADER.pack(LEAVES_MAGIC, ID_CHUNK, len(artifact.tensors),
                                   bytes.fromhex(layout_digest(artifact))))
        for name in table:
            leaves = state.leaves.get(name)
            if leaves is None:
                t = artifact.tensor(name)
                leaves, hashed = tensor_chunks(t), hashed + t.nbytes
            f.write(leaves)
    return hashed


def write_state(artifact: Artifact, state: ArtifactState) -> None:
    """Atomically replace the sidecar (write, fsync, rename, fsync the directory)."""
    state.files = {artifact.file_key(f): fingerprint(f) for f in artifact.files}
    state.layout = {
        "format": artifact.format,
        "metadata": artifact.metadata,
        "tensors": [[t.name, t.type_name, list(t.shape), artifact.file_key(t.file), t.offset, t.nbytes]
                    for t in artifact.tensors],
        "digest": layout_digest(artifact),
    }
    path = state_path(artifact)
    with atomic_file(path, mode=0o644, prefix=temp_prefix(path)) as f:
        f.write((json.dumps(state.to_json(), indent=1) + "\n").encode())


def record_export(artifact: Artifact, identity: str, version: int = 0) -> None:
    """Start an artefact's state afresh at ``version`` (0 for a fresh export; -1 for
    unknown), with the per-tensor digests later patches update (read from the written
    bytes, so they must give ``identity``).

    Raises:
        IntegrityError: the bytes on disk do not have the identity the exporter computed.
    """
    from cdcca_edge.core.errors import IntegrityError

    ident = compute_identity(artifact)
    if ident.digest != identity:
        raise IntegrityError(f"{artifact.path}: the written artefact's identity {ident.digest[:16]} "
                             f"differs from the exporter's {identity[:16]}; export again")
    state = ArtifactState(identity=identity, version=version, history=[
        {"event": "export", "identity": identity, "time": _now()}
    ], tensor_digests=dict(ident.tensors), leaves={k: bytearray(v) for k, v in ident.chunks.items()})
    write_state(artifact, state)
    write_leaves(artifact, state)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
