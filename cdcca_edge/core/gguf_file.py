"""A lean, strict GGUF header reader for the device path.

``gguf.GGUFReader`` builds numpy views for every metadata value: about 2 s on a 49k-token
vocabulary, which would dominate opening a model to patch it. This reader walks the same
header (format facts from gguf-py: magic, value types, ``GGML_QUANT_SIZES``) and skips
array payloads without materialising them, so opening SmolLM2-135M takes tens of ms. It
rejects bad magic, unsupported versions, truncation, duplicate names, misaligned or
overlapping tensor data eagerly, with the offending value in the message.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdcca_edge.core.ggml import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
)

from cdcca_edge.core.errors import FormatError
from cdcca_edge.core.fileio import open_regular

SUPPORTED_VERSIONS = (2, 3)
ARRAY_KEEP_MAX = 64  # arrays up to this length are decoded; longer ones keep their length only
MAX_ARRAY_NESTING = 8  # deeper nesting is not used by any writer; refuse it before recursion does
MAX_DIMS = 4  # GGML_MAX_DIMS
HEADER_MIN = struct.calcsize("<IIQQ")
_U64 = struct.Struct("<Q")  # magic, version, tensor count, metadata count

_SCALAR = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class GGUFArray:
    """A metadata array: its element type, length and, when short, its values."""

    item_type: GGUFValueType
    length: int
    values: list[Any] | None


@dataclass(frozen=True)
class GGUFTensorEntry:
    name: str
    ggml_type: GGMLQuantizationType
    ne: tuple[int, ...]  # GGML order: innermost (row length) first
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


@dataclass
class GGUFHeader:
    path: Path
    version: int
    alignment: int
    data_offset: int  # start of the tensor data section
    kv: dict[str, Any] = field(default_factory=dict)
    tensors: list[GGUFTensorEntry] = field(default_factory=list)


class _Cursor:
    __slots__ = ("buf", "pos", "size", "path")

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.size:
            raise FormatError(f"{self.path}: truncated GGUF header while reading {what} "
                              f"at byte {self.pos}")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        return struct.unpack(fmt, self.take(n, what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        try:
            return bytes(self.take(n, what)).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FormatError(f"{self.path}: {what} is not valid UTF-8") from exc

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        try:
            t = GGUFValueType(vtype)
        except ValueError:
            raise FormatError(f"{self.path}: {what} has unknown value type {vtype}") from None
        if t == GGUFValueType.STRING:
            return self.string(what)
        if t == GGUFValueType.ARRAY:
            if depth >= MAX_ARRAY_NESTING:
                raise FormatError(f"{self.path}: {what} nests arrays deeper than {MAX_ARRAY_NESTING}")
            item = self.unpack("<I", what)
            n = self.unpack("<Q", what)
            try:
                item_t = GGUFValueType(item)
            except ValueError:
                raise FormatError(f"{self.path}: {what} has unknown array item type {item}") from None
            if n <= ARRAY_KEEP_MAX:
                return GGUFArray(item_t, n, [self.value(item, what, depth + 1) for _ in range(n)])
            self.skip_array(item_t, n, what, depth + 1)
            return GGUFArray(item_t, n, None)
        return self.unpack(_SCALAR[t], what)

    def skip_array(self, item: GGUFValueType, n: int, what: str, depth: int) -> None:
        if item == GGUFValueType.STRING:
            buf, pos, size = self.buf, self.pos, self.size
            u64 = _U64.unpack_from
            for _ in range(n):  # each element: u64 length + bytes (a hot loop: 100k tokens)
                if pos + 8 > size:
                    raise FormatError(f"{self.path}: truncated GGUF header in {what}")
                pos += 8 + u64(buf, pos)[0]
            if pos > size:
                raise FormatError(f"{self.path}: truncated GGUF header in {what}")
            self.pos = pos
        elif item == GGUFValueType.ARRAY:
            for _ in range(n):
                self.value(GGUFValueType.ARRAY, what, depth)
        else:
            self.take(n * struct.calcsize(_SCALAR[item]), what)


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Read a GGUF file's metadata and tensor table (never its tensor data).

    Raises:
        FormatError: not a regular file, not a GGUF file, unsupported version, or a
            malformed/truncated header.
    """
    path = Path(path)
    with open_regular(path, "a GGUF file") as f:
        size = f.seek(0, 2)
        if size < HEADER_MIN:
            raise FormatError(f"{path}: {size} bytes is too short to be a GGUF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                return _parse(path, view, size)
            finally:
                view.release()


def _parse(path: Path, view: memoryview, size: int) -> GGUFHeader:
    cur = _Cursor(view, path)
    magic = cur.unpack("<I", "magic")
    if magic != GGUF_MAGIC:
        raise FormatError(f"{path}: bad magic {magic:#010x}, expected {GGUF_MAGIC:#010x} ('GGUF')")
    version = cur.unpack("<I", "version")
    if version not in SUPPORTED_VERSIONS:
        hint = " (big-endian files are not supported)" if version & 0xFFFF == 0 else ""
        raise FormatError(f"{path}: GGUF version {version} is not supported{hint}; "
                          f"supported: {SUPPORTED_VERSIONS}")
    n_tensors = cur.unpack("<Q", "tensor count")
    n_kv = cur.unpack("<Q", "metadata count")
    if n_tensors > size or n_kv > size:
        raise FormatError(f"{path}: implausible counts ({n_tensors} tensors, {n_kv} keys)")
    header = GGUFHeader(path=path, version=version, alignment=GGUF_DEFAULT_ALIGNMENT, data_offset=0)
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        if key in header.kv:
            raise FormatError(f"{path}: duplicate metadata key {key!r}")
        vtype = cur.unpack("<I", f"type of {key!r}")
        header.kv[key] = cur.value(vtype, f"metadata {key!r}")
    align = header.kv.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if type(align) is not int or align <= 0 or align & (align - 1):  # bool is an int: refuse it
        raise FormatError(f"{path}: general.alignment {align!r} is not a power of two")
    header.alignment = align

    raw: list[tuple[str, GGMLQuantizationType, tuple[int, ...], int]] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"tensor name #{i}")
        if name in names:
            raise FormatError(f"{path}: duplicate tensor name {name!r}")
        names.add(name)
        n_dims = cur.unpack("<I", f"dims of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise FormatError(f"{path}: tensor {name!r} has {n_dims} dims, expected 1..{MAX_DIMS}")
        ne = tuple(cur.unpack("<Q", f"dims of {name!r}") for _ in range(n_dims))
        code = cur.unpack("<I", f"type of {name!r}")
        try:
            gtype = GGMLQuantizationType(code)
        except ValueError:
            raise FormatError(f"{path}: tensor {name!r} has unknown GGML type {code}") from None
        rel = cur.unpack("<Q", f"offset of {name!r}")
        if rel % align:
            raise FormatError(f"{path}: tensor {name!r} data offset {rel} is not aligned to {align}")
        raw.append((name, gtype, ne, rel))
    data_offset = -(-cur.pos // align) * align
    header.data_offset = data_offset

    spans = []
    for name, gtype, ne, rel in raw:
        if gtype not in GGML_QUANT_SIZES:
            raise FormatError(f"{path}: tensor {name!r} type {gtype.name} has no known size")
        block, type_size = GGML_QUANT_SIZES[gtype]
        if ne[0] % block:
            raise FormatError(f"{path}: tensor {name!r} row length {ne[0]} is not a multiple of "
                              f"the {gtype.name} block size {block}")
        n = 1
        for d in ne:
            n *= d
        nbytes = n // block * type_size
        start = data_offset + rel
        if start + nbytes > size:
            raise FormatError(f"{path}: tensor {name!r} ({nbytes} bytes at {start}) runs past "
                              f"the end of the file ({size} bytes); the file is truncated")
        header.tensors.append(GGUFTensorEntry(name, gtype, ne, start, nbytes))
        spans.append((start, start + nbytes, name))
    spans.sort()
    for (s0, e0, n0), (s1, _e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise FormatError(f"{path}: tensors {n0!r} and {n1!r} overlap")
    return header
