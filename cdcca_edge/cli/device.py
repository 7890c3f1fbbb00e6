"""`cdcca-edge device`: the device agent (a local OpenAI-compatible API over the device
runtime). Device path: no torch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cdcca_edge.cli._output import err
from cdcca_edge.cli.options import Backend, BackendOpt, value

app = typer.Typer(help="The device agent: serve local apps over an OpenAI-compatible API.", no_args_is_help=True)


@app.command("serve")
def serve(
    model: Annotated[Path, typer.Option(help="The device artefact: .gguf file, ONNX export directory or bundle.")],
    host: Annotated[str, typer.Option(help="Interface to listen on (keep it local).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8700,
    backend: BackendOpt = Backend.auto,
    queue_max: Annotated[int, typer.Option(help="Requests that may wait for the model (429 beyond).")] = 16,
    model_name: Annotated[Optional[str], typer.Option(help="The model id /v1/models shows (default: the "
                                                      "file name).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads of the runtime.")] = None,
    n_ctx: Annotated[Optional[int], typer.Option(help="Context size (tokens).")] = None,
    cloud_state: Annotated[Optional[Path], typer.Option(
        help="Sync with the cloud service: the state directory of `cdcca-edge sync enroll`.")] = None,
    calib: Annotated[Optional[Path], typer.Option(
        help="UTS calibration (`uplink calibrate`): answers above its threshold are spooled for upload "
             "(without --cloud-state they wait in the spool for a later agent with one).")] = None,
    spool: Annotated[Optional[Path], typer.Option(help="Spool directory (default: MODEL.spool beside it).")] = None,
    spool_max_mb: Annotated[int, typer.Option(help="Spool cap, MiB (oldest samples dropped first).")] = 64,
    sync_every: Annotated[float, typer.Option(help="Seconds between syncs with the cloud.")] = 300.0,
    probe: Annotated[Optional[list[str]], typer.Option(
        help="Health-check prompt after an update (repeatable).")] = None,
) -> None:
    """Serve MODEL to local apps: /v1/chat/completions, /v1/completions (streaming or not),
    /v1/models, /healthz, /metrics. Every answer carries its uncertainty in `cdcca`."""
    import uvicorn

    from cdcca_edge.runtime.agent import create_agent_app

    if queue_max < 1:
        raise typer.BadParameter("--queue-max must be at least 1")
    from cdcca_edge.runtime.agent import SyncConfig

    kwargs = {k: v for k, v in (("n_threads", threads), ("n_ctx", n_ctx)) if v is not None}
    sync = SyncConfig(state=cloud_state, calib=calib, spool=spool, spool_max_bytes=spool_max_mb << 20,
                      every=sync_every, probes=tuple(probe) if probe else SyncConfig.probes)
    err.print(f"cdcca-edge device: serving {model} on http://{host}:{port}/v1"
              + (f", syncing every {sync_every:g} s" if cloud_state else ""), highlight=False)
    uvicorn.run(create_agent_app(model, value(backend), queue_max, model_name, sync=sync, **kwargs), host=host,
                port=port, log_level="warning")
