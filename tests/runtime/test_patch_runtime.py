"""Patched artefacts on the real engines: a patched GGUF (llama.cpp) or ONNX directory
(onnxruntime) answers like an artefact freshly exported from the target weights —
bit-identically for block replacement, within the export tolerance for the additive
encodings — and a live backend patches itself safely."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cdcca_edge.converters.gguf_export import hf_tensor_transform, hf_to_gguf_name
from cdcca_edge.converters.validate import TOLERANCES
from cdcca_edge.core.artifact import compute_identity, open_artifact
from cdcca_edge.core.delta_build import DeltaBuilder, diff_artifacts
from cdcca_edge.core.errors import IntegrityError
from cdcca_edge.core.patch import apply_delta
from cdcca_edge.core.trust import Trust
from cdcca_edge.runtime import load
from tests.conftest import PREBUILT
from tests.prebuilt import PAIRS

PROMPT = "question: what colour is the circle? answer: red. question: how many"


def _export(tiny_llama: Path, out: Path, fmt: str, quant: str, adapter: Path | None = None) -> Path:
    from cdcca_edge.converters.export import export

    return export(tiny_llama, out, fmt, quant=quant, adapter=adapter).path  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pair(tiny_models, exports, lora_adapter, tmp_path_factory):
    """Base and LoRA-merged target exports, GGUF q8_0 / f32 and ONNX (built on the host
    for the aarch64 lane: tests/prebuilt.py)."""
    if PREBUILT:
        from tests.prebuilt import prebuilt_pair

        return {key: (exports("llama", *key).path, prebuilt_pair(Path(PREBUILT), *key)) for key in PAIRS}
    root = tmp_path_factory.mktemp("pair")
    out = {}
    for fmt, quant in PAIRS:
        name = f"target-{fmt}-{quant}" + (".gguf" if fmt == "gguf" else "")
        out[(fmt, quant)] = (exports("llama", fmt, quant).path,
                             _export(tiny_models["llama"], root / name, fmt, quant, lora_adapter))
    return out


def _copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)
    return dst


def _logits(path: Path) -> np.ndarray:
    with load(path) as m:
        return m.prompt_logits(PROMPT)


@pytest.mark.parametrize("key", [("gguf", "q8_0"), ("onnx", "f32")])
def test_block_replacement_is_bit_identical(pair, tmp_path, key):
    base, target = pair[key]
    device = _copy(base, tmp_path / base.name)
    diff_artifacts(base, target, tmp_path / "d.cdcd")
    with load(device) as live:  # patch a model that is loaded and serving
        before = live.prompt_logits(PROMPT)
        result = live.apply_patch(tmp_path / "d.cdcd", trust=Trust.none())
        after = live.prompt_logits(PROMPT)
        assert result.applied
    fresh = _logits(target)
    np.testing.assert_array_equal(after, fresh)
    assert np.abs(after - before).max() > 0.05  # the adapter really changed the answer
    assert compute_identity(open_artifact(device)).digest == compute_identity(open_artifact(target)).digest


def _lora_factors(adapter: Path):
    """(hf module name, A (r, in), B (out, r), scale) for every LoRA pair of the adapter."""
    from safetensors.numpy import load_file  # not safetensors.torch: torch is absent on aarch64

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    scale = cfg["lora_alpha"] / cfg["r"]
    for k, a in sd.items():
        if k.endswith("lora_A.weight"):
            mod = k.replace("base_model.model.", "").replace(".lora_A.weight", "")
            b = sd[k.replace("lora_A", "lora_B")]
            yield mod, a.astype(np.float32), b.astype(np.float32), scale


def _close(patched: np.ndarray, fresh: np.ndarray, tol: float) -> None:
    normalized = np.abs(patched - fresh).max() / fresh.std()
    assert normalized <= tol, normalized
    assert (patched.argmax(-1) == fresh.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("key", [("gguf", "q8_0"), ("gguf", "f32"), ("onnx", "f32")])
def test_low_rank_patch_matches_merged_export(pair, tiny_models, lora_adapter, tmp_path, key):
    """The LoRA factors themselves as a delta, mapped into the artefact's layout (GGUF row
    permutation of q/k, ONNX transposed MatMul weights)."""
    base, target = pair[key]
    device = _copy(base, tmp_path / base.name)
    cfg = SimpleNamespace(**json.loads((tiny_models["llama"] / "config.json").read_text()))
    b = DeltaBuilder(device)
    transposed = set()
    if key[0] == "onnx":
        transposed = set(json.loads(open_artifact(device).metadata["cdcca.transposed"]))
    for mod, a, bm, scale in _lora_factors(lora_adapter):
        hf_name = mod + ".weight"
        if key[0] == "gguf":
            # W_gguf = P W_hf for q/k, so the update's rows are permuted the same way
            b.add_low_rank(hf_to_gguf_name("llama", cfg.num_hidden_layers, hf_name),
                           a, hf_tensor_transform("llama", cfg, hf_name)(bm), scale, "f32")
        else:
            assert hf_name in transposed  # stored (in, out): (s B A)^T = s A^T B^T
            b.add_low_rank(hf_name, bm.T, a.T, scale, "f32")
    b.write(tmp_path / "lr.cdcd")
    apply_delta(device, tmp_path / "lr.cdcd", trust=Trust.none())
    patched, fresh = _logits(device), _logits(target)
    tol = 1e-3 if key == ("onnx", "f32") else TOLERANCES[key]
    _close(patched, fresh, tol)


def test_quantised_additive_patch_matches_merged_export(pair, tmp_path):
    """The weight difference as int8 per-block updates on q8_0 (dequantise, add,
    requantise on the device)."""
    from cdcca_edge.core.encodings import dequantize

    base, target = pair[("gguf", "q8_0")]
    _, target_f32 = pair[("gguf", "f32")]
    device = _copy(base, tmp_path / base.name)
    art, tgt = open_artifact(device), open_artifact(target_f32)
    b = DeltaBuilder(art)
    for t in art.tensors:
        if t.type_name != "Q8_0":
            continue
        with open(t.file, "rb") as f:
            f.seek(t.offset)
            w = dequantize("Q8_0", f.read(t.nbytes))
        tt = tgt.tensor(t.name)
        with open(tt.file, "rb") as f:
            f.seek(tt.offset)
            w_new = np.frombuffer(f.read(tt.nbytes), np.float32)
        delta = (w_new - w).reshape(-1, 32)
        changed = np.flatnonzero(np.abs(delta).max(1) > 1e-6)
        if changed.size == 0:
            continue
        scale = (np.abs(delta[changed]).max(1) / 127).astype(np.float16)
        q = np.round(delta[changed] / scale.astype(np.float32)[:, None]).clip(-127, 127)
        runs = [(int(g), 1) for g in changed]
        b.add_quantized(t.name, runs, scale, q, bits=8)
    b.write(tmp_path / "qa.cdcd")
    apply_delta(device, tmp_path / "qa.cdcd", trust=Trust.none())
    _close(_logits(device), _logits(target), TOLERANCES[("gguf", "q8_0")])


def test_failed_live_patch_keeps_serving(pair, tmp_path):
    base, target = pair[("gguf", "q8_0")]
    device = _copy(base, tmp_path / base.name)
    other = _copy(target, tmp_path / "other.gguf")
    t = open_artifact(other).tensor("blk.0.attn_q.weight")
    raw = bytearray(other.read_bytes())
    raw[t.offset + 5] ^= 0x01
    other.write_bytes(bytes(raw))
    diff_artifacts(target, other, tmp_path / "foreign.cdcd")  # made for another model
    with load(device) as live:
        before = live.prompt_logits(PROMPT)
        with pytest.raises(IntegrityError, match="wrong base"):
            live.apply_patch(tmp_path / "foreign.cdcd", trust=Trust.none())
        np.testing.assert_array_equal(live.prompt_logits(PROMPT), before)


def test_export_records_state_so_patch_skips_hashing(tiny_models, pair, tmp_path):
    """An exported artefact's sidecar lets the first patch trust its identity without
    reading the whole model; the patch then records the new identity and version."""
    from cdcca_edge.core.state import read_state, record_export

    if PREBUILT:  # exported on the host: a copy gets its sidecar as export() writes it
        device = _copy(pair[("gguf", "q8_0")][0], tmp_path / "m.gguf")
        record_export(open_artifact(device), compute_identity(open_artifact(device)).digest)
    else:
        device = _export(tiny_models["llama"], tmp_path / "m.gguf", "gguf", "q8_0")
    diff_artifacts(device, pair[("gguf", "q8_0")][1], tmp_path / "d.cdcd")
    r = apply_delta(device, tmp_path / "d.cdcd", trust=Trust.none())
    assert r.applied and r.identity_check == "state"
    state = read_state(open_artifact(device))
    assert state.version == 1 and state.identity == r.target_identity
    assert apply_delta(device, tmp_path / "d.cdcd", trust=Trust.none()).already_applied
