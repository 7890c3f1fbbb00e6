"""`cdcca-edge patch`: apply a delta in place, verified, journaled, crash-safe (device path)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cdcca_edge.cli._output import err, out, print_json, stage_status
from cdcca_edge.cli.options import JsonOpt
from cdcca_edge.core.patch import DEFAULT_CHUNK


def patch(
    model: Annotated[Path, typer.Argument(help=".gguf file, ONNX export directory or bundle, patched in place.")],
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
        if json_out:
            print_json({"artifact": str(model), "recovered": outcome})
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
    else:
        _print_result(model, result)


def _print_result(model: Path, result: Any) -> None:
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
