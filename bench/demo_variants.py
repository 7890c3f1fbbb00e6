"""Source-retention variants of the demo loop, measured against its defaults: how much
of the source domain each keeps after 3 rounds, and what it costs on the target.

    python bench/demo_variants.py [--seeds 0,11,12] [--test 400] [--variants all]

Seeds 11 and 12 lie outside the 1-10 that the multi-seed table (bench/demo.py --seeds)
measures on, so a variant chosen here would still be measured on unseen seeds. Each run
is `run_demo` without ablations; a variant changes one thing in the cloud's AKD:

- ``anchor-1/2``, ``anchor-3/4``: the anchor bundle (sent once) is repeated in the cloud
  until it is about that share of each round's AKD samples;
- ``lora-language``, ``lora-projector``: the LoRA adapter on the language model only, or
  on the projector only (the default adapts both).

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

from bench.common import machine, write_results  # noqa: E402
from cdcca_edge.core.paths import cache_dir  # noqa: E402

LANGUAGE_ONLY = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROJECTOR_ONLY = r".*multi_modal_projector\.linear_[12]"
VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "anchor-1/2": {"anchor_share": 0.5},
    "anchor-3/4": {"anchor_share": 0.75},
    "lora-language": {"lora_targets": LANGUAGE_ONLY},
    "lora-projector": {"lora_targets": PROJECTOR_ONLY},
}


def run_variant(name: str, seed: int, test: int, out: Path) -> dict[str, Any]:
    """One demo run with the variant's change made in the cloud's AKD call."""
    import cdcca_edge.cloud.akd_mm as akd_mm
    from cdcca_edge.core.uplink_format import read_uplink
    from cdcca_edge.demo.loop import DemoConfig, run_demo

    spec = VARIANTS[name]
    original_fn, original_targets = akd_mm.distill_multimodal, akd_mm.LORA_TARGET_REGEX

    def distill(teacher: Any, student: Any, bundles: list[Path], out_dir: Any, cfg: Any, **kw: Any) -> Any:
        share = spec.get("anchor_share")
        if share and bundles and Path(bundles[0]).name == "uplink-anchor.cdcu":
            n_anchor = sum(1 for _ in read_uplink(bundles[0]).samples())
            n_up = sum(1 for b in bundles[1:] for _ in read_uplink(b).samples())
            repeat = max(1, round(share / (1 - share) * n_up / max(1, n_anchor)))
            bundles = [bundles[0]] * (repeat - 1) + list(bundles)
        return original_fn(teacher, student, bundles, out_dir, cfg, **kw)

    akd_mm.distill_multimodal = distill  # run_demo imports it at call time
    akd_mm.LORA_TARGET_REGEX = spec.get("lora_targets", original_targets)
    try:
        t0 = time.perf_counter()
        rep = run_demo(out / f"{name.replace('/', '-')}-{seed}", DemoConfig(ablations=False, seed=seed, test=test))
    finally:
        akd_mm.distill_multimodal, akd_mm.LORA_TARGET_REGEX = original_fn, original_targets
    d = rep.as_dict()
    b = d["baseline"]
    return {"variant": name, "seed": seed, "seconds": time.perf_counter() - t0,
            "round0": {"target": b["target_accuracy"], "source": b["source_accuracy"]},
            "rounds": [{"target": x["target_accuracy"], "source": x["source_accuracy"]} for x in d["rounds"]]}


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
    runs = []
    for seed in seeds:
        for name in names:
            runs.append(run_variant(name, seed, args.test, out))
            print(json.dumps(runs[-1]), file=sys.stderr)
    rows = []
    for name in names:
        mine = [r for r in runs if r["variant"] == name]
        delta = {k: statistics.mean(100 * (r["rounds"][-1][k] - r["round0"][k]) for r in mine)
                 for k in ("target", "source")}
        rows.append({"variant": name, "seeds": seeds, "target_change_points": delta["target"],
                     "source_change_points": delta["source"]})
    write_results("demo-variants", {"machine": machine(), "test": args.test, "rows": rows, "runs": runs})
    print("| variant | target | source |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['target_change_points']:+.1f} | {r['source_change_points']:+.1f} |")


if __name__ == "__main__":
    main()
