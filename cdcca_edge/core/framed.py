"""The framed container the delta (`.cdcd`) and uplink (`.cdcu`) files share: a
preamble (8-byte magic, u32 version, u32 flags, u64 header length), a JSON header, a
payload, and a SHA-256 digest of everything before it; the delta adds a signature after
the digest. Specs: docs/formats/delta.md section 2, docs/formats/uplink.md section 2.

Readers check the preamble and stream the payload through the digest (memory does not
grow with the file); writers write all or nothing, durably (core.fileio.atomic_file).
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import IO, Any, Callable, Iterable

from cdcca_edge.core.errors import FormatError, IntegrityError
from cdcca_edge.core.fileio import atomic_file

PREAMBLE = struct.Struct("<8sIIQ")  # magic, version, flags, header length
DIGEST_SIZE = 32  # SHA-256
READ_CHUNK = 1 << 20  # bytes read (and hashed) per step


def read_preamble(f: IO[bytes], path: Path, size: int, magic: bytes, what: str) -> tuple[bytes, int, int, int]:
    """(raw preamble, version, flags, header length); the caller checks version and flags.

    Raises:
        FormatError: too short for a preamble, or another magic.
    """
    pre = f.read(PREAMBLE.size)
    if len(pre) < PREAMBLE.size:
        raise FormatError(f"{path}: {size} bytes is too short to be {what}")
    got, version, flags, hlen = PREAMBLE.unpack(pre)
    if got != magic:
        raise FormatError(f"{path}: bad magic {got!r}, expected {magic!r}: not {what}")
    return pre, version, flags, hlen


def digest_payload(f: IO[bytes], h: Any, n: int, on_short: Callable[[], Exception]) -> None:
    """Stream the next ``n`` bytes of ``f`` into the digest ``h``; a file that ends first
    raises ``on_short()``."""
    while n:
        chunk = f.read(min(READ_CHUNK, n))
        if not chunk:
            raise on_short()
        h.update(chunk)
        n -= len(chunk)


def check_digest(f: IO[bytes], h: Any, path: Path, fix: str) -> None:
    """Read the stored digest and compare it with ``h``.

    Raises:
        FormatError: the file ends inside the digest. IntegrityError: it differs.
    """
    stored = f.read(DIGEST_SIZE)
    if len(stored) != DIGEST_SIZE:
        raise FormatError(f"{path}: file is truncated in its trailer")
    if h.digest() != stored:
        raise IntegrityError(f"{path}: digest mismatch: {fix}")


def write_framed(path: str | Path, magic: bytes, version: int, flags: int, header: bytes,
                 payload: Iterable[bytes], trailer: Callable[[bytes], bytes] = lambda _d: b"") -> bytes:
    """Write a framed file atomically and durably; returns its digest (raw).
    ``trailer(digest)``: bytes written after the digest (the delta's signature)."""
    pre = PREAMBLE.pack(magic, version, flags, len(header))
    h = hashlib.sha256()
    with atomic_file(path, mode=0o644) as out:
        for part in (pre, header):
            h.update(part)
            out.write(part)
        for part in payload:
            h.update(part)
            out.write(part)
        digest = h.digest()
        out.write(digest)
        out.write(trailer(digest))
    return digest
