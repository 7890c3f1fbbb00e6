"""Where CLI output goes: results on stdout, progress and logs on stderr."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from rich.console import Console

err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def print_json(doc: Any) -> None:
    """Print exactly one JSON document on stdout."""
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


@contextmanager
def stage_status(enabled: bool) -> Iterator[Any]:
    """A spinner on stderr showing the current stage; yields a ``on_stage(str)`` callback.

    Disabled (a no-op callback) under ``--json`` or when stderr is not a terminal, where
    each stage is logged as one line instead.
    """
    if not enabled:
        yield lambda _msg: None
        return
    if not err.is_terminal:
        yield lambda msg: err.print(f"[dim]- {msg}[/dim]", highlight=False)
        return
    with err.status("starting") as status:
        yield lambda msg: status.update(msg)


@contextmanager
def progress(total: int, what: str, quiet: bool) -> Iterator[Callable[[int], None]]:
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
def stage_progress(quiet: bool) -> Iterator[Callable[[str, int, int], None]]:
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


def report_recovery(artifact: Path, outcome: str | None) -> None:
    """Say on stderr what recovery did when a model was opened (nothing if nothing)."""
    if outcome:
        err.print(f"{artifact}: an interrupted patch was found first: {outcome}", highlight=False)
