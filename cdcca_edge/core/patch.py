"""Applying a delta to an artefact in place: checked, journaled, crash-safe.

Protocol (docs/formats/delta.md, section 6):

1. take an exclusive lock on the artefact; recover any journal a crash left behind;
2. read the delta (format, digest), check its signature when keys are trusted, the
   artefact format, the base identity, and decode every record against its tensor;
3. journal pass: read each touched region, check its pre-image digest, append its
   original bytes to the undo journal; fsync the journal and its directory;
4. write pass: compute and write the new bytes in place (through bounded memory maps);
   fsync the data files; re-read every region and check its post-image digest;
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
from array import array
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from cdcca_edge.core.artifact import ONNX_MODEL_NAME, Artifact, open_artifact
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
    current_identity,
    fsync_dir,
    read_state,
    write_state,
)

DEFAULT_CHUNK = 8 << 20  # bytes of model mapped at once; see docs/formats/delta.md
PIECE = 1 << 20  # largest span handed to an encoding at once
JOURNAL_MAGIC = b"CDCJRNL1"
JOURNAL_END = b"CDCJEND1"
JOURNAL_ENTRY = struct.Struct("<HQI")  # file index, absolute offset, length
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
    return art.path if art.format == "gguf" else art.root / ONNX_MODEL_NAME


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

    def entry(self, file_index: int, offset: int, data: bytes | memoryview) -> None:
        self._write(JOURNAL_ENTRY.pack(file_index, offset, len(data)))
        self._write(data)
        self.n += 1

    def finish(self) -> None:
        self.f.write(JOURNAL_END + _U64.pack(self.n) + self.h.digest())
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        fsync_dir(self.path.parent)


def _read_journal(path: Path) -> tuple[dict[str, Any], list[tuple[int, int, int]]] | None:
    """(meta, entries as (file index, offset, position of bytes in the journal)) of a
    complete journal; None if it is incomplete (the crash came before it was finished, so
    the model was never written)."""
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
            fi, off, n = JOURNAL_ENTRY.unpack(eh)
            h.update(eh)
            data_pos = pos + JOURNAL_ENTRY.size
            if data_pos + n > size - tail:
                return None
            left = n
            while left:
                chunk = f.read(min(left, 1 << 20))
                h.update(chunk)
                left -= len(chunk)
            entries.append((fi, off, data_pos, n))
            pos = data_pos + n
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
            for fi, off, data_pos, n in entries:
                j.seek(data_pos)
                os.pwrite(fds[fi], j.read(n), off)
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)


def recover(model: str | Path, _locked: bool = False) -> str | None:
    """Finish or undo a patch that a crash interrupted. Returns what was done
    (``"discarded"``, ``"rolled back"``, ``"rolled forward"``) or None if there was no
    journal.

    Raises:
        UsageError: another process holds the lock.
    """
    art = open_artifact(model)
    jp = journal_path(art)
    if not jp.exists():
        return None
    if not _locked:
        with artifact_lock(art):
            return recover(model, _locked=True)
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
    art = open_artifact(model)
    d = read_delta(delta)
    check_trust(d, trusted_keys(pubkeys))
    h = d.header
    if h.artifact_format != art.format:
        raise FormatError(f"{delta}: made for a {h.artifact_format} artefact, {model} is {art.format}")
    if dry_run:
        return _check_only(art, d, t0)
    _arm_crash_hook()
    with artifact_lock(art):
        recovered = recover(model, _locked=True)
        if recovered:
            art = open_artifact(model)
        say("checking the base identity")
        identity, state, trusted = current_identity(art)
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
            start = plan.offsets[0]
            if start < extent.get(rec.tensor, 0):
                raise FormatError(f"{d.path}: records for {rec.tensor!r} overlap or are out of order")
            extent[rec.tensor] = plan.offsets[-1] + plan.lengths[-1]
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
    offs, lens = plan.offsets, plan.lengths
    n = len(offs)
    i = 0
    while i < n:
        start = offs[i] - offs[i] % _PAGE
        j = i + 1
        while j < n and offs[j] + lens[j] - start <= chunk:
            j += 1
        yield i, j, start, offs[j - 1] + lens[j - 1] - start
        i = j


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
                for off, n in zip(p.offsets, p.lengths):
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
            for p in plans:
                fi = keys.index(p.record.file)
                digest = hashlib.sha256()
                for i, j, start, length in _windows(p, chunk):
                    with mmap.mmap(fds[fi], length, access=mmap.ACCESS_READ, offset=start) as mm:
                        mv = memoryview(mm)
                        try:
                            for k in range(i, j):
                                a = p.offsets[k] - start
                                part = mv[a : a + p.lengths[k]]
                                try:
                                    digest.update(part)
                                    journal.entry(fi, p.offsets[k], part)
                                    if undo:
                                        undo.add(p, k, part)
                                finally:
                                    part.release()  # else closing the map raises BufferError
                                _crash_point()
                        finally:
                            mv.release()
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
            for p in plans:
                _write_plan(p, fds[keys.index(p.record.file)], chunk)
            for fd in fds:
                os.fsync(fd)
            _crash_point()
            say("verifying")
            for p in plans:
                _verify_plan(p, fds[keys.index(p.record.file)], chunk)
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


def _write_plan(p: Plan, fd: int, chunk: int) -> None:
    digest = hashlib.sha256()
    for i, j, start, length in _windows(p, chunk):
        with mmap.mmap(fd, length, access=mmap.ACCESS_WRITE, offset=start) as mm:
            mv = memoryview(mm)
            try:
                old = b""
                if p.needs_old:
                    old = b"".join(mv[p.offsets[k] - start : p.offsets[k] - start + p.lengths[k]]
                                   for k in range(i, j))
                new = p.new_bytes(i, j, old)
                pos = 0
                for k in range(i, j):
                    a, n = p.offsets[k] - start, p.lengths[k]
                    mv[a : a + n] = new[pos : pos + n]
                    pos += n
                digest.update(new)
            finally:
                mv.release()
        _crash_point()
    if digest.hexdigest() != p.record.post_digest:
        raise IntegrityError(f"tensor {p.record.tensor!r}: the bytes computed here differ from the "
                             "sender's (post-image digest mismatch); the model was restored")


def _verify_plan(p: Plan, fd: int, chunk: int) -> None:
    digest = hashlib.sha256()
    for i, j, start, length in _windows(p, chunk):
        with mmap.mmap(fd, length, access=mmap.ACCESS_READ, offset=start) as mm:
            mv = memoryview(mm)
            try:
                for k in range(i, j):
                    a = p.offsets[k] - start
                    digest.update(mv[a : a + p.lengths[k]])
            finally:
                mv.release()
    if digest.hexdigest() != p.record.post_digest:
        raise IntegrityError(f"tensor {p.record.tensor!r}: bytes on disk after writing do not "
                             "match the post-image digest; the model was restored")


class _UndoBuilder:
    """Collects the original bytes of every touched span into a replace delta that takes
    the patched model back to its base."""

    def __init__(self, header: DeltaHeader, digest: str) -> None:
        self.h = header
        self.payload = tempfile.SpooledTemporaryFile(max_size=32 << 20)
        self.records: list[Record] = []
        self._cur: tuple[Plan, list[tuple[int, int]], io.BytesIO] | None = None

    def add(self, plan: Plan, k: int, data: memoryview) -> None:
        if self._cur is not None and (
            self._cur[0] is not plan
            or self._cur[2].tell() + len(data) + 8 * (len(self._cur[1]) + 1) + 64 > MAX_RECORD_PAYLOAD
        ):
            self._flush()
        if self._cur is None:
            self._cur = (plan, [], io.BytesIO())
        _, unit = type_layout(plan.record.type)
        start = (plan.offsets[k] - plan.tensor_offset) // unit
        runs = self._cur[1]
        n = plan.lengths[k] // unit
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + n)
        else:
            runs.append((start, n))
        self._cur[2].write(data)

    def _flush(self) -> None:
        if self._cur is None:
            return
        plan, runs, data = self._cur
        r = plan.record
        payload = encode_runs(runs) + data.getvalue()
        self.records.append(Record(
            file=r.file, tensor=r.tensor, type=r.type, shape=r.shape, encoding=ENC_REPLACE,
            offset=self.payload.tell(), length=len(payload), params={},
            pre_digest=r.post_digest, post_digest=r.pre_digest,
        ))
        self.payload.write(payload)
        self._cur = None

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

