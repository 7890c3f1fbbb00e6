"""Content-addressed blob store: every artefact, uplink bundle and delta the service
keeps is a file named by its SHA-256, written durably (temporary file, fsync, rename,
fsync of the directory) before anyone is told it exists."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

from cdcca_edge.core.errors import UsageError
from cdcca_edge.core.fileio import commit_file, fsync_dir

_SHA = re.compile(r"^[0-9a-f]{64}$")
COPY_CHUNK = 1 << 20


class BlobStore:
    """Blobs under ``root/ab/abcdef...`` (two-hex-digit fan-out)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not _SHA.fullmatch(sha256):
            raise UsageError(f"{sha256[:80]!r} is not a SHA-256 hex digest")
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put_file(self, src: str | Path, sha256: str | None = None) -> tuple[str, int]:
        """Store a copy of ``src`` (hashed while copied); returns (sha256, size).
        Idempotent. With ``sha256`` given, content that does not hash to it is refused
        (UsageError) and nothing is stored."""
        tmp_dir = self.root / "tmp"
        tmp_dir.mkdir(exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="incoming-", dir=tmp_dir)
        tmp = Path(name)
        h, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
                while chunk := f.read(COPY_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            digest = h.hexdigest()
            if sha256 is not None and digest != sha256:
                raise UsageError(f"content hashes to {digest[:16]}, not {sha256[:16]}")
            final = self.path(digest)
            if not final.parent.is_dir():
                final.parent.mkdir()
                fsync_dir(self.root)
            commit_file(tmp, final, mode=0o644)  # fsync, rename, fsync of the fan-out directory
        finally:
            tmp.unlink(missing_ok=True)
        return digest, size

    def read_range(self, sha256: str, start: int, end: int) -> Iterator[bytes]:
        """Bytes [start, end) of a blob, in chunks."""
        with open(self.path(sha256), "rb") as f:
            f.seek(start)
            left = end - start
            while left > 0:
                chunk = f.read(min(COPY_CHUNK, left))
                if not chunk:
                    return
                left -= len(chunk)
                yield chunk

    def count(self) -> int:
        return sum(1 for p in self.root.glob("??/*") if p.is_file())
