"""The lean GGUF header reader: agrees with gguf-py, rejects malformed files precisely."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdcca_edge.core.errors import FormatError
from cdcca_edge.core.gguf_file import GGUFArray, read_gguf_header
from tests.core.gguf_bytes import build_gguf, string, u32


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
    p = tmp_path / "bad.gguf"
    p.write_bytes(_minimal(**overrides))
    with pytest.raises(FormatError, match=message):
        read_gguf_header(p)


def test_too_short(tmp_path):
    p = tmp_path / "short.gguf"
    p.write_bytes(b"GGUF")
    with pytest.raises(FormatError, match="too short"):
        read_gguf_header(p)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncated_or_flipped_never_crashes(sample_gguf, tmp_path_factory, data):
    """Any truncation or bit flip yields FormatError or a header whose tensors lie inside
    the file — never another exception, never an out-of-bounds tensor."""
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
