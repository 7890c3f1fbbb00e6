"""Source-retention variants of the demo loop, measured against its defaults: how much
of the source domain each keeps after 3 rounds, and what it costs on the target.

    python bench/demo_variants.py [--seeds 0,11,12] [--test 400] [--variants all]

Seeds 11 and 12 lie outside the 1-10 that the multi-seed table (bench/demo.py --seeds)
measures on, so a variant chosen here would still be measured on unseen seeds. Each run
is `run_demo` without ablations; a variant changes one thing in the cloud's AKD:

- ``anchor-1/2``, ``anchor-3/4``: the anchor bundle (sent once) is repeated in the cloud
  until it is about that share of each round's AKD samples;
- ``lora-language``, ``lora-projector``: the LoRA adapter on the language model only, or
  on the projector only (the default adapts both);
- ``teacher-confident``: the cloud drops the quarter of each AKD call's samples (uploads
  and anchor alike) whose pseudo-labels the teacher is least sure of: by the teacher's
  mean probability of its own greedy answer tokens (end of answer included). With UTS's
  student-uncertain uploads this is issue 17's "teacher-confident, student-uncertain".
  (A fixed bar of 1/2 dropped nothing: the teacher gave every sample at least that.)
- ``uts-diverse``: the device's ``uts-diverse`` selector (runtime/uts.py,
  ``diverse_picks``): UTS's own count k, picked by uncertainty and diversity among the 2k
  most uncertain inputs (k-center over the images' mean vision-tower tokens).

Writes bench/results/demo-variants.json and prints the table (docs/demo.md, "Tried since,
not kept").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, machine, write_results  # noqa: E402
from cdcca_edge.core.paths import cache_dir  # noqa: E402

LANGUAGE_ONLY = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROJECTOR_ONLY = r".*multi_modal_projector\.linear_[12]"
VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "anchor-1/2": {"anchor_share": 0.5},
    "anchor-3/4": {"anchor_share": 0.75},
    "lora-language": {"lora_targets": LANGUAGE_ONLY},
    "lora-projector": {"lora_targets": PROJECTOR_ONLY},
    "teacher-confident": {"teacher_drop": 0.25},
    "uts-diverse": {"selector": "uts-diverse"},
}


def teacher_confident(teacher_dir: Any, samples: list[Any], max_new: int, drop: float) -> list[Any]:
    """The samples but the ``drop`` fraction whose teacher answer (the one it would give, as
    distill_multimodal labels them) has the lowest mean token probability under the teacher."""
    import torch
    import transformers

    from cdcca_edge.cloud.akd import teacher_confidence
    from cdcca_edge.cloud.akd_mm import build_inputs, greedy

    rng = torch.random.get_rng_state()  # loading a model draws its initial weights: the
    teacher = transformers.LlavaForConditionalGeneration.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    torch.random.set_rng_state(rng)  # LoRA's own initialisation must not move
    eos = int(transformers.AutoTokenizer.from_pretrained(teacher_dir).eos_token_id)
    confidence: list[float] = []
    for k in range(0, len(samples), 32):
        part = samples[k : k + 32]
        answers = [a if a and a[-1] == eos else a + [eos] for a in greedy(teacher, part, max_new, eos)]
        with torch.no_grad():
            inp = build_inputs(teacher, part, answers, eos)
            logits = teacher(inputs_embeds=inp["inputs_embeds"], attention_mask=inp["attention_mask"],
                             position_ids=inp["position_ids"]).logits[:, :-1]  # (B, T-1, V)
        prob = teacher_confidence(logits, inp["ids"][:, 1:])  # (B, T-1)
        m = inp["answer_mask"][:, :-1]
        conf = (prob * m).sum(1) / m.sum(1)  # (B,)
        confidence += conf.tolist()
    cut = sorted(confidence)[int(drop * len(samples))] if samples else 0.0
    return [s for s, c in zip(samples, confidence) if c >= cut]


def run_variant(name: str, seed: int, test: int, out: Path) -> dict[str, Any]:
    """One demo run with the variant's change made in the cloud's AKD call."""
    import cdcca_edge.cloud.akd_mm as akd_mm
    from cdcca_edge.core.uplink_format import read_uplink
    from cdcca_edge.demo.loop import DemoConfig, run_demo

    spec = VARIANTS[name]
    original_fn, original_targets = akd_mm.distill_multimodal, akd_mm.LORA_TARGET_REGEX
    original_read = akd_mm.read_visual_samples
    filtered: list[tuple[int, int]] = []  # (kept, read) per AKD call

    def distill(teacher: Any, student: Any, bundles: list[Path], out_dir: Any, cfg: Any, **kw: Any) -> Any:
        share = spec.get("anchor_share")
        if share and bundles and Path(bundles[0]).name == "uplink-anchor.cdcu":
            n_anchor = sum(1 for _ in read_uplink(bundles[0]).samples())
            n_up = sum(1 for b in bundles[1:] for _ in read_uplink(b).samples())
            repeat = max(1, round(share / (1 - share) * n_up / max(1, n_anchor)))
            bundles = [bundles[0]] * (repeat - 1) + list(bundles)
        drop = spec.get("teacher_drop")
        if drop:
            def read(*a: Any, **k: Any) -> Any:
                samples = original_read(*a, **k)
                kept = teacher_confident(teacher, samples, cfg.max_new_tokens, drop)
                filtered.append((len(kept), len(samples)))
                return kept or samples  # none confident: train as the defaults would
            akd_mm.read_visual_samples = read
        try:
            return original_fn(teacher, student, bundles, out_dir, cfg, **kw)
        finally:
            akd_mm.read_visual_samples = original_read

    akd_mm.distill_multimodal = distill  # run_demo imports it at call time
    akd_mm.LORA_TARGET_REGEX = spec.get("lora_targets", original_targets)
    try:
        t0 = time.perf_counter()
        rep = run_demo(out / f"{name.replace('/', '-')}-{seed}", DemoConfig(ablations=False, seed=seed, test=test,
                                                                       selector=spec.get("selector", "uts")))
    finally:
        akd_mm.distill_multimodal, akd_mm.LORA_TARGET_REGEX = original_fn, original_targets
    d = rep.as_dict()
    b = d["baseline"]
    return {"variant": name, "seed": seed, "seconds": time.perf_counter() - t0,
            "round0": {"target": b["target_accuracy"], "source": b["source_accuracy"]},
            "rounds": [{"target": x["target_accuracy"], "source": x["source_accuracy"]} for x in d["rounds"]],
            **({"teacher_confident_kept": filtered} if filtered else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,11,12")
    ap.add_argument("--test", type=int, default=400, help="held-out questions per domain")
    ap.add_argument("--variants", default="all", help=f"comma-separated, of {', '.join(VARIANTS)}")
    args = ap.parse_args()
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = cache_dir() / "bench" / "demo-variants"
    # the runs on record stay (a variant run alone is compared with the defaults already
    # measured); one of the same variant, seed and test size is replaced
    path = RESULTS / "demo-variants.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    runs = [r for r in old.get("runs", []) if old.get("test") == args.test and r["variant"] in VARIANTS
            and not (r["variant"] in names and r["seed"] in seeds)]
    for seed in seeds:
        for name in names:
            runs.append(run_variant(name, seed, args.test, out))
            print(json.dumps(runs[-1]), file=sys.stderr)
    rows = []
    for name in [n for n in VARIANTS if any(r["variant"] == n for r in runs)]:
        mine = [r for r in runs if r["variant"] == name]
        delta = {k: statistics.mean(100 * (r["rounds"][-1][k] - r["round0"][k]) for r in mine)
                 for k in ("target", "source")}
        rows.append({"variant": name, "seeds": [r["seed"] for r in mine], "target_change_points": delta["target"],
                     "source_change_points": delta["source"]})
    write_results("demo-variants", {"machine": machine(), "test": args.test, "rows": rows, "runs": runs})
    print("| variant | target | source |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['target_change_points']:+.1f} | {r['source_change_points']:+.1f} |")


if __name__ == "__main__":
    main()
