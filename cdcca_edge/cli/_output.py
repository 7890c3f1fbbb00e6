"""Where CLI output goes: results on stdout, progress and logs on stderr."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Iterator

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
