"""Multimodal end to end on tiny LLaVA models built here: bundle export (both language
formats) against torch, the runtime on images, UTS visual tokens in the uplink bundle,
AKD on partial visual tokens, DWC deltas for bundles."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cdcca_edge.cli import main  # noqa: E402
from cdcca_edge.core.trust import Trust  # noqa: E402
from cdcca_edge.demo.scenes import DOMAINS, dataset  # noqa: E402
from cdcca_edge.demo.tiny_llava import TinyLlavaSpec, build_tiny_llava  # noqa: E402
from tests.requires import needs_llama  # noqa: E402

SPEC_T = TinyLlavaSpec(hidden_size=48, intermediate_size=96, num_hidden_layers=2, domains=DOMAINS,
                       train_steps=40, vision_pretrain_steps=20, batch_size=16)
SPEC_S = replace(SPEC_T, hidden_size=32, intermediate_size=64, num_hidden_layers=1, domains=("source",),
                 num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    teacher = build_tiny_llava(root / "teacher", SPEC_T)
    student = build_tiny_llava(root / "student", SPEC_S, vision_from=teacher)
    return teacher, student


class _Bundles(dict):
    """Exported student bundles by format, built on first use; a GGUF one needs llama.cpp
    (export validates it there)."""

    def __init__(self, student: Path, root: Path) -> None:
        super().__init__()
        self.student, self.root = student, root

    def __missing__(self, fmt: str):
        from cdcca_edge.converters.export import export

        if fmt == "gguf":
            needs_llama()
        res = export(self.student, self.root / fmt, fmt, quant="f32")
        self[fmt] = (self.root / fmt, res)
        return self[fmt]


@pytest.fixture(scope="module")
def bundles(llava, tmp_path_factory):
    _, student = llava
    return _Bundles(student, tmp_path_factory.mktemp("bundles"))


def test_students_share_the_frozen_tower(llava):
    from transformers import LlavaForConditionalGeneration

    t = LlavaForConditionalGeneration.from_pretrained(llava[0]).model.vision_tower.state_dict()
    s = LlavaForConditionalGeneration.from_pretrained(llava[1]).model.vision_tower.state_dict()
    assert all(torch.equal(t[k], s[k]) for k in t)


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_bundle_export_parity(bundles, fmt):
    path, res = bundles[fmt]
    assert res.format == f"bundle/{fmt}"
    v = res.extra
    assert v["vision"]["normalized_diff"] < v["vision"]["tolerance"]
    assert v["answers_equal_torch"] == 1.0 and v["answers_checked"] >= 4
    manifest = json.loads((path / "cdcca-artifact.json").read_text())
    assert [p["name"] for p in manifest["parts"]] == ["vision", "language"]
    assert "{question}" in manifest["multimodal"]["prompt_template"]


@pytest.mark.parametrize("fmt,backend", [("gguf", "llama"), ("onnx", "onnx")])
def test_run_image_equals_torch_greedy(bundles, llava, fmt, backend, tmp_path, capsys):
    if backend == "llama":
        needs_llama()
    from PIL import Image
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from cdcca_edge.converters.llava_export import torch_greedy

    path, _ = bundles[fmt]
    model = LlavaForConditionalGeneration.from_pretrained(llava[1]).eval()
    tok = AutoTokenizer.from_pretrained(llava[1])
    info = json.loads((path / "cdcca-artifact.json").read_text())["multimodal"]
    for k, ex in enumerate(dataset(3, seed=7, domains=DOMAINS)):
        img = tmp_path / f"img{k}.png"
        Image.fromarray(ex.image).save(img)
        assert main(["run", str(path), "--image", str(img), "-p", ex.question.text, "--backend", backend,
                     "-n", "6", "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        prompt = info["prompt_template"].replace("{question}", ex.question.text)
        want = torch_greedy(model, tok, prompt, ex.image, info["image_mean"], info["image_std"], 6)
        assert [t["token"] for t in got["tokens"]] == want


def test_image_needs_a_bundle(tmp_path, capsys):
    from tests.core.delta_helpers import make_gguf

    gguf = make_gguf(tmp_path / "m.gguf")
    assert main(["run", str(gguf), "--image", "x.png", "-p", "hi"]) != 0
    assert "multimodal bundle" in capsys.readouterr().err


def test_uplink_visual_tokens(bundles, tmp_path):
    from cdcca_edge.core.artifact import compute_identity, open_artifact
    from cdcca_edge.core.uplink_format import read_uplink
    from cdcca_edge.runtime.multimodal import MultimodalModel
    from cdcca_edge.core.uplink_format import dequantize_tokens
    from cdcca_edge.runtime.uts import calibrate, collect

    path, _ = bundles["gguf"]
    ident = compute_identity(open_artifact(path)).digest
    calib_items = [{"prompt": e.question.text, "image": e.image} for e in dataset(12, seed=1, domains=("source",))]
    stream = [{"id": str(i), "prompt": e.question.text, "image": e.image, "raw_bytes": e.image.nbytes}
              for i, e in enumerate(dataset(16, seed=2, domains=DOMAINS))]
    with MultimodalModel(path) as mm:
        calib = calibrate(mm, calib_items, ident, rate=0.5, max_tokens=4, keep=0.5)
        assert calib.visual is not None
        rep = collect(mm, stream, calib, tmp_path / "up.cdcu", ident)
        rep_raw = collect(mm, stream, calib, tmp_path / "raw.cdcu", ident, include_raw=True)
        feats = {it["id"]: mm.encode_image(it["image"])[0] for it in stream}
    assert rep.n_uploaded > 0
    b = read_uplink(tmp_path / "up.cdcu")
    for s in b.samples():
        n = s.meta["n_visual_tokens"]
        pos = s.arrays["visual_positions"]
        assert s.arrays["visual_features"].dtype == np.int8 and "raw_image" not in s.arrays
        assert len(pos) == n // 2 and list(pos) == sorted(set(pos.tolist()))
        # the kept tokens are the most out-of-distribution ones, and dequantise closely
        f = feats[s.id]
        scores = calib.visual.ood_scores(f)
        assert scores[pos].min() >= np.delete(scores, pos).max() - 1e-9
        err = np.abs(dequantize_tokens(s.arrays["visual_features"], s.arrays["visual_scales"]) - f[pos])
        assert err.max() <= np.abs(f[pos]).max() / 127
    assert rep.bundle_bytes / rep.n_uploaded < 0.5 * stream[0]["raw_bytes"]
    assert all("raw_image" in s.arrays for s in read_uplink(tmp_path / "raw.cdcu").samples())
    assert rep_raw.bundle_bytes > rep.bundle_bytes


def test_akd_visual_tokens(llava, bundles, tmp_path):
    """Dropped tokens are masked (their values do not matter); a distillation step lowers
    the loss; the adapter touches the language model and projector only; DWC expresses it
    as a delta for the bundle, which patches in place."""
    from transformers import LlavaForConditionalGeneration

    from cdcca_edge.cloud.akd import AKDConfig
    from cdcca_edge.cloud.akd_mm import VisualSample, build_inputs, distill_multimodal
    from cdcca_edge.cloud.dwc import make_delta
    from cdcca_edge.core.artifact import compute_identity, open_artifact
    from cdcca_edge.core.patch import apply_delta
    from cdcca_edge.runtime.multimodal import MultimodalModel

    teacher_dir, student_dir = llava
    student = LlavaForConditionalGeneration.from_pretrained(student_dir).eval()
    rng = np.random.default_rng(0)
    n, dv = student.config.image_seq_length, student.config.vision_config.hidden_size
    img = student.config.image_token_index
    pos = np.sort(rng.choice(n, n // 2, replace=False))
    s1 = VisualSample("a", [3, img, 5, 6], rng.standard_normal((n // 2, dv)).astype(np.float32), pos, n)
    full = np.zeros((n, dv), np.float32)
    full[pos] = s1.tokens
    with torch.no_grad():
        outs = []
        for fill in (0.0, 9.0):  # what sits at the dropped positions must not matter
            s = VisualSample("a", s1.prompt_ids, np.where(np.isin(np.arange(n), pos)[:, None], full, fill)
                             .astype(np.float32), np.arange(n), n)
            inp = build_inputs(student, [s], [[7, 8]], 0)
            inp["attention_mask"][0, 1:1 + n] = torch.from_numpy(np.isin(np.arange(n), pos)).long()
            outs.append(student(inputs_embeds=inp["inputs_embeds"], attention_mask=inp["attention_mask"],
                                position_ids=inp["position_ids"]).logits)
        inp = build_inputs(student, [s1], [[7, 8]], 0)
        masked = student(inputs_embeds=inp["inputs_embeds"], attention_mask=inp["attention_mask"],
                         position_ids=inp["position_ids"]).logits
    after = slice(1 + n, None)  # the text after the image (a dropped position's own output is unused)
    assert torch.allclose(outs[0][0, after], outs[1][0, after], atol=1e-5)
    assert torch.allclose(outs[0][0, after], masked[0, after], atol=1e-5)

    device, ident = _device_uplink(bundles, tmp_path, "uts")
    cfg = AKDConfig(epochs=3, lr=5e-3, batch_size=8, max_new_tokens=4, holdout=0.0)
    rep = distill_multimodal(teacher_dir, student_dir, [tmp_path / "up.cdcu"], tmp_path / "akd", cfg)
    assert rep.losses[-1]["total"] < rep.losses[0]["total"]
    assert 0.4 < rep.kept_token_fraction < 0.6
    adapter = json.loads((tmp_path / "akd" / "adapter_config.json").read_text())
    assert "vision_tower" not in str(adapter["target_modules"])
    from safetensors.numpy import load_file

    keys = load_file(str(tmp_path / "akd" / "adapter_model.safetensors"))
    assert keys and not any("vision_tower" in k for k in keys)
    assert any("multi_modal_projector" in k for k in keys) and any("language_model" in k for k in keys)
    dwc = make_delta(device, tmp_path / "akd", tmp_path / "d.cdcd", target_base=student_dir)
    assert dwc.update_left < 0.5
    touched = {r.split("/")[0] for r in _delta_tensors(tmp_path / "d.cdcd")}
    assert touched == {"vision", "language"}  # projector and language model
    apply_delta(device, tmp_path / "d.cdcd", trust=Trust.none())
    assert compute_identity(open_artifact(device)).digest == dwc.target_identity
    with MultimodalModel(device) as mm:  # the patched bundle loads and answers
        ex = dataset(1, seed=9, domains=("noise",))[0]
        assert mm.generate(mm.prompt(ex.question.text), image=ex.image).tokens


def _device_uplink(bundles, tmp_path: Path, selector: str) -> tuple[Path, str]:
    """A copy of the GGUF bundle as a device (``tmp_path/device``), calibrated on 12 source
    images, and its uplink of 24 drifted ones (``tmp_path/up.cdcu``). Returns (device, identity)."""
    import shutil

    from cdcca_edge.core.artifact import compute_identity, open_artifact
    from cdcca_edge.runtime.multimodal import MultimodalModel
    from cdcca_edge.runtime.uts import calibrate, collect

    device = tmp_path / "device"
    shutil.copytree(bundles["gguf"][0], device)
    ident = compute_identity(open_artifact(device)).digest
    with MultimodalModel(device) as mm:
        calib = calibrate(mm, [{"prompt": e.question.text, "image": e.image}
                               for e in dataset(12, seed=1, domains=("source",))], ident, rate=0.5, max_tokens=4)
        collect(mm, [{"id": str(i), "prompt": e.question.text, "image": e.image, "raw_bytes": 1}
                     for i, e in enumerate(dataset(24, seed=3, domains=("noise", "texture")))],
                calib, tmp_path / "up.cdcu", ident, selector=selector)
    return device, ident


def _delta_tensors(path: Path) -> list[str]:
    from cdcca_edge.core.delta_format import read_delta

    return [r.tensor for r in read_delta(path).header.records]


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_run_image_without_heavy_packages(bundles, fmt, tmp_path):
    """The multimodal device path (vision in onnxruntime, language on either backend)
    runs with torch, transformers, peft, optimum and onnx unimportable."""
    import subprocess
    import sys
    import textwrap

    from tests.test_device_path import BLOCKER

    path, _ = bundles[fmt]
    img = tmp_path / "img.npy"
    np.save(img, dataset(1, seed=5, domains=("texture",))[0].image)
    code = BLOCKER + textwrap.dedent(f"""
        from cdcca_edge.cli import main
        raise SystemExit(main(["run", {str(path)!r}, "--image", {str(img)!r}, "-p", "is there a square?", "--json"]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tokens"]


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_qwen2_language_model_bundle(llava, tmp_path, fmt):
    """A LLaVA whose language model is Qwen2 (q/k/v biases) exports and answers as torch."""
    from cdcca_edge.converters.export import export

    if fmt == "gguf":
        needs_llama()

    spec = replace(SPEC_S, arch="qwen2", train_steps=10)
    student = build_tiny_llava(tmp_path / "qwen2", spec, vision_from=llava[0])
    res = export(student, tmp_path / fmt, fmt, quant="f32")
    assert res.extra["answers_equal_torch"] == 1.0
    assert res.extra["vision"]["normalized_diff"] < res.extra["vision"]["tolerance"]


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_runtime_load_opens_bundles_and_patches_them_live(bundles, fmt, tmp_path):
    """runtime.load takes every artefact kind the exporter writes: a bundle is a Backend
    (its language part's text interface, plus images), so prompt logits (DWC's probe KL)
    and the live patch path work on it as on any model."""
    import shutil

    from cdcca_edge.core.artifact import compute_identity, open_artifact
    from cdcca_edge.core.delta_build import DeltaBuilder
    from cdcca_edge.runtime import load
    from cdcca_edge.runtime.base import Backend
    from cdcca_edge.runtime.multimodal import MultimodalModel
    from tests.core.delta_helpers import random_units

    path, _ = bundles[fmt]
    device = tmp_path / "device"
    shutil.copytree(path, device)
    art = open_artifact(device)
    t = next(t for t in art.tensors if t.name.startswith("language/") and t.type_name == "F32" and len(t.shape) == 2)
    b = DeltaBuilder(art)
    b.replace_units(t.name, [0], [8], random_units("F32", 8, np.random.default_rng(1)))
    target = b.write(tmp_path / "d.cdcd").target_identity
    ex = dataset(1, seed=4, domains=("noise",))[0]
    with load(device) as m:
        assert isinstance(m, MultimodalModel) and isinstance(m, Backend)
        ids = m.tokenize("is there a square?")
        assert m.prompt_logits(ids).shape == (len(ids), m.n_vocab)
        before = m.generate(m.prompt(ex.question.text), image=ex.image).tokens
        r = m.apply_patch(tmp_path / "d.cdcd", trust=Trust.none())  # stop, patch, reload
        assert r.applied and m.generate(m.prompt(ex.question.text), image=ex.image).tokens
        assert len(before) > 0
    assert compute_identity(open_artifact(device)).digest == target


def test_visual_distill_under_accelerate_launch(llava, bundles, tmp_path):
    """The visual-token path under `accelerate launch --num_processes 2 --cpu` (gloo): runs
    unchanged and each epoch's mean loss is within 10% of one process's."""
    from cdcca_edge.cloud.akd import AKDConfig
    from cdcca_edge.cloud.akd_mm import distill_multimodal
    from tests.procs import accelerate_launch

    needs_llama()
    teacher_dir, student_dir = llava
    _device_uplink(bundles, tmp_path, "all")
    args = ["--teacher", str(teacher_dir), "--student", str(student_dir), "--bundle", str(tmp_path / "up.cdcu"),
            "--epochs", "3", "--lr", "5e-3", "--max-new-tokens", "4", "--holdout", "0"]
    proc = accelerate_launch(["cdcca_edge.cli", "distill", *args, "-o", str(tmp_path / "ddp"), "--json"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert ddp["processes"] == 2  # really two processes
    one = distill_multimodal(teacher_dir, student_dir, [tmp_path / "up.cdcu"], tmp_path / "one",
                             AKDConfig(epochs=3, lr=5e-3, max_new_tokens=4, holdout=0.0), merge=False)
    assert ddp["steps"] == one.steps and ddp["n_train"] == one.n_train == 24
    for a, b in zip(ddp["losses"], one.losses):
        assert a["total"] == pytest.approx(b["total"], rel=0.10), (ddp["losses"], one.losses)
    assert (tmp_path / "ddp" / "adapter_model.safetensors").is_file()


def test_uts_diverse_uploads_as_many_as_uts_from_a_real_device(bundles, tmp_path):
    """`collect(selector="uts-diverse")` on the llama.cpp device: UTS's own count, the most
    uncertain input among them, and a bundle the cloud reads like any other."""
    from cdcca_edge.cloud.akd_mm import read_visual_samples
    from cdcca_edge.core.uplink_format import read_uplink

    needs_llama()
    picked = {}
    for sel in ("uts", "uts-diverse"):
        (tmp_path / sel).mkdir()
        _device_uplink(bundles, tmp_path / sel, sel)
        up = read_uplink(tmp_path / sel / "up.cdcu")
        assert up.header["selector"] == sel
        picked[sel] = {s.id: s.meta["uncertainty"] for s in up.samples()}
    assert 0 < len(picked["uts-diverse"]) == len(picked["uts"])
    assert max(picked["uts"].values()) in picked["uts-diverse"].values()
    assert len(read_visual_samples([tmp_path / "uts-diverse" / "up.cdcu"])) == len(picked["uts"])
