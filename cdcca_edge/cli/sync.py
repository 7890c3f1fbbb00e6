"""`cdcca-edge sync`: a device talks to the cloud service by hand (enroll, upload, update).
The device agent (a later issue) runs the same client on a schedule. Device path: no
torch; the client is urllib3 + python-tuf's ngclient."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cdcca_edge.cli._output import err, out, print_json
from cdcca_edge.cli.options import JsonOpt

app = typer.Typer(help="A device and the cloud service: enroll, upload bundles, fetch and apply updates.",
                  no_args_is_help=True)

StateOpt = Annotated[Path, typer.Option("--state", help="The device's sync state directory (token, trusted "
                                        "TUF metadata, downloads).")]


@app.command("enroll")
def enroll(
    url: Annotated[str, typer.Argument(help="The service, e.g. http://127.0.0.1:8600.")],
    token: Annotated[str, typer.Argument(help="An enrollment token from `cdcca-edge cloud enroll-token`.")],
    state: StateOpt,
    json_out: JsonOpt = False,
) -> None:
    """Enroll this device: its id and token, and the cohort's TUF root, go into --state."""
    from cdcca_edge.runtime.sync_client import SyncClient

    enr = SyncClient(state).enroll(url, token)
    if json_out:
        print_json({"device_id": enr.device_id, "cohort": enr.cohort, "url": enr.url})
    else:
        out.print(f"enrolled as {enr.device_id} in cohort {enr.cohort}", highlight=False)


@app.command("upload")
def upload(
    bundles: Annotated[list[Path], typer.Argument(help="Uplink bundles (.cdcu).")],
    state: StateOpt,
    json_out: JsonOpt = False,
) -> None:
    """Upload uplink bundles (a bundle already stored is acknowledged again)."""
    from cdcca_edge.runtime.sync_client import SyncClient

    client = SyncClient(state)
    docs = [{"bundle": str(b), **client.upload(b)} for b in bundles]
    if json_out:
        print_json(docs)
    else:
        for d in docs:
            out.print(f"{d['bundle']}: {d['samples']} samples, stored {d['stored']}", highlight=False)


@app.command("update")
def update(
    model: Annotated[Path, typer.Argument(help="The device's artefact (GGUF file, ONNX directory or bundle), patched in place.")],
    state: StateOpt,
    json_out: JsonOpt = False,
) -> None:
    """Ask the service for this model's update; fetch it through TUF (signed, fresh, never
    rolled back), apply it (a delta in place; a whole artefact by atomic replacement),
    check the identity and report it."""
    from cdcca_edge.runtime.sync_client import SyncClient, apply_update

    doc = apply_update(SyncClient(state), model, progress=lambda m: err.print(m, highlight=False))
    if json_out:
        print_json(doc)
    elif doc["update"] is None:
        out.print(f"{model}: version {doc['version']}, the latest", highlight=False)
    else:
        out.print(f"{model}: {doc['update']} to version {doc['version']} ({doc['bytes']:,} bytes fetched)",
                  highlight=False)
