"""A minimal, read-only ONNX protobuf reader for the device path.

The device must locate initializers (name, type, shape, where their bytes live) without the
``onnx`` package, which is an export-time dependency. ONNX files are protobuf messages; we
decode only the wire format and the handful of fields we need (onnx/onnx.proto3 field
numbers below), skipping everything else. Tensor bytes are never copied: for each
initializer we record the file and byte offset of its data, inline (``raw_data``) or in an
external data file.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path

from cdcca_edge.core.errors import FormatError
from cdcca_edge.core.fileio import open_regular

# --- field numbers from onnx.proto3 -------------------------------------------------
MODEL_GRAPH = 7
MODEL_METADATA_PROPS = 14
GRAPH_INITIALIZER = 5
TENSOR_DIMS = 1
TENSOR_DATA_TYPE = 2
TENSOR_NAME = 8
TENSOR_RAW_DATA = 9
TENSOR_EXTERNAL_DATA = 13
TENSOR_DATA_LOCATION = 14
TENSOR_TYPED_DATA = (4, 5, 6, 7, 10, 11)  # float_data, int32_data, string_data, int64_data,
# double_data, uint64_data: values without a fixed byte layout
ENTRY_KEY = 1
ENTRY_VALUE = 2
DATA_LOCATION_EXTERNAL = 1

# TensorProto.DataType -> (our type name, bytes per element). Only types that can hold
# weights are listed with names the rest of the project uses; others keep ONNX's name.
ONNX_DTYPES: dict[int, tuple[str, int]] = {
    1: ("F32", 4),
    2: ("U8", 1),
    3: ("I8", 1),
    4: ("U16", 2),
    5: ("I16", 2),
    6: ("I32", 4),
    7: ("I64", 8),
    9: ("BOOL", 1),
    10: ("F16", 2),
    11: ("F64", 8),
    12: ("U32", 4),
    13: ("U64", 8),
    16: ("BF16", 2),
}

_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise FormatError("ONNX protobuf: truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise FormatError("ONNX protobuf: varint longer than 10 bytes")


def _fields(buf: memoryview, start: int, end: int):
    """Yield (field_number, wire_type, value, value_start) over one message's bytes.

    For length-delimited fields ``value`` is the end offset and ``value_start`` the start;
    for scalars ``value`` is the integer and ``value_start`` is unused.
    """
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        fnum, wire = key >> 3, key & 7
        if fnum == 0:
            raise FormatError("ONNX protobuf: field number 0")
        if wire == _WIRE_VARINT:
            val, pos = _varint(buf, pos, end)
            yield fnum, wire, val, pos
        elif wire == _WIRE_LEN:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise FormatError("ONNX protobuf: length-delimited field runs past its message")
            yield fnum, wire, pos + n, pos
            pos += n
        elif wire == _WIRE_I64:
            if pos + 8 > end:
                raise FormatError("ONNX protobuf: truncated fixed64")
            yield fnum, wire, int.from_bytes(buf[pos : pos + 8], "little"), pos
            pos += 8
        elif wire == _WIRE_I32:
            if pos + 4 > end:
                raise FormatError("ONNX protobuf: truncated fixed32")
            yield fnum, wire, int.from_bytes(buf[pos : pos + 4], "little"), pos
            pos += 4
        else:
            raise FormatError(f"ONNX protobuf: unsupported wire type {wire}")


def _string(buf: memoryview, start: int, end: int) -> str:
    try:
        return bytes(buf[start:end]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"ONNX protobuf: invalid UTF-8 string ({exc})") from exc


def _entry(buf: memoryview, start: int, end: int) -> tuple[str, str]:
    key = value = ""
    for fnum, wire, val, vstart in _fields(buf, start, end):
        if wire == _WIRE_LEN and fnum == ENTRY_KEY:
            key = _string(buf, vstart, val)
        elif wire == _WIRE_LEN and fnum == ENTRY_VALUE:
            value = _string(buf, vstart, val)
    return key, value


@dataclass(frozen=True)
class OnnxInitializer:
    """Where one initializer's bytes live.

    ``location`` is ``None`` for inline ``raw_data`` (bytes inside the model file at
    ``offset``), else the external data file's path relative to the model's directory.
    ``length`` is -1 when an external entry does not state it. ``typed_data`` marks values
    kept in typed repeated fields, which have no byte region.
    """

    name: str
    data_type: int
    dims: tuple[int, ...]
    location: str | None
    offset: int
    length: int
    typed_data: bool = False

    @property
    def type_name(self) -> str:
        return ONNX_DTYPES.get(self.data_type, (f"ONNX{self.data_type}", 0))[0]


@dataclass
class OnnxModelInfo:
    initializers: list[OnnxInitializer] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


def _initializer(buf: memoryview, start: int, end: int) -> OnnxInitializer:
    dims: list[int] = []
    data_type = 0
    name = ""
    raw: tuple[int, int] | None = None
    external: dict[str, str] = {}
    data_location = 0
    has_typed_data = False
    for fnum, wire, val, vstart in _fields(buf, start, end):
        if fnum == TENSOR_DIMS:
            if wire == _WIRE_VARINT:
                dims.append(val)
            elif wire == _WIRE_LEN:  # packed repeated int64
                p = vstart
                while p < val:
                    d, p = _varint(buf, p, val)
                    dims.append(d)
        elif fnum == TENSOR_DATA_TYPE and wire == _WIRE_VARINT:
            data_type = val
        elif fnum == TENSOR_NAME and wire == _WIRE_LEN:
            name = _string(buf, vstart, val)
        elif fnum == TENSOR_RAW_DATA and wire == _WIRE_LEN:
            raw = (vstart, val - vstart)
        elif fnum == TENSOR_EXTERNAL_DATA and wire == _WIRE_LEN:
            k, v = _entry(buf, vstart, val)
            external[k] = v
        elif fnum == TENSOR_DATA_LOCATION and wire == _WIRE_VARINT:
            data_location = val
        elif fnum in TENSOR_TYPED_DATA:
            has_typed_data = True
    if data_location == DATA_LOCATION_EXTERNAL:
        if "location" not in external:
            raise FormatError(f"ONNX initializer {name!r}: external data without a location")
        try:
            offset = int(external.get("offset", "0"))
            length = int(external["length"]) if "length" in external else -1
        except ValueError as exc:
            raise FormatError(f"ONNX initializer {name!r}: bad external offset/length") from exc
        if offset < 0 or length < -1 or ("length" in external and length < 0):
            raise FormatError(f"ONNX initializer {name!r}: negative external offset/length")
        return OnnxInitializer(name, data_type, tuple(dims), external["location"], offset, length)
    if raw is not None:
        return OnnxInitializer(name, data_type, tuple(dims), None, raw[0], raw[1])
    if has_typed_data:
        # Data in typed repeated fields (float_data, ...) has no fixed byte layout we can
        # address; it only happens for small constants written by hand-made models.
        return OnnxInitializer(name, data_type, tuple(dims), None, 0, 0, typed_data=True)
    return OnnxInitializer(name, data_type, tuple(dims), None, start, 0)


def read_onnx_model(path: str | Path) -> OnnxModelInfo:
    """Parse ``path`` (a ``model.onnx``) for its initializers and metadata_props.

    Raises:
        FormatError: the file is not a regular file or not a well-formed ONNX protobuf.
    """
    path = Path(path)
    info = OnnxModelInfo()
    with open_regular(path, "an ONNX model") as f:
        size = f.seek(0, 2)
        if size == 0:
            raise FormatError(f"{path}: empty file, expected an ONNX model")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                graph_seen = False
                for fnum, wire, val, vstart in _fields(buf, 0, size):
                    if fnum == MODEL_GRAPH and wire == _WIRE_LEN:
                        graph_seen = True
                        for gf, gw, gval, gstart in _fields(buf, vstart, val):
                            if gf == GRAPH_INITIALIZER and gw == _WIRE_LEN:
                                info.initializers.append(_initializer(buf, gstart, gval))
                    elif fnum == MODEL_METADATA_PROPS and wire == _WIRE_LEN:
                        k, v = _entry(buf, vstart, val)
                        info.metadata[k] = v
                if not graph_seen:
                    raise FormatError(f"{path}: no graph found; is this an ONNX model file?")
            finally:
                buf.release()
    return info
