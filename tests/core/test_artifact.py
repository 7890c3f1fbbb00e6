"""Artefact identity: a digest over tensor names, types, shapes and bytes only."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFWriter

from cdcca_edge.core.artifact import compute_identity, identity_digest, open_artifact
from cdcca_edge.core.errors import FormatError


def _write(path, tensors: dict[str, np.ndarray], meta: dict[str, str]):
    w = GGUFWriter(str(path), "llama")
    for k, v in meta.items():
        w.add_string(k, v)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def weights():
    rng = np.random.default_rng(0)
    return {"a.weight": rng.standard_normal((4, 32)).astype(np.float32),
            "b.weight": rng.standard_normal((2, 32)).astype(np.float16)}


def test_identity_ignores_metadata_and_order(tmp_path, weights):
    _write(tmp_path / "1.gguf", weights, {"cdcca.version": "x"})
    _write(tmp_path / "2.gguf", dict(reversed(list(weights.items()))), {"general.name": "other"})
    i1 = compute_identity(open_artifact(tmp_path / "1.gguf"))
    i2 = compute_identity(open_artifact(tmp_path / "2.gguf"))
    assert i1.digest == i2.digest and i1.tensors == i2.tensors


def test_identity_tracks_every_tensor_byte(tmp_path, weights):
    path = tmp_path / "m.gguf"
    _write(path, weights, {})
    art = open_artifact(path)
    before = compute_identity(art)
    t = art.tensor("b.weight")
    raw = bytearray(path.read_bytes())
    raw[t.offset + t.nbytes - 1] ^= 0x01  # last byte of the last tensor
    path.write_bytes(bytes(raw))
    after = compute_identity(open_artifact(path))
    assert after.digest != before.digest
    assert after.tensors["a.weight"] == before.tensors["a.weight"]
    assert after.tensors["b.weight"] != before.tensors["b.weight"]


def test_identity_covers_type_and_shape():
    d = "0" * 64
    base = identity_digest([("w", "F32", (2, 3), d)])
    assert identity_digest([("w", "F16", (2, 3), d)]) != base
    assert identity_digest([("w", "F32", (3, 2), d)]) != base
    assert identity_digest([("v", "F32", (2, 3), d)]) != base


def test_open_rejects_non_artifacts(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"not a model")
    with pytest.raises(FormatError, match="neither a GGUF file"):
        open_artifact(tmp_path / "x.bin")
    with pytest.raises(FileNotFoundError):
        open_artifact(tmp_path / "missing.gguf")


def test_open_refuses_a_fifo_without_blocking(tmp_path):
    """A FIFO named as the artefact is refused, not read (a read would block forever)."""
    import os

    from tests.core.hostile_fs import no_hang
    from tests.hostile import hostile

    for name in ("m.gguf", "model.onnx", "cdcca-artifact.json"):
        hostile("gguf" if name.endswith(".gguf") else "onnx" if name.endswith(".onnx") else "manifest")
        os.mkfifo(tmp_path / name)
        with no_hang(), pytest.raises(FormatError, match="not a regular file"):
            open_artifact(tmp_path / name)
