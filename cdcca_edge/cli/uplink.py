"""`cdcca-edge uplink`: UTS on the device: calibrate, select and bundle uploads; inspect."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any

import typer

from cdcca_edge.cli._output import err, out, print_json, stage_progress
from cdcca_edge.cli.options import Backend, BackendOpt, JsonOpt, OutputOpt, Score, SelectorChoice, value
from cdcca_edge.runtime.uts import calibrate as _calibrate
from cdcca_edge.runtime.uts import collect as _collect

app = typer.Typer(help="UTS: calibrate uncertainty, select and bundle uploads.", no_args_is_help=True)


def _default(func: Any, name: str) -> Any:
    """The library's default for a parameter (never restated here)."""
    return inspect.signature(func).parameters[name].default


InputsOpt = Annotated[Path, typer.Option(help="Inputs, JSON Lines {\"id\"?, \"prompt\", \"image\"?}.")]


@app.command("calibrate")
def calibrate(
    artifact: Annotated[Path, typer.Argument(help=".gguf file, ONNX export directory or bundle.")],
    inputs: InputsOpt,
    output: OutputOpt,
    rate: Annotated[float, typer.Option(help="Fraction of in-distribution samples to upload.")] = _default(_calibrate, "rate"),
    token_rate: Annotated[float, typer.Option(help="Fraction of answer tokens to flag.")] = _default(_calibrate, "token_rate"),
    score: Annotated[Score, typer.Option(help="Sample score: surprise = prompt NLL + answer entropy; "
                                              "ref_confidence is the paper's.")] = Score(_default(_calibrate, "score")),
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Answer length.")] = _default(_calibrate, "max_tokens"),
    keep: Annotated[float, typer.Option(help="Images: fraction of visual tokens an upload carries.")] = _default(_calibrate, "keep"),
    backend: BackendOpt = Backend.auto,
    json_out: JsonOpt = False,
) -> None:
    """Fit the upload threshold on in-distribution inputs (with images: also the visual-token
    statistics)."""
    from cdcca_edge.runtime.uts import calibrate_artifact

    with stage_progress(json_out) as tick:
        cal = calibrate_artifact(artifact, inputs, output, backend=value(backend),
                                 progress=lambda d, t: tick("calibrating", d, t), rate=rate,
                                 token_rate=token_rate, score=value(score), max_tokens=max_tokens, keep=keep)
    if json_out:
        print_json({"output": str(output), **{k: v for k, v in cal.__dict__.items() if k != "visual"}})
        return
    out.print(f"{output}: {cal.score} threshold {cal.threshold:.4g} uploads {cal.rate:.0%} of "
              f"{cal.n_samples} in-distribution samples; token entropy threshold "
              f"{cal.token_threshold:.4g} flags {cal.token_rate:.0%} of {cal.n_tokens} tokens",
              highlight=False)


@app.command("collect")
def collect(
    artifact: Annotated[Path, typer.Argument(help=".gguf file, ONNX export directory or bundle.")],
    inputs: InputsOpt,
    calib: Annotated[Path, typer.Option(help="Calibration file from `uplink calibrate`.")],
    output: OutputOpt,
    selector: Annotated[SelectorChoice, typer.Option(
        help="uts; random (same count, for comparison); all (an anchor set).")] = SelectorChoice(_default(_collect, "selector")),
    include_raw: Annotated[bool, typer.Option("--include-raw", help="Also upload raw images.")] = False,
    low_weight: Annotated[float, typer.Option(help="Loss weight of unflagged answer tokens.")] = _default(_collect, "low_weight"),
    seed: Annotated[int, typer.Option(help="Seed of the random selector.")] = _default(_collect, "seed"),
    backend: BackendOpt = Backend.auto,
    json_out: JsonOpt = False,
) -> None:
    """Answer inputs on the device, select the uncertain ones, write the uplink bundle."""
    from cdcca_edge.runtime.uts import collect_artifact

    with stage_progress(json_out) as tick:
        report = collect_artifact(artifact, inputs, calib, output, backend=value(backend),
                                  progress=lambda d, t: tick("answering", d, t), selector=value(selector),
                                  include_raw=include_raw, low_weight=low_weight, seed=seed)
    if json_out:
        print_json(report.as_dict())
        return
    if not report.calibration_matches:
        err.print("[yellow]warning: the calibration was made on another version of this model; "
                  "recalibrate after large updates[/yellow]")
    share = report.bundle_bytes / report.raw_input_bytes if report.raw_input_bytes else 0.0
    out.print(f"{output}: {report.n_uploaded}/{report.n_seen} samples uploaded ({report.selector}); "
              f"{report.bundle_bytes:,} bytes = {share:.1%} of {report.raw_input_bytes:,} raw input "
              f"bytes; scoring took {report.scoring_seconds:.3f} s of {report.decode_seconds:.2f} s "
              "inference", highlight=False)


@app.command("inspect")
def inspect_bundle(
    bundle: Annotated[Path, typer.Argument(help="An uplink bundle (.cdcu).")],
    json_out: JsonOpt = False,
) -> None:
    """Show a bundle's header and samples (checks its digest)."""
    from cdcca_edge.core.uplink_format import describe_uplink, read_uplink

    doc = describe_uplink(read_uplink(bundle))
    if json_out:
        print_json(doc)
        return
    out.print(f"{doc['path']}: {doc['bytes']:,} bytes, {len(doc['samples'])} of {doc['n_seen']} samples "
              f"({doc.get('selector')}), model {doc['artifact_identity'][:16]}", highlight=False)
    for s in doc["samples"]:
        out.print(f"  {s['id']}: uncertainty {s.get('uncertainty', 0):.3f}  {s.get('answer', '')!r}",
                  highlight=False)
