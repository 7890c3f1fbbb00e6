"""Applying a delta to an artefact in place: checked, journaled, crash-safe.

Protocol (docs/formats/delta.md, section 6):

1. take an exclusive lock on the artefact; recover any journal a crash left behind;
2. read the delta (format, digest), check its signature when keys are trusted, the
   artefact format, the base identity, and decode every record against its tensor;
3. journal pass: read each touched region, check its pre-image digest, append its
   original bytes to the undo journal; fsync the journal and its directory;
4. write pass: compute the new bytes, check them against each record's post-image digest,
   write them in place (through bounded memory maps); fsync the data files;
5. commit: atomically replace the state sidecar (new identity and version);
6. remove the journal.

Any failure before step 5 restores the journal's bytes. After a crash, :func:`recover`
(run automatically by the next patch and by ``runtime.load``) rolls back, or forward
when the commit is on disk. Memory is bounded by the map window (``chunk_size``) and the
record limit, not by the model.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import mmap
import os
import shutil
import signal
import struct
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from cdcca_edge.core.artifact import Artifact, open_artifact
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
from cdcca_edge.core.encodings import Plan, encode_runs, make_plan
from cdcca_edge.core.errors import (
    CdccaError,
    FormatError,
    IntegrityError,
    StorageError,
    UsageError,
)
from cdcca_edge.core.ggml import type_layout
from cdcca_edge.core.state import (
    ArtifactState,
    cached_artifact,
    current_identity,
    fsync_dir,
    read_state,
    write_state,
)

DEFAULT_CHUNK = 8 << 20  # bytes of model mapped at once; see docs/formats/delta.md
PIECE = 1 << 20  # largest span handed to an encoding at once
JOURNAL_MAGIC = b"CDCJRNL1"
JOURNAL_END = b"CDCJEND1"
JOURNAL_ENTRY = struct.Struct("<HI")  # file index, number of spans; then u64 offsets[n],
# u32 lengths[n] and the spans' original bytes, concatenated
_U64 = struct.Struct("<Q")
_PAGE = mmap.ALLOCATIONGRANULARITY


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
    identity_check: str = ""  # "state" (trusted sidecar) or "computed"
    recovered: str | None = None  # what recovery did first, if a journal was found
    seconds: float = 0.0
    undo: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for k in ("artifact", "delta", "undo"):
            d[k] = None if d[k] is None else str(d[k])
        return d


# --- locations ---------------------------------------------------------------------------


def journal_path(art: Artifact) -> Path:
    if art.format == "gguf":
        return art.path.with_name(art.path.name + ".cdcca-journal")
    return art.root / "cdcca-journal"


def _lock_target(art: Artifact) -> Path:
    """The GGUF file, ``model.onnx``, or a bundle's manifest (``art.path`` in every case)."""
    return art.path


@contextmanager
def artifact_lock(art: Artifact) -> Iterator[None]:
    """Exclusive advisory lock (flock) on the artefact's main file: one patcher at a time."""
    fd = os.open(_lock_target(art), os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{art.path}: another cdcca-edge process is patching this model; "
                             "wait for it to finish") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


# --- test hook: crash injection ------------------------------------------------------------

_crash_budget: list[int] = []


def _crash_point() -> None:
    """Test hook: with CDCCA_TEST_CRASH_AFTER=N set, the process SIGKILLs itself at the
    N-th crash point (each journal entry, each window written, each fsync, the commit)."""
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


class _JournalWriter:
    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.f: BinaryIO = open(path, "xb")  # x: never clobber a journal we did not recover
        self.h = hashlib.sha256()
        self.n = 0
        raw = json.dumps(meta, sort_keys=True).encode()
        self._write(JOURNAL_MAGIC + _U64.pack(len(raw)) + raw)

    def _write(self, b: bytes | memoryview) -> None:
        self.f.write(b)
        self.h.update(b)

    def entry(self, file_index: int, offsets: Any, lengths: Any, data: bytes) -> None:
        """One window's spans: absolute offsets (n,), lengths (n,), original bytes."""
        import numpy as np

        self._write(JOURNAL_ENTRY.pack(file_index, len(offsets)))
        self._write(np.asarray(offsets, "<u8").tobytes() + np.asarray(lengths, "<u4").tobytes())
        self._write(data)
        self.n += 1

    def finish(self) -> None:
        self.f.write(JOURNAL_END + _U64.pack(self.n) + self.h.digest())
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        fsync_dir(self.path.parent)


def _read_journal(path: Path) -> tuple[dict[str, Any], list[tuple[int, Any, Any, int]]] | None:
    """(meta, entries) of a complete journal, each entry (file index, offsets, lengths,
    position of its bytes in the journal); None if the journal is incomplete (the crash
    came before it was finished, so no model byte had been written)."""
    import numpy as np

    size = path.stat().st_size
    tail = len(JOURNAL_END) + _U64.size + 32
    with open(path, "rb") as f:
        head = f.read(len(JOURNAL_MAGIC) + _U64.size)
        if len(head) < len(JOURNAL_MAGIC) + _U64.size or head[:8] != JOURNAL_MAGIC:
            return None
        (mlen,) = _U64.unpack(head[8:])
        if len(head) + mlen + tail > size:
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
            arrays = f.read(12 * n)
            if len(arrays) < 12 * n:
                return None
            h.update(eh)
            h.update(arrays)
            offsets = np.frombuffer(arrays, "<u8", count=n).astype(np.int64)
            lengths = np.frombuffer(arrays, "<u4", offset=8 * n).astype(np.int64)
            data_pos = pos + JOURNAL_ENTRY.size + 12 * n
            total = int(lengths.sum())
            if data_pos + total > size - tail:
                return None
            left = total
            while left:
                chunk = f.read(min(left, 1 << 20))
                h.update(chunk)
                left -= len(chunk)
            entries.append((fi, offsets, lengths, data_pos))
            pos = data_pos + total
        end = f.read(tail)
        if end[:8] != JOURNAL_END or _U64.unpack(end[8:16])[0] != len(entries) or end[16:] != h.digest():
            return None
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    return meta, entries


def _restore(path: Path, art: Artifact, meta: dict[str, Any], entries: list) -> None:
    files = [art.file_for_key(k) for k in meta["files"]]
    fds = [os.open(f, os.O_RDWR) for f in files]
    try:
        with open(path, "rb") as j:
            for fi, offsets, lengths, data_pos in entries:
                j.seek(data_pos)
                for off, n in zip(offsets.tolist(), lengths.tolist()):
                    os.pwrite(fds[fi], j.read(n), off)
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)


def recover(model: str | Path | Artifact, _locked: bool = False) -> str | None:
    """Finish or undo a patch that a crash interrupted. Returns what was done
    (``"discarded"``, ``"rolled back"``, ``"rolled forward"``) or None if there was no
    journal.

    Raises:
        UsageError: another process holds the lock.
    """
    art = model if isinstance(model, Artifact) else open_artifact(model)
    jp = journal_path(art)
    if not jp.exists():
        return None
    if not _locked:
        with artifact_lock(art):
            return recover(art, _locked=True)
    parsed = _read_journal(jp)
    if parsed is None:
        outcome = "discarded"  # unfinished journal: no model byte was written yet
    else:
        meta, entries = parsed
        state = read_state(art)
        committed = (
            state is not None
            and state.identity == meta["target_identity"]
            and any(h.get("delta_digest") == meta["delta_digest"] for h in state.history[-1:])
        )
        if committed:
            outcome = "rolled forward"
        else:
            _restore(jp, art, meta, entries)
            outcome = "rolled back"
    jp.unlink()
    fsync_dir(jp.parent)
    return outcome


# --- applying ------------------------------------------------------------------------------


def trusted_keys(pubkeys: list[str | Path] | None = None) -> list[bytes]:
    """Keys from ``--pubkey`` files, else from $CDCCA_TRUSTED_KEYS (paths joined by
    os.pathsep), else from the config file's ``trusted_keys`` (docs/cli.md)."""
    from cdcca_edge.core.delta_format import load_public_key
    from cdcca_edge.core.paths import config_file

    paths: list[str | Path] = list(pubkeys or [])
    if not paths and os.environ.get("CDCCA_TRUSTED_KEYS"):
        paths = [p for p in os.environ["CDCCA_TRUSTED_KEYS"].split(os.pathsep) if p]
    if not paths:
        cfg = config_file()
        if cfg.is_file():
            try:
                paths = list(json.loads(cfg.read_text()).get("trusted_keys", []))
            except (ValueError, AttributeError) as exc:
                raise FormatError(f"{cfg}: not a JSON object with 'trusted_keys' ({exc})") from exc
    return [load_public_key(p) for p in paths]


def apply_delta(
    model: str | Path,
    delta: str | Path,
    pubkeys: list[str | Path] | None = None,
    dry_run: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    undo_out: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> PatchResult:
    """Apply ``delta`` to the artefact at ``model`` in place.

    Args:
        pubkeys: trusted public key files; None: the configured ones (:func:`trusted_keys`).
            With any key trusted, unsigned or foreign-signed deltas are refused.
        dry_run: check everything read-only and report; write nothing.
        chunk_size: bytes of model data mapped at once (memory bound).
        undo_out: also write a delta that reverts this one.

    Raises:
        FormatError, IntegrityError: a check failed; nothing was written.
        UsageError: locked, or bad arguments. OSError: I/O failure (the model is restored).
    """
    t0 = time.perf_counter()
    say = progress or (lambda _m: None)
    if chunk_size < PIECE:
        raise UsageError(f"chunk size {chunk_size} is below the {PIECE}-byte minimum")
    cached = cached_artifact(model)
    art, state = cached if cached else (open_artifact(model), None)
    d = read_delta(delta)
    check_trust(d, trusted_keys(pubkeys))
    h = d.header
    if h.artifact_format != art.format:
        raise FormatError(f"{delta}: made for a {h.artifact_format} artefact, {model} is {art.format}")
    if dry_run:
        return _check_only(art, d, t0)
    _arm_crash_hook()
    with artifact_lock(art):
        recovered = recover(art, _locked=True)
        if recovered:
            art, state = open_artifact(model), None
        say("checking the base identity")
        identity, state, trusted = current_identity(art, state)
        result = PatchResult(
            artifact=art.path, delta=d.path, applied=False, already_applied=False, dry_run=False,
            base_identity=h.base_identity, target_identity=h.target_identity,
            from_version=h.from_version, to_version=h.to_version,
            identity_check="state" if trusted else "computed", recovered=recovered,
        )
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
        plans = _plans(art, d)
        result.records = [_record_summary(p) for p in plans]
        result.region_bytes = sum(p.region_bytes for p in plans)
        _write_patch(art, d, plans, state, chunk_size, undo_out, say)
        result.applied = True
        result.undo = Path(undo_out) if undo_out else None
    result.seconds = time.perf_counter() - t0
    return result


def _plans(art: Artifact, d: DeltaFile) -> list[Plan]:
    plans = []
    extent: dict[str, int] = {}
    for rec in d.header.records:
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
        plan = make_plan(rec, d.read_payload(rec), t.offset, t.nbytes, PIECE)
        if len(plan.offsets):
            # records of one tensor must come in order and never overlap: each record's
            # pre-image is then independent of the others
            start = int(plan.offsets[0])
            if start < extent.get(rec.tensor, 0):
                raise FormatError(f"{d.path}: records for {rec.tensor!r} overlap or are out of order")
            extent[rec.tensor] = int(plan.offsets[-1] + plan.lengths[-1])
        plans.append(plan)
    return plans


def _record_summary(p: Plan) -> dict[str, Any]:
    r = p.record
    return {"tensor": r.tensor, "encoding": r.encoding, "type": r.type,
            "payload_bytes": r.length, "region_bytes": p.region_bytes, "spans": len(p.offsets)}


def _windows(plan: Plan, chunk: int) -> Iterator[tuple[int, int, int, int]]:
    """(first span, end span, map start, map length): consecutive spans whose extent fits
    one map of at most ``chunk`` bytes (spans are at most PIECE, so every window holds at
    least one)."""
    import numpy as np

    offs, ends = plan.offsets, plan.offsets + plan.lengths
    n = len(offs)
    i = 0
    while i < n:
        start = int(offs[i]) - int(offs[i]) % _PAGE
        j = max(i + 1, int(np.searchsorted(ends, start + chunk, side="right")))
        yield i, j, start, int(ends[j - 1]) - start
        i = j


_FANCY_MAX = 1 << 20  # touched bytes per window up to which spans are gathered by index


class _Window:
    """One memory map of ``length`` bytes at ``start`` (a multiple of the page size) over a
    data file, with the spans of one plan inside it. Many small spans (scattered blocks)
    are gathered and scattered with one numpy index operation; fewer, larger ones with
    slices. Either way the map is released on exit, so memory stays at one window."""

    def __init__(self, fd: int, start: int, length: int, rel: Any, lens: Any, write: bool) -> None:
        self.mm = mmap.mmap(fd, length, access=mmap.ACCESS_WRITE if write else mmap.ACCESS_READ,
                            offset=start)
        self.rel, self.lens = rel, lens  # (S,) int64 offsets within the map, lengths
        self.total = int(lens.sum())
        self.index = None
        if len(rel) >= 16 and self.total <= _FANCY_MAX:
            import numpy as np

            first = np.repeat(rel - (np.cumsum(lens) - lens), lens)
            self.index = first + np.arange(self.total)  # (total,) byte positions in the map

    def __enter__(self) -> "_Window":
        return self

    def __exit__(self, *exc: object) -> None:
        self.mm.close()

    def gather(self) -> bytes:
        import numpy as np

        if self.index is not None:
            return np.frombuffer(self.mm, np.uint8)[self.index].tobytes()
        mv = memoryview(self.mm)
        try:
            return b"".join([mv[a : a + n] for a, n in zip(self.rel.tolist(), self.lens.tolist())])
        finally:
            mv.release()

    def scatter(self, new: Any) -> None:
        import numpy as np

        new = np.ascontiguousarray(new, dtype=np.uint8).reshape(-1)
        if self.index is not None:
            np.frombuffer(self.mm, np.uint8)[self.index] = new
            return
        mv = memoryview(self.mm)
        src = memoryview(new)
        try:
            pos = 0
            for a, n in zip(self.rel.tolist(), self.lens.tolist()):
                mv[a : a + n] = src[pos : pos + n]
                pos += n
        finally:
            src.release()
            mv.release()


def _open_windows(p: Plan, fd: int, chunk: int, write: bool) -> Iterator[tuple[int, int, _Window]]:
    for i, j, start, length in _windows(p, chunk):
        with _Window(fd, start, length, p.offsets[i:j] - start, p.lengths[i:j], write) as w:
            yield i, j, w


def _check_only(art: Artifact, d: DeltaFile, t0: float) -> PatchResult:
    """Dry run: every check, read-only, including pre-images."""
    h = d.header
    identity, _, trusted = current_identity(art)
    result = PatchResult(
        artifact=art.path, delta=d.path, applied=False, already_applied=identity == h.target_identity,
        dry_run=True, base_identity=h.base_identity, target_identity=h.target_identity,
        from_version=h.from_version, to_version=h.to_version,
        identity_check="state" if trusted else "computed",
    )
    if not result.already_applied:
        if identity != h.base_identity:
            raise IntegrityError(f"{art.path}: wrong base: the model's identity is {identity[:16]}, "
                                 f"the delta applies to {h.base_identity[:16]}")
        plans = _plans(art, d)
        for p in plans:
            f = art.file_for_key(p.record.file)
            digest = hashlib.sha256()
            with open(f, "rb") as fh:
                for off, n in zip(p.offsets.tolist(), p.lengths.tolist()):
                    fh.seek(off)
                    digest.update(fh.read(n))
            if digest.hexdigest() != p.record.pre_digest:
                raise IntegrityError(f"{art.path}: tensor {p.record.tensor!r} is not what the "
                                     "delta expects (pre-image digest mismatch)")
        result.records = [_record_summary(p) for p in plans]
        result.region_bytes = sum(p.region_bytes for p in plans)
    result.seconds = time.perf_counter() - t0
    return result


def _write_patch(art: Artifact, d: DeltaFile, plans: list[Plan], state: ArtifactState | None,
                 chunk: int, undo_out: str | Path | None, say: Callable[[str], None]) -> None:
    h = d.header
    keys = sorted({p.record.file for p in plans})
    files = [art.file_for_key(k) for k in keys]
    fds: list[int] = []
    try:
        for f in files:  # fails early on a read-only model, before anything is written
            fds.append(os.open(f, os.O_RDWR))
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        raise StorageError(f"{f}: cannot open for writing ({exc.strerror}); make the model "
                           "writable. The model is unchanged") from exc
    jp = journal_path(art)
    undo = _UndoBuilder(h, d.digest) if undo_out else None
    kept: dict[tuple[int, int], bytes] = {}
    try:
        need = sum(p.region_bytes + 14 * len(p.offsets) for p in plans) + (1 << 16)
        free = shutil.disk_usage(jp.parent).free
        if free < need:
            raise StorageError(errno.ENOSPC, f"no space for the undo journal: {need} bytes "
                               f"needed, {free} free in {jp.parent}; free some space. The model "
                               "is unchanged")
        say("journaling the original bytes")
        try:
            journal = _JournalWriter(jp, {
                "delta_digest": d.digest, "base_identity": h.base_identity,
                "target_identity": h.target_identity, "from_version": h.from_version,
                "to_version": h.to_version, "files": keys,
            })
        except OSError as exc:
            raise StorageError(exc.errno, f"cannot create the undo journal {jp} "
                               f"({exc.strerror}); make {jp.parent} writable. The model is "
                               "unchanged") from exc
        try:
            # Old bytes are needed again to compute the new ones for all encodings but raw
            # replacement; when they fit the memory bound, keep them instead of re-reading.
            keep = sum(p.region_bytes for p in plans if p.needs_old) <= chunk
            for k, p in enumerate(plans):
                fi = keys.index(p.record.file)
                digest = hashlib.sha256()
                for i, j, w in _open_windows(p, fds[fi], chunk, write=False):
                    old = w.gather()
                    digest.update(old)
                    journal.entry(fi, p.offsets[i:j], p.lengths[i:j], old)
                    if undo:
                        undo.add(p, i, j, old)
                    if keep and p.needs_old:
                        kept[(k, i)] = old
                    _crash_point()
                if digest.hexdigest() != p.record.pre_digest:
                    raise IntegrityError(
                        f"{art.path}: tensor {p.record.tensor!r} is not what the delta expects "
                        "(pre-image digest mismatch); nothing was written"
                    )
            journal.finish()
        except BaseException as exc:
            journal.f.close()
            jp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and not isinstance(exc, CdccaError):
                raise StorageError(exc.errno, f"writing the undo journal {jp} failed "
                                   f"({exc.strerror}); free some space. The model is "
                                   "unchanged") from exc
            raise
        _crash_point()
        try:
            say("writing the new bytes in place")
            for k, p in enumerate(plans):
                _write_plan(p, fds[keys.index(p.record.file)], chunk, k, kept)
            for fd in fds:
                os.fdatasync(fd)
            _crash_point()
            new_state = ArtifactState(
                identity=h.target_identity, version=h.to_version,
                history=(state.history if state else []) + [{
                    "event": "patch", "delta_digest": d.digest, "from_version": h.from_version,
                    "to_version": h.to_version, "base_identity": h.base_identity,
                    "target_identity": h.target_identity,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }],
            )
            write_state(art, new_state)  # the commit point
        except BaseException as exc:
            try:
                parsed = _read_journal(jp)
                assert parsed is not None, "journal unreadable"
                _restore(jp, art, parsed[0], parsed[1])
                jp.unlink()
            except BaseException as rexc:  # keep the journal for `patch --recover`
                raise CdccaError(f"{art.path}: the patch failed ({exc}) and so did the rollback "
                                 f"({rexc}); run `cdcca-edge patch --recover {art.path}`") from exc
            if isinstance(exc, OSError) and not isinstance(exc, CdccaError):
                raise StorageError(exc.errno, f"{art.path}: writing failed ({exc.strerror}); "
                                   "the model was restored") from exc
            raise
        _crash_point()
        jp.unlink()
        fsync_dir(jp.parent)
        if undo and undo_out:
            undo.write(Path(undo_out))
    finally:
        for fd in fds:
            os.close(fd)


def _write_plan(p: Plan, fd: int, chunk: int, k: int, kept: dict[tuple[int, int], bytes]) -> None:
    """Compute and write the plan's new bytes; their digest must be the post-image digest
    (checked over exactly the bytes written to the file's pages)."""
    import numpy as np

    digest = hashlib.sha256()
    for i, j, w in _open_windows(p, fd, chunk, write=True):
        old = None
        if p.needs_old:
            raw = kept.pop((k, i), None)
            old = np.frombuffer(raw if raw is not None else w.gather(), np.uint8)
        new = np.ascontiguousarray(p.new_bytes(i, j, old), dtype=np.uint8)
        if new.size != w.total:
            raise IntegrityError(f"tensor {p.record.tensor!r}: computed {new.size} bytes for a "
                                 f"{w.total}-byte region")
        w.scatter(new)
        digest.update(new)
        _crash_point()
    if digest.hexdigest() != p.record.post_digest:
        raise IntegrityError(f"tensor {p.record.tensor!r}: the bytes computed here differ from the "
                             "sender's (post-image digest mismatch); the model was restored")


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
            records=self.records, created={"by": "cdcca-edge patch --undo-out"},
        )
        self.payload.seek(0)
        write_delta(path, header, self.payload)
