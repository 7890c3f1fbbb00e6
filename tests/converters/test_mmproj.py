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
from cdcca_edge.converters.mmproj import MMPROJ_TOLERANCE, clip_order  # noqa: E402
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
            assert np.abs(got - want).max() <= MMPROJ_TOLERANCE[dtype] * want.std()
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
            assert np.abs(got - want).max() <= MMPROJ_TOLERANCE[dtype] * want.std()
            prompt = bundle.prompt(ex.question.text)
            assert list(m.generate(prompt, cfg, image=ex.image).tokens) == \
                torch_greedy(llava, tok, prompt, ex.image, mean, std, 6)


@pytest.mark.parametrize("edit,option,says", [
    ({"vision_feature_select_strategy": "default"}, [], "vision_feature_select_strategy 'default'"),
    ({"projector_hidden_act": "relu"}, [], "projector_hidden_act 'relu'"),
    ({"vision_feature_layer": -5}, [], "vision_feature_layer -5"),
    ({}, ["--mmproj-dtype", "q8_0"], "--mmproj-dtype 'q8_0'"),
])
def test_mmproj_refuses_what_clip_cpp_would_run_differently(edit, option, says, siglip_dir, tmp_path, capsys):
    """A configuration clip.cpp would not run as HF does (a SigLIP tower with LLaVA's
    "default" selection, which drops a patch there; another projector activation; a
    feature layer the tower lacks), or an mmproj type we do not write, is refused, named,
    before anything is written."""
    hostile("mmproj", 1)
    model = tmp_path / "model"
    shutil.copytree(siglip_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, **edit}))
    capsys.readouterr()
    assert main(["export", str(model), "--format", "gguf", "-o", str(tmp_path / "b"),
                 "--mmproj", str(tmp_path / "m.gguf"), "--no-validate", *option]) == 2
    assert says in capsys.readouterr().err
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


def test_dwc_updates_a_llama_cpp_native_pair_in_place(siglip_dir, tmp_path, capsys):
    """An AKD-style LoRA (the language model's linears and the projector) reaches a device
    that runs language GGUF + mmproj on mtmd as two DWC deltas, one per file, each built
    on the cloud's mirror and patched in place on the device: the pair ends byte-equal to
    the mirrors and answers as torch's merged model. Bad bases are refused, untouched."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from cdcca_edge.cloud.akd_mm import LORA_TARGET_REGEX
    from cdcca_edge.converters.llava_export import torch_greedy
    from cdcca_edge.demo.scenes import DOMAINS, dataset
    from cdcca_edge.runtime.multimodal import MultimodalModel

    torch.manual_seed(0)
    pm = get_peft_model(LlavaForConditionalGeneration.from_pretrained(siglip_dir),
                        LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGET_REGEX, init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(0.3)
    pm.save_pretrained(tmp_path / "lora")
    res = export(siglip_dir, tmp_path / "cloud", "gguf", quant="f32", mmproj=tmp_path / "cloud-mmproj.gguf",
                 validate=False)
    device = tmp_path / "device"
    device.mkdir()
    mirrors = {"language.gguf": res.path / "language.gguf", "mmproj.gguf": tmp_path / "cloud-mmproj.gguf"}
    for name, mirror in mirrors.items():
        shutil.copy(mirror, device / name)
    shutil.copy(mirrors["mmproj.gguf"], tmp_path / "old-mmproj.gguf")
    before = {name: (device / name).read_bytes() for name in mirrors}
    hostile("delta-make", 4)  # a probe KL on an mmproj, an update with nothing for it, another model's mirror,
    # a forged mmproj
    # an mmproj has no language model to take a probe KL on; a language-only update has nothing for it
    (tmp_path / "probe.jsonl").write_text('{"prompt": "question: what colour is the circle? answer:"}\n')
    capsys.readouterr()
    assert main(["delta", "make", "--base", str(mirrors["mmproj.gguf"]), "--target", str(tmp_path / "lora"),
                 "--target-base", str(siglip_dir), "-o", str(tmp_path / "x.cdcd"), "--max-kl", "0.1",
                 "--probe", str(tmp_path / "probe.jsonl")]) == 2
    assert "no language model to measure a probe KL on" in capsys.readouterr().err
    lang_only = tmp_path / "lang-only"
    torch.manual_seed(1)
    get_peft_model(LlavaForConditionalGeneration.from_pretrained(siglip_dir),
                   LoraConfig(r=2, target_modules=r".*language_model.*\.q_proj", init_lora_weights=False)
                   ).save_pretrained(lang_only)
    assert main(["delta", "make", "--base", str(mirrors["mmproj.gguf"]), "--target", str(lang_only),
                 "--target-base", str(siglip_dir), "-o", str(tmp_path / "x.cdcd")]) == 2
    assert "changes nothing in this mmproj" in capsys.readouterr().err
    # the mirror of another model (a wider language model: other projector shapes)
    from cdcca_edge.converters.mmproj import write_mmproj
    from cdcca_edge.demo.tiny_llava import CLIP_MEAN, CLIP_STD, TinyLlavaSpec, llava_config, vqa_tokenizer
    from tests.conftest import LLAVA_SPEC

    other = LlavaForConditionalGeneration(llava_config(
        TinyLlavaSpec(**{**LLAVA_SPEC, "vision_tower": "siglip", "hidden_size": 48}), vqa_tokenizer()))
    write_mmproj(other, list(CLIP_MEAN), list(CLIP_STD), tmp_path / "other.gguf")
    other_bytes = (tmp_path / "other.gguf").read_bytes()
    assert main(["delta", "make", "--base", str(tmp_path / "other.gguf"), "--target", str(tmp_path / "lora"),
                 "--target-base", str(siglip_dir), "-o", str(tmp_path / "x.cdcd")]) == 3
    assert "was not exported from the model this update is for" in capsys.readouterr().err
    assert (tmp_path / "other.gguf").read_bytes() == other_bytes
    # a forged "mmproj": clip.cpp's architecture name, but none of its tensors
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "forged.gguf"), "clip")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    forged = (tmp_path / "forged.gguf").read_bytes()
    assert main(["delta", "make", "--base", str(tmp_path / "forged.gguf"), "--target", str(tmp_path / "lora"),
                 "--target-base", str(siglip_dir), "-o", str(tmp_path / "x.cdcd")]) == 3
    assert "it was not written from this model" in capsys.readouterr().err
    assert (tmp_path / "forged.gguf").read_bytes() == forged and not (tmp_path / "x.cdcd").exists()
    assert not (tmp_path / "x.cdcd").exists() and (device / "mmproj.gguf").read_bytes() == before["mmproj.gguf"]
    capsys.readouterr()
    for name, mirror in mirrors.items():
        assert main(["delta", "make", "--base", str(mirror), "--target", str(tmp_path / "lora"),
                     "--target-base", str(siglip_dir), "-o", str(tmp_path / f"{name}.cdcd"), "--advance-mirror",
                     "--json"]) == 0
        rep = json.loads(capsys.readouterr().out)
        assert rep["parameters_elsewhere"] > 0 and rep["update_left"] < 0.01, rep
        assert main(["patch", str(device / name), str(tmp_path / f"{name}.cdcd")]) == 0
        capsys.readouterr()
        assert (device / name).read_bytes() == mirror.read_bytes() != before[name]
    merged = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(siglip_dir),
                                       tmp_path / "lora").merge_and_unload().eval()
    tok = AutoTokenizer.from_pretrained(siglip_dir)
    cfg = GenerationConfig(max_tokens=6)
    # DWC sends the update quantised (qadd: update_left above), so the pair is near the
    # merged model, not bit-equal to its export: the f16 export's tolerance
    with MtmdModel(device / "language.gguf", device / "mmproj.gguf") as m, MultimodalModel(res.path) as bundle, \
            MtmdModel(res.path / "language.gguf", tmp_path / "old-mmproj.gguf") as old:  # the old tower side
        mean, std = list(bundle.info.image_mean), list(bundle.info.image_std)
        for ex in dataset(6, seed=5, domains=tuple(DOMAINS)):
            with torch.no_grad():
                h = merged.model.vision_tower(torch.from_numpy(bundle.preprocess(ex.image)),
                                              output_hidden_states=True).hidden_states[-1][0]
                want = merged.model.multi_modal_projector(h).numpy()
            err = np.abs(m.vision.encode(ex.image) - want).max()
            assert err <= MMPROJ_TOLERANCE["f16"] * want.std() and err < np.abs(old.vision.encode(ex.image) - want).max() / 5
            prompt = bundle.prompt(ex.question.text)
            assert list(m.generate(prompt, cfg, image=ex.image).tokens) == \
                torch_greedy(merged, tok, prompt, ex.image, mean, std, 6)


@pytest.mark.parametrize("part", ["mmproj", "language"])
def test_dwc_maps_every_parameter_of_a_full_weights_target(part, llava_dir, pairs, tmp_path, capsys):
    """A full-weights LLaVA target (every parameter, the CLIP tower's rotated position rows
    and the parameters LLaVA never reads included) on the pair exported from that very
    model: every slot lines up, so there is nothing to send."""
    res = pairs("f32")
    mirror = tmp_path / f"{part}.gguf"
    shutil.copy(res.extra["mmproj"]["path"] if part == "mmproj" else res.path / "language.gguf", mirror)
    capsys.readouterr()
    assert main(["delta", "make", "--base", str(mirror), "--target", str(llava_dir), "-o", str(tmp_path / "d.cdcd"),
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["records"] == 0 and rep["relative_error"] == 0.0 and rep["parameters_elsewhere"] > 0, rep
