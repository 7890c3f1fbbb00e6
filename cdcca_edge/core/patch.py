"""Applying a delta to an artefact in place: checked, journaled, crash-safe.

Protocol (docs/formats/delta.md, section 6):

1. take an exclusive lock on the artefact (a server holds a shared one while it has the
   model mapped, so a patch never runs under a live reader); recover any journal a crash
   left behind;
2. read the delta (format, digest), check its signature against the trust policy, the
   artefact format, the base identity and the version rule, and decode every record
   against its tensor;
3. journal pass, one record at a time: read each touched region, compute its new bytes,
   check that no finite value becomes non-finite, check both the pre- and post-image
   digests, and append the original *and* new bytes to the journal; fsync it. Nothing
   in the model has been written yet, so any failure here only deletes the journal;
4. write pass: copy the new bytes from the journal into place through the file
   descriptor (a full disk is an error, never a SIGBUS); fsync the data files;
5. check that the touched tensors now give the delta's target identity (else roll back);
6. commit: atomically replace the state sidecar (identity, per-tensor digests, version);
7. remove the journal.

Any failure before step 6 restores the journal's bytes. After a crash, :func:`recover`
(run by the next patch and by every path that opens the model for serving) rolls back, or
forward when the commit is on disk — but only when the journal is bound to the artefact
at that path and every byte it would touch is either the original or the new one; any
other journal is quarantined, never applied. Memory is bounded by the read window
(``chunk_size``) and one record, not by the model or the delta. Model bytes are read
and written through the file descriptor, never a writable map.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
import stat
import struct
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Sequence

from cdcca_edge.core.artifact import (
    ID_CHUNK,
    MANIFEST_NAME,
    ONNX_MODEL_NAME,
    Artifact,
    digest_from_chunks,
    identity_digest,
    open_artifact,
    rehash_chunks,
    touched_chunks,
)
from cdcca_edge.core.delta_format import (
    ENC_REPLACE,
    MAX_RECORD_PAYLOAD,
    DeltaFile,
    DeltaHeader,
    Record,
    check_trust,
    read_delta,
    write_delta,
)
from cdcca_edge.core.encodings import Plan, check_finite, encode_runs, make_plan
from cdcca_edge.core.errors import (
    CdccaError,
    FormatError,
    IntegrityError,
    StorageError,
    UsageError,
)
from cdcca_edge.core.fileio import fsync_dir, open_regular
from cdcca_edge.core.ggml import type_layout
from cdcca_edge.core.lock import ArtifactLock, owner_path
from cdcca_edge.core.state import (
    ArtifactState,
    cached_artifact,
    current_identity,
    LeafCache,
    layout_digest,
    read_state,
    state_path,
    write_leaves,
    write_state,
)
from cdcca_edge.core.trust import Trust

DEFAULT_CHUNK = 4 << 20  # bytes of model read at once (peak memory); see docs/formats/delta.md
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
UNDO_KIND = "undo"  # header["created"]["kind"] of the undo deltas a device writes itself
DEFAULT_SERVE_WAIT = 60.0  # seconds a server waits for a running patch before giving up
_U64 = struct.Struct("<Q")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class PatchResult:
    artifact: Path
    delta: Path
    applied: bool  # False for a dry run or a delta already applied
    already_applied: bool
    dry_run: bool
    base_identity: str
    target_identity: str
    from_version: int
    to_version: int
    records: list[dict[str, Any]] = field(default_factory=list)
    region_bytes: int = 0  # bytes of the artefact rewritten
    identity_check: str = ""  # "state" (verified sidecar), "computed", or "migrated" (an
    # older sidecar: identity computed once under the current scheme, version kept)
    rehashed_bytes: int = 0  # model bytes hashed after the write to check the new identity
    version_before: int | None = None  # the state's version; None when unknown
    recovered: str | None = None  # what recovery did first, if a journal was found
    seconds: float = 0.0
    undo: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for k in ("artifact", "delta", "undo"):
            d[k] = None if d[k] is None else str(d[k])
        return d


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


def _present(p: Path) -> bool:
    """Anything at ``p``, a dangling symlink or a FIFO included (they are quarantined)."""
    return os.path.lexists(p)


# --- test hook: crash injection ------------------------------------------------------------

_crash_budget: list[int] = []


def _crash_point() -> None:
    """Test hook: with CDCCA_TEST_CRASH_AFTER=N set, the process SIGKILLs itself at the
    N-th crash point (each journal entry, each entry written, each fsync, the commit)."""
    if not _crash_budget:
        return
    _crash_budget[0] -= 1
    if _crash_budget[0] <= 0:
        os.kill(os.getpid(), signal.SIGKILL)


def _arm_crash_hook() -> None:
    _crash_budget.clear()
    n = os.environ.get("CDCCA_TEST_CRASH_AFTER")
    if n:
        _crash_budget.append(int(n))


# --- journal -------------------------------------------------------------------------------


@dataclass
class _Entry:
    """One journal entry: spans of one data file, their old bytes at ``data_pos`` in the
    journal and their new bytes right after."""

    fi: int
    offsets: Any  # (n,) int64 absolute file offsets
    lengths: Any  # (n,) int64
    data_pos: int

    @property
    def total(self) -> int:
        return int(self.lengths.sum())


class _JournalWriter:
    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.f: BinaryIO = open(path, "xb")  # x: never clobber a journal we did not recover
        self.h = hashlib.sha256()
        self.entries: list[_Entry] = []
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
        self.entries.append(_Entry(file_index, np.asarray(offsets, np.int64),
                                   np.asarray(lengths, np.int64), self.pos))
        self._write(old)
        self._write(new)

    def finish(self) -> None:
        self.f.write(JOURNAL_END + _U64.pack(len(self.entries)) + self.h.digest())
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        fsync_dir(self.path.parent)


class _Unusable(Exception):
    """A journal that must not be applied to the artefact at this path (the reason)."""


def _open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading if it is a regular file and not a symlink (a FIFO
    would block the reader forever; a symlink could point anywhere).

    Raises:
        _Unusable: anything else.
    """
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise _Unusable("it is not a regular file")
        return open_regular(path, "a patch journal")
    except FormatError as exc:
        raise _Unusable("it is not a regular file") from exc
    except OSError as exc:
        raise _Unusable(f"cannot open it ({exc.strerror})") from exc


def _read_journal(path: Path) -> tuple[dict[str, Any], list[_Entry]] | None:
    """(meta, entries) of a complete journal; None if it is incomplete (the crash came
    before it was finished, so no model byte had been written).

    Raises:
        _Unusable: not a regular file, or complete but malformed.
    """
    import numpy as np

    with _open_regular(path) as f:
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
                h.update(chunk)
                left -= len(chunk)
            entries.append(_Entry(fi, offsets, lengths, data_pos))
            pos = data_pos + 2 * total
        end = f.read(tail)
        if end[:8] != JOURNAL_END or _U64.unpack(end[8:16])[0] != len(entries) or end[16:] != h.digest():
            return None
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _Unusable(f"its header is not JSON ({exc})") from exc
    _check_meta(meta)
    return meta, entries


def _check_meta(meta: Any) -> None:
    def bad(why: str) -> _Unusable:
        return _Unusable(f"its header {why}")

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


def _bind(art: Artifact, meta: dict[str, Any], entries: list[_Entry]) -> list[Path]:
    """Check that the journal was written for exactly this artefact and that every span
    lies inside one of its tensors; returns the data files, by index.

    Raises:
        _Unusable: naming the first mismatch.
    """
    import numpy as np

    if meta["artifact_format"] != art.format:
        raise _Unusable(f"it was written for a {meta['artifact_format']} artefact, this is {art.format}")
    if layout_digest(art) != meta["layout"]:
        raise _Unusable("the model at this path has another tensor layout than the one it "
                        "was written for (another model was put here)")
    files = []
    for f in meta["files"]:
        try:
            path = art.file_for_key(f["key"])
        except CdccaError:
            raise _Unusable(f"it names data file {f['key']!r}, which this artefact lacks") from None
        st = os.stat(path)
        if (st.st_size, st.st_ino, st.st_dev) != (f["size"], f["ino"], f["dev"]):
            raise _Unusable(f"{path.name} is not the file it was written for (size or inode "
                            "differ: the file was replaced)")
        files.append(path)
    regions: dict[int, tuple[Any, Any]] = {}
    for i, p in enumerate(files):
        spans = sorted((t.offset, t.offset + t.nbytes) for t in art.tensors if t.file == p and t.nbytes)
        regions[i] = (np.array([a for a, _ in spans], np.int64), np.array([b for _, b in spans], np.int64))
    for e in entries:
        if e.fi >= len(files):
            raise _Unusable(f"an entry names file index {e.fi} of {len(files)}")
        if not len(e.offsets):
            continue
        if (e.lengths <= 0).any() or (e.lengths > PIECE).any():
            raise _Unusable("an entry has a span of a length no patcher writes")
        starts, ends = regions[e.fi]
        k = np.searchsorted(starts, e.offsets, side="right") - 1
        ok = (k >= 0) & (e.offsets + e.lengths <= ends[np.maximum(k, 0)]) if len(starts) else k < -1
        if not np.all(ok):
            raise _Unusable("a span lies outside every tensor of the model (it would write "
                            "into the header or past the end)")
    return files


def _classify(path: Path, files: list[Path], entries: list[_Entry]) -> str:
    """"old" (no span written yet), "new" (every span written) or "mixed"; every byte
    of every span must be its original or its new value.

    Raises:
        _Unusable: a byte is neither (the file holds other bytes than the journal's model).
    """
    import numpy as np

    seen_old = seen_new = True
    fds = [os.open(f, os.O_RDONLY) for f in files]
    try:
        with _open_regular(path) as j:
            jfd = j.fileno()
            for e in entries:
                total = e.total
                old = np.frombuffer(os.pread(jfd, total, e.data_pos), np.uint8)
                new = np.frombuffer(os.pread(jfd, total, e.data_pos + total), np.uint8)
                cur = np.frombuffer(b"".join(os.pread(fds[e.fi], n, off) for off, n in
                                             zip(e.offsets.tolist(), e.lengths.tolist())), np.uint8)
                if cur.size != total:
                    raise _Unusable("a span runs past the end of its file")
                is_old, is_new = cur == old, cur == new
                if not np.all(is_old | is_new):
                    raise _Unusable("the model's bytes are neither the original nor the new "
                                    "ones (another model was put here)")
                seen_old &= bool(is_old.all())
                seen_new &= bool(is_new.all())
    finally:
        for fd in fds:
            os.close(fd)
    return "old" if seen_old else ("new" if seen_new else "mixed")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _write_spans(fd: int, offsets: Any, lengths: Any, data: bytes | memoryview) -> None:
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
        _pwrite_all(fd, mv[int(cum[a]) : int(cum[b])], int(offs[a]))


def _restore(path: Path, files: list[Path], entries: list[_Entry], which: int = 0) -> None:
    """Write each entry's old (``which`` 0) or new (1) bytes back, then fsync."""
    fds = [os.open(f, os.O_RDWR) for f in files]
    try:
        with open(path, "rb") as j:
            for e in entries:
                j.seek(e.data_pos + which * e.total)
                _write_spans(fds[e.fi], e.offsets, e.lengths, j.read(e.total))
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)


def _quarantine(jp: Path, why: str) -> str:
    aside = jp.with_name(f"{jp.name}.quarantined-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
                         f"-{os.getpid()}")
    os.rename(jp, aside)
    fsync_dir(jp.parent)
    return f"quarantined: {why}; set aside as {aside.name}, the model was not touched"


def recover(model: str | Path | Artifact, _locked: bool = False, wait: float = 0.0) -> str | None:
    """Finish or undo a patch that a crash interrupted. Returns what was done
    (``"discarded"``, ``"rolled back"``, ``"rolled forward"``, or ``"quarantined: ..."``
    for a journal that does not belong to this artefact) or None if there was no journal.

    Raises:
        UsageError: another process holds the lock (after ``wait`` seconds).
    """
    if not isinstance(model, Artifact):
        model = owner_path(model)
        jp = journal_path_for(model)
        if not _present(jp):
            return None
        art = open_artifact(model)
    else:
        art = model
        jp = journal_path(art)
        if not _present(jp):
            return None
    if not _locked:
        with ArtifactLock(art.path, exclusive=True, wait=wait):
            return recover(art, _locked=True)
    try:
        parsed = _read_journal(jp)
        if parsed is None:
            outcome = "discarded"  # unfinished journal: no model byte was written yet
        else:
            meta, entries = parsed
            files = _bind(art, meta, entries)
            where = _classify(jp, files, entries)
            state = read_state(art)
            committed = (
                state is not None
                and state.identity == meta["target_identity"]
                and any(h.get("delta_digest") == meta["delta_digest"] for h in state.history[-1:])
            )
            if committed and where == "new":
                outcome = "rolled forward"
            else:
                if where != "old":
                    _restore(jp, files, entries)
                outcome = "rolled back"
    except _Unusable as exc:
        return _quarantine(jp, f"journal {jp.name}: {exc}")
    _remove_stale_state_temps(art)
    jp.unlink()
    fsync_dir(jp.parent)
    return outcome


def _remove_stale_state_temps(art: Artifact) -> None:
    """A kill inside the commit (between the temporary sidecar's creation and its rename)
    leaves ``.cdcca-state.*``; under the exclusive lock nobody else is writing one."""
    sp = state_path(art)
    for tmp in sp.parent.glob(".cdcca-state.*"):
        try:
            if stat.S_ISREG(os.lstat(tmp).st_mode):
                tmp.unlink()
        except OSError:
            continue


def hold_for_serving(path: str | Path, wait: float = DEFAULT_SERVE_WAIT) -> tuple[ArtifactLock, str | None]:
    """What every path that opens a model for serving calls first: a shared lock on the
    model (held until released: patchers then fail fast or wait), taken only once no
    journal is left, so a half-written model is never served. Returns the lock and what
    recovery did (None if nothing was interrupted).

    Raises:
        UsageError: a patch held the model for more than ``wait`` seconds.
    """
    owner = owner_path(path)
    jp = journal_path_for(owner)
    outcome = None
    for _ in range(8):
        lock = ArtifactLock(owner, exclusive=False, wait=wait)
        if not _present(jp):
            return lock, outcome
        lock.release()
        outcome = recover(owner, wait=wait) or outcome
    raise UsageError(f"{owner}: an interrupted patch's journal keeps reappearing at {jp}; "
                     "stop the process that patches this model")


# --- applying ------------------------------------------------------------------------------


def apply_delta(
    model: str | Path,
    delta: str | Path,
    *,
    trust: Trust,
    dry_run: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    undo_out: str | Path | None = None,
    allow_downgrade: bool = False,
    wait: float = 0.0,
    progress: Callable[[str], None] | None = None,
    computed: Sequence[Sequence[bytes]] | None = None,
) -> PatchResult:
    """Apply ``delta`` to the artefact at ``model`` in place.

    Args:
        trust: which signers to accept (:class:`~cdcca_edge.core.trust.Trust`); with any
            key, unsigned or foreign-signed deltas are refused.
        dry_run: check everything read-only (new bytes and digests included); write nothing.
        chunk_size: bytes of model data mapped at once (memory bound).
        undo_out: also write a delta that reverts this one (validated before any write).
        allow_downgrade: accept a delta whose ``to_version`` is not above the model's.
        wait: seconds to wait for a process serving or patching the model.
        computed: per record, the new bytes of each of its spans, as the delta's builder
            computed them (``DeltaBuilder.new_bytes``): the cloud advancing its mirror
            need not decode the records again. They pass the same checks as decoded
            bytes (post-image digests, finite values, the target identity), so the
            result is byte for byte what a device decoding the delta writes.

    Raises:
        FormatError, IntegrityError: a check failed; nothing was written.
        UsageError: locked, or bad arguments. StorageError: I/O failure (the model is restored).
    """
    t0 = time.perf_counter()
    say = progress or (lambda _m: None)
    if chunk_size < PIECE:
        raise UsageError(f"chunk size {chunk_size} is below the {PIECE}-byte minimum")
    d = read_delta(delta)
    check_trust(d, list(trust.public_keys))
    h = d.header
    _arm_crash_hook()
    with ArtifactLock(model, exclusive=not dry_run, wait=wait):
        recovered = recover(model, _locked=True) if not dry_run else None
        cached = cached_artifact(model)
        art, state = cached if cached else (open_artifact(model), None)
        if h.artifact_format != art.format:
            raise FormatError(f"{delta}: made for a {h.artifact_format} artefact, {model} is {art.format}")
        if undo_out is not None:
            _check_output(Path(undo_out), art, d.path)
        say("checking the base identity")
        identity, state, trusted = current_identity(art, state)
        assert state is not None
        known = state.version if state.version >= 0 else None
        result = PatchResult(
            artifact=art.path, delta=d.path, applied=False, already_applied=False, dry_run=dry_run,
            base_identity=h.base_identity, target_identity=h.target_identity,
            from_version=h.from_version, to_version=h.to_version,
            identity_check="state" if trusted else "migrated" if state.migrated_from else "computed",
            version_before=known, recovered=recovered,
        )
        if state.migrated_from is not None and not trusted and not dry_run:
            say(f"migrated the state sidecar from version {state.migrated_from}")
            state.migrated_from = None
            write_state(art, state)  # recomputed once: the same bytes, the current scheme
            write_leaves(art, state)
        if identity == h.target_identity and identity != h.base_identity:
            result.already_applied = True
            result.seconds = time.perf_counter() - t0
            return result
        if identity != h.base_identity:
            raise IntegrityError(
                f"{model}: wrong base: the model's identity is {identity[:16]}, the delta applies "
                f"to {h.base_identity[:16]} (version {h.from_version}); fetch the delta made for "
                "this model's version"
            )
        if known is not None and h.to_version <= known and not allow_downgrade:
            kind = ("an undo delta" if h.created.get("kind") == UNDO_KIND
                    else "a downgrade or a replayed old delta")
            raise IntegrityError(
                f"{delta}: takes the model from version {h.from_version} to {h.to_version}, but "
                f"it is at version {known}: {kind}. Versions only move forward; pass "
                "--allow-downgrade (allow_downgrade=True) to go back on purpose"
            )
        result.region_bytes = _check_records(art, d)
        if dry_run:
            _journal_pass(art, d, None, None, chunk_size, result, fds=None, computed=computed)
        else:
            _write_patch(art, d, state, identity, chunk_size, undo_out, result, say, computed)
            result.applied = True
            result.undo = Path(undo_out) if undo_out else None
    result.seconds = time.perf_counter() - t0
    return result


def _check_output(out: Path, art: Artifact, delta: Path) -> None:
    """Refuse an output path that cannot be written or that aliases the model, its
    sidecar or journal, or the delta being applied — before anything is written."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"--undo-out {out}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--undo-out {out}: directory {parent} is not writable")
    if out.is_dir():
        raise UsageError(f"--undo-out {out}: is a directory; name a file")
    protected = [*art.files, art.path, state_path(art), journal_path(art), delta]
    target = out.resolve()
    for p in protected:
        same = target == Path(p).resolve()
        if not same and out.exists() and Path(p).exists():
            same = os.path.samefile(out, p)
        if same:
            raise UsageError(f"--undo-out {out}: would overwrite {p}; write the undo delta elsewhere")


def _plan_for(art: Artifact, d: DeltaFile, rec: Record) -> Plan:
    try:
        t = art.tensor(rec.tensor)
    except CdccaError:
        raise FormatError(f"{d.path}: record names tensor {rec.tensor!r}, which {art.path} "
                          "lacks; the delta is for another architecture") from None
    if art.file_key(t.file) != rec.file:
        raise FormatError(f"{d.path}: record for {rec.tensor!r} names file {rec.file!r}, "
                          f"the tensor lives in {art.file_key(t.file)!r}")
    if t.type_name != rec.type or tuple(t.shape) != rec.shape:
        raise FormatError(f"{d.path}: record for {rec.tensor!r} expects {rec.type} "
                          f"{rec.shape}, the artefact has {t.type_name} {t.shape}")
    return make_plan(rec, d.read_payload(rec), t.offset, t.nbytes, PIECE)


def _check_records(art: Artifact, d: DeltaFile) -> int:
    """Decode every record against its tensor, one at a time (nothing kept): returns the
    bytes they rewrite.

    Raises:
        FormatError: a record does not fit; records of a tensor overlap or are unordered.
    """
    extent: dict[str, int] = {}
    region = 0
    for rec in d.header.records:
        plan = _plan_for(art, d, rec)
        if len(plan.offsets):
            # records of one tensor must come in order and never overlap: each record's
            # pre-image is then independent of the others
            start = int(plan.offsets[0])
            if start < extent.get(rec.tensor, 0):
                raise FormatError(f"{d.path}: records for {rec.tensor!r} overlap or are out of order")
            extent[rec.tensor] = int(plan.offsets[-1] + plan.lengths[-1])
        region += plan.region_bytes
    return region


def _record_summary(p: Plan) -> dict[str, Any]:
    r = p.record
    return {"tensor": r.tensor, "encoding": r.encoding, "type": r.type,
            "payload_bytes": r.length, "region_bytes": p.region_bytes, "spans": len(p.offsets)}


def _windows(plan: Plan, chunk: int) -> Iterator[tuple[int, int, int, int]]:
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


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise IntegrityError(f"the model file ended inside a tensor (offset {offset + len(data)}); "
                             "it changed while being patched")
    return data


def _gather(fd: int, start: int, length: int, rel: Any, lens: Any) -> bytes:
    """The bytes of spans at ``rel`` (offsets within the ``length`` bytes at ``start``),
    concatenated. The window is read with pread, never mapped: a read fault on a hole of
    a sparse file allocates it on some file systems (tmpfs), and on a full disk that is a
    SIGBUS. Many small spans (scattered blocks) are gathered with one numpy index."""
    import numpy as np

    total = int(lens.sum())
    if length > 2 * total + len(rel) * _SYSCALL_BYTES:  # sparse: read the spans, not the window
        return b"".join(_pread_exact(fd, int(n), start + int(a)) for a, n in zip(rel, lens))
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


def _preallocate(fd: int, start: int, length: int) -> None:
    """Make sure the blocks about to be written exist (a sparse model file has holes; a
    full disk must fail here, before any model byte is written)."""
    try:
        os.posix_fallocate(fd, start, length)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENODEV, errno.ENOSYS):
            return  # the file system cannot say in advance; pwrite still fails cleanly
        raise StorageError(exc.errno, f"no space for the new bytes of the model "
                           f"({exc.strerror}); free some space. The model is unchanged") from exc


def _journal_pass(art: Artifact, d: DeltaFile, journal: _JournalWriter | None,
                  undo: "_UndoBuilder | None", chunk: int, result: PatchResult,
                  fds: list[int] | None, keys: list[str] | None = None,
                  computed: Sequence[Sequence[bytes]] | None = None) -> dict[str, Any]:
    """Per record, per window: old bytes, new bytes, the finite check and both digests;
    into the journal when given (else a dry run). Returns the tensors touched, each with
    a boolean vector of the leaves (ID_CHUNK chunks) it writes into."""
    import numpy as np

    touched: dict[str, Any] = {}
    own = fds is None
    opened: dict[str, int] = {}
    try:
        if computed is not None and len(computed) != len(d.header.records):
            raise UsageError(f"new bytes given for {len(computed)} records, the delta has "
                             f"{len(d.header.records)}")
        for ri, rec in enumerate(d.header.records):
            p = _plan_for(art, d, rec)
            if computed is not None and len(computed[ri]) != len(p.offsets):
                raise UsageError(f"record {ri}: new bytes given for {len(computed[ri])} spans, "
                                 f"it has {len(p.offsets)}")
            if own:
                key = rec.file
                if key not in opened:
                    opened[key] = os.open(art.file_for_key(key), os.O_RDONLY)
                fd, fi = opened[key], 0
            else:
                assert keys is not None and fds is not None
                fi = keys.index(rec.file)
                fd = fds[fi]
            pre, post = hashlib.sha256(), hashlib.sha256()
            for i, j, start, length in _windows(p, chunk):
                offs, lens = p.offsets[i:j], p.lengths[i:j]
                if journal is not None:  # blocks about to be written must exist first
                    _preallocate(fd, int(offs[0]), int(offs[-1] + lens[-1] - offs[0]))
                old = _gather(fd, start, length, offs - start, lens)
                if computed is not None:
                    new = np.frombuffer(b"".join(computed[ri][i:j]), np.uint8)
                else:
                    new = np.ascontiguousarray(
                        p.new_bytes(i, j, None if not p.needs_old else np.frombuffer(old, np.uint8)),
                        dtype=np.uint8).reshape(-1)
                if new.size != len(old):
                    raise IntegrityError(f"tensor {rec.tensor!r}: computed {new.size} bytes for a "
                                         f"{len(old)}-byte region")
                check_finite(rec, old, new)
                pre.update(old)
                post.update(new)
                if journal is not None:
                    journal.entry(fi, offs, lens, old, new.tobytes())
                    if undo:
                        undo.add(p, i, j, old)
                    _crash_point()
            if pre.hexdigest() != rec.pre_digest:
                raise IntegrityError(f"{art.path}: tensor {rec.tensor!r} is not what the delta "
                                     "expects (pre-image digest mismatch); nothing was written")
            if post.hexdigest() != rec.post_digest:
                raise IntegrityError(f"tensor {rec.tensor!r}: the bytes computed here differ from "
                                     "the sender's (post-image digest mismatch); nothing was written")
            result.records.append(_record_summary(p))
            t = art.tensor(rec.tensor)
            touched[rec.tensor] = touched_chunks(t, p.offsets, p.lengths, touched.get(rec.tensor))
    finally:
        for fd in opened.values():
            os.close(fd)
    return touched


def _write_patch(art: Artifact, d: DeltaFile, state: ArtifactState, identity: str, chunk: int,
                 undo_out: str | Path | None, result: PatchResult, say: Callable[[str], None],
                 computed: Sequence[Sequence[bytes]] | None = None) -> None:
    h = d.header
    keys = sorted({r.file for r in h.records}) or [art.file_key(art.files[0])]
    files = [art.file_for_key(k) for k in keys]
    fds: list[int] = []
    try:
        for f in files:  # fails early on a read-only model, before anything is written
            fds.append(os.open(f, os.O_RDWR))
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        raise StorageError(exc.errno, f"{f}: cannot open for writing ({exc.strerror}); make the "
                           "model writable. The model is unchanged") from exc
    jp = journal_path(art)
    undo = _UndoBuilder(h, d.digest) if undo_out else None
    try:
        need = 2 * result.region_bytes + 16 * sum(1 for _ in h.records) + (1 << 16)
        free = shutil.disk_usage(jp.parent).free
        if free < need:
            raise StorageError(errno.ENOSPC, f"no space for the patch journal: {need} bytes "
                               f"needed, {free} free in {jp.parent}; free some space. The model "
                               "is unchanged")
        say("computing and journaling the new bytes")
        fstats = [os.fstat(fd) for fd in fds]
        try:
            journal = _JournalWriter(jp, {
                "delta_digest": d.digest, "artifact_format": art.format,
                "base_identity": h.base_identity, "target_identity": h.target_identity,
                "from_version": h.from_version, "to_version": h.to_version,
                "layout": layout_digest(art),
                "files": [{"key": k, "size": st.st_size, "ino": st.st_ino, "dev": st.st_dev}
                          for k, st in zip(keys, fstats)],
            })
        except OSError as exc:
            raise StorageError(exc.errno, f"cannot create the patch journal {jp} "
                               f"({exc.strerror}); make {jp.parent} writable. The model is "
                               "unchanged") from exc
        try:
            touched = _journal_pass(art, d, journal, undo, chunk, result, fds, keys, computed)
            journal.finish()
        except BaseException as exc:
            journal.f.close()
            jp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and not isinstance(exc, CdccaError):
                raise StorageError(exc.errno, f"writing the patch journal {jp} failed "
                                   f"({exc.strerror}); free some space. The model is "
                                   "unchanged") from exc
            raise
        _crash_point()
        try:
            say("writing the new bytes in place")
            with open(jp, "rb") as j:
                for e in journal.entries:
                    j.seek(e.data_pos + e.total)
                    _write_spans(fds[e.fi], e.offsets, e.lengths, j.read(e.total))
                    _crash_point()
            for fd in fds:
                os.fdatasync(fd)
            _crash_point()
            say("checking the new identity")
            digests = _new_identity(art, state, touched, h.target_identity, result)
            if undo and undo_out:
                undo.write(Path(undo_out))
            _crash_point()
            new_state = ArtifactState(
                identity=h.target_identity, version=h.to_version,
                history=state.history + [{
                    "event": "patch", "delta_digest": d.digest, "from_version": h.from_version,
                    "to_version": h.to_version, "base_identity": h.base_identity,
                    "target_identity": h.target_identity,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }],
                tensor_digests=digests, leaves=state.leaves,
            )
            if state.leaves:  # no usable cache (or a cold start): a whole new one, before
                try:  # the commit, while a kill still leaves the journal that tidies up
                    write_leaves(art, new_state)
                except OSError:
                    pass  # only a cache: the next patch re-derives the leaves it cannot verify
            _crash_point()
            write_state(art, new_state)  # the commit point
        except BaseException as exc:
            try:
                _restore(jp, files, journal.entries)
                jp.unlink()
                fsync_dir(jp.parent)
            except BaseException as rexc:  # keep the journal for `patch --recover`
                raise CdccaError(f"{art.path}: the patch failed ({exc}) and so did the rollback "
                                 f"({rexc}); run `cdcca-edge patch --recover {art.path}`") from exc
            if isinstance(exc, OSError) and not isinstance(exc, CdccaError):
                raise StorageError(exc.errno, f"{art.path}: writing failed ({exc.strerror}); "
                                   "free some space. The model was restored") from exc
            raise
        _crash_point()
        jp.unlink()
        fsync_dir(jp.parent)
    finally:
        for fd in fds:
            os.close(fd)


def _new_identity(art: Artifact, state: ArtifactState, touched: dict[str, Any], target: str,
                  result: PatchResult) -> dict[str, str]:
    """Per-tensor digests after the write: in each touched tensor only the leaves the
    delta wrote into are re-read and re-hashed (artifact.md, section 2), the rest are as
    the verified state recorded them. Their identity must be the delta's target. The new
    leaves go into the leaf cache tensor by tensor (before the commit: a kill then leaves
    the journal, and a stale row fails its check).

    Raises:
        IntegrityError: it is not (the model is then rolled back by the caller).
    """
    import numpy as np

    digests = dict(state.tensor_digests)
    cache = LeafCache(art, state)

    def rehash(name: str) -> tuple[str, str, int]:
        t, mask = art.tensor(name), touched[name]
        leaves, computed = cache.get(name)
        rehash_chunks(t, leaves, mask)
        cache.put(name, leaves)
        hashed = t.nbytes if computed else min(int(np.count_nonzero(mask)) * ID_CHUNK, t.nbytes)
        return name, digest_from_chunks(t.nbytes, leaves), hashed

    try:
        # SHA-256 releases the GIL on 4 KiB inputs: the tensors are re-hashed on every core
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            for name, digest, hashed in pool.map(rehash, touched):
                digests[name] = digest
                result.rehashed_bytes += hashed
    finally:
        cache.close()
    got = identity_digest((t.name, t.type_name, t.shape, digests[t.name]) for t in art.tensors)
    if got != target:
        raise IntegrityError(f"{art.path}: after writing, the model's identity is {got[:16]}, not "
                             f"the delta's target {target[:16]}: the delta's header lies about "
                             "what it produces. The model was restored")
    return digests


class _UndoBuilder:
    """Collects the original bytes of every touched span into a replace delta that takes
    the patched model back to its base."""

    def __init__(self, header: DeltaHeader, digest: str) -> None:
        self.h = header
        self.payload = tempfile.SpooledTemporaryFile(max_size=32 << 20)
        self.records: list[Record] = []
        self._plan: Plan | None = None
        self._starts: list[int] = []
        self._lengths: list[int] = []
        self._data = io.BytesIO()

    def add(self, plan: Plan, i: int, j: int, old: bytes) -> None:
        _, unit = type_layout(plan.record.type)
        pos = 0
        for off, n in zip(plan.offsets[i:j].tolist(), plan.lengths[i:j].tolist()):
            if self._plan is not plan or (
                self._data.tell() + n + 8 * (len(self._starts) + 1) + 64 > MAX_RECORD_PAYLOAD
            ):
                self._flush()
                self._plan = plan
            start = (off - plan.tensor_offset) // unit
            if self._starts and self._starts[-1] + self._lengths[-1] == start:
                self._lengths[-1] += n // unit
            else:
                self._starts.append(start)
                self._lengths.append(n // unit)
            self._data.write(old[pos : pos + n])
            pos += n

    def _flush(self) -> None:
        if self._plan is None or not self._starts:
            return
        r = self._plan.record
        payload = encode_runs(self._starts, self._lengths) + self._data.getvalue()
        self.records.append(Record(
            file=r.file, tensor=r.tensor, type=r.type, shape=r.shape, encoding=ENC_REPLACE,
            offset=self.payload.tell(), length=len(payload), params={},
            pre_digest=r.post_digest, post_digest=r.pre_digest,
        ))
        self.payload.write(payload)
        self._plan, self._starts, self._lengths, self._data = None, [], [], io.BytesIO()

    def write(self, path: Path) -> None:
        self._flush()
        header = DeltaHeader(
            artifact_format=self.h.artifact_format, base_identity=self.h.target_identity,
            target_identity=self.h.base_identity, from_version=self.h.to_version,
            to_version=self.h.from_version, payload_bytes=self.payload.tell(),
            records=self.records, created={"by": "cdcca-edge patch --undo-out", "kind": UNDO_KIND},
        )
        self.payload.seek(0)
        write_delta(path, header, self.payload)
