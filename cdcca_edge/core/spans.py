"""Windowed I/O on model files: the spans a record rewrites, read in bounded windows
with pread (never a map: a read fault on a hole of a sparse file allocates it on some
file systems, and on a full disk that is a SIGBUS) and written with pwrite."""

from __future__ import annotations

import errno
import os
from typing import Any, Iterator

from cdcca_edge.core.encodings import Plan
from cdcca_edge.core.errors import IntegrityError, StorageError

def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def write_spans(fd: int, offsets: Any, lengths: Any, data: bytes | memoryview) -> None:
    """Write ``data`` (the spans' bytes, concatenated) at the spans, one pwrite per run of
    contiguous spans: through the descriptor, so a full disk raises ENOSPC instead of
    killing the process with SIGBUS as a write through a map would."""
    import numpy as np

    mv = memoryview(data)
    offs, lens = offsets, lengths
    if not len(offs):
        return
    breaks = np.flatnonzero(offs[1:] != offs[:-1] + lens[:-1]) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(offs)]])
    cum = np.concatenate([[0], np.cumsum(lens)])
    for a, b in zip(starts.tolist(), stops.tolist()):
        pwrite_all(fd, mv[int(cum[a]) : int(cum[b])], int(offs[a]))


def windows(plan: Plan, chunk: int) -> Iterator[tuple[int, int, int, int]]:
    """(first span, end span, window start, window length): consecutive spans whose
    extent fits one read of at most ``chunk`` bytes (spans are at most PIECE, so every
    window holds at least one)."""
    import numpy as np

    offs, ends = plan.offsets, plan.offsets + plan.lengths
    n = len(offs)
    i = 0
    while i < n:
        start = int(offs[i])
        j = max(i + 1, int(np.searchsorted(ends, start + chunk, side="right")))
        yield i, j, start, int(ends[j - 1]) - start
        i = j


_FANCY_MAX = 1 << 20  # touched bytes per window up to which spans are gathered by index
_SYSCALL_BYTES = 16 << 10  # a read costs about as much as copying this many bytes more


def pread_exact(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise IntegrityError(f"the model file ended inside a tensor (offset {offset + len(data)}); "
                             "it changed while being patched")
    return data


def gather(fd: int, start: int, length: int, rel: Any, lens: Any) -> bytes:
    """The bytes of spans at ``rel`` (offsets within the ``length`` bytes at ``start``),
    concatenated. The window is read with pread, never mapped: a read fault on a hole of
    a sparse file allocates it on some file systems (tmpfs), and on a full disk that is a
    SIGBUS. Many small spans (scattered blocks) are gathered with one numpy index."""
    import numpy as np

    total = int(lens.sum())
    if length > 2 * total + len(rel) * _SYSCALL_BYTES:  # sparse: read the spans, not the window
        return b"".join(pread_exact(fd, int(n), start + int(a)) for a, n in zip(rel, lens))
    buf = bytearray(length)
    view = memoryview(buf)
    got = 0
    while got < length:
        n = os.preadv(fd, [view[got:]], start + got)
        if not n:
            raise IntegrityError(f"the model file ended inside a tensor (offset {start + got}); "
                                 "it changed while being patched")
        got += n
    view.release()
    if len(rel) >= 16 and total <= _FANCY_MAX:
        first = np.repeat(rel - (np.cumsum(lens) - lens), lens)
        return np.frombuffer(buf, np.uint8)[first + np.arange(total)].tobytes()
    mv = memoryview(buf)
    try:
        return b"".join([mv[a : a + n] for a, n in zip(rel.tolist(), lens.tolist())])
    finally:
        mv.release()


def preallocate(fd: int, start: int, length: int) -> None:
    """Make sure the blocks about to be written exist (a sparse model file has holes; a
    full disk must fail here, before any model byte is written)."""
    try:
        os.posix_fallocate(fd, start, length)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENODEV, errno.ENOSYS):
            return  # the file system cannot say in advance; pwrite still fails cleanly
        raise StorageError(exc.errno, f"no space for the new bytes of the model "
                           f"({exc.strerror}); free some space. The model is unchanged") from exc
