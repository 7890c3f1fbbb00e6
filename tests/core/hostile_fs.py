"""Hostile file-system entries for the reader tests: FIFOs, symlink loops, links out of a
directory, directories where files belong, names the OS refuses.

A FIFO read by mistake blocks forever; :func:`no_hang` turns that into a test failure
instead of a stuck suite.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LONG_NAME = "x" * 5000  # ENAMETOOLONG on every common file system


class Hung(Exception):
    """A reader blocked (on a FIFO, typically) instead of refusing the input."""


@contextmanager
def no_hang(seconds: int = 5) -> Iterator[None]:
    """Fail with :class:`Hung` if the body blocks for more than ``seconds``."""

    def _alarm(signum, frame):  # noqa: ARG001
        raise Hung(f"reader blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def add_traps(d: Path, outside: Path) -> dict[str, str]:
    """Create, inside ``d``, entries no reader may follow or open, and return their names
    by kind. ``outside`` is a regular file outside ``d``.
    """
    os.mkfifo(d / "fifo")
    (d / "emptydir").mkdir()
    os.symlink("loop", d / "loop")  # ELOOP: a link to itself
    os.symlink(outside, d / "link_out")  # a link to a file outside the directory
    os.symlink("no-such-file", d / "dangling")
    return {"fifo": "fifo", "dir": "emptydir", "loop": "loop", "link_out": "link_out",
            "dangling": "dangling"}


# Path strings that are hostile whatever the directory holds.
HOSTILE_PATHS = [
    "", ".", "..", "../outside.bin", "/etc/passwd", "/dev/zero", "a\0b", LONG_NAME,
    LONG_NAME + "/x", "sub/" * 200 + "x", "\udcff", "é/ü", " ", "\\..\\x", "fifo/x",
]
