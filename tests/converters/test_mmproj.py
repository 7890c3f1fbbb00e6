"""A tiny LLaVA as a language GGUF plus llama.cpp's mmproj GGUF, run by llama.cpp's mtmd
(clip.cpp encodes the image): validated against torch, runnable from `cdcca-edge run
--mmproj`, patchable as any GGUF; bad inputs refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("llama_cpp")

from cdcca_edge.cli import main  # noqa: E402
from cdcca_edge.converters.export import export  # noqa: E402
from cdcca_edge.converters.mmproj import clip_order  # noqa: E402
from cdcca_edge.core.artifact import compute_identity, open_artifact  # noqa: E402
from cdcca_edge.core.errors import FormatError  # noqa: E402
from cdcca_edge.core.gguf_file import read_gguf_header  # noqa: E402
from cdcca_edge.runtime.base import GenerationConfig  # noqa: E402
from cdcca_edge.runtime.mtmd import MtmdModel  # noqa: E402
from tests.hostile import hostile  # noqa: E402


@pytest.fixture(scope="module")
def llava_dir(llava_bundles):
    return llava_bundles("gguf").parent / "model"


@pytest.fixture(scope="module")
def pairs(llava_dir, tmp_path_factory):
    """Validated exports (bundle + mmproj) by dtype, made once."""
    root, made = tmp_path_factory.mktemp("mmproj"), {}

    def get(dtype):
        if dtype not in made:
            made[dtype] = export(llava_dir, root / f"bundle-{dtype}", "gguf", quant=dtype,
                                 mmproj=root / f"mmproj-{dtype}.gguf", mmproj_dtype=dtype)
        return made[dtype]

    return get


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_mmproj_pair_runs_on_mtmd_as_torch_computes_it(dtype, llava_dir, pairs):
    from transformers import LlavaForConditionalGeneration

    from cdcca_edge.demo.scenes import dataset
    from cdcca_edge.runtime.multimodal import MultimodalModel

    res = pairs(dtype)
    report = res.extra["mmproj"]
    assert report["validation"]["passed"], report
    mmproj, bundle_dir = Path(report["path"]), res.path
    kv = read_gguf_header(mmproj).kv
    assert kv["general.type"] == "mmproj" and kv["clip.projector_type"] == "mlp"
    assert list(kv["clip.vision.feature_layer"].values) == [1]  # the tiny tower's one layer: its output
    llava = LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype=torch.float32).eval()
    with MtmdModel(bundle_dir / "language.gguf", mmproj) as m, MultimodalModel(bundle_dir) as bundle:
        for ex in dataset(4, seed=9, domains=("source", "noise")):
            got = m.vision.encode(ex.image)
            x = torch.from_numpy(bundle.preprocess(ex.image))
            with torch.no_grad():
                h = llava.model.vision_tower(x, output_hidden_states=True).hidden_states[-1][0]
                want = llava.model.multi_modal_projector(h[torch.tensor(clip_order(h.shape[0] - 1))]).numpy()
            assert np.abs(got - want).max() <= (0.02 if dtype == "f32" else 0.05) * want.std()
            # the answer is the language model's on clip.cpp's embeddings, through mtmd's prompt split
            prompt = bundle.prompt(ex.question.text)
            cfg = GenerationConfig(max_tokens=5)
            assert m.generate(prompt, cfg, image=ex.image).tokens == \
                bundle.generate(prompt, cfg, image_embeds=want).tokens


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    """The tests' tiny LLaVA with a SigLIP tower (no CLS: clip.cpp hands on HF's tokens)."""
    from cdcca_edge.demo.tiny_llava import TinyLlavaSpec, build_tiny_llava
    from tests.conftest import LLAVA_SPEC

    return build_tiny_llava(tmp_path_factory.mktemp("siglip") / "model",
                            TinyLlavaSpec(**{**LLAVA_SPEC, "vision_tower": "siglip"}))


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_siglip_llava_on_mtmd_answers_as_torch(dtype, siglip_dir, tmp_path):
    """A SigLIP-tower LLaVA through llama.cpp's mtmd: every image token is HF's, in HF's
    order, and the greedy answers are torch's, token for token, on every domain."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from cdcca_edge.converters.llava_export import torch_greedy
    from cdcca_edge.demo.scenes import DOMAINS, dataset
    from cdcca_edge.runtime.multimodal import MultimodalModel

    res = export(siglip_dir, tmp_path / "bundle", "gguf", quant=dtype, mmproj=tmp_path / "mmproj.gguf",
                 mmproj_dtype=dtype)
    report = res.extra["mmproj"]
    assert report["tower"] == "siglip" and report["validation"]["answers_equal_torch"] == 1.0, report
    header = read_gguf_header(tmp_path / "mmproj.gguf")
    names = {t.name for t in header.tensors}
    assert "v.patch_embd.bias" in names and "v.class_embd" not in names and "v.pre_ln.weight" not in names
    llava = LlavaForConditionalGeneration.from_pretrained(siglip_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(siglip_dir)
    assert clip_order(llava.config.image_seq_length, "siglip") == list(range(llava.config.image_seq_length))
    cfg = GenerationConfig(max_tokens=6)
    with MtmdModel(res.path / "language.gguf", tmp_path / "mmproj.gguf") as m, MultimodalModel(res.path) as bundle:
        mean, std = list(bundle.info.image_mean), list(bundle.info.image_std)
        for ex in dataset(12, seed=21, domains=tuple(DOMAINS)):
            with torch.no_grad():
                h = llava.model.vision_tower(torch.from_numpy(bundle.preprocess(ex.image)),
                                             output_hidden_states=True).hidden_states[-1][0]  # (N, Dv): HF's order
                want = llava.model.multi_modal_projector(h).numpy()
            got = m.vision.encode(ex.image)
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= (0.02 if dtype == "f32" else 0.05) * want.std()
            prompt = bundle.prompt(ex.question.text)
            assert list(m.generate(prompt, cfg, image=ex.image).tokens) == \
                torch_greedy(llava, tok, prompt, ex.image, mean, std, 6)


def test_mmproj_refuses_a_tower_clip_cpp_would_run_differently(siglip_dir, tmp_path):
    """A SigLIP tower with LLaVA's "default" selection (drop the first token, which is no
    CLS there) is refused before anything is written."""
    hostile("mmproj", 1)
    model = tmp_path / "model"
    shutil.copytree(siglip_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["vision_feature_select_strategy"] = "default"
    cfg["image_seq_length"] -= 1
    (model / "config.json").write_text(json.dumps(cfg))
    assert main(["export", str(model), "--format", "gguf", "-o", str(tmp_path / "b"),
                 "--mmproj", str(tmp_path / "m.gguf"), "--no-validate"]) == 2
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "b").exists()


def test_cli_run_mmproj_and_bad_inputs(llava_dir, pairs, exports, tmp_path, capsys):
    from PIL import Image

    from cdcca_edge.demo.scenes import dataset

    hostile("mmproj", 6)
    res = pairs("f32")
    shutil.copy(res.extra["mmproj"]["path"], tmp_path / "mmproj.gguf")
    lang = res.path / "language.gguf"
    png = tmp_path / "img.png"
    Image.fromarray(dataset(1, seed=4, domains=("source",))[0].image).save(png)
    prompt = "USER: <image>\nwhat colour is the shape? ASSISTANT:"
    assert main(["run", str(lang), "--mmproj", str(tmp_path / "mmproj.gguf"), "--image", str(png), "-p", prompt,
                 "-n", "4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["backend"] == "llama+mtmd" and doc["tokens"]
    # an mmproj needs an image; runs beside a GGUF only; a text GGUF is no mmproj
    assert main(["run", str(lang), "--mmproj", str(tmp_path / "mmproj.gguf"), "-p", prompt]) == 2
    assert main(["run", str(exports("llama", "onnx").path), "--mmproj", str(tmp_path / "mmproj.gguf"),
                 "--image", str(png), "-p", prompt]) == 2
    assert main(["run", str(lang), "--mmproj", str(lang), "--image", str(png), "-p", prompt]) == 3
    cut = tmp_path / "cut.gguf"
    cut.write_bytes((tmp_path / "mmproj.gguf").read_bytes()[:5000])
    assert main(["run", str(lang), "--mmproj", str(cut), "--image", str(png), "-p", prompt]) == 3
    # --mmproj is for a LLaVA model exported to GGUF
    assert main(["export", str(llava_dir), "--format", "onnx", "-o", str(tmp_path / "b2"),
                 "--mmproj", str(tmp_path / "m2.gguf")]) == 2
    assert not (tmp_path / "m2.gguf").exists()
    capsys.readouterr()
    assert res.extra["mmproj"]["bytes"] == (tmp_path / "mmproj.gguf").stat().st_size


def test_mmproj_is_patched_in_place(llava_dir, pairs, tmp_path):
    """The projector inside the mmproj changes (a cloud update of the projector): `delta
    diff` + `patch` bring the device's mmproj to the new one, and mtmd runs it."""
    from transformers import LlavaForConditionalGeneration

    from cdcca_edge.converters.mmproj import write_mmproj
    from cdcca_edge.demo.scenes import dataset
    from cdcca_edge.demo.tiny_llava import CLIP_MEAN, CLIP_STD

    llava = LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype=torch.float32).eval()
    write_mmproj(llava, list(CLIP_MEAN), list(CLIP_STD), tmp_path / "old.gguf")
    with torch.no_grad():
        llava.model.multi_modal_projector.linear_2.weight.mul_(1.05)
    write_mmproj(llava, list(CLIP_MEAN), list(CLIP_STD), tmp_path / "new.gguf")
    device = tmp_path / "device.gguf"
    shutil.copy(tmp_path / "old.gguf", device)
    assert main(["delta", "diff", str(tmp_path / "old.gguf"), str(tmp_path / "new.gguf"), "-o",
                 str(tmp_path / "d.cdcd")]) == 0
    assert main(["patch", str(device), str(tmp_path / "d.cdcd")]) == 0
    assert compute_identity(open_artifact(device)).digest == compute_identity(open_artifact(tmp_path / "new.gguf")).digest
    lang = pairs("f32").path / "language.gguf"
    img = dataset(1, seed=2, domains=("source",))[0].image
    with MtmdModel(lang, device) as a, MtmdModel(lang, tmp_path / "new.gguf") as b:
        np.testing.assert_array_equal(a.vision.encode(img), b.vision.encode(img))
    with pytest.raises(FormatError):
        MtmdModel(lang, tmp_path / "d.cdcd")
