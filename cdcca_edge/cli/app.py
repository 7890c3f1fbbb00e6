"""The `cdcca-edge` typer app: one module per command group, each command thin (options
in, one library call, result out). Commands import the library lazily, so the device
commands (`run`, `inspect`, `patch`) never load torch."""

from __future__ import annotations

from typing import Annotated

import typer

from cdcca_edge import __version__
from cdcca_edge.cli import cloud, delta, device, sync, uplink
from cdcca_edge.cli.demo import demo
from cdcca_edge.cli.distill import distill
from cdcca_edge.cli.export import export
from cdcca_edge.cli.inspect import inspect
from cdcca_edge.cli.patch import patch
from cdcca_edge.cli.run import run

app = typer.Typer(
    name="cdcca-edge",
    help="Cloud-device collaborative adaptation of LLMs: export, run, uplink, distill, patch.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


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


for command in (export, inspect, run, patch, distill, demo):
    app.command()(command)
app.add_typer(delta.app, name="delta")
app.add_typer(uplink.app, name="uplink")
app.add_typer(cloud.app, name="cloud")
app.add_typer(sync.app, name="sync")
app.add_typer(device.app, name="device")
