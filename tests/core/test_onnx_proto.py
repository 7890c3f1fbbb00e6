"""The torch-free ONNX reader: finds every initializer's bytes exactly where onnx says."""

from __future__ import annotations

import os
import stat

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from cdcca_edge.cli import main
from cdcca_edge.core import onnx_proto as P
from cdcca_edge.core.artifact import open_artifact
from cdcca_edge.core.errors import FormatError
from cdcca_edge.core.onnx_proto import read_onnx_model
from tests.core.hostile_fs import HOSTILE_PATHS, LONG_NAME, add_traps, no_hang
from tests.hostile import hostile


def _model(inits: list[onnx.TensorProto], meta: dict[str, str] | None = None) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [x], [y], initializer=inits)
    model = helper.make_model(graph)
    for k, v in (meta or {}).items():
        e = model.metadata_props.add()
        e.key, e.value = k, v
    return model


def _inits():
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((3, 4)).astype(np.float32),
        "h": rng.standard_normal((5,)).astype(np.float16),
        "i": np.arange(6, dtype=np.int64).reshape(2, 3),
    }


@pytest.mark.parametrize("external", [False, True])
def test_initializer_bytes_located(tmp_path, external):
    arrays = _inits()
    model = _model([numpy_helper.from_array(a, n) for n, a in arrays.items()], {"cdcca.x": "1"})
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=external,
                    all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=0)
    info = read_onnx_model(path)
    assert info.metadata == {"cdcca.x": "1"}
    art = open_artifact(tmp_path)
    assert {t.name for t in art.tensors} == set(arrays)
    for t in art.tensors:
        raw = t.file.read_bytes()[t.offset : t.offset + t.nbytes]
        assert raw == arrays[t.name].tobytes()
        assert t.shape == arrays[t.name].shape
        assert t.file.name == ("model.onnx_data" if external else "model.onnx")
    assert {t.name: t.type_name for t in art.tensors} == {"w": "F32", "h": "F16", "i": "I64"}


def test_typed_field_data_is_rejected_with_fix(tmp_path):
    hostile("onnx")
    t = helper.make_tensor("w", TensorProto.FLOAT, [3, 4], np.zeros(12, np.float32).tolist())
    onnx.save_model(_model([t]), str(tmp_path / "model.onnx"))
    with pytest.raises(FormatError, match="external data file"):
        open_artifact(tmp_path)


def test_missing_external_file(tmp_path):
    hostile("onnx")
    model = _model([numpy_helper.from_array(_inits()["w"], "w")])
    onnx.save_model(model, str(tmp_path / "model.onnx"), save_as_external_data=True,
                    location="model.onnx_data", size_threshold=0)
    (tmp_path / "model.onnx_data").unlink()
    with pytest.raises(FormatError, match="external data file 'model.onnx_data' is missing"):
        open_artifact(tmp_path)


def test_external_location_outside_dir(tmp_path):
    hostile("onnx")
    model = _model([numpy_helper.from_array(_inits()["w"], "w")])
    sub = tmp_path / "m"
    sub.mkdir()
    onnx.save_model(model, str(sub / "model.onnx"), save_as_external_data=True,
                    location="model.onnx_data", size_threshold=0)
    m = onnx.load(str(sub / "model.onnx"), load_external_data=False)
    for e in m.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = "../evil.bin"
    (tmp_path / "evil.bin").write_bytes(b"\0" * 48)
    onnx.save_model(m, str(sub / "model.onnx"))
    with pytest.raises(FormatError, match="outside the model directory"):
        open_artifact(sub)


def test_directory_without_model(tmp_path):
    hostile("onnx")
    with pytest.raises(FormatError, match="has no model.onnx"):
        open_artifact(tmp_path)


def test_external_location_is_the_model_file(tmp_path):
    hostile("onnx")
    model = _model([numpy_helper.from_array(_inits()["w"], "w")])
    onnx.save_model(model, str(tmp_path / "model.onnx"), save_as_external_data=True,
                    location="model.onnx_data", size_threshold=0)
    m = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    for e in m.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = "model.onnx"
    onnx.save_model(m, str(tmp_path / "model.onnx"))
    with pytest.raises(FormatError, match="claims the model file itself"):
        open_artifact(tmp_path)


@pytest.mark.parametrize("key,value,message", [("offset", "-8", "negative external"),
                                                ("length", "7", "length 7 != 48")])
def test_bad_external_offsets(tmp_path, key, value, message):
    hostile("onnx")
    model = _model([numpy_helper.from_array(_inits()["w"], "w")])
    onnx.save_model(model, str(tmp_path / "model.onnx"), save_as_external_data=True,
                    location="model.onnx_data", size_threshold=0)
    m = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    entries = m.graph.initializer[0].external_data
    for e in entries:
        if e.key == key:
            e.value = value
            break
    else:
        e = entries.add()
        e.key, e.value = key, value
    onnx.save_model(m, str(tmp_path / "model.onnx"))
    with pytest.raises(FormatError, match=message):
        open_artifact(tmp_path)


def _fuzz(raw: bytearray, data) -> bytearray:
    if data.draw(st.booleans()):
        return raw[: data.draw(st.integers(0, len(raw) - 1))]
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= 1 << data.draw(st.integers(0, 7))
    return raw


def _check_contract(d):
    try:
        art = open_artifact(d)
    except FormatError:
        return
    by_file: dict = {}
    for t in art.tensors:
        assert t.offset >= 0 and t.offset + t.nbytes <= t.file.stat().st_size
        assert t.file.parent == d.resolve()
        by_file.setdefault(t.file, []).append((t.offset, t.offset + t.nbytes))
    for spans in by_file.values():
        spans.sort()
        assert all(e0 <= s1 for (_, e0), (s1, _) in zip(spans, spans[1:]))


@pytest.fixture(scope="module")
def fuzz_models(tmp_path_factory):
    """Serialised models to mutate (built once): inline, and external with its data file
    in a directory the mutated model.onnx is rewritten into."""
    arrays = _inits()
    inits = [numpy_helper.from_array(a, n) for n, a in arrays.items()]
    inline = _model(inits).SerializeToString()
    d = tmp_path_factory.mktemp("fuzzx")
    onnx.save_model(_model(inits), str(d / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=0)
    return inline, d, (d / "model.onnx").read_bytes(), tmp_path_factory.mktemp("fuzz")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_inline_model_never_crashes(fuzz_models, data):
    inline, _, _, d = fuzz_models
    raw = bytes(_fuzz(bytearray(inline), data))
    hostile("onnx")
    (d / "model.onnx").write_bytes(raw)
    _check_contract(d)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_external_model_never_crashes(fuzz_models, data):
    """Bit flips in the external-data entries (location, offset, length) included."""
    _, d, raw, _ = fuzz_models
    raw = bytes(_fuzz(bytearray(raw), data))
    hostile("onnx")
    (d / "model.onnx").write_bytes(raw)
    _check_contract(d)


# --- hostile external data locations (docs/formats/artifact.md section 1) -------------




def _relocate(d, location: str) -> None:
    """Point initializer 0's external data at ``location`` (model.onnx rewritten)."""
    m = onnx.load(str(d / "model.onnx"), load_external_data=False)
    for e in m.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = location
    (d / "model.onnx").write_bytes(m.SerializeToString())


def _external(d):
    d.mkdir(exist_ok=True)
    model = _model([numpy_helper.from_array(_inits()["w"], "w")])
    onnx.save_model(model, str(d / "model.onnx"), save_as_external_data=True,
                    location="model.onnx_data", size_threshold=0)
    return d


def test_data_file_symlinked_out_of_the_directory(tmp_path, capsys):
    """The data file is a link to a file outside: refused (exit 3), naming the file."""
    d = _external(tmp_path / "m")
    (d / "model.onnx_data").rename(tmp_path / "elsewhere.bin")
    os.symlink(tmp_path / "elsewhere.bin", d / "model.onnx_data")
    hostile("onnx")
    with pytest.raises(FormatError, match="'model.onnx_data'.*symbolic link"):
        open_artifact(d)
    hostile("onnx")
    assert main(["inspect", str(d)]) == 3
    assert "model.onnx_data" in capsys.readouterr().err
    os.unlink(d / "model.onnx_data")  # a relative link out: the same
    os.symlink("../elsewhere.bin", d / "model.onnx_data")
    hostile("onnx")
    assert main(["inspect", str(d)]) == 3


def test_data_file_symlinked_inside_the_directory(tmp_path):
    """Even a link to a file in the same directory is refused: data files are patched in
    place, and a link would let two names (or a later swap) alias one file."""
    d = _external(tmp_path / "m")
    (d / "model.onnx_data").rename(d / "real.bin")
    os.symlink("real.bin", d / "model.onnx_data")
    hostile("onnx")
    with pytest.raises(FormatError, match="symbolic link"):
        open_artifact(d)


@pytest.mark.parametrize("trap,message", [
    ("fifo", "not a regular file"), ("emptydir", "not a regular file"),
    ("loop", "symbolic link"), ("link_out", "symbolic link"), ("dangling", "symbolic link"),
    ("a\0b", "NUL"), (LONG_NAME, "cannot be used"), ("/etc/passwd", "absolute"),
    ("", "the model directory itself"), (".", "the model directory itself"),
    ("../outside.bin", "outside the model directory"), ("missing.bin", "is missing"),
    ("missing/x.bin", "is missing"), ("model.onnx_data/x", "is missing"),
])
def test_hostile_data_locations(tmp_path, trap, message, capsys):
    d = _external(tmp_path / "m")
    (tmp_path / "outside.bin").write_bytes(b"\0" * 48)
    add_traps(d, tmp_path / "outside.bin")
    _relocate(d, trap)
    hostile("onnx")
    with no_hang(), pytest.raises(FormatError, match=message):
        open_artifact(d)
    hostile("onnx")
    with no_hang():
        assert main(["inspect", "--no-identity", str(d)]) == 3
    assert "FormatError" in capsys.readouterr().err


def test_missing_data_file_exit_3(tmp_path, capsys):
    """A missing data file is bad data (exit 3), the same from every reader."""
    d = _external(tmp_path / "m")
    (d / "model.onnx_data").unlink()
    hostile("onnx")
    assert main(["inspect", str(d)]) == 3
    assert "model.onnx_data' is missing" in capsys.readouterr().err


def test_data_file_in_a_subdirectory_is_fine(tmp_path):
    d = _external(tmp_path / "m")
    (d / "w").mkdir()
    (d / "model.onnx_data").rename(d / "w" / "data.bin")
    _relocate(d, "w/data.bin")
    art = open_artifact(d)
    assert art.tensors[0].file == (d / "w" / "data.bin").resolve()
    assert art.file_key(art.tensors[0].file) == "w/data.bin"


# --- forged protobufs: structure-aware ------------------------------------------------
# Hand-encoded ModelProto / GraphProto / TensorProto with every field wrong in some way:
# lying lengths, wrong wire types, dims that overflow, unknown data types, typed data,
# external entries whose location is a trap (FIFO, link, loop, directory, the model
# itself, NUL, too long) and whose offset/length are not numbers.



def _uvarint(n: int) -> bytes:
    n &= 2**64 - 1  # negative int64 values are ten-byte varints
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _tag(fnum: int, wire: int) -> bytes:
    return _uvarint(fnum << 3 | wire)


def _ld(fnum: int, body: bytes) -> bytes:
    return _tag(fnum, 2) + _uvarint(len(body)) + body


def _vi(fnum: int, n: int) -> bytes:
    return _tag(fnum, 0) + _uvarint(n)


def _rarely(draw, n: int = 30) -> bool:
    """True about once in ``n`` draws: each fault is rare, so most forged models get far
    enough to reach the checks after it (locations, sizes, overlap)."""
    return draw(st.integers(0, n - 1)) == 0


def _mostly(draw, good, bad, n: int = 10):
    return draw(bad) if _rarely(draw, n) else draw(good)


_LOCATIONS = ["model.onnx_data", "./model.onnx_data", "sub/data.bin", "sub/../model.onnx_data",
              "alias", "fifo", "emptydir", "loop", "link_out", "dangling", "model.onnx", "missing.bin",
              "sub", "model.onnx_data/x"]
_NUMBERS = ["0", "4", "48", "64", "4096", "-8", "-1", "1e3", "0x10", " 7", "1_0", "\u0661\u0662", "",
            "99999999999999999999", "1" * 5000, "nan"]
_ELEM = {1: 4, 10: 2, 16: 2, 7: 8, 2: 1}  # a few ONNX data types and their element sizes
_DATA_SIZE = 4096  # model.onnx_data in trap_dir


@st.composite
def _junk_field(draw) -> bytes:
    fnum = draw(st.integers(1, 30))
    wire = draw(st.sampled_from([0, 1, 2, 5, 0, 2, 3, 4, 6, 7]))
    if wire == 0:
        return _vi(fnum, draw(st.integers(0, 2**64 - 1)))
    if wire == 2:
        return _ld(fnum, draw(st.binary(max_size=12)))
    if wire in (1, 5):
        return _tag(fnum, wire) + draw(st.binary(min_size=0, max_size=8))
    return _tag(fnum, wire)  # group wire types: unsupported


def _text(draw, pool) -> bytes:
    if _rarely(draw):
        return draw(st.binary(max_size=6))  # often not UTF-8
    v = draw(st.one_of(st.sampled_from(pool), st.sampled_from(HOSTILE_PATHS), st.text(max_size=6)))
    return v.encode("utf-8", "surrogatepass")


@st.composite
def _initializer(draw, outside: str, layout: dict) -> bytes:
    """One TensorProto; ``layout["next"]`` is the next free offset in model.onnx_data, so
    that well-formed initializers do not overlap."""
    fields = []
    dims = _mostly(draw, st.lists(st.sampled_from([1, 2, 3, 4, 8]), max_size=3), st.lists(
        st.one_of(st.sampled_from([0, 2**31, 2**62, 2**63, 2**64 - 1, -1, -(2**63)]),
                  st.integers(-(2**63), 2**64 - 1)), max_size=5))
    if draw(st.booleans()):
        fields.append(_ld(P.TENSOR_DIMS, b"".join(_uvarint(d) for d in dims)))  # packed
    else:
        fields += [_vi(P.TENSOR_DIMS, d) for d in dims]
    dtype = _mostly(draw, st.sampled_from(sorted(_ELEM)), st.sampled_from([0, 8, 14, 17, 99, 2**32, 2**64 - 1]))
    fields.append(_vi(P.TENSOR_DATA_TYPE, dtype))
    fields.append(_ld(P.TENSOR_NAME, _mostly(draw, st.sampled_from([b"w", b"h", b"i", b"k", b"w"]),
                                             st.binary(max_size=6))))
    nbytes = _ELEM.get(dtype, 1)
    for d in dims:
        nbytes *= d
    mode = draw(st.sampled_from(["external"] * 6 + ["raw", "raw", "typed", "none", "both"]))
    if mode in ("raw", "both"):
        fields.append(_ld(P.TENSOR_RAW_DATA, _mostly(draw, st.just(b"\0" * max(0, min(nbytes, 512))),
                                                     st.binary(max_size=64))))
    if mode == "typed":
        fields.append(_ld(draw(st.sampled_from(P.TENSOR_TYPED_DATA)), draw(st.binary(max_size=8))))
    if mode in ("external", "both"):
        offset = layout["next"]
        if 0 <= nbytes <= _DATA_SIZE:
            layout["next"] += nbytes
        entries = {"location": _mostly(draw, st.sampled_from(["model.onnx_data", "sub/data.bin"]), st.one_of(
                       st.sampled_from(_LOCATIONS), st.just(outside)), n=4).encode(),
                   "offset": _mostly(draw, st.just(str(offset)), st.sampled_from(_NUMBERS)).encode(),
                   "length": _mostly(draw, st.just(str(nbytes)), st.sampled_from(_NUMBERS)).encode()}
        if _rarely(draw):
            entries["location"] = _text(draw, _LOCATIONS)
        for key in list(entries):
            if _rarely(draw):
                del entries[key]
        items = list(entries.items())
        if _rarely(draw):
            items.append((draw(st.sampled_from(["checksum", "", "location", "x"])), _text(draw, _NUMBERS)))
        for k, v in items:
            entry = _ld(P.ENTRY_KEY, k.encode()) + _ld(P.ENTRY_VALUE, v)
            if _rarely(draw, 60):
                entry += draw(_junk_field())
            fields.append(_ld(P.TENSOR_EXTERNAL_DATA, entry))
        fields.append(_vi(P.TENSOR_DATA_LOCATION, _mostly(draw, st.just(1), st.sampled_from([0, 2, 2**63]))))
    if _rarely(draw):
        fields.append(draw(_junk_field()))
    if _rarely(draw, 5):
        fields = draw(st.permutations(fields))
    return b"".join(fields)


@st.composite
def _forged_model(draw, outside: str) -> bytes:
    layout = {"next": 0}
    graph = b"".join(_ld(P.GRAPH_INITIALIZER, draw(_initializer(outside, layout)))
                     for _ in range(draw(st.integers(0, 4))))
    if _rarely(draw):
        graph += draw(_junk_field())
    parts = [_ld(P.MODEL_GRAPH, graph)]
    for _ in range(draw(st.integers(0, 2))):
        parts.append(_ld(P.MODEL_METADATA_PROPS, _ld(P.ENTRY_KEY, _text(draw, ["cdcca.version", "k"]))
                         + _ld(P.ENTRY_VALUE, _text(draw, ["x", "[]"]))))
    if _rarely(draw):
        parts.append(draw(_junk_field()))
    if _rarely(draw):
        parts = parts[1:]  # no graph at all
    raw = b"".join(draw(st.permutations(parts)))
    if _rarely(draw, 15):
        raw = raw[: draw(st.integers(0, len(raw)))]
    return raw


@pytest.fixture(scope="module")
def trap_dir(tmp_path_factory):
    """A model directory with real data files and every trap a location could name."""
    top = tmp_path_factory.mktemp("onnx-traps")
    (top / "outside.bin").write_bytes(bytes(range(256)) * 16)
    d = top / "m"
    d.mkdir()
    (d / "model.onnx_data").write_bytes(bytes(range(256)) * 16)  # 4 KiB
    (d / "sub").mkdir()
    (d / "sub" / "data.bin").write_bytes(b"\1" * 256)
    os.symlink("model.onnx_data", d / "alias")
    add_traps(d, top / "outside.bin")
    return d


def _check_forged_contract(d) -> None:
    """FormatError, or tensors in regular, non-link files inside the directory, in
    bounds, not overlapping."""
    with no_hang():
        try:
            art = open_artifact(d)
        except FormatError as exc:
            assert str(exc)
            return
    root = d.resolve()
    spans: dict = {}
    for t in art.tensors:
        assert root in t.file.parents and t.file.resolve() == t.file
        assert stat.S_ISREG(os.lstat(t.file).st_mode)
        assert t.offset >= 0 and t.offset + t.nbytes <= t.file.stat().st_size
        assert art.file_key(t.file)
        spans.setdefault(t.file, []).append((t.offset, t.offset + t.nbytes))
    for s in spans.values():
        s.sort()
        assert all(e0 <= s1 for (_, e0), (s1, _) in zip(s, s[1:]))


@settings(max_examples=1100)
@given(data=st.data())
def test_forged_model_never_crashes(trap_dir, data):
    raw = data.draw(_forged_model(str(trap_dir.parent / "outside.bin")))
    hostile("onnx")
    (trap_dir / "model.onnx").write_bytes(raw)
    _check_forged_contract(trap_dir)


@settings(max_examples=60)
@given(data=st.data())
def test_forged_model_cli_exit(trap_dir, capsys, data):
    """Through ``cdcca-edge inspect``: exit 0 or 3, never 1 or 2."""
    raw = data.draw(_forged_model(str(trap_dir.parent / "outside.bin")))
    hostile("onnx")
    (trap_dir / "model.onnx").write_bytes(raw)
    with no_hang():
        code = main(["inspect", "--json", str(trap_dir)])
    err = capsys.readouterr().err
    assert code in (0, 3), err


def test_model_file_fifo_is_refused(tmp_path):
    hostile("onnx")
    os.mkfifo(tmp_path / "x.onnx")
    with no_hang(), pytest.raises(FormatError, match="not a regular file"):
        read_onnx_model(tmp_path / "x.onnx")
