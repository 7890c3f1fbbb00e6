"""A PEFT LoRA adapter as llama.cpp's LoRA GGUF, run by llama.cpp beside the base GGUF:
it answers as the merged model does, on both tiny architectures; bad inputs are refused
with messages that name the fix, leaving no file behind."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("llama_cpp")

from cdcca_edge.cli import main  # noqa: E402
from cdcca_edge.converters.export import export, export_lora_gguf  # noqa: E402
from cdcca_edge.core.errors import FormatError, UsageError  # noqa: E402
from cdcca_edge.core.gguf_file import read_gguf_header  # noqa: E402
from cdcca_edge.runtime import load  # noqa: E402
from cdcca_edge.runtime.base import GenerationConfig  # noqa: E402
from tests.cloud.test_dwc import make_lora  # noqa: E402
from tests.conftest import ARCHS  # noqa: E402
from tests.converters.test_export import PROMPTS  # noqa: E402
from tests.hostile import hostile  # noqa: E402


@pytest.fixture(scope="module")
def loras(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-gguf")
    return {arch: make_lora(tiny_models[arch], root / arch, seed=7, targets=("q_proj", "k_proj", "v_proj",
                                                                               "down_proj")) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_gguf_answers_as_the_merged_model(arch, loras, tiny_models, exports, tmp_path):
    base = exports(arch, "gguf", "f32").path
    doc = export_lora_gguf(tiny_models[arch], loras[arch], base, tmp_path / "a.gguf", dtype="f32")
    assert doc["validation"]["passed"] and doc["rank"] == 4
    kv = read_gguf_header(tmp_path / "a.gguf").kv
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora"
    assert kv["adapter.lora.alpha"] == pytest.approx(8.0)  # PEFT's scale 8/4 = 2, times r
    merged = export(tiny_models[arch], tmp_path / "merged.gguf", "gguf", quant="f32", adapter=loras[arch])
    with load(base, lora=tmp_path / "a.gguf") as with_lora, load(merged.path) as m:
        plain = load(base)
        for prompt in PROMPTS:
            ids = m.tokenize(prompt)
            a, b, c = with_lora.prompt_logits(ids), m.prompt_logits(ids), plain.prompt_logits(ids)
            # q and k are adapted too: the permutation of B's rows matters (Llama)
            assert np.abs(a - b).max() <= 0.02 * b.std(), prompt
            assert np.abs(c - b).max() > 10 * np.abs(a - b).max(), "the adapter changed nothing"
            cfg = GenerationConfig(max_tokens=8)
            assert with_lora.generate(prompt, cfg).tokens == m.generate(prompt, cfg).tokens
        plain.close()


def test_cli_lora_gguf(loras, tiny_models, exports, tmp_path, capsys):
    base = exports("llama", "gguf", "q8_0").path
    out = tmp_path / "a.gguf"
    assert main(["export", str(tiny_models["llama"]), "--adapter", str(loras["llama"]), "--lora-gguf", str(base),
                 "-o", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["dtype"] == "f16" and doc["validation"]["passed"] and out.stat().st_size == doc["bytes"]


def test_bad_inputs_are_refused_and_leave_nothing(loras, tiny_models, exports, tmp_path, capsys):
    hostile("lora-gguf", 8)
    base = exports("llama", "gguf", "f32").path
    out = tmp_path / "a.gguf"
    # no adapter; an adapter that is not LoRA; a base that is not GGUF; the other model's base
    assert main(["export", str(tiny_models["llama"]), "--lora-gguf", str(base), "-o", str(out)]) == 2
    assert "--adapter" in capsys.readouterr().err
    not_lora = tmp_path / "ia3"
    shutil.copytree(loras["llama"], not_lora)
    cfg = json.loads((not_lora / "adapter_config.json").read_text())
    (not_lora / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(UsageError, match="not a LoRA adapter"):
        export_lora_gguf(tiny_models["llama"], not_lora, base, out)
    with pytest.raises(UsageError, match="not a GGUF"):
        export_lora_gguf(tiny_models["llama"], loras["llama"], exports("llama", "onnx").path, out)
    assert not out.exists() and not list(tmp_path.glob(".a.gguf*"))
    # a LoRA GGUF made for one model, loaded on another of the same shapes (llama.cpp
    # alone would apply it)
    export_lora_gguf(tiny_models["llama"], loras["llama"], base, out, validate=False)
    with pytest.raises(FormatError, match="another model"):
        load(exports("qwen2", "gguf", "f32").path, lora=out)
    # a model file given as the LoRA
    with pytest.raises(FormatError, match="not a LoRA GGUF"):
        load(base, lora=base)
    # a truncated LoRA GGUF
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    with pytest.raises(FormatError, match="truncated"):
        load(base, lora=cut)
    # a LoRA whose factors do not fit the base's matrix (llama.cpp logs a refusal, and
    # llama-cpp-python then serves the base alone: our backend refuses it first)
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 4.0)
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 32), np.float32))  # the matrix is 64 wide
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((64, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(FormatError, match=r"need \(r, in\) and \(out, r\)"):
        load(base, lora=tmp_path / "bad.gguf")
