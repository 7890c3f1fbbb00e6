"""Export -> run round trips for both architectures and every quant type, with parity
against torch (docs/export.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cdcca_edge.converters import gguf_export
from cdcca_edge.converters.export import export
from cdcca_edge.converters.validate import TOLERANCES
from cdcca_edge.core.artifact import compute_identity, open_artifact
from cdcca_edge.core.errors import FormatError, UsageError, ValidationError
from cdcca_edge.runtime import GenerationConfig, load
from tests.conftest import ARCHS, GGUF_QUANTS

PROMPTS = ("question: what colour is the circle? answer:", "the red circle is left of the")


def torch_greedy(model_dir: Path, prompt: str, n: int) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, pad_token_id=tok.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    eos = tok.eos_token_id
    return new[: new.index(eos) + 1] if eos in new else new


def torch_rank(model_dir: Path, prompt_ids: list[int], tokens: list[int]) -> int:
    """The worst rank (0 = argmax) of ``tokens`` under torch, teacher-forced."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + tokens])).logits[0]  # (T, V)
    rows = logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(tokens)]
    chosen = rows[torch.arange(len(tokens)), torch.tensor(tokens)]
    return int((rows > chosen[:, None]).sum(-1).max())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant", GGUF_QUANTS)
def test_gguf_round_trip(arch, quant, exports, tiny_models):
    result = exports(arch, "gguf", quant)
    v = result.validation
    assert v.passed and v.normalized_diff <= TOLERANCES[("gguf", quant)]
    art = open_artifact(result.path)
    assert compute_identity(art).digest == result.identity == art.metadata["cdcca.export_identity"]
    assert art.metadata["cdcca.quant"] == quant and art.metadata["cdcca.arch"] == arch
    # norms stay F32; matrices take the requested type (embeddings Q8_0 at q4_0)
    types = {t.name: t.type_name for t in art.tensors}
    assert types["output_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == quant.upper()
    with load(result.path, backend="llama") as model:
        for prompt in PROMPTS:
            gen = model.generate(prompt, GenerationConfig(max_tokens=12))
            if quant in ("f32", "f16"):
                assert gen.tokens == torch_greedy(tiny_models[arch], prompt, 12), prompt
            else:
                # quantised weights may flip a near-tie, so exact equality is not promised:
                # every token picked must still be among torch's top 2 (q8_0) or top 3 (q4_0)
                worst = torch_rank(tiny_models[arch], gen.prompt_tokens, gen.tokens)
                assert worst <= (1 if quant == "q8_0" else 2), prompt
    if quant == "q4_0":
        assert v.top1_agreement >= 0.8


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_round_trip(arch, exports, tiny_models):
    result = exports(arch, "onnx")
    assert result.validation.passed and result.validation.normalized_diff < 1e-3
    art = open_artifact(result.path)
    assert art.format == "onnx"
    # every initializer lives in the one external data file, under its HF name
    assert {t.file.name for t in art.tensors} == {"model.onnx_data"}
    names = {t.name for t in art.tensors}
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert not any(n.startswith("onnx::") for n in names)
    assert compute_identity(art).digest == result.identity
    with load(result.path) as model:
        assert model.name == "onnx"
        for prompt in PROMPTS:
            gen = model.generate(prompt, GenerationConfig(max_tokens=12))
            assert gen.tokens == torch_greedy(tiny_models[arch], prompt, 12), prompt


def test_onnx_export_loads_in_optimum(exports, tiny_models):
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    result = exports("llama", "onnx")
    model = ORTModelForCausalLM.from_pretrained(result.path)
    tok = AutoTokenizer.from_pretrained(result.path)
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                         do_sample=False, pad_token_id=tok.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    assert new[: len(torch_greedy(tiny_models["llama"], PROMPTS[0], 12))] == torch_greedy(
        tiny_models["llama"], PROMPTS[0], 12
    )


@pytest.mark.parametrize("fmt,quant", [("gguf", "f32"), ("gguf", "q8_0"), ("onnx", "f32")])
def test_adapter_is_merged(fmt, quant, lora_adapter, tiny_models, exports, tmp_path):
    """Validation compares against the merged model, and the result differs from the base."""
    out = tmp_path / ("m.gguf" if fmt == "gguf" else "m-onnx")
    merged = export(tiny_models["llama"], out, fmt, quant=quant, adapter=lora_adapter)
    base = exports("llama", fmt, quant)
    assert merged.validation.passed
    assert merged.source_digest != base.source_digest
    with load(merged.path) as a, load(base.path) as b:
        ids = a.tokenize(PROMPTS[0])
        assert np.abs(a.prompt_logits(ids) - b.prompt_logits(ids)).max() > 0.05


def test_broken_export_is_refused_and_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    """Leave out the GGML rotary permutation of q/k: validation must catch it (exit 3 in
    the CLI), the output must not appear, and an existing file there must survive."""
    out = tmp_path / "broken.gguf"
    out.write_bytes(b"previous good file")
    monkeypatch.setattr(gguf_export, "hf_tensor_transform", lambda arch, cfg, name: (lambda w: w))
    with pytest.raises(ValidationError, match="disagrees with torch"):
        export(tiny_models["llama"], out, "gguf", quant="f32")
    assert out.read_bytes() == b"previous good file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf"]


def test_unsupported_architecture(tmp_path, tiny_models):
    bad = tmp_path / "gpt2"
    shutil.copytree(tiny_models["llama"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="model_type 'gpt2' is not supported"):
        export(bad, tmp_path / "x.gguf", "gguf")


def test_bad_options(tiny_models, tmp_path):
    with pytest.raises(UsageError, match="not a GGUF export type"):
        export(tiny_models["llama"], tmp_path / "x.gguf", "gguf", quant="q5_k")
    with pytest.raises(UsageError, match="not available for ONNX export"):
        export(tiny_models["llama"], tmp_path / "x", "onnx", quant="q8_0")
    with pytest.raises(UsageError, match="not a directory"):
        export(tmp_path / "missing", tmp_path / "x.gguf", "gguf")


def test_permutation_inverse():
    w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    p = gguf_export.permute_qk(w, n_head=2)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(gguf_export.unpermute_qk(p, n_head=2), w)


def test_onnx_reexport_replaces_the_directory(tiny_models, tmp_path):
    out = tmp_path / "onnx"
    export(tiny_models["qwen2"], out, "onnx")
    (out / "stale.bin").write_bytes(b"left over from an earlier export")
    export(tiny_models["qwen2"], out, "onnx")
    assert not (out / "stale.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]  # no temporary left behind


def test_onnx_export_refuses_a_foreign_directory(tiny_models, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(UsageError, match="not an ONNX export"):
        export(tiny_models["qwen2"], out, "onnx")
    assert (out / "holiday.jpg").read_bytes() == b"precious"
