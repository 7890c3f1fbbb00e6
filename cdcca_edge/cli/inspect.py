"""`cdcca-edge inspect`: an artefact's tensors, provenance and identity (device path)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cdcca_edge.cli._output import out, print_json
from cdcca_edge.cli.options import JsonOpt


def inspect(
    artifact: Annotated[Path, typer.Argument(help=".gguf file, ONNX export directory or bundle.")],
    identity: Annotated[
        bool, typer.Option("--identity/--no-identity", help="Hash tensor bytes for the identity.")
    ] = True,
    json_out: JsonOpt = False,
) -> None:
    """Show an artefact's tensors, types, sizes, provenance and identity."""
    from cdcca_edge.core.artifact import describe, open_artifact

    art = open_artifact(artifact)
    doc = describe(art, identity=identity)
    if json_out:
        print_json(doc)
        return
    _print_table(art, doc)


def _print_table(art: Any, doc: dict[str, Any]) -> None:
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
    if doc["identity"]:
        same = doc["identity_matches_export"]
        note = "" if same is None else ("  (= export identity)" if same else "  (changed since export)")
        out.print(f"identity: {doc['identity']}{note}", highlight=False)
