"""UTS on both backends: calibrated thresholds, selection, token flags, visual OOD scores,
and the bundle the device writes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cdcca_edge.demo.tiny import tiny_corpus
from cdcca_edge.core.artifact import compute_identity, open_artifact
from cdcca_edge.core.errors import FormatError, UsageError
from cdcca_edge.core.uplink_format import read_uplink
from cdcca_edge.runtime import GenerationConfig, load
from cdcca_edge.runtime.scores import REF_TEMPERATURE, score_logits
from cdcca_edge.runtime.uts import (
    SCORES,
    Calibration,
    VisualStats,
    calibrate,
    collect,
    generation_config,
    read_inputs,
    sample_uncertainty,
)

OOD = ["def fibonacci(n): return", "Le chat est sur la table et", "SELECT name FROM users WHERE",
       "1 2 3 4 5 6 7 8", "import numpy as np\nx = np.", "Dear Sir, I am writing to",
       "the weather in paris is", "<html><body><div class="]


def in_dist(n: int, seed: int) -> list[str]:
    out = []
    for s in tiny_corpus(n, seed=seed):
        out.append(s.split("answer:")[0] + "answer:" if "answer:" in s else " ".join(s.split()[:4]))
    return out


def write_jsonl(path, prompts, prefix):
    with open(path, "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"id": f"{prefix}{i}", "prompt": p}) + "\n")
    return path


def test_ref_confidence_by_hand():
    x = np.array([[2.0, 1.9, -1.0]], np.float32)
    (s,) = score_logits(x, [0])
    e = np.exp((x[0] - x[0].max()) / REF_TEMPERATURE)
    assert s.ref_top1 == pytest.approx(1 / e.sum(), rel=1e-5)
    # a temperature below 1 sharpens the near-tie: the top token's probability rises
    assert REF_TEMPERATURE < 1 and s.ref_top1 > s.top1_prob + 0.1


def test_visual_ood_score_is_not_activation_size():
    """In-distribution tokens with large activations score low; a small, unusual token high.
    (The reference code's MC dropout on features reduces to mean squared activation, which
    would rank them the other way round.)"""
    rng = np.random.default_rng(0)
    calib = rng.normal(5.0, 1.0, (2000, 16))  # big activations are normal here
    stats = VisualStats.fit(calib, keep=0.25)
    normal = rng.normal(5.0, 1.0, (6, 16))
    odd = np.zeros((2, 16))  # tiny activations, far from anything seen
    tokens = np.concatenate([normal, odd])
    scores = stats.ood_scores(tokens)
    assert scores[6:].min() > scores[:6].max()
    assert (tokens**2).mean(-1)[6:].max() < (tokens**2).mean(-1)[:6].min()  # activation says otherwise
    assert stats.select(tokens).tolist() == [6, 7]


@pytest.fixture(params=["llama", "onnx"])
def model(request, exports):
    fmt = "gguf" if request.param == "llama" else "onnx"
    result = exports("llama", fmt, "q8_0" if fmt == "gguf" else "f32")
    with load(result.path, backend=request.param) as m:
        yield m, compute_identity(open_artifact(result.path)).digest


def test_calibrate_hits_the_rate(model):
    m, identity = model
    prompts = in_dist(60, seed=3)
    cal = calibrate(m, prompts, identity, rate=0.2, token_rate=0.25, max_tokens=12)
    u = np.array([sample_uncertainty(m.generate(p, generation_config(cal.score, 12)), cal.score)
                  for p in prompts])
    assert abs((u > cal.threshold).mean() - 0.2) <= 0.05
    assert cal.n_samples == 60 and cal.n_tokens > 60


def test_collect_selects_out_of_distribution_inputs(model, tmp_path):
    m, identity = model
    cal = calibrate(m, in_dist(60, seed=3), identity, rate=0.1, max_tokens=12)
    mixed = in_dist(40, seed=11) + OOD
    items = read_inputs(write_jsonl(tmp_path / "in.jsonl", mixed, "x"))
    report = collect(m, items, cal, tmp_path / "b.cdcu", identity, 3)
    b = read_uplink(tmp_path / "b.cdcu")
    assert report.n_seen == len(mixed) and report.n_uploaded == len(b) > 0
    assert b.header["artifact_identity"] == identity and b.header["artifact_version"] == 3
    ood_ids = {f"x{i}" for i in range(40, len(mixed))}
    uploaded = set(report.uploaded_ids)
    # uncertainty finds the shifted inputs: most of them go up, few in-distribution ones do
    assert len(uploaded & ood_ids) / len(ood_ids) >= 0.5
    assert len(uploaded - ood_ids) / 40 <= 0.3
    for s in b.samples():
        assert s.meta["uncertainty"] > cal.threshold
        ent = s.arrays["token_entropy"].astype(np.float32)
        flags = s.arrays["token_flags"].astype(bool)
        assert np.all(s.arrays["token_weights"][flags] == 1.0)
        assert np.all(s.arrays["token_weights"][~flags] == np.float16(0.1))
        assert len(s.arrays["answer_ids"]) == len(ent)
        assert m.tokenize(s.meta["prompt"]) == s.arrays["prompt_ids"].tolist()
    assert 0 < report.scoring_seconds < report.decode_seconds
    # random selection: as many samples, chosen without looking at uncertainty
    rnd = collect(m, items, cal, tmp_path / "r.cdcu", identity, selector="random", seed=1)
    assert rnd.n_uploaded == report.n_uploaded and rnd.uploaded_ids != report.uploaded_ids
    # all: an anchor set, every input goes up
    every = collect(m, items, cal, tmp_path / "a.cdcu", identity, selector="all")
    assert every.n_uploaded == len(mixed) == len(read_uplink(tmp_path / "a.cdcu"))
    with pytest.raises(UsageError, match="uts, uts-diverse, random or all"):
        collect(m, items[:2], cal, tmp_path / "x.cdcu", identity, selector="best")  # type: ignore[arg-type]


def test_token_flags_follow_the_threshold(model, tmp_path):
    m, identity = model
    cal = calibrate(m, in_dist(30, seed=4), identity, rate=0.5, token_rate=0.3, max_tokens=10)
    items = read_inputs(write_jsonl(tmp_path / "in.jsonl", OOD, "o"))
    collect(m, items, cal, tmp_path / "b.cdcu", identity)
    for s in read_uplink(tmp_path / "b.cdcu").samples():
        gen = m.generate(s.meta["prompt"], GenerationConfig(max_tokens=10))
        ent = np.array([t.entropy for t in gen.scores])
        np.testing.assert_array_equal(s.arrays["token_flags"].astype(bool), ent > cal.token_threshold)


def test_all_scores_and_paper_reference(model):
    m, identity = model
    gen = m.generate("def fibonacci(n): return", GenerationConfig(max_tokens=8, score_prompt=True))
    for name in SCORES:
        assert math.isfinite(sample_uncertainty(gen, name))
    ref = float(np.prod([s.ref_top1 for s in gen.scores]))
    assert gen.sample.ref_confidence == pytest.approx(ref, rel=1e-6)


def test_scoring_can_be_switched_off(model):
    m, _ = model
    on = m.generate("there are", GenerationConfig(max_tokens=6, stop_at_eos=False))
    off = m.generate("there are", GenerationConfig(max_tokens=6, stop_at_eos=False, score=False))
    assert off.tokens == on.tokens and off.scores == [] and off.scoring_seconds == 0
    assert len(on.scores) == 6 and on.scoring_seconds > 0


def test_calibration_file_round_trip_and_errors(tmp_path):
    cal = Calibration("a" * 64, "mean_entropy", 0.1, 1.5, 0.2, 2.0, 16, 50, 400,
                      visual=VisualStats([0.0, 1.0], [1.0, 2.0], 0.5))
    cal.save(tmp_path / "c.json")
    back = Calibration.load(tmp_path / "c.json")
    assert back == cal
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(FormatError, match="calibration file"):
        Calibration.load(tmp_path / "bad.json")


def test_inputs_are_checked(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(FormatError, match="a.jsonl:2"):
        read_inputs(tmp_path / "a.jsonl")
    (tmp_path / "b.jsonl").write_text('{"id": "x", "prompt": "a"}\n{"id": "x", "prompt": "b"}\n')
    with pytest.raises(FormatError, match="duplicate id"):
        read_inputs(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text('{"prompt": "a", "image": "missing.png"}\n')
    with pytest.raises(FormatError, match="not found"):
        read_inputs(tmp_path / "c.jsonl")


def test_bad_arguments(model):
    m, identity = model
    with pytest.raises(UsageError, match="rate"):
        calibrate(m, ["a"] * 20, identity, rate=1.5)
    with pytest.raises(UsageError, match="too few"):
        calibrate(m, ["the red circle"] * 3, identity)
    with pytest.raises(UsageError, match="unknown score"):
        calibrate(m, ["a"] * 20, identity, score="vibes")


def test_image_drift_sees_a_camera_change_that_per_token_scores_miss():
    """Calibration images whose patches differ widely (the content) but share a camera:
    an image under another camera (a cast on every patch, some noise) gets a high
    image-level drift, a
    new in-distribution image a typical one, although the per-token scores of the two
    barely differ. The text and drift parts are weighed by their calibration spreads."""
    rng = np.random.default_rng(0)
    cast = rng.choice([-1.0, 1.0], size=16)  # the new camera's colour cast, every patch alike

    def image(drifted: bool) -> np.ndarray:
        content = rng.standard_normal((64, 16)) * 3.0  # (T, D): patches vary a lot
        return content + (cast + rng.standard_normal((64, 16)) * 0.5 if drifted else 0.0)

    cal = [image(False) for _ in range(40)]
    stats = VisualStats.fit(np.concatenate(cal))
    text = rng.normal(12.0, 0.5, size=40)
    drift = stats.fit_images(cal, text)
    assert drift.shape == (40,) and abs(float(np.median(drift))) < 0.05  # 0: the median image
    assert stats.image_weight == pytest.approx(text.std() / drift.std())
    fresh = [stats.image_drift(image(False)) for _ in range(20)]
    noisy = [stats.image_drift(image(True)) for _ in range(20)]
    assert min(noisy) > max(fresh)
    tok_fresh = [float(stats.ood_scores(image(False)).mean()) for _ in range(20)]
    tok_noisy = [float(stats.ood_scores(image(True)).mean()) for _ in range(20)]
    assert np.mean(tok_noisy) / np.mean(tok_fresh) < 1.25  # the per-token score barely moves


def test_uts_diverse_spreads_the_same_count_over_the_images():
    """uts-diverse uploads as many as uts, the most uncertain first, then spread over the
    images: of two kinds of hard image, uts takes only the harder kind; uts-diverse both."""
    from cdcca_edge.runtime.uts import Decision, decide

    rng = np.random.default_rng(0)
    kind_a, kind_b = rng.normal(size=8), rng.normal(size=8)  # two kinds of image, by their mean token

    def image(kind: np.ndarray) -> np.ndarray:
        return (kind + 0.01 * rng.normal(size=(4, 8))).astype(np.float32)  # (N=4, Dv=8)

    # 4 hard images of kind a (uncertainty 9..6), 4 of kind b (5..2), 4 easy ones of kind a
    unc = [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 0.3, 0.2, 0.1, 0.0]
    kinds = ["a"] * 4 + ["b"] * 4 + ["a"] * 4
    calib = Calibration("x" * 64, "ref_confidence", 0.1, 5.5, 0.2, 1.0, 8, 10, 10)  # threshold 5.5: 4 above

    def run(selector: str) -> list[int]:
        ds = [Decision({"id": str(i)}, None, u, visual=image(kind_a if k == "a" else kind_b))  # type: ignore[arg-type]
              for i, (u, k) in enumerate(zip(unc, kinds))]
        decide(ds, calib, selector)  # type: ignore[arg-type]
        return [i for i, d in enumerate(ds) if d.upload]

    assert run("uts") == [0, 1, 2, 3]
    picked = run("uts-diverse")
    assert len(picked) == 4 and 0 in picked  # as many; the most uncertain first
    assert {kinds[i] for i in picked} == {"a", "b"} and max(picked) < 8  # both kinds, all from the 2k pool
    with pytest.raises(UsageError, match="--selector uts"):  # text inputs have no image to spread over
        decide([Decision({"id": "t"}, None, 9.0)], calib, "uts-diverse")  # type: ignore[arg-type]
