"""`cdcca-edge demo`: the whole CDCCA loop on the embedded benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cdcca_edge.cli._output import err, out, print_json, stage_status
from cdcca_edge.cli.options import JsonOpt, choices, value
from cdcca_edge.demo.loop import DEVICE_BACKENDS, LOOP_SELECTORS, DemoConfig

_DEMO = DemoConfig()
DeviceBackend = choices("DeviceBackend", DEVICE_BACKENDS)
LoopSelector = choices("LoopSelector", LOOP_SELECTORS)


def demo(
    rounds: Annotated[int, typer.Option(help="Cloud-device rounds.")] = _DEMO.rounds,
    backend: Annotated[DeviceBackend, typer.Option(
        help="Device language part: llama (GGUF q8_0) or onnx (ONNX f32).")] = DeviceBackend(_DEMO.backend),
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write the report, plots and artefacts.")] = Path(
        "cdcca-demo"),
    quick: Annotated[bool, typer.Option("--quick", help="Tiny models and sets: the whole loop in seconds.")] = False,
    ablations: Annotated[bool, typer.Option(help="Also run the paper's ablations on round 1's data.")] = _DEMO.ablations,
    seed: Annotated[int, typer.Option(help="Seed of the data streams (the first seed with --seeds).")] = _DEMO.seed,
    seeds: Annotated[int, typer.Option(
        help="Run the loop for this many seeds (own streams, test sets and upload draws), with UTS and with "
             "random uploads, and report means, 95% intervals and paired differences. 1: one run.")] = 1,
    selector: Annotated[LoopSelector, typer.Option(
        help="What the device uploads: uts; uts-diverse (as many, by uncertainty and diversity over the "
             "images); random (as many, at random). With --seeds, the UTS arm's selector.")] = LoopSelector(
        _DEMO.selector),
    test: Annotated[int, typer.Option(help="Held-out questions per domain (each target domain, and the "
                                           "source domain).")] = _DEMO.test,
    text_models: Annotated[Optional[Path], typer.Option(
        help="Instead of the loop: write the tiny text teacher and student (HF directories) and the "
             "student as GGUF q8_0 into this directory, for `cdcca-edge cloud create-cohort`.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Run the CDCCA loop on the embedded multimodal domain-shift benchmark: the device
    answers and uploads (UTS), the cloud distils (AKD) and compresses (DWC), the device
    patches in place; writes OUT/report.md, OUT/report.json and plots."""
    from cdcca_edge.demo.loop import render_markdown, run_demo

    if text_models is not None:
        from cdcca_edge.demo.tiny import text_pair

        with stage_status(not json_out) as on_stage:
            paths = text_pair(text_models, on_stage)
        if json_out:
            print_json({k: str(v) for k, v in paths.items()})
        else:
            out.print(f"teacher {paths['teacher']}, student {paths['student']}, device artefact "
                      f"{paths['artifact']}", highlight=False)
        return

    cfg = DemoConfig(rounds=rounds, backend=value(backend), quick=quick, ablations=ablations, seed=seed, test=test,
                     selector=value(selector))
    if seeds != 1:
        _many_seeds(out_dir, cfg, seeds, json_out)
        return
    with stage_status(not json_out) as on_stage:
        report = run_demo(out_dir, cfg, stage=on_stage, on_round=None if json_out else _round_line)
    if json_out:
        print_json(report.as_dict())
        return
    table = [row for row in render_markdown(report).split("\n") if row.startswith("|")]
    out.print("\n".join(table), highlight=False)
    out.print(f"report: {out_dir / 'report.md'} (+ report.json, accuracy.png, bytes.png)", highlight=False)


def _round_line(r: dict) -> None:
    err.print(f"round {r['round']}: target {r['target_accuracy']:.1%}, source {r['source_accuracy']:.1%} "
              f"(teacher {r['teacher_accuracy']:.1%}); up {r['uplink_bytes']:,} B "
              f"({r['uplink_bytes'] / r['raw_input_bytes']:.1%} of raw), down {r['downlink_bytes']:,} B "
              f"({r['downlink_bytes'] / r['artifact_bytes']:.1%} of the artefact), patch "
              f"{r['patch_seconds'] * 1000:.0f} ms", highlight=False)


def _many_seeds(out_dir: Path, cfg: DemoConfig, seeds: int, json_out: bool) -> None:
    from cdcca_edge.demo.seeds import render_seeds_markdown, run_seeds

    def seed_line(k: int, pair: dict) -> None:
        u, r = pair["uts"]["rounds"][-1], pair["random"]["rounds"][-1]
        err.print(f"seed {k}: after round {u['round']}, target {u['target_accuracy']:.1%} with UTS uploads, "
                  f"{r['target_accuracy']:.1%} with random uploads; source {u['source_accuracy']:.1%}",
                  highlight=False)

    with stage_status(not json_out) as on_stage:
        summary = run_seeds(out_dir, cfg, seeds, stage=on_stage, on_seed=None if json_out else seed_line)
    if json_out:
        print_json(summary)
        return
    table = [row for row in render_seeds_markdown(summary).split("\n") if row.startswith("|")]
    out.print("\n".join(table), highlight=False)
    out.print(f"report: {out_dir / 'report.md'} (+ report.json, seeds-accuracy.png, seeds-differences.png; "
              f"each run under {out_dir}/seed-K/)", highlight=False)
