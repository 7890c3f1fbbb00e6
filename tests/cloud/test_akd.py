"""AKD: loss terms by hand, vocabulary checks, and end-to-end distillation of a tiny
teacher (all domains) into a tiny student (source domain only) from a real uplink bundle."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cdcca_edge.cloud.akd import (
    BIAS_ADAPTER_DIR,
    AKDConfig,
    distill,
    kd_divergence,
    teacher_confidence,
    weighted_mean,
)
from cdcca_edge.demo.tiny import TEXT_STUDENT, TEXT_TEACHER, TinySpec, build_tiny_model, text_prompts
from cdcca_edge.core.errors import UsageError


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_kd_divergence_by_hand(kind):
    s = np.array([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    t = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    T = 2.0
    ps, pt = _np_softmax(s / T), _np_softmax(t / T)
    if kind == "forward_kl":
        want = (pt * np.log(pt / ps)).sum(-1)
    elif kind == "reverse_kl":
        want = (ps * np.log(ps / pt)).sum(-1)
    else:
        m = 0.5 * (ps + pt)
        want = 0.5 * ((pt * np.log(pt / m)).sum(-1) + (ps * np.log(ps / m)).sum(-1))
    got = kd_divergence(torch.tensor(s), torch.tensor(t), kind, T).numpy()
    np.testing.assert_allclose(got, want * T * T, rtol=1e-5)


def test_kd_is_zero_for_equal_distributions():
    x = torch.randn(4, 10)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert kd_divergence(x, x, kind, 1.0).abs().max() < 1e-6


def test_weighted_mean_and_ce_weighting():
    v = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w = torch.tensor([0.0, 1.0, 0.1, 0.0])
    assert float(weighted_mean(v, w)) == pytest.approx((2.0 + 0.3) / 1.1)
    assert float(weighted_mean(v, torch.zeros(4))) == 0.0


def test_config_validation():
    with pytest.raises(UsageError, match="nothing to learn"):
        AKDConfig(ce_weight=0, kd_weight=0, feature_weight=0)
    with pytest.raises(UsageError, match="kd_loss"):
        AKDConfig(kd_loss="l2")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="adapter"):
        AKDConfig(adapter="prefix")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="teacher_weighting"):
        AKDConfig(teacher_weighting="entropy")  # type: ignore[arg-type]


def test_teacher_confidence_is_the_teachers_probability_of_the_label():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]], requires_grad=True)  # (1, 2, 3)
    targets = torch.tensor([[0, 2]])
    c = teacher_confidence(logits, targets)
    e = math.exp(2.0)
    assert c.tolist()[0] == pytest.approx([e / (e + 2), 1 / 3])
    assert not c.requires_grad  # a weight, not a path for gradients into the teacher
    # weighted by it, a confident label's loss counts more than an unsure one's
    assert float(weighted_mean(torch.tensor([1.0, 0.0]), c[0])) == pytest.approx(c[0, 0].item() / c[0].sum().item())


def test_confidence_weighting_changes_training_and_stays_deterministic(pair, bundle, tmp_path):
    plain = distill(pair[0], pair[1], [bundle], tmp_path / "plain", AKDConfig(epochs=1, max_new_tokens=6, seed=3))
    cfg = AKDConfig(epochs=1, max_new_tokens=6, seed=3, teacher_weighting="confidence")
    w1 = distill(pair[0], pair[1], [bundle], tmp_path / "w1", cfg)
    w2 = distill(pair[0], pair[1], [bundle], tmp_path / "w2", cfg)
    assert w1.losses == w2.losses
    assert w1.losses[0]["ce"] != plain.losses[0]["ce"]  # the weights reach the loss


# --- end to end ---------------------------------------------------------------------------

TEACHER, STUDENT = TEXT_TEACHER, TEXT_STUDENT


prompts = text_prompts


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("akd")
    return build_tiny_model(root / "teacher", TEACHER), build_tiny_model(root / "student", STUDENT)


@pytest.fixture(scope="module")
def bundle(pair, tmp_path_factory):
    """The student, exported and run on target-domain inputs, uploads what it is unsure of."""
    from cdcca_edge.converters.export import export
    from cdcca_edge.core.artifact import compute_identity, open_artifact
    from cdcca_edge.runtime import load
    from cdcca_edge.runtime.uts import calibrate, collect, read_inputs

    root = tmp_path_factory.mktemp("bundle")
    art = export(pair[1], root / "student.gguf", "gguf", quant="f32").path
    ident = compute_identity(open_artifact(art)).digest
    with open(root / "in.jsonl", "w") as f:
        for i, p in enumerate(prompts("target", 80, seed=21)):
            f.write(json.dumps({"id": f"t{i}", "prompt": p}) + "\n")
    with load(art) as m:
        cal = calibrate(m, prompts("source", 40, seed=20), ident, rate=0.3, max_tokens=12)
        rep = collect(m, read_inputs(root / "in.jsonl"), cal, root / "b.cdcu", ident)
    assert rep.n_uploaded >= 30  # shifted inputs: most go up
    return root / "b.cdcu"


def test_distill_lora_end_to_end(pair, bundle, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    teacher, student = pair
    out = tmp_path / "adapter"
    cfg = AKDConfig(epochs=6, lr=3e-3, batch_size=8, max_new_tokens=8, seed=0)
    report = distill(teacher, student, [bundle], out, cfg, merge=True)
    losses = [e["total"] for e in report.losses]
    assert losses[-1] < losses[0] * 0.8  # it learns
    b, a = report.agreement_before, report.agreement_after
    # distillation on uploaded samples raises agreement on held-out samples of that domain
    assert a["holdout"]["token_agreement"] > b["holdout"]["token_agreement"] + 0.05
    assert a["bundle"]["token_agreement"] > b["bundle"]["token_agreement"]
    assert json.loads((out / "report.json").read_text())["steps"] == report.steps
    # a real PEFT adapter, and it is the trained one
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student), out)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, merged(ids).logits, atol=1e-4, rtol=1e-4)
    # and it exports through the converters, adapter merged, validated against torch
    from cdcca_edge.converters.export import export

    res = export(student, tmp_path / "adapted.gguf", "gguf", quant="q8_0", adapter=out)
    assert res.validation.passed and res.adapter == str(out)


def test_distill_is_deterministic(pair, bundle, tmp_path):
    cfg = AKDConfig(epochs=1, max_new_tokens=6, seed=3)
    r1 = distill(pair[0], pair[1], [bundle], tmp_path / "a", cfg)
    r2 = distill(pair[0], pair[1], [bundle], tmp_path / "b", cfg)
    assert r1.losses == r2.losses
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == (tmp_path / "b" / "adapter_model.safetensors").read_bytes()


def test_bias_norm_adapter_on_qwen2(tmp_path, bundle):
    """bias-norm: LN tuning on the norms, plus bias deltas where the architecture has
    biases (Qwen2's q/k/v); both load in peft, and the merged model exports."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t = build_tiny_model(tmp_path / "t", TinySpec(arch="qwen2", hidden_size=96, intermediate_size=192,
                                                  num_hidden_layers=3, domain="all", seed=7, train_steps=200))
    s = build_tiny_model(tmp_path / "s", TinySpec(arch="qwen2", domain="source", seed=8, train_steps=150))
    out = tmp_path / "bn"
    report = distill(t, s, [bundle], out, AKDConfig(adapter="bias-norm", epochs=2, lr=1e-2, max_new_tokens=6),
                     merge=True)
    assert (out / "adapter_config.json").is_file() and (out / BIAS_ADAPTER_DIR / "adapter_config.json").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LN_TUNING"
    assert json.loads((out / BIAS_ADAPTER_DIR / "adapter_config.json").read_text())["peft_type"] == "BEFT"
    from cdcca_edge.converters.hf import peft_notices_known

    with peft_notices_known():  # plain peft loads them (its RMSNorm notice aside)
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(s), out)
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(s), out / BIAS_ADAPTER_DIR)
    # few parameters: norms and biases only
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(s).parameters())
    assert report.trainable_params < n_params * 0.02
    # adapter + bias adapter, merged by peft, equal the merged model AKD wrote
    base = AutoModelForCausalLM.from_pretrained(s)
    with peft_notices_known():
        both = PeftModel.from_pretrained(base, out).merge_and_unload()
    both = PeftModel.from_pretrained(both, out / BIAS_ADAPTER_DIR).merge_and_unload()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(both(ids).logits, merged(ids).logits, atol=1e-4, rtol=1e-4)
        assert (merged(ids).logits - AutoModelForCausalLM.from_pretrained(s)(ids).logits).abs().max() > 1e-3
    # export --adapter merges both adapters: the same model as exporting the merged one
    from cdcca_edge.converters.export import export

    a = export(s, tmp_path / "a.gguf", "gguf", quant="f32", adapter=out)
    b = export(out / "merged", tmp_path / "b.gguf", "gguf", quant="f32")
    assert a.validation.passed and b.validation.passed
    from cdcca_edge.runtime import load

    with load(a.path) as ma, load(b.path) as mb:  # equal up to float rounding of b + (b' - b)
        np.testing.assert_allclose(ma.prompt_logits("there are two"), mb.prompt_logits("there are two"),
                                   atol=1e-4)


def test_vocabulary_mismatch_is_refused(pair, bundle, tmp_path):
    from transformers import AutoTokenizer

    from cdcca_edge.demo.tiny import train_tokenizer

    other = tmp_path / "other"
    build_tiny_model(other, TinySpec(vocab_size=400, train_steps=0, seed=9))
    tok = train_tokenizer(["completely different words for another vocabulary"] * 50, 300)
    tok.save_pretrained(other)
    with pytest.raises(UsageError, match="tokenizers differ"):
        distill(other, pair[1], [bundle], tmp_path / "x", AKDConfig(epochs=1))
    t_tok, s_tok = AutoTokenizer.from_pretrained(pair[0]), AutoTokenizer.from_pretrained(pair[1])
    assert t_tok.get_vocab() == s_tok.get_vocab()  # the real pair shares one


def test_cli_distill_and_module_entry_point(pair, bundle, tmp_path):
    """`python -m cdcca_edge.cli distill` (what `accelerate launch -m` runs) end to end."""
    import subprocess
    import sys

    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "cdcca_edge.cli", "distill", "--teacher", str(pair[0]), "--student",
         str(pair[1]), "--bundle", str(bundle), "-o", str(out), "--epochs", "1", "--max-new-tokens", "6",
         "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["steps"] >= 1 and (out / "adapter_model.safetensors").is_file()
    assert math.isfinite(doc["losses"][0]["total"])


def test_distill_under_accelerate_launch_matches_one_process(pair, bundle, tmp_path):
    """`accelerate launch --num_processes 2 --cpu cdcca-edge distill` (gloo, data parallel):
    the same command runs unchanged, and its losses track one process's. Tolerance: each
    epoch's mean loss within 10% of the single process's (the two processes split each batch,
    so a batch's mean over tokens is weighted a little differently)."""
    from tests.procs import accelerate_launch

    args = ["--teacher", str(pair[0]), "--student", str(pair[1]), "--bundle", str(bundle), "--epochs", "3",
            "--max-new-tokens", "6", "--holdout", "0.2", "--seed", "1"]
    proc = accelerate_launch(["cdcca_edge.cli", "distill", *args, "-o", str(tmp_path / "ddp"), "--json"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert ddp["processes"] == 2  # really two processes
    one = distill(pair[0], pair[1], [bundle], tmp_path / "one",
                  AKDConfig(epochs=3, max_new_tokens=6, holdout=0.2, seed=1))
    assert ddp["steps"] == one.steps
    for a, b in zip(ddp["losses"], one.losses):
        assert a["total"] == pytest.approx(b["total"], rel=0.10), (ddp["losses"], one.losses)
    assert ddp["losses"][-1]["total"] < ddp["losses"][0]["total"]  # it learns
    # one adapter, written once, that loads
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pair[1]), tmp_path / "ddp")


def test_a_launch_where_each_process_would_train_alone_is_refused(pair, bundle, tmp_path):
    """WORLD_SIZE says 2, accelerate sees 1 (`accelerate launch --multi_gpu` on a machine
    without GPUs and without ACCELERATE_USE_CPU): refused, nothing written."""
    from tests.procs import accelerate_launch

    args = ["--teacher", str(pair[0]), "--student", str(pair[1]), "--bundle", str(bundle), "--epochs", "1"]
    proc = accelerate_launch(["cdcca_edge.cli", "distill", *args, "-o", str(tmp_path / "x")], use_cpu=False)
    assert proc.returncode != 0
    assert "ACCELERATE_USE_CPU=1" in proc.stderr and "would train alone" in proc.stderr
    assert not (tmp_path / "x").exists()
