"""The demo loop as a benchmark: run `cdcca-edge demo` (or take a run's report) and record
its rounds and ablation tables.

    python bench/demo.py [--rounds 3] [--backend llama] [--report path/to/report.json]
    python bench/demo.py --seeds 5 --test 1000 [--report path/to/seeds/report.json]
    python bench/demo.py --seeds 5 --test 1000 --selector uts-diverse

Copies report.{json,md} and the plots to bench/results/demo/ and writes the "demo" section
of docs/benchmarks.md; with --seeds, the multi-seed run (means, 95% intervals, paired
differences, issue 17's goals) goes to bench/results/demo-seeds/ and the "demo-seeds"
section; with ``--selector uts-diverse`` (the UTS arm's selector), to
bench/results/demo-seeds-uts-diverse/ and its own section.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, update_section  # noqa: E402
from cdcca_edge.demo.loop import ABLATIONS  # noqa: E402


def section(r: dict) -> str:
    b, rounds, a = r["baseline"], r["rounds"], r["ablations"]
    rows = [f"| 0 | {b['target_accuracy']:.1%} | {b['source_accuracy']:.1%} | {b['teacher_accuracy']:.1%} | - | - | - |"]
    for x in rounds:
        rows.append(f"| {x['round']} | {x['target_accuracy']:.1%} | {x['source_accuracy']:.1%} | "
                    f"{x['teacher_accuracy']:.1%} | {x['uplink_bytes']:,} ({x['uplink_bytes'] / x['raw_input_bytes']:.1%}) "
                    f"/ {x['n_uploaded']} of {x['n_seen']} | {x['downlink_bytes']:,} "
                    f"({x['downlink_bytes'] / x['artifact_bytes']:.1%}) | {x['patch_seconds'] * 1000:.0f} |")
    src = [x["source_accuracy"] for x in rounds]
    worst = min(range(len(src)), key=lambda i: src[i])
    drift = (f"Target accuracy {b['target_accuracy']:.1%} -> {rounds[-1]['target_accuracy']:.1%} (teacher "
             f"{b['teacher_accuracy']:.1%}: {(rounds[-1]['target_accuracy'] - b['target_accuracy']) / max(1e-9, b['teacher_accuracy'] - b['target_accuracy']):.0%} "
             f"of the gap closed); source accuracy {b['source_accuracy']:.1%} -> {src[-1]:.1%} at the end, "
             f"lowest {src[worst]:.1%} after round {rounds[worst]['round']} ({2 * r['config']['test']} target and "
             f"{r['config']['test']} source questions: one standard error about "
             f"{100 * (0.25 / (2 * r['config']['test'])) ** 0.5:.1f} and {100 * (0.25 / r['config']['test']) ** 0.5:.1f} "
             "points). One seed: the figures with intervals over ten seeds are [below](#demo-seeds).")
    anchor = sum(x.get("anchor_bytes", 0) for x in rounds)
    per_sample = (sum(x["uplink_bytes"] for x in rounds) - anchor) / max(1, sum(x["n_uploaded"] for x in rounds))
    anchor_line = (f" Round 1's uplink includes the anchor set sent once ({r['config']['calibration']} source-domain "
                   f"calibration images, {anchor:,} bytes).") if anchor else ""
    v = a["variants"]
    abl = [f"| student before | - | - | {a['student_before']:.1%} |"]
    for name, label in ABLATIONS.items():
        if name not in v:
            continue
        abl.append(f"| {label} | {v[name]['n_uploaded']} | {v[name]['uplink_bytes']:,} | {v[name]['target_accuracy']:.1%} |")
    abl.append(f"| teacher | - | - | {a['teacher']:.1%} |")
    d = a["downlink"]
    mm = r.get("export", {}).get("bundle_validation") or {}
    parity = ""
    if mm:
        parity = (f"\nDevice bundle parity with torch (export validation): vision part "
                  f"{mm['vision']['normalized_diff']:.2g} x std; language part ({r['export']['quant']}) "
                  f"{mm['language']['normalized_diff']:.3g} x std, top-1 {mm['language'].get('top1_agreement', 1.0):.0%}; "
                  f"image questions answered token for token as torch: {mm['answers_equal_torch']:.0%} of "
                  f"{mm['answers_checked']}.\n")
    return f"""<a id="demo"></a>
## Demo: the CDCCA loop on the embedded multimodal benchmark (`cdcca-edge demo`, `bench/demo.py`)

{r['config']['rounds']} rounds, device backend `{r['config']['backend']}`, {r['config']['stream']} questions per round
(domains drawn uniformly: source, noise, texture), evaluation on {2 * r['config']['test']} held-out target and
{r['config']['test']} source questions with whole images; whole run {r['seconds']:.0f} s (training the models
included when they are not cached yet).
Bundle: {r['artifact_bytes']:,} bytes (vision ONNX f32 + language GGUF q8_0). Raw inputs = uncompressed
64x64 RGB frame (12,288 B) + question.
{parity}
| round | target acc | source acc | teacher acc (target) | uplink B (% of raw seen) / uploads | downlink B (% of bundle) | patch ms |
|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

{drift}

Uplink: {per_sample:,.0f} bytes per uploaded sample (50% of its 64 visual tokens, int8, plus prompt,
answer and scores) against 12,288 bytes of raw pixels ({per_sample / 12288:.1%}).{anchor_line}

Ablations (the paper's, on round 1's stream, from the original student, each variant also distilling on the anchor set as the loop does; target accuracy in torch on whole images):

| variant | uploads | uplink B | target acc |
|---|---:|---:|---:|
{chr(10).join(abl)}

| downlink for round 1's update | bytes |
|---|---:|
| DWC delta (ours) | {d['dwc_delta_bytes']:,} |
| fp16 LoRA adapter as is | {d['fp16_adapter_bytes']:,} |
| full re-download of the bundle | {d['full_redownload_bytes']:,} |

Plots: `bench/results/demo/accuracy.png`, `bench/results/demo/bytes.png`.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backend", default="llama")
    ap.add_argument("--report", type=Path, help="take this run's report.json instead of running")
    ap.add_argument("--seeds", type=int, default=1, help="run over this many seeds (cdcca-edge demo --seeds)")
    # seed 0 is the one the defaults were chosen on (docs/demo.md); the measurement starts after it
    ap.add_argument("--first-seed", type=int, default=1, help="the first seed of a --seeds run")
    ap.add_argument("--test", type=int, default=None, help="held-out questions per domain")
    ap.add_argument("--selector", default="uts", help="the UTS arm's selector: uts or uts-diverse (--seeds)")
    args = ap.parse_args()
    if args.seeds > 1 or (args.report and "seeds" in json.loads(args.report.read_text())):
        seeds_main(args)
        return
    if args.report is None:
        from cdcca_edge.demo.loop import DemoConfig, run_demo
        from cdcca_edge.core.paths import cache_dir

        out = cache_dir() / "bench" / "demo"
        run_demo(out, DemoConfig(rounds=args.rounds, backend=args.backend),
                 stage=lambda m: print(m, file=sys.stderr))
        report = out / "report.json"
    else:
        report = args.report
    dest = RESULTS / "demo"
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("report.json", "report.md", "accuracy.png", "bytes.png"):
        if (report.parent / name).resolve() != (dest / name).resolve():
            shutil.copy(report.parent / name, dest / name)
    md = section(json.loads(report.read_text()))
    update_section("demo", md)
    print(md)


def _seeds_name(selector: str) -> str:
    """The results folder and docs section of a seeds run: demo-seeds, or
    demo-seeds-uts-diverse when its UTS arm ran that selector."""
    return "demo-seeds" if selector in ("uts", "random") else f"demo-seeds-{selector}"


def seeds_section(s: dict, seconds: float | None) -> str:
    from cdcca_edge.demo.seeds import render_seeds_markdown

    name = _seeds_name(s["config"].get("selector", "uts"))
    body = render_seeds_markdown(s).split("\n", 2)[2]  # without its title
    body = body.replace("](seeds-", f"](../bench/results/{name}/seeds-")
    c = s["config"]
    sel = c.get("selector", "uts")
    arm = "UTS uploads" if name == "demo-seeds" else f"`{sel}` uploads (UTS's count, by uncertainty and diversity)"
    flag = "" if name == "demo-seeds" else f" --selector {sel}"
    abl = " (and the round-1 ablations)" if c.get("ablations") else ""
    took = f" Whole run: {seconds / 60:.0f} min on this 2-core machine." if seconds else ""
    return f"""<a id="{name}"></a>
## Demo over seeds{'' if name == 'demo-seeds' else f', {sel}'}: the method's claims with 95% intervals (`bench/demo.py --seeds {s['seeds']}{flag}`)

`cdcca-edge demo --seeds {s['seeds']} --seed {c['seed']} --test {s['test_per_domain']}{flag}{'' if c.get('ablations') else ' --no-ablations'}` (seeds {c['seed']} to
{c['seed'] + s['seeds'] - 1}; seed 0 is the one the defaults were chosen on): {c['rounds']} rounds, device backend
`{c['backend']}`, {c['stream']} questions per round; per seed, the loop runs once with {arm}{abl} and once
with random uploads of the same count.{took}

{body}"""


def seeds_main(args: argparse.Namespace) -> None:
    import time

    seconds = None
    if args.report is None:
        from cdcca_edge.core.paths import cache_dir
        from cdcca_edge.demo.loop import DemoConfig
        from cdcca_edge.demo.seeds import run_seeds

        out = cache_dir() / "bench" / _seeds_name(args.selector)
        cfg = DemoConfig(rounds=args.rounds, backend=args.backend, seed=args.first_seed, selector=args.selector,
                         **({"test": args.test} if args.test else {}))
        t = time.perf_counter()
        run_seeds(out, cfg, args.seeds, stage=lambda m: print(m, file=sys.stderr, flush=True))
        seconds = time.perf_counter() - t
        report = out / "report.json"
    else:
        report = args.report
    s = json.loads(report.read_text())
    if seconds is not None:
        s["seconds"] = seconds
        report.write_text(json.dumps(s, indent=1) + "\n")
    section_name = _seeds_name(s["config"].get("selector", "uts"))
    dest = RESULTS / section_name
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("report.json", "report.md", "seeds-accuracy.png", "seeds-differences.png"):
        if (report.parent / name).resolve() != (dest / name).resolve():
            shutil.copy(report.parent / name, dest / name)
    md = seeds_section(s, s.get("seconds"))
    update_section(section_name, md)
    print(md)


if __name__ == "__main__":
    main()
