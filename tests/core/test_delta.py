"""Delta patches (docs/formats/delta.md): every encoding x tensor type, checks before
writing, crash safety, hostile input. Digests of whole files decide "unchanged"."""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cdcca_edge.core import delta_format as df
from cdcca_edge.core.artifact import compute_identity, open_artifact
from cdcca_edge.core.delta_build import DeltaBuilder, diff_artifacts
from cdcca_edge.core.encodings import pack_int4, unpack_int4
from cdcca_edge.core.errors import FormatError, IntegrityError, StorageError, UsageError
from cdcca_edge.core.ggml import HALF_FIELDS, blocks_nonfinite
from cdcca_edge.core.patch import apply_delta, journal_path, recover
from cdcca_edge.core.state import read_state
from cdcca_edge.core.trust import Trust
from tests.core.delta_helpers import (
    GGUF_TYPES,
    REQUANT,
    file_digest,
    make_gguf,
    make_onnx,
    random_units,
    reseal,
)
from tests.hostile import hostile

ERRORS = (FormatError, IntegrityError)


@pytest.fixture
def model(tmp_path) -> Path:
    return make_gguf(tmp_path / "m.gguf")


def raw_tensor(path: Path, name: str) -> bytes:
    t = open_artifact(path).tensor(name)
    with open(t.file, "rb") as f:
        f.seek(t.offset)
        return f.read(t.nbytes)


def deq(type_name: str, raw: bytes) -> np.ndarray:
    """Reference dequantisation straight from gguf-py (not our encodings module)."""
    buf = np.frombuffer(raw, np.uint8)
    if type_name == "F32":
        return buf.view(np.float32).astype(np.float32)
    if type_name == "F16":
        return buf.view(np.float16).astype(np.float32)
    return gguf.quants.dequantize(buf, T[type_name]).reshape(-1).astype(np.float32)


def req(type_name: str, x: np.ndarray) -> bytes:
    if type_name == "F32":
        return x.astype(np.float32).tobytes()
    if type_name == "F16":
        return x.astype(np.float16).tobytes()
    block = gguf.GGML_QUANT_SIZES[T[type_name]][0]
    return gguf.quants.quantize(x.reshape(-1, block).astype(np.float32), T[type_name]).tobytes()


def check_applied(path: Path, summary, untouched: dict[str, bytes]) -> None:
    art = open_artifact(path)
    assert compute_identity(art).digest == summary.target_identity
    for name, raw in untouched.items():
        assert raw_tensor(path, name) == raw, name


# --- round trips: every encoding x type -------------------------------------------------


@pytest.mark.parametrize("type_name", GGUF_TYPES)
def test_replace_round_trip(model, tmp_path, type_name):
    name = f"{type_name}.w"
    block, size = gguf.GGML_QUANT_SIZES[T[type_name]]
    before = {t.name: raw_tensor(model, t.name) for t in open_artifact(model).tensors}
    rng = np.random.default_rng(1)
    n_units = open_artifact(model).tensor(name).nbytes // size
    runs = [(0, 2), (5, 1), (n_units - 4, 3)]
    data = random_units(type_name, sum(n for _, n in runs), rng)
    b = DeltaBuilder(model)
    b.replace_units(name, [s for s, _ in runs], [n for _, n in runs], data)
    summary = b.write(tmp_path / "d.cdcd")
    apply_delta(model, tmp_path / "d.cdcd", trust=Trust.none())
    got = raw_tensor(model, name)
    expect = bytearray(before[name])
    pos = 0
    for s, n in runs:
        expect[s * size : (s + n) * size] = data[pos : pos + n * size]
        pos += n * size
    assert got == bytes(expect)
    check_applied(model, summary, {k: v for k, v in before.items() if k != name})


@pytest.mark.parametrize("type_name", REQUANT)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dense", [False, True])
def test_qadd_round_trip(model, tmp_path, type_name, bits, dense):
    name = f"{type_name}.w"
    t = open_artifact(model).tensor(name)
    g = 32  # group = Q8_0/Q4_0 block; float tensors use the default group of 32
    n_groups = t.n_elements // g
    runs = None if dense else [(1, 2), (30, 3), (n_groups - 1, 1)]
    count = n_groups if dense else sum(n for _, n in runs)
    rng = np.random.default_rng(2)
    lo, hi = (-127, 127) if bits == 8 else (-8, 7)
    q = rng.integers(lo, hi + 1, count * g).astype(np.int8)
    scales = rng.uniform(0.001, 0.02, count).astype(np.float16)
    before = raw_tensor(model, name)
    b = DeltaBuilder(model)
    b.add_quantized(name, runs, scales, q, bits=bits)
    summary = b.write(tmp_path / "d.cdcd")
    apply_delta(model, tmp_path / "d.cdcd", trust=Trust.none())
    # the spec, computed independently: dequantise -> add scale * q -> requantise
    _, gbytes = (g, gguf.GGML_QUANT_SIZES[T[type_name]][1] * (g // gguf.GGML_QUANT_SIZES[T[type_name]][0]))
    expect = bytearray(before)
    groups = [(0, n_groups)] if dense else runs
    k = 0
    for s, n in groups:
        old = before[s * gbytes : (s + n) * gbytes]
        delta = (q[k * g : (k + n) * g].astype(np.float32).reshape(n, g)
                 * scales[k : k + n].astype(np.float32)[:, None]).reshape(-1)
        expect[s * gbytes : (s + n) * gbytes] = req(type_name, deq(type_name, old) + delta)
        k += n
    assert raw_tensor(model, name) == bytes(expect)
    assert compute_identity(open_artifact(model)).digest == summary.target_identity


def lowrank_expected(type_name: str, before: bytes, a: np.ndarray, b: np.ndarray, scale: float) -> bytes:
    """The tensor's bytes after ``W += scale * B @ A`` as the spec computes it (delta.md 5.4)."""
    rows, cols = b.shape[0], a.shape[1]
    acc = np.zeros((rows, cols), np.float32)
    for k in range(a.shape[0]):  # the spec's fixed order
        acc += b[:, k : k + 1] * a[k : k + 1, :]
    w = deq(type_name, before).reshape(rows, cols)
    return req(type_name, (w + acc * np.float32(scale)).reshape(-1))


@pytest.mark.parametrize("type_name", REQUANT)
def test_lowrank_round_trip(model, tmp_path, type_name):
    name = f"{type_name}.w"
    t = open_artifact(model).tensor(name)
    rows, cols = t.shape
    rng = np.random.default_rng(3)
    a = (rng.standard_normal((3, cols)) * 0.1).astype(np.float16).astype(np.float32)
    bm = (rng.standard_normal((rows, 3)) * 0.1).astype(np.float16).astype(np.float32)
    before = raw_tensor(model, name)
    b = DeltaBuilder(model)
    b.add_low_rank(name, a, bm, scale=0.75)
    summary = b.write(tmp_path / "d.cdcd")
    apply_delta(model, tmp_path / "d.cdcd", chunk_size=1 << 20, trust=Trust.none())
    assert raw_tensor(model, name) == lowrank_expected(type_name, before, a, bm, 0.75)
    assert compute_identity(open_artifact(model)).digest == summary.target_identity


def test_lowrank_stochastic_rounding_q8_0(model, tmp_path):
    """Stochastic rounding keeps block scales, follows the spec's formula bit for bit,
    gives the same bytes whatever the chunking, undoes exactly, and is unbiased: an
    update of a fifth of a quantisation step arrives on average instead of rounding away."""
    from cdcca_edge.core.encodings import uniform_at

    name = "Q8_0.w"
    t = open_artifact(model).tensor(name)
    rows, cols = t.shape
    before = raw_tensor(model, name)
    blocks = np.frombuffer(before, np.uint8).reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32).reshape(-1)
    # a rank-1 update of +0.2 step in every block (B = the row's step, A = 0.2)
    a = np.full((1, cols), 0.2, np.float32)
    step_rows = d.reshape(rows, cols // 32).max(1)  # one block scale per row, roughly
    bm = step_rows[:, None].astype(np.float32)
    outs = []
    for chunk in (1 << 20, 2 << 20):
        copy = tmp_path / f"m{chunk}.gguf"
        shutil.copy(model, copy)
        b = DeltaBuilder(copy)
        b.add_low_rank(name, a, bm, scale=1.0, factor_dtype="f32", rounding="stochastic", seed=7)
        summary = b.write(tmp_path / f"d{chunk}.cdcd")
        apply_delta(copy, tmp_path / f"d{chunk}.cdcd", chunk_size=chunk, undo_out=tmp_path / f"u{chunk}.cdcd", trust=Trust.none())
        assert compute_identity(open_artifact(copy)).digest == summary.target_identity
        outs.append(raw_tensor(copy, name))
        apply_delta(copy, tmp_path / f"u{chunk}.cdcd", trust=Trust.none(), allow_downgrade=True)
        assert raw_tensor(copy, name) == before
    assert outs[0] == outs[1]
    # any partition of the blocks gives the same bytes (the draws are indexed by element)
    from cdcca_edge.core.encodings import q8_stochastic_add

    add_all = (bm * a).reshape(-1)
    whole = q8_stochastic_add(before, add_all, 0, 7)
    half = len(blocks) // 2
    parts = np.concatenate([q8_stochastic_add(before[: half * 34], add_all[: half * 32], 0, 7),
                            q8_stochastic_add(before[half * 34 :], add_all[half * 32 :], half * 32, 7)])
    assert np.array_equal(whole, parts) and whole.tobytes() == outs[0]
    new = np.frombuffer(outs[0], np.uint8).reshape(-1, 34)
    assert np.array_equal(new[:, :2], blocks[:, :2])  # scales kept
    # the spec's formula, recomputed here
    add = (bm * a).reshape(-1, 32)
    safe = np.where(d > 0, d, np.float32(1))
    u = uniform_at(7, np.arange(rows * cols, dtype=np.uint64)).reshape(-1, 32)
    q = blocks[:, 2:].view(np.int8).astype(np.float64)
    want = np.clip(np.floor(q + (add / safe[:, None]).astype(np.float64) + u), -127, 127).astype(np.int8)
    assert np.array_equal(new[:, 2:].view(np.int8)[d > 0], want[d > 0])
    # unbiased: the mean code change is the update in steps, not 0 as nearest rounding gives
    moved = (new[:, 2:].view(np.int8).astype(np.float64) - q)[d > 0]
    expect = (add / safe[:, None])[d > 0]
    assert abs(moved.mean() - expect.mean()) < 0.05 and expect.mean() > 0.1
    # nearest rounding would have erased it
    b = DeltaBuilder(model)
    with pytest.raises(UsageError, match="Q8_0"):
        b.add_low_rank("F32.w", np.zeros((1, open_artifact(model).tensor("F32.w").shape[1]), np.float32),
                       np.zeros((open_artifact(model).tensor("F32.w").shape[0], 1), np.float32), 1.0,
                       rounding="stochastic")


@pytest.mark.parametrize("type_name", REQUANT)
def test_lowrank_mx_round_trip(model, tmp_path, type_name):
    """Mixed-precision factors: the payload is laid out as the spec says (read here with
    zlib and numpy, not the module's decoder) and the tensor gets exactly the spec's
    result from the decoded factors."""
    import zlib

    name = f"{type_name}.w"
    t = open_artifact(model).tensor(name)
    rows, cols = t.shape
    rng = np.random.default_rng(5)
    a = rng.standard_normal((3, cols)).astype(np.float32) * 0.1
    bm = rng.standard_normal((rows, 3)).astype(np.float32) * 0.1
    bits, g = [8, 4, 2], 48
    before = raw_tensor(model, name)
    b = DeltaBuilder(model)
    b.add_low_rank(name, a, bm, scale=0.5, factor_dtype="mx", bits=bits, group=g)
    summary = b.write(tmp_path / "d.cdcd")
    delta = df.read_delta(tmp_path / "d.cdcd")
    (rec,) = delta.header.records
    assert rec.params["bits"] == bits and rec.params["group"] == g
    payload = delta.read_payload(rec)
    d = zlib.decompressobj()
    codes = np.frombuffer(d.decompress(payload), np.int8)
    assert d.eof and codes.size == 3 * (rows + cols)
    n_scales = 3 * (-(-cols // g) + -(-rows // g))
    scales = np.frombuffer(d.unused_data, "<f2").astype(np.float32)
    assert scales.size == n_scales
    fa, fb = np.zeros((3, cols), np.float32), np.zeros((rows, 3), np.float32)
    c = s = 0
    for k, nb in enumerate(bits):
        lim = 2 ** (nb - 1) - 1
        for vec_len, put in ((cols, lambda v, k=k: fa.__setitem__(k, v)),
                             (rows, lambda v, k=k: fb.__setitem__((slice(None), k), v))):
            q = codes[c : c + vec_len]
            assert np.abs(q.astype(int)).max() <= lim
            sc = scales[s : s + -(-vec_len // g)]
            put(q.astype(np.float32) * sc[np.arange(vec_len) // g])
            c += vec_len
            s += -(-vec_len // g)
    # wider components reproduce their factor better
    rel = [np.linalg.norm(fa[k] - a[k]) / np.linalg.norm(a[k]) for k in range(3)]
    assert rel[0] < 0.01 < rel[1] < rel[2] < 0.6
    apply_delta(model, tmp_path / "d.cdcd", chunk_size=1 << 20, trust=Trust.none())
    assert raw_tensor(model, name) == lowrank_expected(type_name, before, fa, fb, 0.5)
    assert compute_identity(open_artifact(model)).digest == summary.target_identity


def test_lowrank_mx_builder_refuses_bad_widths(model):
    t = open_artifact(model).tensor("F32.w")
    rows, cols = t.shape
    b = DeltaBuilder(model)
    for bits, group in (([9], 64), ([1], 64), ([8, 8], 64), ([8], 0)):
        with pytest.raises(UsageError, match="mx factors"):
            b.add_low_rank("F32.w", np.zeros((1, cols)), np.zeros((rows, 1)), 1.0, factor_dtype="mx",
                           bits=bits, group=group)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), bits=st.integers(2, 8), group=st.integers(1, 80), seed=st.integers(0, 2**16),
       spread=st.floats(1e-6, 1e3))
def test_mx_quantize_properties(n, bits, group, seed, spread):
    """Codes stay in range, the group scales decode them, and the error per value is at
    most half a step unless the writer chose to clip that group."""
    from cdcca_edge.core.encodings import decode_mx_factors, encode_mx_factors, mx_dequantize, mx_quantize

    v = (np.random.default_rng(seed).standard_normal(n) * spread).astype(np.float32)
    q, s = mx_quantize(v, bits, group)
    lim = 2 ** (bits - 1) - 1
    assert q.dtype == np.int8 and q.shape == (n,) and np.abs(q.astype(int)).max() <= lim
    assert s.shape == (-(-n // group),) and np.all(np.isfinite(s))
    back = mx_dequantize(q, s, group)
    step = s.astype(np.float32)[np.arange(n) // group]
    top = np.abs(v) <= lim * step  # values inside the chosen range
    assert np.all(np.abs(back - v)[top] <= 0.5 * step[top] * (1 + 1e-3) + 1e-30)
    # as factors: one component of a (n, n) matrix, through the record payload
    a, b = decode_mx_factors(encode_mx_factors(v[None, :], v[:, None], [bits], group), [bits], group,
                             n, n, "t")
    assert np.array_equal(a[0], back) and np.array_equal(b[:, 0], back)


@pytest.mark.parametrize("init", ["w32", "w16"])
@pytest.mark.parametrize("encoding", ["replace", "qadd", "lowrank"])
def test_onnx_initializers_patched_and_run(tmp_path, init, encoding):
    """F32 and F16 initializers in ONNX external data, every encoding; onnxruntime then
    computes with the new weights."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    d = make_onnx(tmp_path / "onnx")
    rng = np.random.default_rng(4)
    es = 4 if init == "w32" else 2
    b = DeltaBuilder(d)
    if encoding == "replace":
        vals = rng.standard_normal(5).astype(np.float32 if init == "w32" else np.float16)
        b.replace_units(init, [3], [5], vals.tobytes())
    elif encoding == "qadd":
        b.add_quantized(init, [(2, 3)], np.full(3, 0.01, np.float16), rng.integers(-100, 100, 96), bits=8)
    else:
        b.add_low_rank(init, rng.standard_normal((2, 64)) * 0.1, rng.standard_normal((8, 2)) * 0.1, 0.5)
    summary = b.write(tmp_path / "d.cdcd")
    before = (d / "model.onnx_data").read_bytes()
    apply_delta(d, tmp_path / "d.cdcd", trust=Trust.none())
    assert compute_identity(open_artifact(d)).digest == summary.target_identity
    assert (d / "model.onnx_data").read_bytes() != before and es
    m = onnx.load(str(d / "model.onnx"))
    w = sum(numpy_helper.to_array(i).astype(np.float32) for i in m.graph.initializer)
    x = rng.standard_normal((1, 8)).astype(np.float32)
    y = ort.InferenceSession(str(d / "model.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("encoding", ["qadd", "lowrank"])
def test_q4k_supports_replacement_only(model, encoding):
    """The device never re-quantises Q4_K: llama.cpp's quantiser writes other bytes on
    aarch64 than on x86-64, so the writer refuses (and the patcher too, test_patch_hostile)."""
    b = DeltaBuilder(model)
    with pytest.raises(UsageError, match="makes the device re-quantise Q4_K"):
        if encoding == "qadd":
            b.add_quantized("Q4_K.w", None, np.ones(16), np.ones(16 * 256 // 32 * 32), bits=8)
        else:
            b.add_low_rank("Q4_K.w", np.ones((1, 256)), np.ones((16, 1)), 1.0)


def test_int4_packing():
    q = np.arange(-8, 8, dtype=np.int8)
    np.testing.assert_array_equal(unpack_int4(pack_int4(q), q.size), q)


def test_records_split_at_the_size_limit(model, tmp_path, monkeypatch):
    import cdcca_edge.core.delta_build as db

    monkeypatch.setattr(db, "MAX_RECORD_PAYLOAD", 4096)
    new = random_units("F32", 16 * 256, np.random.default_rng(5))
    b = DeltaBuilder(model)
    b.replace_tensor("F32.w", new)
    s = b.write(tmp_path / "d.cdcd")
    assert s.records > 3
    apply_delta(model, tmp_path / "d.cdcd", trust=Trust.none())
    assert raw_tensor(model, "F32.w") == new


# --- properties --------------------------------------------------------------------------


@st.composite
def changes(draw):
    """A random mix of records over random tensors (disjoint per tensor)."""
    ops = []
    for type_name in draw(st.lists(st.sampled_from(GGUF_TYPES), min_size=1, max_size=4, unique=True)):
        enc = draw(st.sampled_from(["replace"] if type_name == "Q4_K" else ["replace", "qadd", "lowrank"]))
        ops.append((type_name, enc, draw(st.integers(0, 2**31 - 1))))
    return ops


def build(model: Path, out: Path, ops) -> object:
    b = DeltaBuilder(model)
    for type_name, enc, seed in ops:
        rng = np.random.default_rng(seed)
        t = open_artifact(model).tensor(f"{type_name}.w")
        block, size = gguf.GGML_QUANT_SIZES[T[type_name]]
        n_units = t.nbytes // size
        if enc == "replace":
            s = int(rng.integers(0, n_units - 4))
            n = int(rng.integers(1, 4))
            b.replace_units(t.name, [s], [n], random_units(type_name, n, rng))
        elif enc == "qadd":
            g = max(32, block)  # a group is whole blocks (a Q4_K super-block is 256)
            n_groups = t.n_elements // g
            s = int(rng.integers(0, n_groups - 3))
            b.add_quantized(t.name, [(s, 2)], rng.uniform(0.001, 0.01, 2), rng.integers(-9, 9, 2 * g), bits=8)
        elif seed % 2:  # mixed-precision factors
            b.add_low_rank(t.name, rng.standard_normal((2, t.shape[1])) * 0.05,
                           rng.standard_normal((t.shape[0], 2)) * 0.05, 1.0, factor_dtype="mx", bits=[8, 3])
        else:
            b.add_low_rank(t.name, rng.standard_normal((2, t.shape[1])) * 0.05,
                           rng.standard_normal((t.shape[0], 2)) * 0.05, 1.0)
    return b.write(out)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=changes())
def test_apply_then_undo_is_identity(tmp_path_factory, ops):
    d = tmp_path_factory.mktemp("undo")
    model = make_gguf(d / "m.gguf")
    original = file_digest(model)
    summary = build(model, d / "d.cdcd", ops)
    apply_delta(model, d / "d.cdcd", undo_out=d / "undo.cdcd", trust=Trust.none())
    assert compute_identity(open_artifact(model)).digest == summary.target_identity
    assert file_digest(model) != original or summary.base_identity == summary.target_identity
    apply_delta(model, d / "undo.cdcd", trust=Trust.none(), allow_downgrade=True)
    assert file_digest(model) == original
    assert not journal_path(open_artifact(model)).exists()


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzzbase")
    model = make_gguf(d / "m.gguf")
    build(model, d / "d.cdcd", [("Q8_0", "replace", 1), ("F16", "qadd", 2), ("Q4_0", "lowrank", 3)])
    return model, (d / "d.cdcd").read_bytes()


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncated_or_flipped_delta_changes_nothing(fuzz_base, tmp_path_factory, data):
    hostile("delta")
    base, original = fuzz_base
    raw = bytearray(original)
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 3))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
    assume(bytes(raw) != original)  # two flips of one bit cancel out
    d = tmp_path_factory.mktemp("fz")
    model = d / "m.gguf"
    shutil.copy(base, model)
    before = file_digest(model)
    (d / "bad.cdcd").write_bytes(bytes(raw))
    with pytest.raises(ERRORS):
        apply_delta(model, d / "bad.cdcd", trust=Trust.none())
    assert file_digest(model) == before
    assert not journal_path(open_artifact(model)).exists()


def _set_record(i: int, **kv):
    def mutate(h, payload):
        h["records"][i].update(kv)
    return mutate


def _flip_payload(at: int):
    def mutate(h, payload):
        payload[at] ^= 0xFF
    return mutate


def _mx(**kv):
    """Record 2 of the fuzz base (mx factors, rank 2, bits [8, 3]) with params changed."""
    return _set_record(2, params={"rank": 2, "scale": 1.0, "factor_dtype": "mx", "bits": [8, 3], "group": 64, **kv})


def _flip_record_payload(i: int, at: int):
    def mutate(h, payload):
        payload[h["records"][i]["offset"] + at] ^= 0xFF
    return mutate


HOSTILE = {
    "other tensor": (_set_record(0, tensor="F32.w"), FormatError),
    "missing tensor": (_set_record(0, tensor="nope"), FormatError),
    "other type": (_set_record(0, type="F16"), FormatError),
    "other shape": (_set_record(0, shape=[8, 512]), FormatError),
    "unknown encoding": (_set_record(0, encoding="xor"), FormatError),
    "payload outside": (_set_record(0, offset=10**9), FormatError),
    "payload too short": (_set_record(0, length=5), FormatError),
    "pre-image lie": (_set_record(0, pre_digest="0" * 64), IntegrityError),
    "post-image lie": (_set_record(1, post_digest="f" * 64), IntegrityError),
    "index garbage": (_flip_payload(6), FormatError),
    "base identity": (lambda h, p: h.update(base_identity="a" * 64), IntegrityError),
    "format": (lambda h, p: h.update(artifact_format="onnx"), FormatError),
    "bad scale": (_set_record(1, params={"bits": 3, "dense": False}), FormatError),
    "lowrank nan scale": (_set_record(2, params={"rank": 2, "scale": None, "factor_dtype": "f16"}), FormatError),
    "mx bits too wide": (_mx(bits=[9, 3]), FormatError),
    "mx bits too narrow": (_mx(bits=[8, 1]), FormatError),
    "mx bits missing one": (_mx(bits=[8]), FormatError),
    "mx bits as bools": (_mx(bits=[True, 3]), FormatError),
    "mx no group": (_mx(group=None), FormatError),
    "mx group zero": (_mx(group=0), FormatError),
    "mx group huge": (_mx(group=1 << 17), FormatError),
    "mx other group": (_mx(group=32), FormatError),  # the scales no longer fill the payload
    "mx codes out of range": (_mx(bits=[2, 3]), FormatError),  # 8-bit codes read as 2-bit
    "mx rank beyond codes": (_mx(rank=3, bits=[8, 3, 3]), FormatError),
    "mx zlib garbage": (_flip_record_payload(2, 0), FormatError),
    "mx inflates past its codes": (_mx(rank=1, bits=[8]), FormatError),
    "overlapping records": (lambda h, p: h["records"].append(dict(h["records"][0])), FormatError),
    # the device never re-quantises a K type (platform-dependent quantiser): section 5.5
    "qadd on Q4_K": (lambda h, p: h["records"][1].update(tensor="Q4_K.w", type="Q4_K"), FormatError),
    "lowrank on Q4_K": (lambda h, p: h["records"][2].update(tensor="Q4_K.w", type="Q4_K"), FormatError),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_delta_changes_nothing(fuzz_base, tmp_path, case):
    """Deltas forged with a valid digest (no key needed for that) are still refused by the
    record checks, and the model is left as it was."""
    hostile("delta")
    base, raw = fuzz_base
    model = tmp_path / "m.gguf"
    shutil.copy(base, model)
    (tmp_path / "good.cdcd").write_bytes(raw)
    mutate, err = HOSTILE[case]
    forged = reseal(tmp_path / "good.cdcd", tmp_path / "forged.cdcd", mutate)
    before = file_digest(model)
    with pytest.raises(err):
        apply_delta(model, forged, trust=Trust.none())
    assert file_digest(model) == before
    assert not journal_path(open_artifact(model)).exists()


# --- checks before writing -------------------------------------------------------------


def test_wrong_base_is_refused(tmp_path):
    a = make_gguf(tmp_path / "a.gguf", seed=0)
    other = make_gguf(tmp_path / "b.gguf", seed=1)
    build(a, tmp_path / "d.cdcd", [("Q8_0", "replace", 0)])
    before = file_digest(other)
    with pytest.raises(IntegrityError, match="wrong base"):
        apply_delta(other, tmp_path / "d.cdcd", trust=Trust.none())
    assert file_digest(other) == before


def test_applying_twice_is_a_no_op(model, tmp_path):
    build(model, tmp_path / "d.cdcd", [("Q8_0", "replace", 0)])
    assert apply_delta(model, tmp_path / "d.cdcd", trust=Trust.none()).applied
    after = file_digest(model)
    again = apply_delta(model, tmp_path / "d.cdcd", trust=Trust.none())
    assert again.already_applied and not again.applied
    assert file_digest(model) == after
    state = read_state(open_artifact(model))
    assert state.version == 1 and state.history[-1]["event"] == "patch"


def test_stale_state_is_recomputed(model, tmp_path):
    """A sidecar whose fingerprint no longer matches is not trusted."""
    build(model, tmp_path / "d.cdcd", [("F16", "qadd", 0)])
    apply_delta(model, tmp_path / "d.cdcd", trust=Trust.none())
    # someone rewrites the file behind cdcca's back: the recorded identity is now a lie
    make_gguf(model, seed=5)
    d2 = tmp_path / "d2.cdcd"
    build(model, d2, [("F32", "replace", 1)])
    r = apply_delta(model, d2, trust=Trust.none())
    assert r.applied and r.identity_check == "computed"


def test_dry_run_writes_nothing(model, tmp_path):
    build(model, tmp_path / "d.cdcd", [("Q4_0", "lowrank", 0), ("F32", "replace", 1)])
    before = file_digest(model)
    r = apply_delta(model, tmp_path / "d.cdcd", dry_run=True, trust=Trust.none())
    assert r.dry_run and not r.applied and len(r.records) == 2 and r.region_bytes > 0
    assert file_digest(model) == before


def test_lock_excludes_a_second_patcher(model, tmp_path):
    build(model, tmp_path / "d.cdcd", [("Q8_0", "replace", 0)])
    fd = os.open(model, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(UsageError, match="in use.*this process holds it"):
            apply_delta(model, tmp_path / "d.cdcd", trust=Trust.none())
    finally:
        os.close(fd)
    assert apply_delta(model, tmp_path / "d.cdcd", trust=Trust.none()).applied


# --- trust -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    df.generate_keypair(d / "a.pem", d / "a.pub")
    df.generate_keypair(d / "b.pem", d / "b.pub")
    return d


def test_signed_delta_with_trusted_key(model, tmp_path, keys):
    b = DeltaBuilder(model)
    b.replace_units("Q8_0.w", [0], [1], bytes(34))
    s = b.write(tmp_path / "d.cdcd", sign_key=df.load_private_key(keys / "a.pem"))
    assert s.signed and df.read_delta(s.path).signature.key_id
    assert apply_delta(model, s.path, trust=Trust.keys([keys / "a.pub"])).applied


@pytest.mark.parametrize("case", ["unsigned", "other key", "bad signature"])
def test_untrusted_delta_is_refused(model, tmp_path, keys, case, monkeypatch):
    b = DeltaBuilder(model)
    b.replace_units("Q8_0.w", [0], [1], bytes(34))
    key = None if case == "unsigned" else df.load_private_key(keys / ("b.pem" if case == "other key" else "a.pem"))
    path = b.write(tmp_path / "d.cdcd", sign_key=key).path
    if case == "bad signature":
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0x01  # last byte of the signature
        path.write_bytes(bytes(raw))
    # the key comes from the environment this time, as a device would configure it
    monkeypatch.setenv("CDCCA_TRUSTED_KEYS", str(keys / "a.pub"))
    before = file_digest(model)
    with pytest.raises(IntegrityError, match={"unsigned": "unsigned", "other key": "not trusted",
                                              "bad signature": "bad signature"}[case]):
        apply_delta(model, path, trust=Trust.configured())
    assert file_digest(model) == before


# --- crashes, full disks, read-only files -------------------------------------------------

CRASH_SCRIPT = textwrap.dedent("""
    import sys
    from cdcca_edge.core.patch import apply_delta
    from cdcca_edge.core.trust import Trust
    apply_delta(sys.argv[1], sys.argv[2], trust=Trust.none())
""")


def test_kill_9_at_random_points_leaves_old_or_new(tmp_path):
    """SIGKILL the patch process at 60 random points of its write path (the crash hook
    counts journal entries, written windows, fsyncs and the commit); after recovery the
    model is exactly the old or the new one, never a mixture."""
    base = make_gguf(tmp_path / "base.gguf")
    b = DeltaBuilder(base)  # 12 replaced runs, a qadd and a low-rank update: ~20 crash points
    b.replace_units("Q8_0.w", list(range(0, 120, 10)), [2] * 12, random_units("Q8_0", 24, np.random.default_rng(3)))
    b.add_quantized("F16.w", [(3, 4)], [0.01] * 4, [5] * 128)
    b.add_low_rank("Q4_0.w", np.ones((2, 256)) * 0.01, np.ones((16, 2)) * 0.01, 1.0)
    b.write(tmp_path / "d.cdcd")
    done = tmp_path / "done.gguf"
    shutil.copy(base, done)
    apply_delta(done, tmp_path / "d.cdcd", trust=Trust.none())
    old, new = file_digest(base), file_digest(done)
    rng = random.Random(0)
    outcomes = {"old": 0, "new": 0}
    for trial in range(60):
        model = tmp_path / f"t{trial}.gguf"
        shutil.copy(base, model)
        env = dict(os.environ, CDCCA_TEST_CRASH_AFTER=str(rng.randint(1, 24)))
        proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(model), str(tmp_path / "d.cdcd")],
                              env=env, capture_output=True, timeout=120)
        assert proc.returncode in (0, -9), proc.stderr
        recover(model)
        digest = file_digest(model)
        assert digest in (old, new), f"trial {trial}: a mixture of old and new"
        outcomes["old" if digest == old else "new"] += 1
        assert not journal_path(open_artifact(model)).exists()
        # and the model is fully usable afterwards: the same delta applies or is a no-op
        r = apply_delta(model, tmp_path / "d.cdcd", trust=Trust.none())
        assert file_digest(model) == new and (r.applied or r.already_applied)
    assert outcomes["old"] and outcomes["new"]  # both sides of the commit were hit


def test_runtime_load_recovers_an_interrupted_patch(tmp_path):
    from cdcca_edge.runtime import load  # noqa: F401 - load() runs recovery first

    base = make_gguf(tmp_path / "m.gguf")
    build(base, tmp_path / "d.cdcd", [("Q8_0", "replace", 1)])
    before = file_digest(base)
    env = dict(os.environ, CDCCA_TEST_CRASH_AFTER="3")
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(base), str(tmp_path / "d.cdcd")],
                          env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9
    assert journal_path(open_artifact(base)).exists()
    from cdcca_edge.core.patch import recover as _recover

    assert _recover(base) in ("discarded", "rolled back")
    assert file_digest(base) == before


def test_disk_full_before_journal(model, tmp_path, monkeypatch):
    import cdcca_edge.core.patch as patch_mod

    build(model, tmp_path / "d.cdcd", [("Q8_0", "replace", 0)])
    before = file_digest(model)
    monkeypatch.setattr(patch_mod.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 10, 10))
    with pytest.raises(StorageError, match="no space for the patch journal"):
        apply_delta(model, tmp_path / "d.cdcd", trust=Trust.none())
    assert file_digest(model) == before and not journal_path(open_artifact(model)).exists()


def test_disk_full_while_journaling(tmp_path):
    """A real write failure (file size limit) half-way through the journal."""
    model = make_gguf(tmp_path / "m.gguf")
    b = DeltaBuilder(model)
    b.replace_tensor("F32.w", random_units("F32", 16 * 256, np.random.default_rng(7)))
    b.write(tmp_path / "d.cdcd")
    before = file_digest(model)
    code = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        from cdcca_edge.cli import main
        sys.exit(main(["patch", {str(model)!r}, {str(tmp_path / 'd.cdcd')!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "patch journal" in proc.stderr and "unchanged" in proc.stderr
    assert file_digest(model) == before and not journal_path(open_artifact(model)).exists()


def test_read_only_model(model, tmp_path):
    build(model, tmp_path / "d.cdcd", [("Q8_0", "replace", 0)])
    before = file_digest(model)
    if os.geteuid() == 0:  # root ignores file modes: make the file immutable instead
        if subprocess.run(["chattr", "+i", str(model)], capture_output=True).returncode:
            pytest.skip("chattr +i unavailable on this file system")
        undo = ["chattr", "-i", str(model)]
    else:
        model.chmod(0o444)
        undo = None
    try:
        with pytest.raises(StorageError, match="cannot open for writing"):
            apply_delta(model, tmp_path / "d.cdcd", trust=Trust.none())
    finally:
        if undo:
            subprocess.run(undo, check=True)
    assert file_digest(model) == before


# --- delta diff ----------------------------------------------------------------------------


def test_diff_is_exact_and_minimal(tmp_path):
    old = make_gguf(tmp_path / "old.gguf", seed=0)
    new = tmp_path / "new.gguf"
    shutil.copy(old, new)
    t = open_artifact(new).tensor("Q8_0.w")
    raw = bytearray(new.read_bytes())
    raw[t.offset + 34 * 5 + 3] ^= 0x10  # one byte in block 5
    raw[t.offset + 34 * 9] ^= 0x01  # block 9
    new.write_bytes(bytes(raw))
    s = diff_artifacts(old, new, tmp_path / "d.cdcd")
    assert s.records == 1 and s.touched_bytes == 2 * 34
    apply_delta(old, tmp_path / "d.cdcd", trust=Trust.none())
    assert old.read_bytes() == new.read_bytes()
    same = diff_artifacts(new, new, tmp_path / "none.cdcd")
    assert same.records == 0


def test_diff_refuses_different_layouts(tmp_path):
    a = make_gguf(tmp_path / "a.gguf", cols=256)
    b = make_gguf(tmp_path / "b.gguf", cols=512)
    with pytest.raises(UsageError, match="different tensor layouts"):
        diff_artifacts(a, b, tmp_path / "d.cdcd")


def test_small_chunks_bound_the_maps(model, tmp_path):
    """The window never exceeds chunk_size, so many windows are needed: same result."""
    new = random_units("F32", 16 * 256, np.random.default_rng(9))
    b = DeltaBuilder(model)
    b.replace_tensor("F32.w", new)
    b.write(tmp_path / "d.cdcd")
    apply_delta(model, tmp_path / "d.cdcd", chunk_size=1 << 20, trust=Trust.none())
    assert raw_tensor(model, "F32.w") == new
    with pytest.raises(UsageError, match="minimum"):
        apply_delta(model, tmp_path / "d.cdcd", chunk_size=4096, trust=Trust.none())


def test_builder_rejects_runs_outside_the_tensor(model):
    b = DeltaBuilder(model)
    with pytest.raises(UsageError, match="past the tensor"):
        b.replace_units("Q8_0.w", [127], [2], bytes(68))


def _lowrank_and_replace(model: Path, out: Path):
    rng = np.random.default_rng(5)
    b = DeltaBuilder(model)
    b.replace_units("Q8_0.w", [1, 30], [2, 3], random_units("Q8_0", 5, rng))
    b.add_low_rank("F32.w", rng.standard_normal((2, 256)) * 0.05, rng.standard_normal((16, 2)) * 0.05, 1.0)
    return b, b.write(out)


def test_builder_bytes_applied_as_computed_equal_decoding(tmp_path):
    """The cloud advances its mirror with the bytes the builder computed: the result is
    the bytes a device decoding the delta writes."""
    a, c = make_gguf(tmp_path / "a.gguf"), make_gguf(tmp_path / "c.gguf")
    b, s = _lowrank_and_replace(a, tmp_path / "d.cdcd")
    r = apply_delta(a, tmp_path / "d.cdcd", trust=Trust.none(), computed=b.new_bytes())
    apply_delta(c, tmp_path / "d.cdcd", trust=Trust.none())
    assert r.applied and a.read_bytes() == c.read_bytes()
    assert compute_identity(open_artifact(a)).digest == s.target_identity


@pytest.mark.parametrize("case", ["one byte off", "a span missing", "a record missing"])
def test_computed_bytes_that_differ_from_the_delta_are_refused(tmp_path, case):
    a = make_gguf(tmp_path / "a.gguf")
    b, _ = _lowrank_and_replace(a, tmp_path / "d.cdcd")
    new = b.new_bytes()
    if case == "one byte off":
        new[1][0] = bytes([new[1][0][0] ^ 1]) + new[1][0][1:]
        err = IntegrityError
    elif case == "a span missing":
        new[0] = new[0][:-1]
        err = UsageError
    else:
        new = new[:1]
        err = UsageError
    before = a.read_bytes()
    with pytest.raises(err):
        apply_delta(a, tmp_path / "d.cdcd", trust=Trust.none(), computed=new)
    assert a.read_bytes() == before and not journal_path(open_artifact(a)).exists()


def test_resign_replaces_only_the_signature(tmp_path):
    """After a key rotation a published delta is re-signed: same records, payload and
    digest; trusted under the new key, refused under the old; an altered delta is not
    re-signed."""
    from tests.core.delta_helpers import make_gguf

    old = make_gguf(tmp_path / "a.gguf")
    new = make_gguf(tmp_path / "b.gguf", seed=5)
    for name in ("k1", "k2"):
        df.generate_keypair(tmp_path / f"{name}.pem", tmp_path / f"{name}.pub")
    diff_artifacts(old, new, tmp_path / "d.cdcd", sign_key=df.load_private_key(tmp_path / "k1.pem"))
    kid = df.resign_delta(tmp_path / "d.cdcd", tmp_path / "r.cdcd", df.load_private_key(tmp_path / "k2.pem"))
    a, b = df.read_delta(tmp_path / "d.cdcd"), df.read_delta(tmp_path / "r.cdcd")
    assert a.digest == b.digest and a.header == b.header and b.signature.key_id == kid
    df.check_trust(b, [df.load_public_key(tmp_path / "k2.pub")])
    with pytest.raises(IntegrityError):
        df.check_trust(b, [df.load_public_key(tmp_path / "k1.pub")])
    raw = bytearray((tmp_path / "d.cdcd").read_bytes())
    raw[200] ^= 1
    (tmp_path / "bad.cdcd").write_bytes(bytes(raw))
    with pytest.raises((FormatError, IntegrityError)):
        df.resign_delta(tmp_path / "bad.cdcd", tmp_path / "x.cdcd", df.load_private_key(tmp_path / "k2.pem"))
    assert not (tmp_path / "x.cdcd").exists()


@settings(max_examples=200, deadline=None)
@given(type_name=st.sampled_from(sorted(HALF_FIELDS)),
       data=st.binary(min_size=1, max_size=4096), special=st.booleans())
def test_finite_check_from_float16_fields_equals_dequantising(type_name, data, special):
    """The patcher's finite check reads only each block's float16 fields (core/ggml.py
    HALF_FIELDS); it must say exactly what gguf-py's dequantiser says, on any bytes."""
    block, size = gguf.GGML_QUANT_SIZES[T[type_name]]
    n = max(1, len(data) // size)
    raw = bytearray((data * (n * size // len(data) + 1))[: n * size])
    if special:  # an inf or nan in a float16 field of the first block
        off = HALF_FIELDS[type_name][-1]
        raw[off:off + 2] = np.array([np.inf if len(data) % 2 else np.nan], np.float16).tobytes()
    with np.errstate(all="ignore"):
        vals = gguf.quants.dequantize(np.frombuffer(bytes(raw), np.uint8), T[type_name]).reshape(n, block)
    np.testing.assert_array_equal(blocks_nonfinite(type_name, bytes(raw)), ~np.isfinite(vals).all(1))
