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
import os
import shutil
import signal
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Callable, Sequence

from cdcca_edge.core.artifact import (
    ID_CHUNK,
    Artifact,
    digest_from_chunks,
    identity_digest,
    open_artifact,
    rehash_chunks,
    touched_chunks,
)
from cdcca_edge.core.delta_build import UNDO_KIND, UndoBuilder
from cdcca_edge.core.delta_format import (
    DeltaFile,
    Record,
    check_trust,
    read_delta,
)
from cdcca_edge.core.encodings import Plan, check_finite, make_plan
from cdcca_edge.core.errors import (
    CdccaError,
    FormatError,
    IntegrityError,
    StorageError,
    UsageError,
)
from cdcca_edge.core.fileio import fsync_dir
from cdcca_edge.core.journal import (
    PIECE,
    JournalUnusable,
    JournalWriter,
    bind,
    classify,
    journal_path,
    journal_path_for,
    present,
    quarantine,
    read_journal,
    restore,
    write_spans,
)
from cdcca_edge.core.lock import ArtifactLock, owner_path
from cdcca_edge.core.spans import gather, preallocate, windows
from cdcca_edge.core.state import (
    ArtifactState,
    LeafCache,
    cached_artifact,
    current_identity,
    layout_digest,
    leaves_path,
    read_state,
    state_path,
    temp_prefix,
    write_leaves,
    write_state,
)
from cdcca_edge.core.trust import Trust

DEFAULT_CHUNK = 4 << 20  # bytes of model read at once (peak memory); see docs/formats/delta.md
DEFAULT_SERVE_WAIT = 60.0  # seconds a server waits for a running patch before giving up


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
        if not present(jp):
            return None
        art = open_artifact(model)
    else:
        art = model
        jp = journal_path(art)
        if not present(jp):
            return None
    if not _locked:
        with ArtifactLock(art.path, exclusive=True, wait=wait):
            return recover(art, _locked=True)
    try:
        parsed = read_journal(jp)
        if parsed is None:
            outcome = "discarded"  # unfinished journal: no model byte was written yet
        else:
            meta, entries = parsed
            files = bind(art, meta, entries)
            where = classify(jp, files, entries)
            state = read_state(art)
            # a sidecar of an older version keeps the identity of its own scheme, which is
            # the scheme a journal written before the upgrade names its target in
            committed = (
                state is not None
                and meta["target_identity"] in (state.identity, state.legacy_identity)
                and any(h.get("delta_digest") == meta["delta_digest"] for h in state.history[-1:])
            )
            if committed and where == "new":
                outcome = "rolled forward"
            else:
                if where != "old":
                    restore(jp, files, entries)
                outcome = "rolled back"
    except JournalUnusable as exc:
        return quarantine(jp, f"journal {jp.name}: {exc}")
    _remove_stale_state_temps(art)
    jp.unlink()
    fsync_dir(jp.parent)
    return outcome


def _remove_stale_state_temps(art: Artifact) -> None:
    """A kill inside the commit (between a temporary sidecar's creation and its rename)
    leaves ``.MODEL.gguf.cdcca-state.json.*`` (or ``.leaves.*``); under this model's
    exclusive lock nobody else writes those, and other models' temporaries are named
    after them."""
    sp, lp = state_path(art), leaves_path(art)
    for tmp in [*sp.parent.glob(f"{glob_escape(temp_prefix(sp))}*"), *lp.parent.glob(f"{glob_escape(temp_prefix(lp))}*")]:
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
        if not present(jp):
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
    protected = [*art.files, art.path, state_path(art), leaves_path(art), journal_path(art), delta]
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


def _journal_pass(art: Artifact, d: DeltaFile, journal: JournalWriter | None,
                  undo: "UndoBuilder | None", chunk: int, result: PatchResult,
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
            for i, j, start, length in windows(p, chunk):
                offs, lens = p.offsets[i:j], p.lengths[i:j]
                if journal is not None:  # blocks about to be written must exist first
                    preallocate(fd, int(offs[0]), int(offs[-1] + lens[-1] - offs[0]))
                old = gather(fd, start, length, offs - start, lens)
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
                    new_bytes = new.tobytes()
                    journal.entry(fi, offs, lens, old, new_bytes)
                    if undo:
                        undo.add(p, i, j, old, new_bytes)
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
    undo = UndoBuilder(h, d.digest) if undo_out else None
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
            journal = JournalWriter(jp, {
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
                    write_spans(fds[e.fi], e.offsets, e.lengths, j.read(e.total))
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
                    result.rehashed_bytes += write_leaves(art, new_state)
                except OSError:
                    pass  # only a cache: the next patch re-derives the leaves it cannot verify
            _crash_point()
            write_state(art, new_state)  # the commit point
        except BaseException as exc:
            try:
                restore(jp, files, journal.entries)
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
