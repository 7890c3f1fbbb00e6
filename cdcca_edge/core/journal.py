"""The patch journal (`MODEL.gguf.cdcca-journal`, or `cdcca-journal` in a directory): what
a patch is about to write, bound to the artefact it belongs to, and how recovery reads,
checks and replays it. Spec: docs/formats/delta.md, sections 6.1 and 6.2.

Layout: ``CDCJRNL2``, u64 meta length, the meta JSON (delta digest, artefact format,
layout digest, each data file's key, size, inode and device); entries (u16 file index,
u32 span count, u64 offsets[n], u32 lengths[n], the spans' original bytes, then their new
bytes); ``CDCJEND2``, u64 entry count, SHA-256 of everything before the end marker.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cdcca_edge.core.artifact import ONNX_MODEL_NAME, Artifact
from cdcca_edge.core.bundle import MANIFEST_NAME
from cdcca_edge.core.errors import CdccaError, FormatError
from cdcca_edge.core.fileio import fsync_dir, open_regular
from cdcca_edge.core.spans import write_spans
from cdcca_edge.core.state import layout_digest

PIECE = 1 << 20  # largest span handed to an encoding at once (and journaled as one)
JOURNAL_NAME = "cdcca-journal"  # inside an ONNX or bundle directory
JOURNAL_SUFFIX = ".cdcca-journal"  # beside a GGUF file
JOURNAL_MAGIC = b"CDCJRNL2"
JOURNAL_END = b"CDCJEND2"
JOURNAL_ENTRY = struct.Struct("<HI")  # file index, number of spans; then u64 offsets[n],
# u32 lengths[n], the spans' original bytes, then their new bytes (each concatenated)
MAX_JOURNAL_META = 1 << 20
MAX_JOURNAL_FILES = 1 << 12
MAX_ENTRY_SPANS = 1 << 22
_U64 = struct.Struct("<Q")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# --- locations ---------------------------------------------------------------------------


def journal_path_for(path: str | Path) -> Path:
    """``MODEL.gguf.cdcca-journal`` beside a GGUF file; ``cdcca-journal`` inside an ONNX
    or bundle directory (given as the directory, its model.onnx or its manifest)."""
    p = Path(path)
    if p.is_dir():
        return p / JOURNAL_NAME
    if p.name in (ONNX_MODEL_NAME, MANIFEST_NAME):
        return p.parent / JOURNAL_NAME
    return p.with_name(p.name + JOURNAL_SUFFIX)


def journal_path(art: Artifact) -> Path:
    return journal_path_for(art.path)


def present(p: Path) -> bool:
    """Anything at ``p``, a dangling symlink or a FIFO included (they are quarantined)."""
    return os.path.lexists(p)


# --- journal -------------------------------------------------------------------------------


@dataclass
class JournalEntry:
    """One journal entry: spans of one data file, their old bytes at ``data_pos`` in the
    journal and their new bytes right after."""

    fi: int
    offsets: Any  # (n,) int64 absolute file offsets
    lengths: Any  # (n,) int64
    data_pos: int

    @property
    def total(self) -> int:
        return int(self.lengths.sum())


class JournalWriter:
    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.f: BinaryIO = open(path, "xb")  # x: never clobber a journal we did not recover
        self.h = hashlib.sha256()
        self.entries: list[JournalEntry] = []
        self.pos = 0
        raw = json.dumps(meta, sort_keys=True).encode()
        self._write(JOURNAL_MAGIC + _U64.pack(len(raw)) + raw)

    def _write(self, b: bytes | memoryview) -> None:
        self.f.write(b)
        self.h.update(b)
        self.pos += len(b)

    def entry(self, file_index: int, offsets: Any, lengths: Any, old: bytes, new: bytes) -> None:
        """One window's spans: absolute offsets (n,), lengths (n,), old and new bytes."""
        import numpy as np

        self._write(JOURNAL_ENTRY.pack(file_index, len(offsets)))
        self._write(np.asarray(offsets, "<u8").tobytes() + np.asarray(lengths, "<u4").tobytes())
        self.entries.append(JournalEntry(file_index, np.asarray(offsets, np.int64),
                                   np.asarray(lengths, np.int64), self.pos))
        self._write(old)
        self._write(new)

    def finish(self) -> None:
        self.f.write(JOURNAL_END + _U64.pack(len(self.entries)) + self.h.digest())
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        fsync_dir(self.path.parent)


class JournalUnusable(Exception):
    """A journal that must not be applied to the artefact at this path (the reason)."""


def _open_journal(path: Path) -> BinaryIO:
    """``path`` opened for reading if it is a regular file and not a symlink (a FIFO
    would block the reader forever; a symlink could point anywhere).

    Raises:
        JournalUnusable: anything else.
    """
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise JournalUnusable("it is not a regular file")
        return open_regular(path, "a patch journal")
    except FormatError as exc:
        raise JournalUnusable("it is not a regular file") from exc
    except OSError as exc:
        raise JournalUnusable(f"cannot open it ({exc.strerror})") from exc


def read_journal(path: Path) -> tuple[dict[str, Any], list[JournalEntry]] | None:
    """(meta, entries) of a complete journal; None if it is incomplete (the crash came
    before it was finished, so no model byte had been written).

    Raises:
        JournalUnusable: not a regular file, or complete but malformed.
    """
    import numpy as np

    with _open_journal(path) as f:
        size = os.fstat(f.fileno()).st_size
        tail = len(JOURNAL_END) + _U64.size + 32
        head = f.read(len(JOURNAL_MAGIC) + _U64.size)
        if len(head) < len(JOURNAL_MAGIC) + _U64.size or head[:8] != JOURNAL_MAGIC:
            return None
        (mlen,) = _U64.unpack(head[8:])
        if mlen > MAX_JOURNAL_META or len(head) + mlen + tail > size:
            return None
        h = hashlib.sha256(head)
        raw = f.read(mlen)
        h.update(raw)
        entries = []
        pos = len(head) + mlen
        while pos < size - tail:
            eh = f.read(JOURNAL_ENTRY.size)
            if len(eh) < JOURNAL_ENTRY.size:
                return None
            fi, n = JOURNAL_ENTRY.unpack(eh)
            if n > MAX_ENTRY_SPANS or pos + JOURNAL_ENTRY.size + 12 * n > size - tail:
                return None
            arrays = f.read(12 * n)
            h.update(eh)
            h.update(arrays)
            offsets = np.frombuffer(arrays, "<u8", count=n).astype(np.int64)
            lengths = np.frombuffer(arrays, "<u4", offset=8 * n).astype(np.int64)
            data_pos = pos + JOURNAL_ENTRY.size + 12 * n
            total = int(lengths.sum())
            if data_pos + 2 * total > size - tail:
                return None
            left = 2 * total
            while left:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:  # shrank while being read: not a complete journal
                    return None
                h.update(chunk)
                left -= len(chunk)
            entries.append(JournalEntry(fi, offsets, lengths, data_pos))
            pos = data_pos + 2 * total
        end = f.read(tail)
        if end[:8] != JOURNAL_END or _U64.unpack(end[8:16])[0] != len(entries) or end[16:] != h.digest():
            return None
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise JournalUnusable(f"its header is not JSON ({exc})") from exc
    check_meta(meta)
    return meta, entries


def check_meta(meta: Any) -> None:
    def bad(why: str) -> JournalUnusable:
        return JournalUnusable(f"its header {why}")

    if not isinstance(meta, dict):
        raise bad("is not a JSON object")
    for k in ("delta_digest", "base_identity", "target_identity", "layout"):
        if not isinstance(meta.get(k), str) or not _HEX64.match(meta[k]):
            raise bad(f"has no valid {k!r}")
    for k in ("from_version", "to_version"):
        if not isinstance(meta.get(k), int) or isinstance(meta[k], bool):
            raise bad(f"has no integer {k!r}")
    if meta.get("artifact_format") not in ("gguf", "onnx", "bundle"):
        raise bad("names no artefact format")
    files = meta.get("files")
    if not isinstance(files, list) or not 0 < len(files) <= MAX_JOURNAL_FILES:
        raise bad("lists no files")
    for f in files:
        if not (isinstance(f, dict) and isinstance(f.get("key"), str)
                and all(isinstance(f.get(k), int) and not isinstance(f.get(k), bool)
                        for k in ("size", "ino", "dev"))):
            raise bad("has a malformed file entry")


def bind(art: Artifact, meta: dict[str, Any], entries: list[JournalEntry]) -> list[Path]:
    """Check that the journal was written for exactly this artefact and that every span
    lies inside one of its tensors; returns the data files, by index.

    Raises:
        JournalUnusable: naming the first mismatch.
    """
    import numpy as np

    if meta["artifact_format"] != art.format:
        raise JournalUnusable(f"it was written for a {meta['artifact_format']} artefact, this is {art.format}")
    if layout_digest(art) != meta["layout"]:
        raise JournalUnusable("the model at this path has another tensor layout than the one it "
                        "was written for (another model was put here)")
    files = []
    for f in meta["files"]:
        try:
            path = art.file_for_key(f["key"])
        except CdccaError:
            raise JournalUnusable(f"it names data file {f['key']!r}, which this artefact lacks") from None
        st = os.stat(path)
        if (st.st_size, st.st_ino, st.st_dev) != (f["size"], f["ino"], f["dev"]):
            raise JournalUnusable(f"{path.name} is not the file it was written for (size or inode "
                            "differ: the file was replaced)")
        files.append(path)
    regions: dict[int, tuple[Any, Any]] = {}
    for i, p in enumerate(files):
        spans = sorted((t.offset, t.offset + t.nbytes) for t in art.tensors if t.file == p and t.nbytes)
        regions[i] = (np.array([a for a, _ in spans], np.int64), np.array([b for _, b in spans], np.int64))
    for e in entries:
        if e.fi >= len(files):
            raise JournalUnusable(f"an entry names file index {e.fi} of {len(files)}")
        if not len(e.offsets):
            continue
        if (e.lengths <= 0).any() or (e.lengths > PIECE).any():
            raise JournalUnusable("an entry has a span of a length no patcher writes")
        starts, ends = regions[e.fi]
        k = np.searchsorted(starts, e.offsets, side="right") - 1
        # offset <= end - length, not offset + length <= end: an offset near 2**63 would
        # overflow the sum into a negative number that passes (found by hypothesis)
        ok = (k >= 0) & (e.offsets <= ends[np.maximum(k, 0)] - e.lengths) if len(starts) else k < -1
        if not np.all(ok):
            raise JournalUnusable("a span lies outside every tensor of the model (it would write "
                            "into the header or past the end)")
    return files


def classify(path: Path, files: list[Path], entries: list[JournalEntry]) -> str:
    """"old" (no span written yet), "new" (every span written) or "mixed"; every byte
    of every span must be its original or its new value.

    Raises:
        JournalUnusable: a byte is neither (the file holds other bytes than the journal's model).
    """
    import numpy as np

    seen_old = seen_new = True
    fds = [os.open(f, os.O_RDONLY) for f in files]
    try:
        with _open_journal(path) as j:
            jfd = j.fileno()
            for e in entries:
                total = e.total
                old = np.frombuffer(os.pread(jfd, total, e.data_pos), np.uint8)
                new = np.frombuffer(os.pread(jfd, total, e.data_pos + total), np.uint8)
                cur = np.frombuffer(b"".join(os.pread(fds[e.fi], n, off) for off, n in
                                             zip(e.offsets.tolist(), e.lengths.tolist())), np.uint8)
                if cur.size != total:
                    raise JournalUnusable("a span runs past the end of its file")
                is_old, is_new = cur == old, cur == new
                if not np.all(is_old | is_new):
                    raise JournalUnusable("the model's bytes are neither the original nor the new "
                                    "ones (another model was put here)")
                seen_old &= bool(is_old.all())
                seen_new &= bool(is_new.all())
    finally:
        for fd in fds:
            os.close(fd)
    return "old" if seen_old else ("new" if seen_new else "mixed")


def restore(path: Path, files: list[Path], entries: list[JournalEntry], which: int = 0) -> None:
    """Write each entry's old (``which`` 0) or new (1) bytes back, then fsync."""
    fds = [os.open(f, os.O_RDWR) for f in files]
    try:
        with open(path, "rb") as j:
            for e in entries:
                j.seek(e.data_pos + which * e.total)
                write_spans(fds[e.fi], e.offsets, e.lengths, j.read(e.total))
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)


def quarantine(jp: Path, why: str) -> str:
    aside = jp.with_name(f"{jp.name}.quarantined-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
                         f"-{os.getpid()}")
    os.rename(jp, aside)
    fsync_dir(jp.parent)
    return f"quarantined: {why}; set aside as {aside.name}, the model was not touched"
