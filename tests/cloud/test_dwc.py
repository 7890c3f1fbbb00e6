"""DWC: deltas from cloud updates, against the device mirror, for GGUF and ONNX bases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cdcca_edge.cloud.dwc import DWCConfig, make_delta
from cdcca_edge.converters.export import export
from cdcca_edge.core.artifact import open_artifact
from cdcca_edge.core.errors import MissingTensorError, UsageError
from cdcca_edge.core.patch import apply_delta
from cdcca_edge.core.trust import Trust
from tests.core.delta_helpers import file_digest

PROBE = ["question: what colour is the circle? answer:", "the red circle is left of the",
         "there are three", "question: how many squares are there? answer:"]


def make_lora(base: Path, out: Path, seed: int, targets=("q_proj", "v_proj", "down_proj"), scale=0.3) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                        LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(scale)
    pm.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("dwc")
    base = tiny_models["llama"]
    lora = make_lora(base, root / "lora", seed=0)
    return root, base, lora


@pytest.mark.parametrize("fmt,quant", [("gguf", "q8_0"), ("gguf", "f16"), ("onnx", "f32")])
def test_lora_update_arrives(setup, tmp_path, fmt, quant):
    root, base, lora = setup
    mirror = export(base, tmp_path / ("m.gguf" if fmt == "gguf" else "m"), fmt, quant=quant).path
    mirror_before = file_digest(mirror)
    rep = make_delta(mirror, lora, tmp_path / "d.cdcd", target_base=base, probe=PROBE)
    assert rep.records_by_encoding.get("lowrank", 0) >= 1  # LoRA-shaped: low rank is cheapest
    assert rep.probe_kl < rep.probe_kl_before * 0.05
    assert rep.update_left < 0.05 and rep.relative_error < rep.relative_error_before
    # the delta really takes the device (a copy of the mirror) to the target
    device = tmp_path / ("dev.gguf" if fmt == "gguf" else "dev")
    (shutil.copy if fmt == "gguf" else shutil.copytree)(mirror, device)
    assert apply_delta(device, tmp_path / "d.cdcd", trust=Trust.none()).applied
    assert file_digest(mirror) == mirror_before  # make_delta (without advancing) leaves the mirror alone


def test_full_weights_target_and_budget(setup, tmp_path):
    """A merged HF directory as target: no factors, so block encodings; a smaller budget
    gives a smaller delta and a larger KL."""
    root, base, lora = setup
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = tmp_path / "merged"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), lora).merge_and_unload().save_pretrained(merged)
    AutoTokenizer.from_pretrained(base).save_pretrained(merged)
    mirror = export(base, tmp_path / "m.gguf", "gguf", quant="q8_0").path
    full = make_delta(mirror, merged, tmp_path / "full.cdcd", probe=PROBE)
    assert "lowrank" not in full.records_by_encoding and full.probe_kl < full.probe_kl_before * 0.05
    small = make_delta(mirror, merged, tmp_path / "small.cdcd", config=DWCConfig(budget_bytes=full.bytes // 4),
                       probe=PROBE)
    assert small.bytes <= full.bytes // 4 * 1.2
    assert full.probe_kl < small.probe_kl < small.probe_kl_before


def test_max_kl_search(setup, tmp_path):
    root, base, lora = setup
    mirror = export(base, tmp_path / "m.gguf", "gguf", quant="q8_0").path
    rep = make_delta(mirror, lora, tmp_path / "d.cdcd", target_base=base,
                     config=DWCConfig(max_kl=0.004), probe=PROBE)
    assert rep.probe_kl <= 0.004 and rep.search
    with pytest.raises(UsageError, match="needs --probe"):
        make_delta(mirror, lora, tmp_path / "x.cdcd", target_base=base, config=DWCConfig(max_kl=0.01))


def test_missing_slot_is_an_error(tiny_models, tmp_path):
    """An update to a parameter the artefact has no tensor for (biases on a bias-free
    Llama export) is refused, naming the parameter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    base = tiny_models["llama"]
    mirror = export(base, tmp_path / "m.gguf", "gguf", quant="q8_0").path
    cfg = LlamaConfig.from_pretrained(base)
    cfg.attention_bias = True
    biased = AutoModelForCausalLM.from_config(cfg)
    biased.load_state_dict(AutoModelForCausalLM.from_pretrained(base).state_dict(), strict=False)
    biased.save_pretrained(tmp_path / "biased")
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path / "biased")
    with pytest.raises(MissingTensorError, match=r"self_attn\.[qkvo]_proj\.bias"):
        make_delta(mirror, tmp_path / "biased", tmp_path / "d.cdcd")


def test_ten_rounds_do_not_drift(setup, tmp_path):
    """Ten successive cloud updates (a different adapter each round, so the mirror drifts
    from the adapters' base): each delta is computed against the mirror's exact bytes and
    applied to it, and the weight error against each round's target stays flat at the
    quantisation floor instead of accumulating."""
    root, base, _ = setup
    mirror = export(base, tmp_path / "mirror.gguf", "gguf", quant="q8_0").path
    errors = []
    for k in range(10):
        lora = make_lora(base, tmp_path / f"lora{k}", seed=100 + k, scale=0.2)
        rep = make_delta(mirror, lora, tmp_path / f"d{k}.cdcd", target_base=base, advance_mirror=True)
        errors.append(rep.relative_error)
        if k:  # after round 0 the mirror is no longer the adapters' base: low rank is refused
            assert "lowrank" not in rep.records_by_encoding
    assert max(errors) <= 1.5 * min(errors), errors
    assert errors[-1] <= 1.2 * errors[0], errors


def test_cli_delta_make(setup, tmp_path):
    from cdcca_edge.cli import main

    root, base, lora = setup
    mirror = export(base, tmp_path / "m.gguf", "gguf", quant="q8_0").path
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROBE))
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["delta", "make", "--base", str(mirror), "--target", str(lora), "--target-base", str(base),
                   "--probe", str(probe), "-o", str(tmp_path / "d.cdcd"), "--advance-mirror", "--json"])
    assert rc == 0
    doc = json.loads(buf.getvalue())
    assert doc["mirror_advanced"] and doc["probe_kl"] < doc["probe_kl_before"]
    from cdcca_edge.core.state import read_state

    assert read_state(open_artifact(mirror)).version == 1


@pytest.mark.parametrize("bits", ["9", "1,8", "four", ""])
def test_cli_delta_make_refuses_bad_factor_bits(setup, tmp_path, capsys, bits):
    """A bad --factor-bits is exit 2 with a message naming the option, before any work;
    the mirror is left as it was and no delta is written."""
    from cdcca_edge.cli import main

    root, base, lora = setup
    mirror = export(base, tmp_path / "m.gguf", "gguf", quant="q8_0").path
    before = file_digest(mirror)
    rc = main(["delta", "make", "--base", str(mirror), "--target", str(lora), "--target-base", str(base),
               "--factor-bits", bits, "-o", str(tmp_path / "d.cdcd")])
    assert rc == 2
    assert "factor" in capsys.readouterr().err.lower()
    assert file_digest(mirror) == before and not (tmp_path / "d.cdcd").exists()


def test_advance_mirror_is_one_call_and_keeps_mirror_equal_to_device(setup, tmp_path):
    """Build, measure and advance in one call, with no copy of the model; a device
    patched with the delta is then the mirror, byte for byte (the central invariant)."""
    from cdcca_edge.core.artifact import compute_identity

    root, base, lora = setup
    mirror = export(base, tmp_path / "m.gguf", "gguf", quant="q8_0").path
    device = tmp_path / "dev.gguf"
    shutil.copy(mirror, device)
    rep = make_delta(mirror, lora, tmp_path / "d.cdcd", target_base=base, probe=PROBE, advance_mirror=True)
    assert rep.mirror_advanced and rep.probe_kl < rep.probe_kl_before
    assert compute_identity(open_artifact(mirror)).digest == rep.target_identity
    assert apply_delta(device, tmp_path / "d.cdcd", trust=Trust.none()).applied
    assert file_digest(device) == file_digest(mirror)
    assert not list(tmp_path.glob("*trial-undo*"))


def test_interrupted_measurement_is_taken_back_first(setup, tmp_path):
    """A candidate left applied to the mirror (the process died while measuring it) is
    taken back by the next make_delta before it builds anything."""
    from cdcca_edge.cloud.dwc import restore_interrupted_trial, trial_undo_path
    from cdcca_edge.core.artifact import compute_identity

    root, base, lora = setup
    mirror = export(base, tmp_path / "m.gguf", "gguf", quant="q8_0").path
    original = file_digest(mirror)
    first = make_delta(mirror, lora, tmp_path / "d.cdcd", target_base=base)
    assert file_digest(mirror) == original  # measured in place, then taken back
    apply_delta(mirror, tmp_path / "d.cdcd", trust=Trust.none(), undo_out=trial_undo_path(mirror))
    assert compute_identity(open_artifact(mirror)).digest == first.target_identity  # the crash state
    again = make_delta(mirror, lora, tmp_path / "d2.cdcd", target_base=base)
    assert again.base_identity == first.base_identity and file_digest(mirror) == original
    assert restore_interrupted_trial(mirror) is None and not trial_undo_path(mirror).exists()


def test_mirror_that_is_not_the_device_is_refused(setup, tmp_path):
    from cdcca_edge.core.artifact import compute_identity
    from cdcca_edge.core.errors import IntegrityError

    root, base, lora = setup
    mirror = export(base, tmp_path / "m.gguf", "gguf", quant="q8_0").path
    before = file_digest(mirror)
    with pytest.raises(IntegrityError, match="parted ways"):
        make_delta(mirror, lora, tmp_path / "d.cdcd", target_base=base, expect_identity="0" * 64)
    assert file_digest(mirror) == before and not (tmp_path / "d.cdcd").exists()
    rep = make_delta(mirror, lora, tmp_path / "d.cdcd", target_base=base,
                     expect_identity=compute_identity(open_artifact(mirror)).digest)
    assert rep.base_identity == compute_identity(open_artifact(mirror)).digest


def test_factored_svd_is_the_svd_of_the_product():
    """DWC's low-rank plan takes the SVD from the LoRA factors (no dense SVD): same
    singular values, same product, orthonormal vectors."""
    import numpy as np

    from cdcca_edge.cloud.dwc import factored_svd

    rng = np.random.default_rng(0)
    f = [(rng.standard_normal((4, 96)).astype(np.float32), rng.standard_normal((160, 4)).astype(np.float32), 2.0),
         (rng.standard_normal((2, 96)).astype(np.float32), rng.standard_normal((160, 2)).astype(np.float32), 0.5)]
    dense = sum(s * (b.astype(np.float64) @ a.astype(np.float64)) for a, b, s in f)
    u, sv, vt = factored_svd(f)
    want = np.linalg.svd(dense, compute_uv=False)
    assert u.shape == (160, 6) and vt.shape == (6, 96)
    np.testing.assert_allclose(sv, want[:6], rtol=1e-10)
    assert want[6] < 1e-10 * want[0]
    np.testing.assert_allclose((u * sv) @ vt, dense, atol=1e-10 * np.abs(dense).max())
    np.testing.assert_allclose(u.T @ u, np.eye(6), atol=1e-12)
    np.testing.assert_allclose(vt @ vt.T, np.eye(6), atol=1e-12)


@pytest.mark.parametrize("target", ["adapter", "adapter-mixed", "merged"])
def test_records_reused_across_budgets_are_the_records_built_fresh(setup, tmp_path, target):
    """A --max-kl search re-uses a record built for an earlier budget: the delta it
    writes is byte for byte the one built from scratch (low-rank and block encodings).
    With mixed-precision factors each budget tends to give every tensor other widths, so
    there the test checks the equality only; 8-bit factors re-use records."""
    from cdcca_edge.cloud.dwc import build, load_targets, price, select
    from cdcca_edge.core.delta_build import DeltaBuilder
    from cdcca_edge.core.delta_format import read_delta

    root, base, lora = setup
    mirror = export(base, tmp_path / "m.gguf", "gguf", quant="q8_0").path
    art = open_artifact(mirror)
    if target.startswith("adapter"):
        targets = load_targets(art, lora, base)[0]
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        merged = tmp_path / "merged"
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), lora).merge_and_unload().save_pretrained(merged)
        AutoTokenizer.from_pretrained(base).save_pretrained(merged)
        targets = load_targets(art, merged)[0]
    cfg = DWCConfig() if target == "adapter-mixed" else DWCConfig(factor_bits=(8,))
    plans = [p for p in (price(t, cfg) for t in targets) if p is not None]
    full = sum(c.cost for c in select(plans, None))
    cache: dict = {}
    chosen = 0
    for budget in (full // 3, full // 2, None):  # later budgets keep most earlier choices
        cached, fresh = DeltaBuilder(art), DeltaBuilder(art)
        choices = [c for c in select(plans, budget) if c.rank or c.n_groups]
        chosen += len(choices)
        c1 = build(art, choices, cached, cache=cache)
        c2 = build(art, select(plans, budget), fresh)
        assert c1 == c2
        sa, sb = cached.write(tmp_path / "a.cdcd"), fresh.write(tmp_path / "b.cdcd")
        # the same delta, byte for byte, but for the header's creation time (seconds)
        da, db = read_delta(tmp_path / "a.cdcd"), read_delta(tmp_path / "b.cdcd")
        assert da.header.records == db.header.records and sa.target_identity == sb.target_identity
        assert ([da.read_payload(r) for r in da.header.records]
                == [db.read_payload(r) for r in db.header.records])
    if target != "adapter-mixed":
        assert 0 < len(cache) < chosen  # some choices were built once and re-used


def test_bit_ladder_is_a_convex_hull():
    """The steps up a component's ladder remove less error per byte each time, skip widths
    that cost more for less, and end at the widest useful width."""
    import numpy as np

    from cdcca_edge.cloud.dwc import _hull

    widths = (2, 3, 4, 8)
    err = np.array([40.0, 39.0, 5.0, 0.1])  # 3 bits is barely better than 2: off the hull
    cost = np.array([10.0, 15.0, 20.0, 40.0])
    steps = _hull(100.0, err, cost, widths)
    assert [(s[0], s[1]) for s in steps] == [(0, 2), (2, 4), (4, 8)]
    ratios = [g / c for _, _, g, c in steps]
    assert all(a > b for a, b in zip(ratios, ratios[1:]))
    assert sum(g for _, _, g, _ in steps) == pytest.approx(100.0 - 0.1)
    # a width that costs more and leaves more is never a step
    assert [(s[0], s[1]) for s in _hull(100.0, np.array([5.0, 6.0]), np.array([10.0, 20.0]), (4, 8))] == [(0, 4)]


def test_mixed_precision_factors_beat_8_bit_factors_at_equal_budget(setup, tmp_path):
    """Under a budget, mixed-precision factors carry more of the update than 8-bit ones:
    weaker components go at fewer bits instead of not at all. Both stay within the budget,
    and the delta applies on a device copy to the identity it names."""
    import numpy as np

    root, base, lora = setup
    mirror = export(base, tmp_path / "m.gguf", "gguf", quant="f16").path
    full = make_delta(mirror, lora, tmp_path / "full.cdcd", target_base=base)
    budget = full.bytes // 4
    mixed = make_delta(mirror, lora, tmp_path / "mx.cdcd", target_base=base, config=DWCConfig(budget_bytes=budget))
    eight = make_delta(mirror, lora, tmp_path / "i8.cdcd", target_base=base,
                       config=DWCConfig(budget_bytes=budget, factor_bits=(8,)))
    assert mixed.records_by_encoding.get("lowrank", 0) >= 1
    # the strongest component of each tensor is sent, at least as wide as the typical one
    # (a record header priced into its first step once left it at 0 or 2 bits while
    # weaker components got 8)
    from cdcca_edge.cloud.dwc import load_targets, price, select

    plans = [p for p in (price(t, DWCConfig()) for t in load_targets(open_artifact(mirror), lora, base)[0])
             if p is not None]
    for c in select(plans, budget):
        if c.rank:
            assert c.bits[0] > 0 and c.bits[0] >= np.median([b for b in c.bits if b])
    for rep in (mixed, eight):
        assert rep.bytes <= budget + 512  # record headers are estimated, the file's own is not priced
    assert mixed.update_left < eight.update_left < 1.0
    device = tmp_path / "dev.gguf"
    shutil.copy(mirror, device)
    assert apply_delta(device, tmp_path / "mx.cdcd", trust=Trust.none()).applied
    with pytest.raises(UsageError, match="factor_bits"):
        DWCConfig(factor_bits=(1, 8))
