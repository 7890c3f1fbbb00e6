"""Content-addressed blob store: every artefact, uplink bundle and delta the service
keeps is a file named by its SHA-256, written durably (temporary file, fsync, rename,
fsync of the directory) before anyone is told it exists."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import BinaryIO, Iterator

from cdcca_edge.core.errors import UsageError
from cdcca_edge.core.fileio import atomic_file

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
        """Store a copy of ``src``; returns (sha256, size). Idempotent."""
        with open(src, "rb") as f:
            return self.put_stream(f, sha256)

    def put_stream(self, f: BinaryIO, sha256: str | None = None) -> tuple[str, int]:
        """Store what ``f`` yields; (sha256, size). With ``sha256`` given, a stream that
        does not hash to it is refused (UsageError) and nothing is stored."""
        h = hashlib.sha256()
        tmp_dir = self.root / "tmp"
        tmp_dir.mkdir(exist_ok=True)
        size = 0
        with atomic_file(tmp_dir / f"incoming-{os.getpid()}-{id(f)}", mode=0o644) as out:
            while chunk := f.read(COPY_CHUNK):
                h.update(chunk)
                out.write(chunk)
                size += len(chunk)
        tmp = tmp_dir / f"incoming-{os.getpid()}-{id(f)}"
        digest = h.hexdigest()
        try:
            if sha256 is not None and digest != sha256:
                raise UsageError(f"content hashes to {digest[:16]}, not {sha256[:16]}")
            final = self.path(digest)
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)  # same file system: atomic; the content was fsync'd
            from cdcca_edge.core.fileio import fsync_dir

            fsync_dir(final.parent)
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
