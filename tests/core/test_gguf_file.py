"""The lean GGUF header reader: agrees with gguf-py, rejects malformed files precisely."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType, GGUFWriter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdcca_edge.core.errors import FormatError
from cdcca_edge.core.gguf_file import GGUFArray, read_gguf_header
from tests.core.gguf_bytes import build_gguf, gguf_string, string, u32
from tests.hostile import hostile


@pytest.fixture(scope="module")
def sample_gguf(tmp_path_factory):
    import gguf

    path = tmp_path_factory.mktemp("gguf") / "sample.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_string("cdcca.version", "test")
    w.add_uint32("llama.context_length", 128)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(200)])  # long: skipped
    w.add_array("short.list", [1, 2, 3])
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal((4, 64)).astype(np.float32))
    w.add_tensor("b.weight", rng.standard_normal((3, 32)).astype(np.float16))
    q = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), T.Q8_0)
    w.add_tensor("c.weight", q, raw_dtype=T.Q8_0)
    q4 = gguf.quants.quantize(rng.standard_normal((5, 96)).astype(np.float32), T.Q4_0)
    w.add_tensor("d.weight", q4, raw_dtype=T.Q4_0)
    w.add_tensor("e.norm", rng.standard_normal(64).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_agrees_with_gguf_py(sample_gguf):
    ours = read_gguf_header(sample_gguf)
    ref = GGUFReader(sample_gguf)
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.ggml_type == b.tensor_type
        assert a.ne == tuple(int(d) for d in b.shape)
        assert a.offset == b.data_offset
        assert a.nbytes == b.n_bytes
    assert ours.kv["llama.context_length"] == 128
    assert ours.kv["cdcca.version"] == "test"
    assert ours.kv["llama.rope.freq_base"] == pytest.approx(10000.0)
    tokens = ours.kv["tokenizer.ggml.tokens"]
    assert isinstance(tokens, GGUFArray) and tokens.length == 200 and tokens.values is None
    assert ours.kv["short.list"].values == [1, 2, 3]
    assert ours.data_offset == ref.data_offset


def _minimal(**overrides):
    kv = [("general.architecture", *string("llama"))]
    tensors = [("w", (32, 2), int(T.F32), 0)]
    args = dict(kv=kv, tensors=tensors, data=b"\0" * 256)
    args.update(overrides)
    return build_gguf(**args)


def test_minimal_hand_built_file_parses(tmp_path):
    p = tmp_path / "m.gguf"
    p.write_bytes(_minimal())
    h = read_gguf_header(p)
    assert h.tensors[0].name == "w" and h.tensors[0].nbytes == 256


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(magic=0x12345678), "bad magic"),
        (dict(version=1), "version 1 is not supported"),
        (dict(version=3 << 24), "big-endian"),
        (dict(tensors=[("w", (32, 2), int(T.F32), 0), ("w", (32,), int(T.F32), 256)]), "duplicate tensor name 'w'"),
        (dict(kv=[("k", *u32(1)), ("k", *u32(2))]), "duplicate metadata key 'k'"),
        (dict(tensors=[("w", (32, 2), int(T.F32), 4)]), "not aligned"),
        (dict(tensors=[("w", (32, 2), int(T.F32), 0), ("v", (32,), int(T.F32), 128)]), "overlap"),
        (dict(tensors=[("w", (30, 2), int(T.Q8_0), 0)]), "not a multiple of the Q8_0 block size 32"),
        (dict(tensors=[("w", (32, 2), 999, 0)]), "unknown GGML type 999"),
        (dict(tensors=[("w", (32, 64), int(T.F32), 0)]), "runs past the end of the file"),
        (dict(kv=[("general.alignment", *u32(3))]), "not a power of two"),
        (dict(kv=[("k", 77, b"")]), "unknown value type 77"),
        (dict(kv=[("general.alignment", GGUFValueType.BOOL, b"\x01")]), "not a power of two"),
        (dict(kv=[("deep", GGUFValueType.ARRAY,
                   (struct.pack("<IQ", GGUFValueType.ARRAY, 1)) * 5000 + struct.pack("<IQ", 4, 0))]),
         "nests arrays deeper"),
    ],
)
def test_rejects_malformed(tmp_path, overrides, message):
    hostile("gguf")
    p = tmp_path / "bad.gguf"
    p.write_bytes(_minimal(**overrides))
    with pytest.raises(FormatError, match=message):
        read_gguf_header(p)


def test_too_short(tmp_path):
    hostile("gguf")
    p = tmp_path / "short.gguf"
    p.write_bytes(b"GGUF")
    with pytest.raises(FormatError, match="too short"):
        read_gguf_header(p)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncated_or_flipped_never_crashes(sample_gguf, tmp_path_factory, data):
    """Any truncation or bit flip yields FormatError or a header whose tensors lie inside
    the file — never another exception, never an out-of-bounds tensor."""
    hostile("gguf")
    raw = bytearray(sample_gguf.read_bytes())
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
    p = tmp_path_factory.mktemp("fuzz") / "f.gguf"
    p.write_bytes(bytes(raw))
    try:
        h = read_gguf_header(p)
    except FormatError:
        return
    # The contract a patcher relies on: every tensor aligned, inside the file, disjoint.
    spans = sorted((t.offset, t.offset + t.nbytes) for t in h.tensors)
    for (s0, e0), (s1, _) in zip(spans, spans[1:]):
        assert e0 <= s1
    for t in h.tensors:
        assert t.offset + t.nbytes <= len(raw)
        assert (t.offset - h.data_offset) % h.alignment == 0
    # ... and where gguf-py also reads the file, both see the same tensors.
    try:
        ref = GGUFReader(p)
    except Exception:  # noqa: BLE001 - gguf-py's failures are not ours to classify
        return
    assert [(t.name, t.data_offset, t.n_bytes) for t in ref.tensors] == [
        (t.name, t.offset, t.nbytes) for t in h.tensors
    ]


# --- forged headers: every field wrong in every way ------------------------------------
# Structure-aware where bit flips are not: lying counts, unknown value and GGML types,
# arrays that claim 2^64 items or nest past the limit, strings longer than the file, dims
# that overflow, offsets at the end of the address space, alignments that are not powers
# of two. The reader must raise FormatError or return tensors that lie inside the file.

_U64_EDGES = [0, 1, 2, 31, 32, 33, 64, 255, 256, 2**31, 2**32 - 1, 2**32, 2**62, 2**63, 2**64 - 32,
              2**64 - 1]
_VALUE_TYPES = [int(t) for t in GGUFValueType]
_GGML_TYPES = [int(t) for t in T]


def _u64s():
    return st.one_of(st.sampled_from(_U64_EDGES), st.integers(0, 2**64 - 1))


def _mostly(draw, good, bad):
    """``good`` nine times in ten, else ``bad``: forged files must get past the first
    check often enough to reach every later one."""
    return draw(good) if draw(st.integers(0, 9)) else draw(bad)


def _gguf_str(draw) -> bytes:
    kind = draw(st.integers(0, 19))
    if kind == 0:  # a length that lies
        return struct.pack("<Q", draw(_u64s())) + draw(st.binary(max_size=8))
    if kind == 1:  # not UTF-8
        b = draw(st.binary(min_size=1, max_size=8))
        return struct.pack("<Q", len(b)) + b
    text = draw(st.one_of(st.sampled_from(["general.architecture", "k", "w", "cdcca.version",
                                           "a" * 300]), st.text(max_size=8)))
    return gguf_string(text.encode("utf-8", "surrogatepass").decode("utf-8", "replace"))


_SCALAR_FMT = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
               GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
               GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<B", GGUFValueType.UINT64: "<Q",
               GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}


@st.composite
def _gguf_value(draw, depth: int = 0) -> tuple[int, bytes]:
    """(value type code, encoded value): mostly well-formed, sometimes not."""
    vtype = _mostly(draw, st.sampled_from(_VALUE_TYPES), st.integers(0, 2**32 - 1))
    if vtype == GGUFValueType.STRING:
        return vtype, _gguf_str(draw)
    if vtype == GGUFValueType.ARRAY:
        if depth >= 3 or draw(st.integers(0, 5)) == 0:  # lying length, or nesting past the limit
            if draw(st.booleans()):
                levels = draw(st.integers(7, 40))
                return vtype, struct.pack("<IQ", GGUFValueType.ARRAY, 1) * levels + struct.pack("<IQ", 4, 0)
            item = _mostly(draw, st.sampled_from(_VALUE_TYPES), st.integers(0, 2**32 - 1))
            return vtype, struct.pack("<IQ", item, draw(_u64s())) + draw(st.binary(max_size=16))
        item_t = draw(st.sampled_from(_VALUE_TYPES))
        items = [draw(_gguf_value(depth + 1)) for _ in range(draw(st.integers(0, 3)))]
        if draw(st.integers(0, 3)):  # one item type, as a writer does
            items = [(item_t, v) for t, v in items if t == item_t]
        body = b"".join(v for _t, v in items)
        n = _mostly(draw, st.just(len(items)), _u64s())
        return vtype, struct.pack("<IQ", item_t, n) + body
    if vtype not in _SCALAR_FMT:
        return vtype, draw(st.binary(max_size=9))
    fmt = _SCALAR_FMT[GGUFValueType(vtype)]
    if vtype in (GGUFValueType.UINT32, GGUFValueType.UINT64) and draw(st.booleans()):
        return vtype, struct.pack(fmt, draw(st.sampled_from([0, 1, 3, 32, 64, 2**31, 2**32 - 1])))
    size = _mostly(draw, st.just(struct.calcsize(fmt)), st.integers(0, 9))
    return vtype, draw(st.binary(min_size=size, max_size=size))


_SANE_TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_K]


@st.composite
def _forged_gguf(draw) -> bytes:
    magic = _mostly(draw, st.just(0x46554747), st.sampled_from([0x47475546, 0, 0x46554748]))
    version = _mostly(draw, st.sampled_from([2, 3]), st.sampled_from([1, 0, 4, 3 << 24, 2**32 - 1]))
    align = 32
    kv = []
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.integers(0, 4)) == 0:  # the one key that steers the layout
            vtype, value = _mostly(draw, st.sampled_from([u32(32), u32(64), u32(8)]),
                                   _gguf_value())
            key = gguf_string("general.alignment")
            if (vtype, len(value)) == (GGUFValueType.UINT32, 4):
                align = struct.unpack("<I", value)[0] or 32
        else:
            key = _gguf_str(draw)
            vtype, value = draw(_gguf_value())
        kv.append(key + struct.pack("<I", vtype) + value)
    tensors, rel = [], 0
    for i in range(draw(st.integers(0, 4))):
        name = _mostly(draw, st.sampled_from([gguf_string(f"t{i}")] * 3 + [gguf_string("w")]),
                       st.builds(lambda _: _gguf_str(draw), st.none()))
        gtype = _mostly(draw, st.sampled_from(_SANE_TYPES), st.one_of(
            st.sampled_from(list(T)), st.integers(0, 2**32 - 1)))
        block = GGML_QUANT_SIZES[T(gtype)][0] if gtype in set(_GGML_TYPES) and T(gtype) in GGML_QUANT_SIZES else 32
        ne = [block * draw(st.integers(1, 2))] + [draw(st.integers(1, 3)) for _ in range(draw(st.integers(0, 2)))]
        sane = draw(st.integers(0, 5)) > 0
        if not sane:  # dims that overflow, or too many / too few of them
            ne = [draw(st.one_of(st.sampled_from([1, 2, 32, 256]), _u64s()))
                  for _ in range(draw(st.sampled_from([0, 1, 2, 4, 5])))]
        n_dims = _mostly(draw, st.just(len(ne)), st.sampled_from([0, 5, 2**32 - 1]))
        offset = _mostly(draw, st.just(rel), st.one_of(st.sampled_from([0, 32, 1, 31]), _u64s()))
        if sane and align <= 4096 and gtype in set(_GGML_TYPES) and T(gtype) in GGML_QUANT_SIZES:
            n = 1
            for d in ne:
                n *= d
            rel += -(-(n // block * GGML_QUANT_SIZES[T(gtype)][1]) // align) * align  # < 64 KiB
        tensors.append(name + struct.pack("<I", n_dims) + b"".join(struct.pack("<Q", d % 2**64) for d in ne)
                       + struct.pack("<IQ", gtype, offset % 2**64))
    n_tensors = _mostly(draw, st.just(len(tensors)), _u64s())  # counts that lie
    n_kv = _mostly(draw, st.just(len(kv)), _u64s())
    out = struct.pack("<IIQQ", magic, version, n_tensors, n_kv) + b"".join(kv) + b"".join(tensors)
    out += b"\0" * _mostly(draw, st.just(-len(out) % min(align, 4096)), st.integers(0, 40))
    out += b"\x11" * _mostly(draw, st.just(rel), st.integers(0, rel + 64))
    if draw(st.integers(0, 9)) == 0:
        out = out[: draw(st.integers(0, len(out)))]
    return out


def _check_header_contract(path, size: int) -> None:
    try:
        h = read_gguf_header(path)
    except FormatError as exc:
        assert str(exc)
        return
    assert h.alignment > 0 and h.alignment & (h.alignment - 1) == 0
    spans = sorted((t.offset, t.offset + t.nbytes) for t in h.tensors)
    for (_s0, e0), (s1, _) in zip(spans, spans[1:]):
        assert e0 <= s1
    for t in h.tensors:
        assert 0 <= t.offset and t.offset + t.nbytes <= size
        assert (t.offset - h.data_offset) % h.alignment == 0
        assert 1 <= len(t.ne) <= 4


@pytest.fixture(scope="module")
def forge_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("forged-gguf")


@settings(max_examples=1200)
@given(raw=_forged_gguf())
def test_forged_header_never_crashes(forge_dir, raw):
    hostile("gguf")
    p = forge_dir / "f.gguf"
    p.write_bytes(raw)
    _check_header_contract(p, len(raw))


@settings(max_examples=60)
@given(raw=_forged_gguf())
def test_forged_header_cli_exit(forge_dir, capsys, raw):
    """Through ``cdcca-edge inspect``: exit 0 or 3, never 1 or 2."""
    from cdcca_edge.cli import main

    hostile("gguf")
    p = forge_dir / "c.gguf"
    p.write_bytes(raw)
    code = main(["inspect", "--json", str(p)])
    err = capsys.readouterr().err
    assert code in (0, 3), err


def test_fifo_is_refused_without_blocking(tmp_path):
    import os

    from tests.core.hostile_fs import no_hang

    hostile("gguf")
    os.mkfifo(tmp_path / "f.gguf")
    with no_hang(), pytest.raises(FormatError, match="not a regular file"):
        read_gguf_header(tmp_path / "f.gguf")
