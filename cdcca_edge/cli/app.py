"""Typer commands. Each is thin: options in, one library call, result out."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Iterator, Optional

import typer

from cdcca_edge import __version__
from cdcca_edge.cli._output import err, out, print_json, stage_status
from cdcca_edge.core.errors import UsageError
from cdcca_edge.core.patch import DEFAULT_CHUNK

if TYPE_CHECKING:
    from cdcca_edge.runtime import Generation, StreamEvent

app = typer.Typer(
    name="cdcca-edge",
    help="Cloud-device collaborative adaptation of LLMs: export, run, uplink, distill, patch.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


def _version(value: bool) -> None:
    if value:
        print(f"cdcca-edge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """cdcca-edge: the CDCCA loop on real device runtimes."""


@app.command()
def export(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face model directory (Llama/Qwen2).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="OUT.gguf, or the ONNX output directory.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="gguf or onnx.")] = "gguf",
    quant: Annotated[
        Optional[str], typer.Option(help="GGUF: f32, f16, q8_0 (default), q4_0. ONNX: f32.")
    ] = None,
    adapter: Annotated[
        Optional[Path], typer.Option(help="PEFT adapter directory to merge before export.")
    ] = None,
    validate: Annotated[
        bool, typer.Option("--validate/--no-validate", help="Check logits against torch (default on).")
    ] = True,
    tolerance: Annotated[
        Optional[float], typer.Option(help="Override the format's validation tolerance (docs/export.md).")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Export a HF causal LM (+ LoRA adapter) to a validated GGUF file or ONNX directory; a
    LLaVA model to a bundle directory (vision ONNX + language GGUF/ONNX)."""
    from cdcca_edge.converters.export import export as do_export

    with stage_status(not json_out) as on_stage:
        result = do_export(
            model_dir, output, fmt, quant=quant, adapter=adapter, validate=validate,
            tolerance=tolerance, on_stage=on_stage,  # type: ignore[arg-type]
        )
    if json_out:
        print_json(result.as_dict())
        return
    v, mm = result.validation, result.extra
    if mm:  # a multimodal bundle: each part, then whole image questions
        lang = mm["language"]
        check = (f"validated: vision {mm['vision']['normalized_diff']:.2g} x std; language "
                 f"{lang['normalized_diff']:.3g} x std (tolerance {lang['tolerance']}); image questions "
                 f"answered as torch: {mm['answers_equal_torch']:.0%} of {mm['answers_checked']}")
    elif v:
        check = (f"validated on {v.backend}: max |Δlogit| {v.max_abs_diff:.3g} "
                 f"({v.normalized_diff:.3g} x std, tolerance {v.tolerance}), top-1 agreement "
                 f"{v.top1_agreement:.0%}")
    else:
        check = "not validated (--no-validate)"
    out.print(f"{result.path}  {result.format}/{result.quant}  {result.bytes / 1e6:.1f} MB  "
              f"identity {result.identity[:16]}", highlight=False)
    out.print(f"  {check}  [{result.seconds:.1f} s]", highlight=False)


@app.command()
def inspect(
    artifact: Annotated[Path, typer.Argument(help=".gguf file or ONNX export directory.")],
    identity: Annotated[
        bool, typer.Option("--identity/--no-identity", help="Hash tensor bytes for the identity.")
    ] = True,
    json_out: JsonOpt = False,
) -> None:
    """Show an artefact's tensors, types, sizes, provenance and identity."""
    from cdcca_edge.core.artifact import META_EXPORT_IDENTITY, compute_identity, open_artifact

    art = open_artifact(artifact)
    ident = compute_identity(art) if identity else None
    doc = {
        "path": str(art.path),
        "format": art.format,
        "files": [str(f) for f in art.files],
        "n_tensors": len(art.tensors),
        "tensor_bytes": art.tensor_bytes,
        "metadata": art.metadata,
        "identity": ident.digest if ident else None,
        "identity_matches_export": (
            ident.digest == art.metadata.get(META_EXPORT_IDENTITY) if ident else None
        ),
        "tensors": [
            {
                "name": t.name,
                "type": t.type_name,
                "shape": list(t.shape),
                "bytes": t.nbytes,
                "file": t.file.name,
                "offset": t.offset,
                **({"digest": ident.tensors[t.name]} if ident else {}),
            }
            for t in art.tensors
        ],
    }
    if json_out:
        print_json(doc)
        return
    from rich.table import Table

    table = Table(title=f"{art.path} ({art.format})", title_justify="left")
    for col, just in (("tensor", "left"), ("type", "left"), ("shape", "left"), ("bytes", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for t in art.tensors:
        table.add_row(t.name, t.type_name, "x".join(map(str, t.shape)), f"{t.nbytes:,}")
    out.print(table)
    out.print(f"tensors: {len(art.tensors)}, {art.tensor_bytes:,} bytes in {len(art.files)} file(s)")
    for k, v in sorted(art.metadata.items()):
        out.print(f"{k}: {v}", highlight=False)
    if ident:
        same = doc["identity_matches_export"]
        note = "" if same is None else ("  (= export identity)" if same else "  (changed since export)")
        out.print(f"identity: {ident.digest}{note}", highlight=False)


@app.command()
def run(
    artifact: Annotated[Path, typer.Argument(help=".gguf file, ONNX export directory or multimodal bundle.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt text (with --image: the question).")],
    image: Annotated[
        Optional[Path], typer.Option(help="An image (PNG/JPEG/.npy) for a multimodal bundle to look at.")
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="New tokens at most.")] = 32,
    backend: Annotated[str, typer.Option(help="auto, onnx or llama.")] = "auto",
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Sample from the k most likely tokens (0 = all).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: all cores).")] = None,
    score_prompt: Annotated[
        bool, typer.Option("--score-prompt", help="Also score every prompt token.")
    ] = False,
    show_scores: Annotated[
        bool, typer.Option("--show-scores", help="Print a per-token uncertainty table.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Answer a prompt on the device runtime, with per-token uncertainty."""
    from cdcca_edge.core.artifact import open_artifact
    from cdcca_edge.runtime import GenerationConfig, load

    config = GenerationConfig(
        max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        score_prompt=score_prompt,
    )
    if image is not None and open_artifact(artifact).format != "bundle":  # before loading it
        raise UsageError(f"--image needs a multimodal bundle; {artifact} is a text model")
    with load(artifact, backend=backend, n_threads=threads) as model:  # type: ignore[arg-type]
        _report_recovery(artifact, model.recovered)
        multimodal = hasattr(model, "encode_image")
        extra: dict[str, Any] = {}
        if image is not None:
            prompt = model.prompt(prompt)  # type: ignore[attr-defined]  # the bundle's template
            extra = {"image": image}
        if json_out:
            result = model.generate(prompt, config, **extra)
            doc = {"backend": model.name, "artifact": str(artifact)}
            if multimodal:
                doc["image"] = str(image) if image else None
            print_json({**doc, **result.as_dict()})
            return

        def show(event: "StreamEvent") -> None:
            out.file.write(event.text)
            out.file.flush()

        if image is None:
            result = model.generate(prompt, config, on_token=show)
        else:
            result = model.generate(prompt, config, **extra)
            out.file.write(result.text)
        out.file.write("\n")
    if show_scores:
        print_score_table(result)
    s = result.sample
    rate = result.as_dict()["timings"]["decode_tokens_per_second"]
    err.print(
        f"[dim]{model.name}: {len(result.tokens)} tokens ({result.finish_reason}), "
        f"{rate or 0:.1f} tok/s, confidence {s.confidence:.3f}, mean entropy "
        f"{s.mean_entropy:.3f} nats[/dim]",
        highlight=False,
    )


def _report_recovery(artifact: Path, outcome: str | None) -> None:
    if outcome:
        err.print(f"{artifact}: an interrupted patch was found first: {outcome}", highlight=False)


@contextmanager
def _progress(total: int, what: str, quiet: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr (off under --json); yields ``tick(done)``."""
    if quiet:
        yield lambda _n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.update(task, completed=n)


@contextmanager
def _stage_progress(quiet: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar whose task changes with the stage: ``tick(stage, done, total)``."""
    if quiet:
        yield lambda _s, _d, _t: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=err, transient=True) as bar:
        tasks: dict[str, int] = {}

        def tick(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield tick


def print_score_table(result: "Generation") -> None:
    from rich.table import Table

    table = Table("token", "id", "entropy", "top-1 p", "margin", title="per-token uncertainty",
                  title_justify="left")
    for text, s in zip(result.token_texts, result.scores):
        table.add_row(repr(text), str(s.token), f"{s.entropy:.3f}", f"{s.top1_prob:.3f}",
                      f"{s.margin:.3f}")
    out.print(table)


@app.command()
def patch(
    model: Annotated[Path, typer.Argument(help=".gguf file or ONNX export directory, patched in place.")],
    delta: Annotated[Optional[Path], typer.Argument(help="The delta (.cdcd) to apply.")] = None,
    pubkey: Annotated[
        Optional[list[Path]],
        typer.Option(help="Trusted Ed25519 public key (PEM); repeatable. Unsigned deltas are then refused."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check everything read-only; write nothing.")] = False,
    recover_only: Annotated[
        bool, typer.Option("--recover", help="Only finish or undo an interrupted patch.")
    ] = False,
    undo_out: Annotated[
        Optional[Path], typer.Option(help="Also write a delta that reverts this patch.")
    ] = None,
    allow_downgrade: Annotated[
        bool, typer.Option("--allow-downgrade",
                           help="Accept a delta that does not move the version forward (undo deltas).")
    ] = False,
    wait: Annotated[
        float, typer.Option(help="Seconds to wait for a process serving or patching the model (0: fail at once).")
    ] = 0.0,
    chunk_size: Annotated[
        int, typer.Option(help="Bytes of model data read at once (memory bound).")
    ] = DEFAULT_CHUNK,
    json_out: JsonOpt = False,
) -> None:
    """Apply a delta to a model in place: verified, journaled, crash-safe."""
    from cdcca_edge.core.errors import UsageError
    from cdcca_edge.core.patch import apply_delta, recover
    from cdcca_edge.core.trust import Trust

    if recover_only:
        outcome = recover(model, wait=wait)
        doc = {"artifact": str(model), "recovered": outcome}
        if json_out:
            print_json(doc)
        else:
            out.print(f"{model}: " + (f"interrupted patch {outcome}" if outcome else "nothing to recover"))
        return
    if delta is None:
        raise UsageError("missing DELTA: cdcca-edge patch MODEL DELTA (or --recover MODEL)")
    with stage_status(not json_out) as on_stage:
        trust = Trust.keys(pubkey) if pubkey else Trust.configured()
        result = apply_delta(model, delta, trust=trust, dry_run=dry_run, chunk_size=chunk_size,
                             undo_out=undo_out, allow_downgrade=allow_downgrade, wait=wait,
                             progress=on_stage)
    if json_out:
        print_json(result.as_dict())
        return
    if result.recovered:
        err.print(f"recovered an interrupted patch first: {result.recovered}")
    if result.identity_check == "migrated":
        err.print("the state sidecar was of an older version: the model's identity was computed "
                  "once under the current scheme and its version kept")
    if result.already_applied:
        out.print(f"{model}: already at version {result.to_version} "
                  f"({result.target_identity[:16]}); nothing to do")
        return
    verb = "would change" if result.dry_run else "patched"
    out.print(f"{model}: {verb} {len(result.records)} records, {result.region_bytes:,} bytes; "
              f"version {result.from_version} -> {result.to_version}, identity "
              f"{result.base_identity[:16]} -> {result.target_identity[:16]} "
              f"[{result.seconds:.3f} s]", highlight=False)
    if result.undo:
        out.print(f"undo delta: {result.undo}", highlight=False)


delta_app = typer.Typer(help="Make, inspect and sign deltas.", no_args_is_help=True)
app.add_typer(delta_app, name="delta")


@delta_app.command("diff")
def delta_diff(
    old: Annotated[Path, typer.Argument(help="The artefact the device has.")],
    new: Annotated[Path, typer.Argument(help="The artefact it should become (same tensor layout).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Delta file to write.")],
    sign_key: Annotated[
        Optional[Path], typer.Option(help="Ed25519 private key (PEM) to sign with.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Exact block-replacement delta between two artefacts with the same layout."""
    from cdcca_edge.core.delta_build import diff_artifacts
    from cdcca_edge.core.delta_format import load_private_key

    key = load_private_key(sign_key) if sign_key else None
    with stage_status(not json_out) as on_stage:
        on_stage("comparing tensors")
        summary = diff_artifacts(old, new, output, sign_key=key)
    if json_out:
        print_json(summary.as_dict())
        return
    out.print(f"{output}: {summary.bytes:,} bytes, {summary.records} records, rewrites "
              f"{summary.touched_bytes:,} bytes; {summary.base_identity[:16]} -> "
              f"{summary.target_identity[:16]}{' (signed)' if summary.signed else ''}",
              highlight=False)


@delta_app.command("make")
def delta_make(
    base: Annotated[Path, typer.Option(help="The device artefact as the cloud mirrors it (.gguf or ONNX dir).")],
    target: Annotated[Path, typer.Option(help="HF model directory, or a PEFT adapter directory with --target-base.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Delta file to write.")],
    target_base: Annotated[
        Optional[Path], typer.Option(help="The HF base model the --target adapter was trained on.")
    ] = None,
    budget_bytes: Annotated[Optional[int], typer.Option(help="Spend at most this many bytes.")] = None,
    max_kl: Annotated[
        Optional[float], typer.Option(help="Smallest delta whose probe KL vs the target is at most this.")
    ] = None,
    probe: Annotated[
        Optional[Path], typer.Option(help="Probe prompts, JSON Lines {\"prompt\": ...}, for the KL.")
    ] = None,
    sign_key: Annotated[Optional[Path], typer.Option(help="Ed25519 private key (PEM) to sign with.")] = None,
    no_lowrank: Annotated[bool, typer.Option("--no-lowrank", help="Never use low-rank records.")] = False,
    advance_mirror: Annotated[
        bool, typer.Option("--advance-mirror", help="Leave the mirror (--base) at the delta's target (one operation).")
    ] = False,
    expect_identity: Annotated[
        Optional[str], typer.Option(help="The identity the device reports; refuse a mirror with another one.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """DWC: compress a cloud update into the smallest delta for the device's exact model."""
    from cdcca_edge.cloud.dwc import DWCConfig, make_delta
    from cdcca_edge.core.delta_format import load_private_key

    prompts = None
    if probe is not None:
        from cdcca_edge.runtime.uts import read_inputs

        prompts = [it["prompt"] for it in read_inputs(probe)]
    cfg = DWCConfig(budget_bytes=budget_bytes, max_kl=max_kl, lowrank=not no_lowrank)
    key = load_private_key(sign_key) if sign_key else None
    with stage_status(not json_out) as on_stage:
        report = make_delta(base, target, output, target_base=target_base, config=cfg, probe=prompts,
                            sign_key=key, progress=on_stage, advance_mirror=advance_mirror,
                            expect_identity=expect_identity)
    doc = report.as_dict()
    if json_out:
        print_json(doc)
        return
    enc = ", ".join(f"{n} {k}" for k, n in sorted(report.records_by_encoding.items()))
    out.print(f"{output}: {report.bytes:,} bytes ({report.bytes / report.artifact_bytes:.3%} of the "
              f"{report.artifact_bytes:,}-byte model), {report.records} records ({enc}); "
              f"{report.weights_touched:.2%} of weights touched", highlight=False)
    out.print(f"  weight error vs target {report.relative_error_before:.3g} -> {report.relative_error:.3g} "
              f"(update left: {report.update_left:.1%})", highlight=False)
    if report.probe_kl is not None:
        out.print(f"  probe KL vs target {report.probe_kl_before:.4g} -> {report.probe_kl:.4g}", highlight=False)
    if advance_mirror:
        out.print(f"  mirror {base} advanced to version {report.to_version}", highlight=False)


@delta_app.command("inspect")
def delta_inspect(
    delta: Annotated[Path, typer.Argument(help="A delta file.")],
    json_out: JsonOpt = False,
) -> None:
    """Show a delta's header, records and sizes (checks its digest)."""
    from cdcca_edge.core.delta_format import read_delta

    d = read_delta(delta)
    h = d.header
    doc = {
        "path": str(d.path), "bytes": d.size, "digest": d.digest,
        "signed_by": d.signature.key_id if d.signature else None,
        **{k: v for k, v in h.to_json().items() if k != "records"},
        "records": [r.to_json() for r in h.records],
    }
    if json_out:
        print_json(doc)
        return
    from rich.table import Table

    out.print(f"{d.path}: {d.size:,} bytes, digest {d.digest[:16]}, "
              f"{'signed by ' + d.signature.key_id if d.signature else 'unsigned'}", highlight=False)
    out.print(f"{h.artifact_format} version {h.from_version} -> {h.to_version}: "
              f"{h.base_identity[:16]} -> {h.target_identity[:16]}; created {h.created}", highlight=False)
    table = Table("tensor", "encoding", "type", "shape", "payload bytes", "params")
    for r in h.records:
        table.add_row(r.tensor, r.encoding, r.type, "x".join(map(str, r.shape)), f"{r.length:,}",
                      json.dumps(r.params) if r.params else "")
    out.print(table)


@delta_app.command("keygen")
def delta_keygen(
    output: Annotated[Path, typer.Option("-o", "--output", help="Private key file (PEM); KEY.pub gets the public key.")],
) -> None:
    """Make an Ed25519 key pair for signing deltas (--sign-key) and trusting them (--pubkey)."""
    from cdcca_edge.core.delta_format import generate_keypair
    from cdcca_edge.core.errors import UsageError

    pub = output.with_name(output.name + ".pub")
    if output.exists() or pub.exists():
        raise UsageError(f"{output} or {pub} exists; not overwriting a key")
    kid = generate_keypair(output, pub)
    out.print(f"private key {output} (keep it on the signing side), public key {pub}; key id {kid}",
              highlight=False)


uplink_app = typer.Typer(help="UTS: calibrate uncertainty, select and bundle uploads.",
                         no_args_is_help=True)
app.add_typer(uplink_app, name="uplink")


def _identity_of(artifact: Path) -> tuple[str, int | None]:
    from cdcca_edge.core.artifact import open_artifact
    from cdcca_edge.core.state import current_identity

    identity, state, _ = current_identity(open_artifact(artifact))
    return identity, state.version if state else None




@uplink_app.command("calibrate")
def uplink_calibrate(
    artifact: Annotated[Path, typer.Argument(help=".gguf file or ONNX export directory.")],
    inputs: Annotated[Path, typer.Option(help="In-distribution inputs, JSON Lines {\"prompt\": ...}.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Calibration file to write (JSON).")],
    rate: Annotated[float, typer.Option(help="Fraction of in-distribution samples to upload.")] = 0.1,
    token_rate: Annotated[float, typer.Option(help="Fraction of answer tokens to flag.")] = 0.2,
    score: Annotated[str, typer.Option(help="surprise (prompt NLL + answer entropy), prompt_nll, mean_entropy, max_entropy, neg_log_confidence or ref_confidence (the paper's).")] = "surprise",
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Answer length.")] = 32,
    keep: Annotated[float, typer.Option(help="Images: fraction of visual tokens an upload carries.")] = 0.5,
    backend: Annotated[str, typer.Option(help="auto, onnx or llama.")] = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Fit the upload threshold on in-distribution inputs (with images: also the visual-token
    statistics)."""
    from cdcca_edge.runtime import load
    from cdcca_edge.runtime.uts import calibrate, read_inputs

    items = read_inputs(inputs)
    identity, _ = _identity_of(artifact)
    with load(artifact, backend=backend) as model:  # type: ignore[arg-type]
        with _progress(len(items), "calibrating", json_out) as tick:
            cal = calibrate(model, items, identity, rate=rate, token_rate=token_rate, score=score,
                            max_tokens=max_tokens, keep=keep, progress=tick)
    cal.save(output)
    if json_out:
        print_json({"output": str(output), **{k: v for k, v in cal.__dict__.items() if k != "visual"}})
        return
    out.print(f"{output}: {cal.score} threshold {cal.threshold:.4g} uploads {cal.rate:.0%} of "
              f"{cal.n_samples} in-distribution samples; token entropy threshold "
              f"{cal.token_threshold:.4g} flags {cal.token_rate:.0%} of {cal.n_tokens} tokens",
              highlight=False)


@uplink_app.command("collect")
def uplink_collect(
    artifact: Annotated[Path, typer.Argument(help=".gguf file or ONNX export directory.")],
    inputs: Annotated[Path, typer.Option(help="Inputs, JSON Lines {\"id\"?, \"prompt\", \"image\"?}.")],
    calib: Annotated[Path, typer.Option(help="Calibration file from `uplink calibrate`.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Uplink bundle to write (.cdcu).")],
    selector: Annotated[str, typer.Option(help="uts; random (same count, for comparison); all (an anchor set).")] = "uts",
    include_raw: Annotated[bool, typer.Option("--include-raw", help="Also upload raw images.")] = False,
    low_weight: Annotated[float, typer.Option(help="Loss weight of unflagged answer tokens.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the random selector.")] = 0,
    backend: Annotated[str, typer.Option(help="auto, onnx or llama.")] = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Answer inputs on the device, select the uncertain ones, write the uplink bundle."""
    from cdcca_edge.runtime import load
    from cdcca_edge.runtime.uts import Calibration, collect, read_inputs

    items = read_inputs(inputs)
    cal = Calibration.load(calib)
    identity, version = _identity_of(artifact)
    with load(artifact, backend=backend) as model:  # type: ignore[arg-type]
        with _progress(len(items), "answering", json_out) as tick:
            report = collect(model, items, cal, output, identity, version, selector=selector,  # type: ignore[arg-type]
                             include_raw=include_raw, low_weight=low_weight, seed=seed, progress=tick)
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


@uplink_app.command("inspect")
def uplink_inspect(
    bundle: Annotated[Path, typer.Argument(help="An uplink bundle (.cdcu).")],
    json_out: JsonOpt = False,
) -> None:
    """Show a bundle's header and samples (checks its digest)."""
    from cdcca_edge.core.uplink_format import read_uplink

    b = read_uplink(bundle)
    samples = []
    for s in b.samples():
        samples.append({"id": s.id, **{k: v for k, v in s.meta.items() if k in ("uncertainty", "answer")},
                        "arrays": {k: list(v.shape) for k, v in s.arrays.items()}})
    doc = {"path": str(b.path), "bytes": b.size, "digest": b.digest,
           **{k: v for k, v in b.header.items() if k != "samples"}, "samples": samples}
    if json_out:
        print_json(doc)
        return
    out.print(f"{b.path}: {b.size:,} bytes, {len(b)} of {b.header['n_seen']} samples "
              f"({b.header.get('selector')}), model {b.header['artifact_identity'][:16]}", highlight=False)
    for s in samples:
        out.print(f"  {s['id']}: uncertainty {s.get('uncertainty', 0):.3f}  {s.get('answer', '')!r}",
                  highlight=False)


@app.command()
def distill(
    teacher: Annotated[Path, typer.Option(help="Teacher HF model directory (cloud).")],
    student: Annotated[Path, typer.Option(help="Student HF model directory (the device's model).")],
    bundle: Annotated[list[Path], typer.Option(help="Uplink bundle (.cdcu); repeatable.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output: the PEFT adapter directory.")],
    adapter: Annotated[str, typer.Option(help="lora, or bias-norm (LN tuning + bias terms).")] = "lora",
    epochs: Annotated[int, typer.Option(help="Passes over the uploaded samples.")] = 3,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Samples per step.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Teacher pseudo-label length.")] = 16,
    ce_weight: Annotated[float, typer.Option(help="Weight of CE on teacher pseudo-labels.")] = 1.0,
    kd_weight: Annotated[float, typer.Option(help="Weight of logit KD.")] = 1.0,
    kd_loss: Annotated[str, typer.Option(help="forward_kl, reverse_kl or jsd.")] = "forward_kl",
    kd_temperature: Annotated[float, typer.Option(help="KD softmax temperature.")] = 1.0,
    device_kd: Annotated[bool, typer.Option("--device-kd/--no-device-kd", help="Also KD on the device's uploaded answers, token-weighted.")] = True,
    feature_weight: Annotated[float, typer.Option(help="Weight of last-hidden-state feature KD.")] = 1.0,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 16,
    target_modules: Annotated[Optional[str], typer.Option(help="LoRA targets, comma-separated (default: all projections).")] = None,
    holdout: Annotated[float, typer.Option(help="Fraction of samples held out for the report.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed: same inputs and seed, same adapter.")] = 0,
    merge: Annotated[bool, typer.Option("--merge", help="Also write the merged model to OUTPUT/merged.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """AKD: distil the teacher into a PEFT adapter on the student, from uplink bundles."""
    from cdcca_edge.cloud.akd import DEFAULT_LORA_TARGETS, AKDConfig
    from cdcca_edge.cloud.akd import distill as run_distill

    cfg = AKDConfig(
        adapter=adapter, lora_r=lora_r, lora_alpha=lora_alpha,  # type: ignore[arg-type]
        target_modules=tuple(target_modules.split(",")) if target_modules else DEFAULT_LORA_TARGETS,
        epochs=epochs, lr=lr, batch_size=batch_size, max_new_tokens=max_new_tokens,
        ce_weight=ce_weight, kd_weight=kd_weight, kd_loss=kd_loss,  # type: ignore[arg-type]
        kd_temperature=kd_temperature, kd_on_device_answer=device_kd,
        feature_weight=feature_weight, holdout=holdout, seed=seed,
    )
    from cdcca_edge.converters.llava_export import is_llava

    if is_llava(teacher) or is_llava(student):  # AKD on the bundles' visual tokens
        from cdcca_edge.cloud.akd_mm import distill_multimodal

        if not (is_llava(teacher) and is_llava(student)):
            raise UsageError("teacher and student must both be LLaVA models for AKD on visual tokens")
        with _stage_progress(json_out) as tick:
            mm = distill_multimodal(teacher, student, bundle, output, cfg, merge=merge, progress=tick)
        if json_out:
            print_json(mm.as_dict())
            return
        out.print(f"{output}: lora adapter on the language model and projector, {mm.trainable_params:,} "
                  f"trainable parameters, {mm.steps} steps on {mm.n_train} image samples "
                  f"({mm.kept_token_fraction:.0%} of visual tokens kept) [{mm.seconds:.1f} s]", highlight=False)
        for split in ("bundle", "holdout"):
            out.print(f"  teacher answer agreement on {split}: {mm.agreement_before[split]:.1%} -> "
                      f"{mm.agreement_after[split]:.1%}", highlight=False)
        return
    with _stage_progress(json_out) as tick:
        report = run_distill(teacher, student, bundle, output, cfg, merge=merge, progress=tick)
    if json_out:
        print_json(report.as_dict())
        return
    b, a = report.agreement_before, report.agreement_after
    out.print(f"{output}: {report.config['adapter']} adapter, {report.trainable_params:,} trainable "
              f"parameters, {report.steps} steps on {report.n_train} samples [{report.seconds:.1f} s]",
              highlight=False)
    for split in ("bundle", "holdout"):
        out.print(f"  teacher agreement on {split}: tokens {b[split]['token_agreement']:.1%} -> "
                  f"{a[split]['token_agreement']:.1%}, answers {b[split]['answer_match']:.1%} -> "
                  f"{a[split]['answer_match']:.1%}", highlight=False)
    if report.merged:
        out.print(f"  merged model: {report.merged}", highlight=False)


@app.command()
def demo(
    rounds: Annotated[int, typer.Option(help="Cloud-device rounds.")] = 3,
    backend: Annotated[str, typer.Option(help="Device language part: llama (GGUF q8_0) or onnx.")] = "llama",
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write the report, plots and artefacts.")] = Path(
        "cdcca-demo"),
    quick: Annotated[bool, typer.Option("--quick", help="Tiny models and sets: the whole loop in seconds.")] = False,
    ablations: Annotated[bool, typer.Option(help="Also run the paper's ablations on round 1's data.")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the data streams.")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Run the CDCCA loop on the embedded multimodal domain-shift benchmark: the device
    answers and uploads (UTS), the cloud distils (AKD) and compresses (DWC), the device
    patches in place; writes OUT/report.md, OUT/report.json and plots."""
    from cdcca_edge.cloud.demo import DemoConfig, render_markdown, run_demo

    cfg = DemoConfig(rounds=rounds, backend=backend, quick=quick, ablations=ablations, seed=seed)

    def line(r: dict) -> None:
        if not json_out:
            err.print(f"round {r['round']}: target {r['target_accuracy']:.1%}, source {r['source_accuracy']:.1%} "
                      f"(teacher {r['teacher_accuracy']:.1%}); up {r['uplink_bytes']:,} B "
                      f"({r['uplink_bytes'] / r['raw_input_bytes']:.1%} of raw), down {r['downlink_bytes']:,} B "
                      f"({r['downlink_bytes'] / r['artifact_bytes']:.1%} of the artefact), patch "
                      f"{r['patch_seconds'] * 1000:.0f} ms", highlight=False)

    with stage_status(not json_out) as on_stage:
        report = run_demo(out_dir, cfg, stage=on_stage, on_round=line)
    if json_out:
        print_json(report.as_dict())
        return
    table = [row for row in render_markdown(report).split("\n") if row.startswith("|")]
    out.print("\n".join(table), highlight=False)
    out.print(f"report: {out_dir / 'report.md'} (+ report.json, accuracy.png, bytes.png)", highlight=False)
