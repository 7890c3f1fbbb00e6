"""Files: opening what a reader is handed or discovers (regular files only), and
writing files and directories all or nothing (one helper each, used by every writer).

A FIFO opened for reading blocks until a writer appears, and a device or directory has
no fixed bytes to map. Readers therefore open with ``O_NONBLOCK`` (which does not affect
regular files), check the open descriptor with ``fstat`` (no window between check and
use), and refuse anything that is not a regular file with a :class:`FormatError`.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

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


def short_repr(s: str, n: int = 80) -> str:
    """``repr(s)``, cut to about ``n`` characters: hostile names can be any length."""
    r = repr(s)
    return r if len(r) <= n else f"{r[:n]}...' ({len(s)} characters)"


def entry_inside(root: Path, rel: str, what: str, where: str) -> tuple[Path, os.stat_result | None]:
    """Find the file or directory ``rel`` names inside ``root`` (a resolved directory).

    The rule (docs/formats/artifact.md, section 1.1): ``rel`` is relative, stays inside
    ``root`` once normalised, and no component of it is a symbolic link, so the path
    checked is the path later opened and patched in place.

    Returns:
        The path and its ``stat``, or ``None`` in place of the stat when nothing is there.

    Raises:
        FormatError: ``rel`` is absolute, holds a NUL byte, leaves ``root``, names
            ``root`` itself, goes through a symbolic link, or cannot be looked up.
        PermissionError: the file system denies the look-up (an environment problem).
    """
    shown = short_repr(rel)
    if "\0" in rel:
        raise FormatError(f"{what} {shown} holds a NUL byte")
    if os.path.isabs(rel):
        raise FormatError(f"{what} {shown} is an absolute path; it must be relative to {where}")
    lexical = Path(os.path.normpath(root / rel))
    if lexical == root:
        raise FormatError(f"{what} {shown} names {where} itself, not a file in it")
    if root not in lexical.parents:
        raise FormatError(f"{what} {shown} points outside {where}")
    try:
        real = lexical.resolve()
    except RuntimeError as exc:  # Python < 3.13: a link loop
        raise FormatError(f"{what} {shown} goes through a symbolic link loop ({exc})") from exc
    except OSError as exc:
        raise FormatError(f"{what} {shown} cannot be used ({exc.strerror})") from exc
    if real != lexical:
        raise FormatError(f"{what} {shown} is or goes through a symbolic link (to {real}); keep "
                          f"the real file in {where}")
    try:
        return real, os.stat(real)
    except (FileNotFoundError, NotADirectoryError):
        return real, None
    except PermissionError:
        raise
    except OSError as exc:  # ENAMETOOLONG, ELOOP, ...: the name is the problem
        raise FormatError(f"{what} {shown} cannot be used ({exc.strerror})") from exc


# --- writing all or nothing ---------------------------------------------------------------


def default_mode() -> int:
    """0o666 less the process umask: what open() would have given (mkstemp gives 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_file(tmp: Path, path: Path, *, mode: int | None = None, durable: bool = True) -> None:
    """Move the finished temporary file ``tmp`` onto ``path`` (same directory) atomically:
    fsync it, set its mode (default: what open() gives), rename, fsync the directory."""
    if durable:
        fsync_file(tmp)
    os.chmod(tmp, default_mode() if mode is None else mode)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


@contextmanager
def atomic_file(path: str | Path, *, durable: bool = True, mode: int | None = None,
                prefix: str | None = None) -> Iterator[BinaryIO]:
    """Write ``path`` all or nothing: yields a temporary file in its directory (named
    ``prefix``..., default ``.NAME.``...) that replaces ``path`` when the block ends, and
    is deleted if it raises. ``durable``: fsync the file and the directory (a cache that
    is checked before use need not be)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=prefix or f".{path.name}.", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        commit_file(tmp, path, mode=mode, durable=False)
        if durable:
            fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_dir(tmp: Path, out: Path, *, durable: bool = True) -> None:
    """Put the finished directory ``tmp`` (a sibling of ``out``) in the place of ``out``,
    whole: no stale file of an earlier ``out`` survives, and a crash in between leaves
    both under hidden names, never a mixture. ``tmp`` is gone afterwards either way."""
    old = out.parent / f".{out.name}.replaced"
    try:
        os.chmod(tmp, default_mode() | 0o111)
        if durable:  # every file, then every directory (their entries), deepest first
            for p in sorted(tmp.rglob("*"), key=lambda q: -len(q.parts)):
                if p.is_symlink():
                    continue
                if p.is_file():
                    fsync_file(p)
                elif p.is_dir():
                    fsync_dir(p)
            fsync_dir(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        if durable:
            fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
