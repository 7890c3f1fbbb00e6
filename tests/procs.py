"""Helpers for tests that run real processes on the loopback interface."""

from __future__ import annotations

import socket
import time
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, until: Callable[[], Any], seconds: float = 300.0, every: float = 0.3) -> Any:
    """Poll ``until()`` until it returns something true (returned), or fail naming ``what``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = until()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")
