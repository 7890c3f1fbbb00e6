"""The torch-free ONNX reader: finds every initializer's bytes exactly where onnx says."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from cdcca_edge.core.artifact import open_artifact
from cdcca_edge.core.errors import FormatError
from cdcca_edge.core.onnx_proto import read_onnx_model


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
    t = helper.make_tensor("w", TensorProto.FLOAT, [3, 4], np.zeros(12, np.float32).tolist())
    onnx.save_model(_model([t]), str(tmp_path / "model.onnx"))
    with pytest.raises(FormatError, match="external data file"):
        open_artifact(tmp_path)


def test_missing_external_file(tmp_path):
    model = _model([numpy_helper.from_array(_inits()["w"], "w")])
    onnx.save_model(model, str(tmp_path / "model.onnx"), save_as_external_data=True,
                    location="model.onnx_data", size_threshold=0)
    (tmp_path / "model.onnx_data").unlink()
    with pytest.raises(FormatError, match="external data file 'model.onnx_data' is missing"):
        open_artifact(tmp_path)


def test_external_location_outside_dir(tmp_path):
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
    with pytest.raises(FormatError, match="has no model.onnx"):
        open_artifact(tmp_path)


def test_external_location_is_the_model_file(tmp_path):
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


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_inline_model_never_crashes(tmp_path_factory, data):
    arrays = _inits()
    raw = bytearray(_model([numpy_helper.from_array(a, n) for n, a in arrays.items()]).SerializeToString())
    d = tmp_path_factory.mktemp("fuzz")
    (d / "model.onnx").write_bytes(bytes(_fuzz(raw, data)))
    _check_contract(d)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_external_model_never_crashes(tmp_path_factory, data):
    """Bit flips in the external-data entries (location, offset, length) included."""
    arrays = _inits()
    d = tmp_path_factory.mktemp("fuzzx")
    model = _model([numpy_helper.from_array(a, n) for n, a in arrays.items()])
    onnx.save_model(model, str(d / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=0)
    raw = bytearray((d / "model.onnx").read_bytes())
    (d / "model.onnx").write_bytes(bytes(_fuzz(raw, data)))
    _check_contract(d)
