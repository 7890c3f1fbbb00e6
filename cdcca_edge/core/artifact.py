"""Device artefacts: one GGUF file or one ONNX model with external data.

An artefact is seen as a list of tensors, each a contiguous byte region of a file. That is
the view every device-side operation needs (identity, inspect, and later in-place
patching), and it is the same for both formats. Bytes are read through memory maps, never
copied whole. Spec: docs/formats/artifact.md.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal

from cdcca_edge.core.ggml import GGUF_MAGIC

from cdcca_edge.core.errors import FormatError, IntegrityError, MissingTensorError
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
META_TRANSPOSED = "cdcca.transposed"  # ONNX: JSON list of initializers stored as W^T (in, out)

MANIFEST_NAME = "cdcca-artifact.json"  # a bundle: several parts, one artefact (section 6)
MANIFEST_FORMAT = "cdcca-artifact"
MANIFEST_VERSION = 1
_PART_NAME = re.compile(r"^[a-z0-9_-]+$")
ONNX_MODEL_NAME = "model.onnx"
ONNX_DATA_NAME = "model.onnx_data"
IDENTITY_SCHEME = "cdcca-id-v1"
HASH_CHUNK = 8 << 20  # bytes hashed per step: bounded memory whatever the tensor size


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

    Raises:
        FileNotFoundError: nothing at ``path``.
        FormatError: the file(s) are not a well-formed artefact of either format.
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
    if path.name == MANIFEST_NAME:
        return _open_bundle(path)
    with open(path, "rb") as f:
        magic = f.read(4)
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
            file = (base / init.location).resolve()
            if base not in file.parents:
                raise FormatError(f"{model_path}: external data location {init.location!r} "
                                  "points outside the model directory")
            if file == model_path:
                raise FormatError(f"{model_path}: initializer {init.name!r} claims the model "
                                  "file itself as its external data")
        if init.length >= 0 and init.length != nbytes:
            raise FormatError(f"{model_path}: initializer {init.name!r} length {init.length} "
                              f"!= {nbytes} bytes implied by its shape {init.dims}")
        if file not in sizes:
            if not file.is_file():
                raise FormatError(f"{model_path}: external data file {file.name!r} is missing; "
                                  "keep it next to the model")
            sizes[file] = file.stat().st_size
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
    manifest = manifest.resolve()
    root = manifest.parent
    try:
        doc = json.loads(manifest.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{manifest}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise FormatError(f"{manifest}: not a {MANIFEST_FORMAT} manifest")
    if doc.get("version") != MANIFEST_VERSION:
        raise FormatError(f"{manifest}: manifest version {doc.get('version')!r} is not "
                          f"supported (expected {MANIFEST_VERSION}); upgrade cdcca-edge")
    parts = doc.get("parts")
    if not isinstance(parts, list) or not parts:
        raise FormatError(f"{manifest}: the manifest lists no parts")
    tensors: list[TensorInfo] = []
    metadata: dict[str, str] = {}
    seen: set[str] = set()
    for part in parts:
        name = part.get("name") if isinstance(part, dict) else None
        rel = part.get("path") if isinstance(part, dict) else None
        if not isinstance(name, str) or not _PART_NAME.match(name):
            raise FormatError(f"{manifest}: part name {name!r} must match [a-z0-9_-]+")
        if name in seen:
            raise FormatError(f"{manifest}: duplicate part name {name!r}")
        seen.add(name)
        if not isinstance(rel, str) or not rel:
            raise FormatError(f"{manifest}: part {name!r} has no path")
        target = (root / rel).resolve()
        if root not in target.parents:
            raise FormatError(f"{manifest}: part {name!r} path {rel!r} points outside the bundle")
        if not target.exists():
            raise FormatError(f"{manifest}: part {name!r} is missing ({rel}); keep every part "
                              "inside the bundle directory")
        if (target / MANIFEST_NAME).exists() if target.is_dir() else target.name == MANIFEST_NAME:
            raise FormatError(f"{manifest}: part {name!r} is itself a bundle; nesting is not supported")
        sub = open_artifact(target)
        for t in sub.tensors:
            tensors.append(TensorInfo(f"{name}/{t.name}", t.type_name, t.shape, t.file.resolve(),
                                      t.offset, t.nbytes))
        metadata.update({f"{name}/{k}": v for k, v in sub.metadata.items()})
    prov = doc.get("provenance", {})
    if isinstance(prov, dict):
        metadata.update({str(k): str(v) for k, v in prov.items() if str(k).startswith(META_PREFIX)})
    by_file: dict[Path, list[TensorInfo]] = {}
    for t in tensors:
        by_file.setdefault(t.file, []).append(t)
    for f, ts in by_file.items():
        _check_no_overlap(f, ts)  # two parts must not share a data file's bytes
    return Artifact(path=manifest, format="bundle", tensors=tensors, metadata=metadata)


def _check_no_overlap(path: Path, tensors: list[TensorInfo]) -> None:
    # Overlapping regions would make an in-place write to one tensor corrupt another.
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors if t.nbytes)
    for (s0, e0, n0), (s1, _e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise FormatError(f"{path}: tensors {n0!r} and {n1!r} overlap")


# --- identity -------------------------------------------------------------------------


def iter_tensor_bytes(t: TensorInfo, chunk: int = HASH_CHUNK) -> Iterator[memoryview]:
    """Yield ``t``'s bytes in chunks of at most ``chunk`` bytes, through a memory map.

    Each chunk is released when the next is requested: copy it to keep it.
    """
    if t.nbytes == 0:
        return
    with open(t.file, "rb") as f:
        if f.seek(0, 2) < t.offset + t.nbytes:
            raise IntegrityError(f"{t.file}: tensor {t.name!r} is cut short; the file changed "
                                 "after it was opened")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                for start in range(t.offset, t.offset + t.nbytes, chunk):
                    end = min(start + chunk, t.offset + t.nbytes)
                    part = view[start:end]
                    if len(part) != end - start:
                        part.release()
                        raise IntegrityError(f"{t.file}: tensor {t.name!r} is cut short; the "
                                             "file changed after it was opened")
                    try:
                        yield part
                    finally:
                        part.release()
            finally:
                view.release()


def tensor_digest(t: TensorInfo) -> str:
    """SHA-256 of one tensor's bytes, hex."""
    h = hashlib.sha256()
    for part in iter_tensor_bytes(t):
        h.update(part)
    return h.hexdigest()


@dataclass(frozen=True)
class Identity:
    """An artefact's identity: one digest, plus the per-tensor digests it was built from."""

    digest: str
    tensors: dict[str, str]

    @property
    def short(self) -> str:
        return self.digest[:16]


def identity_digest(entries: Iterable[tuple[str, str, tuple[int, ...], str]]) -> str:
    """Combine (name, type, shape, tensor digest) entries into one identity digest.

    Entries are sorted by name, so the identity does not depend on tensor order or file
    layout; metadata is not part of it (docs/formats/artifact.md, "Identity").
    """
    h = hashlib.sha256(IDENTITY_SCHEME.encode() + b"\n")
    for name, type_name, shape, digest in sorted(entries):
        dims = ",".join(str(d) for d in shape)
        h.update(f"{name}\0{type_name}\0{dims}\0{digest}\n".encode())
    return h.hexdigest()


def compute_identity(artifact: Artifact) -> Identity:
    """The identity of an artefact as it is on disk now (reads every tensor byte once)."""
    per = {t.name: tensor_digest(t) for t in artifact.tensors}
    digest = identity_digest((t.name, t.type_name, t.shape, per[t.name]) for t in artifact.tensors)
    return Identity(digest=digest, tensors=per)
