"""Device artefacts: one GGUF file or one ONNX model with external data.

An artefact is seen as a list of tensors, each a contiguous byte region of a file. That is
the view every device-side operation needs (identity, inspect, and later in-place
patching), and it is the same for both formats. Bytes are read through memory maps, never
copied whole. Spec: docs/formats/artifact.md.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from cdcca_edge.core.ggml import GGUF_MAGIC

from cdcca_edge.core.errors import FormatError, IntegrityError, MissingTensorError
from cdcca_edge.core.bundle import MANIFEST_NAME, read_manifest
from cdcca_edge.core.fileio import entry_inside, open_regular, short_repr
from cdcca_edge.core.gguf_file import read_gguf_header
from cdcca_edge.core.onnx_proto import ONNX_DTYPES, read_onnx_model

ArtifactFormat = Literal["gguf", "onnx", "bundle"]

# Provenance metadata keys, written by the exporters into GGUF key/values and ONNX
# metadata_props alike (docs/formats/artifact.md, "Provenance").
META_PREFIX = "cdcca."
META_VERSION = "cdcca.version"  # cdcca-edge version that exported the artefact
META_SOURCE_DIGEST = "cdcca.source_digest"  # digest of the HF weights (+ adapter) exported
META_QUANT = "cdcca.quant"  # quant type requested at export (f32, f16, q8_0, q4_0)
META_ARCH = "cdcca.arch"  # HF architecture family (llama, qwen2)
META_EXPORT_IDENTITY = "cdcca.export_identity"  # identity right after export
META_LORA_BASE = "cdcca.lora_base_source_digest"  # LoRA GGUF: the source digest of the base it was made for
META_TRANSPOSED = "cdcca.transposed"  # ONNX: JSON list of initializers stored as W^T (in, out)

ONNX_MODEL_NAME = "model.onnx"
ONNX_DATA_NAME = "model.onnx_data"
IDENTITY_SCHEME = "cdcca-id-v2"  # v2: tensor digests are Merkle roots over ID_CHUNK chunks
ID_CHUNK = 4096  # bytes per leaf of a tensor digest (artifact.md section 2): the unit a patch re-hashes
TENSOR_DIGEST_PREFIX = b"cdcca-tensor-v2\0"
HASH_CHUNK = 8 << 20  # bytes hashed per step: bounded memory whatever the tensor size
REHASH_WINDOW = 1 << 20  # bytes read at once to re-hash touched leaves (one buffer per thread)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's bytes in an artefact.

    ``shape`` is in C (row-major, numpy) order, outermost first, for both formats: GGUF
    stores dims innermost first, so they are reversed here. ``offset`` is absolute in
    ``file``.
    """

    name: str
    type_name: str  # "F32", "F16", "BF16", "Q8_0", "Q4_0", ... (GGML names; ONNX mapped)
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class Artifact:
    """An opened artefact: its format, files, tensors and provenance metadata."""

    path: Path
    format: ArtifactFormat
    tensors: list[TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        """The GGUF file, or the ONNX model's / bundle's directory: what file keys are
        relative to."""
        return self.path if self.format == "gguf" else self.path.parent

    def file_key(self, file: Path) -> str:
        """How records and state name one of this artefact's files: ``""`` for a GGUF
        file itself, the path relative to the directory for an ONNX artefact."""
        if self.format == "gguf":
            return ""
        return file.relative_to(self.root).as_posix()

    def file_for_key(self, key: str) -> Path:
        """Inverse of :meth:`file_key`, restricted to this artefact's own data files.

        Raises:
            MissingTensorError: no data file of the artefact has this key.
        """
        for f in self.files:
            if self.file_key(f) == key:
                return f
        raise MissingTensorError(f"{self.path}: no data file {key!r} in this artefact")

    @property
    def files(self) -> list[Path]:
        seen: dict[Path, None] = {}
        for t in self.tensors:
            seen.setdefault(t.file, None)
        return list(seen)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def tensor(self, name: str) -> TensorInfo:
        """The tensor called ``name``.

        Raises:
            MissingTensorError: the artefact has no such tensor.
        """
        for t in self.tensors:
            if t.name == name:
                return t
        raise MissingTensorError(f"{self.path}: no tensor named {name!r}")


# --- opening --------------------------------------------------------------------------


def open_artifact(path: str | Path) -> Artifact:
    """Open a GGUF file, an ONNX directory or a ``model.onnx`` path, read-only.

    ``path`` itself may be a symbolic link; the files an artefact names (ONNX external
    data, bundle parts) may not (docs/formats/artifact.md, section 1.1).

    Raises:
        FileNotFoundError: nothing at ``path``.
        FormatError: the file(s) are not a well-formed artefact of either format, or
            ``path`` is a FIFO, device or socket.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            return _open_bundle(path / MANIFEST_NAME)
        if (path / ONNX_MODEL_NAME).is_file():
            return _open_onnx(path / ONNX_MODEL_NAME)
        raise FormatError(
            f"{path}: directory has no {ONNX_MODEL_NAME} or {MANIFEST_NAME}; pass a .gguf "
            "file, an ONNX export directory, a bundle directory, or the .onnx file itself"
        )
    expected = "a .gguf file, an ONNX model or a bundle manifest"
    with open_regular(path, expected) as f:  # a FIFO would block a plain open()
        magic = f.read(4)
    if path.name == MANIFEST_NAME:
        return _open_bundle(path)
    if len(magic) == 4 and int.from_bytes(magic, "little") == GGUF_MAGIC:
        return _open_gguf(path)
    if path.suffix == ".onnx":
        return _open_onnx(path)
    raise FormatError(
        f"{path}: neither a GGUF file (first bytes {magic!r}, expected b'GGUF') nor an .onnx model"
    )


def _open_gguf(path: Path) -> Artifact:
    header = read_gguf_header(path)
    tensors = [
        TensorInfo(e.name, e.ggml_type.name, tuple(reversed(e.ne)), path, e.offset, e.nbytes)
        for e in header.tensors
    ]
    metadata = {
        k: v for k, v in header.kv.items()
        if isinstance(v, str) and (k.startswith(META_PREFIX) or k == "general.architecture")
    }
    return Artifact(path=path, format="gguf", tensors=tensors, metadata=metadata)


def _open_onnx(model_path: Path) -> Artifact:
    info = read_onnx_model(model_path)
    model_path = model_path.resolve()
    base = model_path.parent
    tensors = []
    sizes: dict[Path, int] = {}
    located: dict[str, tuple[Path, os.stat_result | None]] = {}
    for init in info.initializers:
        if init.typed_data:
            raise FormatError(
                f"{model_path}: initializer {init.name!r} keeps its values in typed fields; "
                "re-export with the weights in an external data file"
            )
        if init.data_type not in ONNX_DTYPES:
            raise FormatError(f"{model_path}: initializer {init.name!r} has unsupported "
                              f"data type {init.data_type}")
        n = 1
        for d in init.dims:
            n *= d
        nbytes = n * ONNX_DTYPES[init.data_type][1]
        if init.location is None:
            file = model_path
        else:
            if init.location not in located:  # hundreds of initializers share one file
                located[init.location] = entry_inside(
                    base, init.location,
                    f"{model_path}: initializer {init.name!r} external data location",
                    "the model directory")
            file, st = located[init.location]
            if file == model_path:
                raise FormatError(f"{model_path}: initializer {init.name!r} claims the model "
                                  "file itself as its external data")
            if file not in sizes:
                shown = short_repr(init.location)
                if st is None:
                    raise FormatError(f"{model_path}: external data file {shown} is missing; "
                                      "keep it next to the model")
                if not stat.S_ISREG(st.st_mode):
                    raise FormatError(f"{model_path}: external data file {shown} is not a "
                                      "regular file")
                sizes[file] = st.st_size
        if init.length >= 0 and init.length != nbytes:
            raise FormatError(f"{model_path}: initializer {init.name!r} length {init.length} "
                              f"!= {nbytes} bytes implied by its shape {init.dims}")
        if file not in sizes:  # the model file itself: inline raw_data
            sizes[file] = model_path.stat().st_size
        if init.offset + nbytes > sizes[file]:
            raise FormatError(f"{model_path}: initializer {init.name!r} runs past the end of "
                              f"{file.name}")
        tensors.append(TensorInfo(init.name, init.type_name, init.dims, file, init.offset, nbytes))
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise FormatError(f"{model_path}: duplicate initializer names")
    for f in sizes:
        _check_no_overlap(f, [t for t in tensors if t.file == f])
    metadata = {k: v for k, v in info.metadata.items() if k.startswith(META_PREFIX)}
    return Artifact(path=model_path, format="onnx", tensors=tensors, metadata=metadata)


def _open_bundle(manifest: Path) -> Artifact:
    """A bundle: each part opened on its own, tensors renamed ``<part>/<tensor>``."""
    m = read_manifest(manifest)
    tensors: list[TensorInfo] = []
    metadata: dict[str, str] = {}
    for name, target in m.parts.items():
        sub = open_artifact(target)
        for t in sub.tensors:
            file = t.file.resolve()
            if m.root not in file.parents:  # e.g. a part's model.onnx linked from elsewhere
                raise FormatError(f"{m.path}: part {name!r} keeps tensor {t.name!r} in {file}, "
                                  "outside the bundle")
            tensors.append(TensorInfo(f"{name}/{t.name}", t.type_name, t.shape, file,
                                      t.offset, t.nbytes))
        metadata.update({f"{name}/{k}": v for k, v in sub.metadata.items()})
    metadata.update({k: v for k, v in m.provenance.items() if k.startswith(META_PREFIX)})
    by_file: dict[Path, list[TensorInfo]] = {}
    for t in tensors:
        by_file.setdefault(t.file, []).append(t)
    for f, ts in by_file.items():
        _check_no_overlap(f, ts)  # two parts must not share a data file's bytes
    return Artifact(path=m.path, format="bundle", tensors=tensors, metadata=metadata)


def _check_no_overlap(path: Path, tensors: list[TensorInfo]) -> None:
    # Overlapping regions would make an in-place write to one tensor corrupt another.
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors if t.nbytes)
    for (s0, e0, n0), (s1, _e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise FormatError(f"{path}: tensors {n0!r} and {n1!r} overlap")


# --- identity -------------------------------------------------------------------------


def iter_tensor_bytes(t: TensorInfo, chunk: int = HASH_CHUNK) -> Iterator[memoryview]:
    """Yield ``t``'s bytes in chunks of at most ``chunk`` bytes, read into one reused
    buffer (not a memory map: reading a hole of a sparse file through a map allocates it
    on some file systems, tmpfs among them, and a fault there on a full disk is a SIGBUS).

    Each chunk is overwritten when the next is requested: copy it to keep it.
    """
    if t.nbytes == 0:
        return
    buf = bytearray(min(chunk, t.nbytes))
    view = memoryview(buf)
    try:
        with open(t.file, "rb", buffering=0) as f:
            if f.seek(0, 2) < t.offset + t.nbytes:
                raise IntegrityError(f"{t.file}: tensor {t.name!r} is cut short; the file changed "
                                     "after it was opened")
            f.seek(t.offset)
            left = t.nbytes
            while left:
                n = f.readinto(view[: min(chunk, left)])
                if not n:
                    raise IntegrityError(f"{t.file}: tensor {t.name!r} is cut short; the "
                                         "file changed after it was opened")
                yield view[:n]
                left -= n
    finally:
        view.release()


def read_tensor(t: TensorInfo) -> bytes:
    """All of ``t``'s bytes (checked as :func:`iter_tensor_bytes` checks them)."""
    return b"".join(bytes(p) for p in iter_tensor_bytes(t))


def chunk_count(nbytes: int) -> int:
    """Leaves of a tensor digest: ``ceil(nbytes / ID_CHUNK)``."""
    return -(-nbytes // ID_CHUNK)


def hash_chunks(data: bytes | bytearray | memoryview) -> bytes:
    """SHA-256 of each ``ID_CHUNK`` piece of ``data`` (the last may be shorter),
    concatenated: 32 bytes per leaf."""
    view = memoryview(data).cast("B")
    sha = hashlib.sha256
    try:
        return b"".join([sha(view[i : i + ID_CHUNK]).digest() for i in range(0, len(view), ID_CHUNK)])
    finally:
        view.release()


def digest_from_chunks(nbytes: int, leaves: bytes | bytearray | memoryview) -> str:
    """A tensor digest from its leaf digests (artifact.md section 2): SHA-256 over a prefix, the
    tensor's byte count and the leaves in order. Hex."""
    if len(leaves) != 32 * chunk_count(nbytes):
        raise ValueError(f"{len(leaves)} bytes of leaf digests for a {nbytes}-byte tensor")
    return hashlib.sha256(TENSOR_DIGEST_PREFIX + nbytes.to_bytes(8, "little") + bytes(leaves)).hexdigest()


def bytes_digest(data: Any) -> str:
    """The tensor digest of in-memory bytes (an array is taken as its C-order bytes)."""
    if hasattr(data, "tobytes") and not isinstance(data, (bytes, bytearray, memoryview)):
        import numpy as np

        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    view = memoryview(data).cast("B")
    return digest_from_chunks(len(view), hash_chunks(view))


def tensor_chunks(t: TensorInfo) -> bytes:
    """The leaf digests of one tensor as it is on disk now (HASH_CHUNK is a multiple of
    ID_CHUNK, so every read holds whole leaves)."""
    return b"".join(hash_chunks(part) for part in iter_tensor_bytes(t))


def tensor_digest(t: TensorInfo) -> str:
    """One tensor's digest (a Merkle root over its 4 KiB chunks), hex."""
    return digest_from_chunks(t.nbytes, tensor_chunks(t))


def rehash_chunks(t: TensorInfo, leaves: bytearray, touched: Any,
                  splice: list[tuple[int, bytes]] | None = None) -> None:
    """Recompute, in ``leaves``, the leaf digests of the chunks of ``t`` flagged in the
    boolean vector ``touched``, from the file's bytes with ``splice`` (absolute offset,
    new bytes; sorted, within ``t``) written over them first. Reads only those chunks.

    Raises:
        IntegrityError: the file ends inside the tensor.
    """
    import numpy as np

    idx = np.flatnonzero(touched)
    if not len(idx):
        return
    out = np.frombuffer(leaves, np.uint8).reshape(-1, 32)  # a view: writes go to ``leaves``
    per_read = REHASH_WINDOW // ID_CHUNK
    # a read is one syscall and a copy; reading the unflagged chunks between flagged ones
    # costs copies only, so a window is read whole where that is cheaper than per run
    cuts = np.flatnonzero(np.diff(idx) != 1) + 1
    run_start = np.zeros(len(idx), bool)
    run_start[0] = True
    run_start[cuts] = True
    offs = [o for o, _ in splice] if splice else []
    buf = bytearray(min(REHASH_WINDOW, t.nbytes))
    sha = hashlib.sha256
    with open(t.file, "rb", buffering=0) as f:
        fd = f.fileno()

        def read(k0: int, k1: int) -> memoryview:
            lo, hi = k0 * ID_CHUNK, min(k1 * ID_CHUNK, t.nbytes)
            view = memoryview(buf)[: hi - lo]
            got = 0
            while got < len(view):
                n = os.preadv(fd, [view[got:]], t.offset + lo + got)
                if not n:
                    raise IntegrityError(f"{t.file}: tensor {t.name!r} is cut short; the file "
                                         "changed after it was opened")
                got += n
            if splice:
                a, z = t.offset + lo, t.offset + hi
                i = max(0, bisect.bisect_right(offs, a) - 1)
                while i < len(splice) and splice[i][0] < z:
                    off, new = splice[i]
                    s, e = max(off, a), min(off + len(new), z)
                    if s < e:
                        view[s - a : e - a] = new[s - off : e - off]
                    i += 1
            return view

        pos = 0
        while pos < len(idx):
            k0 = int(idx[pos])
            end = int(np.searchsorted(idx, k0 + per_read))
            ks = idx[pos:end]
            runs = np.flatnonzero(run_start[pos:end])
            extent = (int(ks[-1]) + 1 - k0) * ID_CHUNK
            if extent <= 2 * len(ks) * ID_CHUNK + len(runs) * (16 << 10):
                view = read(k0, int(ks[-1]) + 1)
                rel = (ks - k0).tolist()
                digs = b"".join([sha(view[r * ID_CHUNK : (r + 1) * ID_CHUNK]).digest() for r in rel])
                view.release()
            else:
                parts = []
                # a window may begin inside a run (cut at per_read): its first span starts a run
                bounds = sorted({0, *runs.tolist()}) + [len(ks)]
                for r0, r1 in zip(bounds, bounds[1:]):
                    view = read(int(ks[r0]), int(ks[r1 - 1]) + 1)
                    parts.append(hash_chunks(view))
                    view.release()
                digs = b"".join(parts)
            out[ks] = np.frombuffer(digs, np.uint8).reshape(-1, 32)
            pos = end


def touched_chunks(t: TensorInfo, offsets: Any, lengths: Any, into: Any = None) -> Any:
    """Boolean vector over ``t``'s chunks: True where a span (absolute offset, length)
    overlaps the chunk. ``into``: a vector to add to (returned)."""
    import numpy as np

    n = chunk_count(t.nbytes)
    mark = np.zeros(n + 1, np.int64)
    rel = np.asarray(offsets, np.int64) - t.offset
    lens = np.asarray(lengths, np.int64)
    keep = lens > 0
    rel, lens = rel[keep], lens[keep]
    np.add.at(mark, rel // ID_CHUNK, 1)
    np.add.at(mark, (rel + lens - 1) // ID_CHUNK + 1, -1)
    hit = np.cumsum(mark[:n]) > 0
    if into is not None:
        into |= hit
        return into
    return hit


@dataclass(frozen=True)
class Identity:
    """An artefact's identity: one digest, plus the per-tensor digests it was built from."""

    digest: str
    tensors: dict[str, str]
    chunks: dict[str, bytes] = field(default_factory=dict, compare=False, repr=False)  # leaves


def identity_digest(entries: Iterable[tuple[str, str, tuple[int, ...], str]]) -> str:
    """Combine (name, type, shape, tensor digest) entries into one identity digest.

    Entries are sorted by name, so the identity does not depend on tensor order or file
    layout; metadata is not part of it (docs/formats/artifact.md, "Identity").
    """
    h = hashlib.sha256(IDENTITY_SCHEME.encode() + b"\n")
    for name, type_name, shape, digest in sorted(entries):
        dims = ",".join(str(d) for d in shape)
        # each field length-prefixed: a name holding a separator cannot shift the fields
        for part in (name, type_name, dims, digest):
            raw = part.encode()
            h.update(len(raw).to_bytes(4, "little") + raw)
    return h.hexdigest()


def compute_identity(artifact: Artifact) -> Identity:
    """The identity of an artefact as it is on disk now (reads every tensor byte once)."""
    leaves = {t.name: tensor_chunks(t) for t in artifact.tensors}
    per = {t.name: digest_from_chunks(t.nbytes, leaves[t.name]) for t in artifact.tensors}
    digest = identity_digest((t.name, t.type_name, t.shape, per[t.name]) for t in artifact.tensors)
    return Identity(digest=digest, tensors=per, chunks=leaves)


def describe(artifact: Artifact, identity: bool = True) -> dict[str, Any]:
    """What ``cdcca-edge inspect --json`` prints: files, provenance, the tensor table and
    (reading every tensor byte, unless ``identity`` is False) the identity and per-tensor
    digests, with whether the identity is still the one recorded at export."""
    ident = compute_identity(artifact) if identity else None
    return {
        "path": str(artifact.path),
        "format": artifact.format,
        "files": [str(f) for f in artifact.files],
        "n_tensors": len(artifact.tensors),
        "tensor_bytes": artifact.tensor_bytes,
        "metadata": artifact.metadata,
        "identity": ident.digest if ident else None,
        "identity_matches_export": (
            ident.digest == artifact.metadata.get(META_EXPORT_IDENTITY) if ident else None
        ),
        "tensors": [
            {"name": t.name, "type": t.type_name, "shape": list(t.shape), "bytes": t.nbytes,
             "file": t.file.name, "offset": t.offset,
             **({"digest": ident.tensors[t.name]} if ident else {})}
            for t in artifact.tensors
        ],
    }
