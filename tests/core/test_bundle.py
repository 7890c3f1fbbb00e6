"""Bundles: a manifest directory of GGUF and ONNX parts is one artefact — one identity over
every file, and one delta patching several files at once."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cdcca_edge.core.artifact import MANIFEST_NAME, compute_identity, open_artifact
from cdcca_edge.core.delta_build import DeltaBuilder
from cdcca_edge.core.errors import FormatError
from cdcca_edge.core.patch import apply_delta
from tests.core.delta_helpers import file_digest, make_gguf, make_onnx


def make_bundle(root, seed=0):
    root.mkdir()
    make_gguf(root / "language.gguf", seed=seed)
    make_onnx(root / "vision", seed=seed)
    (root / MANIFEST_NAME).write_text(json.dumps({
        "format": "cdcca-artifact", "version": 1,
        "parts": [{"name": "vision", "path": "vision"}, {"name": "language", "path": "language.gguf"}],
    }))
    return root


def test_bundle_tensors_and_identity(tmp_path):
    b = make_bundle(tmp_path / "b")
    art = open_artifact(b)
    assert art.format == "bundle"
    names = {t.name for t in art.tensors}
    assert {"vision/w32", "vision/w16", "language/Q8_0.w"} <= names
    assert {art.file_key(f) for f in art.files} == {"language.gguf", "vision/model.onnx_data"}
    before = compute_identity(art).digest
    # a byte in either part changes the one identity
    for part_file, tensor in (("language.gguf", "language/F32.w"), ("vision/model.onnx_data", "vision/w32")):
        t = open_artifact(b).tensor(tensor)
        raw = bytearray(t.file.read_bytes())
        raw[t.offset] ^= 1
        t.file.write_bytes(bytes(raw))
        assert compute_identity(open_artifact(b)).digest != before
        raw[t.offset] ^= 1
        t.file.write_bytes(bytes(raw))
    assert compute_identity(open_artifact(b)).digest == before


def test_one_delta_patches_both_parts(tmp_path):
    b = make_bundle(tmp_path / "b")
    original = {p: file_digest(b / p) for p in ("language.gguf", "vision")}
    builder = DeltaBuilder(b)
    builder.replace_units("language/Q8_0.w", [3], [1], bytes(34))
    builder.add_quantized("vision/w16", [(0, 2)], [0.01, 0.02], np.ones(64, np.int8), bits=8)
    s = builder.write(tmp_path / "d.cdcd")
    assert {r.file for r in __import__("cdcca_edge.core.delta_format", fromlist=["x"]).read_delta(s.path).header.records} == {
        "language.gguf", "vision/model.onnx_data"}
    apply_delta(b, tmp_path / "d.cdcd", undo_out=tmp_path / "undo.cdcd")
    assert compute_identity(open_artifact(b)).digest == s.target_identity
    assert all(file_digest(b / p) != d for p, d in original.items())
    apply_delta(b, tmp_path / "undo.cdcd")
    assert all(file_digest(b / p) == d for p, d in original.items())


@pytest.mark.parametrize("manifest,message", [
    ({"format": "x", "version": 1, "parts": []}, "not a cdcca-artifact manifest"),
    ({"format": "cdcca-artifact", "version": 1, "parts": []}, "no parts"),
    ({"format": "cdcca-artifact", "version": 1, "parts": [{"name": "a/b", "path": "language.gguf"}]}, "part name"),
    ({"format": "cdcca-artifact", "version": 1, "parts": [{"name": "a", "path": "../x.gguf"}]}, "outside the bundle"),
    ({"format": "cdcca-artifact", "version": 1, "parts": [{"name": "a", "path": "language.gguf"},
                                                          {"name": "a", "path": "vision"}]}, "duplicate part"),
    ({"format": "cdcca-artifact", "version": 1, "parts": [{"name": "a", "path": "nothing.gguf"}]}, "missing"),
])
def test_bad_manifest(tmp_path, manifest, message):
    b = make_bundle(tmp_path / "b")
    (b / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match=message):
        open_artifact(b)


def test_manifest_not_json(tmp_path):
    b = make_bundle(tmp_path / "b")
    (b / MANIFEST_NAME).write_text("{nope")
    with pytest.raises(FormatError, match="not valid JSON"):
        open_artifact(b)
    shutil.rmtree(b)
