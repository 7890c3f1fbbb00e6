"""`cdcca-edge delta`: make (DWC), diff, inspect and sign deltas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cdcca_edge.cli._output import out, print_json, stage_status
from cdcca_edge.cli.options import JsonOpt, OutputOpt, SignKeyOpt
from cdcca_edge.core.errors import UsageError

app = typer.Typer(help="Make, inspect and sign deltas.", no_args_is_help=True)


@app.command("diff")
def diff(
    old: Annotated[Path, typer.Argument(help="The artefact the device has.")],
    new: Annotated[Path, typer.Argument(help="The artefact it should become (same tensor layout).")],
    output: OutputOpt,
    sign_key: SignKeyOpt = None,
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


@app.command("make")
def make(
    base: Annotated[Path, typer.Option(help="The device artefact as the cloud mirrors it.")],
    target: Annotated[Path, typer.Option(help="HF model directory, or a PEFT adapter directory with --target-base.")],
    output: OutputOpt,
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
    sign_key: SignKeyOpt = None,
    no_lowrank: Annotated[bool, typer.Option("--no-lowrank", help="Never use low-rank records.")] = False,
    factor_bits: Annotated[
        Optional[str], typer.Option(help="Bit widths a low-rank component may take under a budget, "
                                         "comma-separated (2-8); default 2,3,4,5,6,8.")
    ] = None,
    advance_mirror: Annotated[
        bool, typer.Option("--advance-mirror", help="Leave the mirror (--base) at the delta's target (one operation).")
    ] = False,
    expect_identity: Annotated[
        Optional[str], typer.Option(help="The identity the device reports; refuse a mirror with another one.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """DWC: compress a cloud update into the smallest delta for the device's exact model."""
    from cdcca_edge.cloud.dwc import FACTOR_BITS, DWCConfig, make_delta
    from cdcca_edge.core.delta_format import load_private_key
    from cdcca_edge.runtime.uts import read_prompts

    try:
        widths = FACTOR_BITS if factor_bits is None else tuple(int(b) for b in factor_bits.split(","))
    except ValueError:
        raise UsageError(f"--factor-bits {factor_bits!r}: give bit widths in [2, 8], comma-separated, "
                         "e.g. 2,3,4,5,6,8") from None
    cfg = DWCConfig(budget_bytes=budget_bytes, max_kl=max_kl, lowrank=not no_lowrank, factor_bits=widths)
    with stage_status(not json_out) as on_stage:
        report = make_delta(base, target, output, target_base=target_base, config=cfg,
                            probe=read_prompts(probe) if probe else None,
                            sign_key=load_private_key(sign_key) if sign_key else None,
                            progress=on_stage, advance_mirror=advance_mirror, expect_identity=expect_identity)
    if json_out:
        print_json(report.as_dict())
    else:
        _print_report(output, base, report)


def _print_report(output: Path, base: Path, report: Any) -> None:
    enc = ", ".join(f"{n} {k}" for k, n in sorted(report.records_by_encoding.items()))
    out.print(f"{output}: {report.bytes:,} bytes ({report.bytes / report.artifact_bytes:.3%} of the "
              f"{report.artifact_bytes:,}-byte model), {report.records} records ({enc}); "
              f"{report.weights_touched:.2%} of weights touched", highlight=False)
    out.print(f"  weight error vs target {report.relative_error_before:.3g} -> {report.relative_error:.3g} "
              f"(update left: {report.update_left:.1%})", highlight=False)
    if report.probe_kl is not None:
        out.print(f"  probe KL vs target {report.probe_kl_before:.4g} -> {report.probe_kl:.4g}", highlight=False)
    if report.mirror_advanced:
        out.print(f"  mirror {base} advanced to version {report.to_version}", highlight=False)
    if report.parameters_elsewhere:
        out.print(f"  {report.parameters_elsewhere} of the update's parameters live in the other file of the "
                  "language GGUF + mmproj pair: run delta make on it too", highlight=False)


@app.command("inspect")
def inspect(
    delta: Annotated[Path, typer.Argument(help="A delta file.")],
    json_out: JsonOpt = False,
) -> None:
    """Show a delta's header, records and sizes (checks its digest)."""
    from cdcca_edge.core.delta_format import describe_delta, read_delta

    d = read_delta(delta)
    if json_out:
        print_json(describe_delta(d))
        return
    from rich.table import Table

    h = d.header
    out.print(f"{d.path}: {d.size:,} bytes, digest {d.digest[:16]}, "
              f"{'signed by ' + d.signature.key_id if d.signature else 'unsigned'}", highlight=False)
    out.print(f"{h.artifact_format} version {h.from_version} -> {h.to_version}: "
              f"{h.base_identity[:16]} -> {h.target_identity[:16]}; created {h.created}", highlight=False)
    table = Table("tensor", "encoding", "type", "shape", "payload bytes", "params")
    for r in h.records:
        table.add_row(r.tensor, r.encoding, r.type, "x".join(map(str, r.shape)), f"{r.length:,}",
                      json.dumps(r.params) if r.params else "")
    out.print(table)


@app.command("keygen")
def keygen(
    output: Annotated[Path, typer.Option("-o", "--output", help="Private key file (PEM); KEY.pub gets the public key.")],
) -> None:
    """Make an Ed25519 key pair for signing deltas (--sign-key) and trusting them (--pubkey)."""
    from cdcca_edge.core.delta_format import generate_keypair

    pub = output.with_name(output.name + ".pub")
    kid = generate_keypair(output, pub)
    out.print(f"private key {output} (keep it on the signing side), public key {pub}; key id {kid}",
              highlight=False)
