"""Opening the files a reader is handed or discovers: regular files only.

A FIFO opened for reading blocks until a writer appears, and a device or directory has
no fixed bytes to map. Readers therefore open with ``O_NONBLOCK`` (which does not affect
regular files), check the open descriptor with ``fstat`` (no window between check and
use), and refuse anything that is not a regular file with a :class:`FormatError`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from cdcca_edge.core.errors import FormatError


def open_regular(path: str | Path, what: str = "file") -> BinaryIO:
    """Open ``path`` for binary reading if it is a regular file (symbolic links followed).

    Args:
        path: the file to open.
        what: what the caller expected, for the message ("a GGUF file", ...).

    Raises:
        FormatError: ``path`` is a FIFO, socket, device or directory.
        OSError: it cannot be opened (missing, permission denied, ...).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                    else "a socket" if stat.S_ISSOCK(mode) else "a device")
            raise FormatError(f"{path}: not a regular file ({kind}), expected {what}")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
