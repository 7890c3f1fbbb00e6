"""Patching you can trust: the holes hostile testing found (issue 11), one regression test
(or table, or hypothesis strategy) each. Spec: docs/formats/delta.md sections 6-8 and
docs/security.md. "Unchanged" is decided by digests of whole files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdcca_edge.cli import main
from cdcca_edge.core import journal as J
from cdcca_edge.core import patch as P
from cdcca_edge.core.artifact import compute_identity, open_artifact
from cdcca_edge.core.delta_build import DeltaBuilder
from cdcca_edge.core.errors import FormatError, IntegrityError, UsageError
from cdcca_edge.core.state import read_state, state_path
from cdcca_edge.core.trust import Trust
from tests.core.delta_helpers import file_digest, make_gguf, random_units, reseal
from tests.hostile import hostile

NONE = Trust.none()


def identity(path: Path) -> str:
    return compute_identity(open_artifact(path)).digest


def two_record_delta(model: Path, out: Path, seed: int = 1) -> object:
    """Q8_0 blocks replaced and an F32 low-rank update: two records, two windows."""
    rng = np.random.default_rng(seed)
    b = DeltaBuilder(model)
    b.replace_units("Q8_0.w", [2, 40], [3, 5], random_units("Q8_0", 8, rng))
    b.add_low_rank("F32.w", rng.standard_normal((2, 256)) * 0.05, rng.standard_normal((16, 2)) * 0.05, 1.0)
    return b.write(out)


def crash_at(model: Path, delta: Path, n: int) -> int:
    """Run apply_delta in a forked child that SIGKILLs itself at crash point ``n``."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.environ["CDCCA_TEST_CRASH_AFTER"] = str(n)
            P.apply_delta(model, delta, trust=NONE)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A base model, its target, and the genuine journal of a patch killed half-way through
    the write pass (crash point 4 of 8: the first record written, the second not)."""
    d = tmp_path_factory.mktemp("scene")
    base = make_gguf(d / "base.gguf")
    summary = two_record_delta(base, d / "d.cdcd")
    target = d / "target.gguf"
    shutil.copy(base, target)
    P.apply_delta(target, d / "d.cdcd", trust=NONE)
    mixed = d / "mixed.gguf"
    shutil.copy(base, mixed)
    status = crash_at(mixed, d / "d.cdcd", 4)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    journal = P.journal_path_for(mixed).read_bytes()
    assert file_digest(mixed) not in (file_digest(base), file_digest(target))
    return Scene({"dir": d, "base": base, "target": target, "mixed": mixed, "journal": journal,
                  "summary": summary, "delta": d / "d.cdcd"})


class Scene(dict):
    def __repr__(self) -> str:  # hypothesis prints its arguments: keep it short
        return f"Scene({self['dir']})"


def place(scene, where: Path, journal: bytes | None = None, model: str = "mixed") -> Path:
    """A copy of ``model`` at ``where`` with ``journal`` (default: the genuine one, rebound
    to the copy's inode as if the crash had happened there) beside it."""
    shutil.copy(scene[model], where)
    if journal is None:
        meta, entries = split_journal(scene["journal"])
        st_ = os.stat(where)
        meta["files"][0].update(size=st_.st_size, ino=st_.st_ino, dev=st_.st_dev)
        journal = seal_journal(meta, entries)
    P.journal_path_for(where).write_bytes(journal)
    return where


# --- journals: parse, forge, reseal ------------------------------------------------------


def split_journal(raw: bytes) -> tuple[dict, list[tuple[int, list[int], list[int], bytes, bytes]]]:
    mlen = struct.unpack_from("<Q", raw, 8)[0]
    meta = json.loads(raw[16 : 16 + mlen])
    pos, end = 16 + mlen, len(raw) - (8 + 8 + 32)
    entries = []
    while pos < end:
        fi, n = J.JOURNAL_ENTRY.unpack_from(raw, pos)
        pos += J.JOURNAL_ENTRY.size
        offs = list(struct.unpack_from(f"<{n}Q", raw, pos))
        lens = list(struct.unpack_from(f"<{n}I", raw, pos + 8 * n))
        pos += 12 * n
        total = sum(lens)
        entries.append((fi, offs, lens, raw[pos : pos + total], raw[pos + total : pos + 2 * total]))
        pos += 2 * total
    return meta, entries


def seal_journal(meta, entries) -> bytes:
    """A complete journal with a valid end hash: anyone can compute it (SHA-256)."""
    m = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    body = J.JOURNAL_MAGIC + struct.pack("<Q", len(m)) + m
    for fi, offs, lens, old, new in entries:
        body += J.JOURNAL_ENTRY.pack(fi, len(offs)) + struct.pack(f"<{len(offs)}Q", *offs)
        body += struct.pack(f"<{len(lens)}I", *lens) + old + new
    return body + J.JOURNAL_END + struct.pack("<Q", len(entries)) + hashlib.sha256(body).digest()


def test_genuine_journal_rolls_back_exactly(scene, tmp_path):
    m = place(scene, tmp_path / "m.gguf")
    assert P.recover(m) == "rolled back"
    assert file_digest(m) == file_digest(scene["base"])
    assert not P.journal_path_for(m).exists()


def _forge(scene, change) -> bytes:
    meta, entries = split_journal(scene["journal"])
    change(meta, entries)
    return seal_journal(meta, entries)


def _first_span(offset=None, length=None, fi=None):
    def change(meta, entries):
        fi0, offs, lens, old, new = entries[0]
        n = lens[0] if length is None else length
        entries[0] = (fi0 if fi is None else fi, [offs[0] if offset is None else offset], [n],
                      (old * (n // len(old) + 1))[:n], (new * (n // len(new) + 1))[:n])
    return change


# Each planted journal has a valid end hash; each must be quarantined, never applied.
PLANTED = {
    "offset 0 (the GGUF header)": _first_span(offset=0),
    "offset 2**40 (a 1 TB sparse file)": _first_span(offset=1 << 40),
    "file index out of range": _first_span(fi=7),
    "span longer than a patcher writes": _first_span(length=J.PIECE + 1),
    "metadata of the wrong type": lambda m, e: m.update(files="m.gguf"),
    "versions of the wrong type": lambda m, e: m.update(to_version="7"),
    "no layout": lambda m, e: m.pop("layout"),
    "other layout": lambda m, e: m.update(layout="0" * 64),
    "other inode": lambda m, e: m["files"][0].update(ino=m["files"][0]["ino"] + 1),
    "other size": lambda m, e: m["files"][0].update(size=m["files"][0]["size"] - 1),
    "other format": lambda m, e: m.update(artifact_format="onnx"),
    "a file the model lacks": lambda m, e: m["files"][0].update(key="../other.gguf"),
    "metadata not an object": lambda m, e: (m.clear(), m.update({"x": [1]})),
}


@pytest.mark.parametrize("case", sorted(PLANTED))
def test_planted_journal_is_quarantined(scene, tmp_path, case):
    hostile("journal")
    m = tmp_path / "m.gguf"
    shutil.copy(scene["base"], m)
    before = file_digest(m)
    forged = _forge(scene, PLANTED[case])
    jp = P.journal_path_for(m)
    jp.write_bytes(forged)
    if case.startswith(("other inode", "other size")):
        pass  # the bound file facts are what differ
    elif case not in ("other layout", "no layout", "metadata of the wrong type", "versions of the wrong type",
                      "other format", "a file the model lacks", "metadata not an object"):
        # bind the forged journal to this very file, so only the span checks can catch it
        meta, entries = split_journal(forged)
        st_ = os.stat(m)
        meta["files"][0].update(size=st_.st_size, ino=st_.st_ino, dev=st_.st_dev)
        jp.write_bytes(seal_journal(meta, entries))
    outcome = P.recover(m)
    assert outcome is not None and outcome.startswith("quarantined"), outcome
    assert file_digest(m) == before and m.stat().st_size == scene["base"].stat().st_size
    assert not jp.exists() and len(list(tmp_path.glob("m.gguf.cdcca-journal.quarantined-*"))) == 1
    assert main(["inspect", str(m), "--json"]) == 0  # the model is servable


def test_fresh_model_copied_over_a_crashed_patch_is_left_alone(scene, tmp_path):
    """The realistic case: a patch crashed, the user copied another version over the same
    path (same inode, same size). Rolling back would write stale bytes into it."""
    m = place(scene, tmp_path / "m.gguf")
    other = make_gguf(tmp_path / "other.gguf", seed=3)  # same layout, other weights
    with open(m, "r+b") as f:  # cp: same inode
        f.write(other.read_bytes())
    outcome = P.recover(m)
    assert outcome.startswith("quarantined") and "neither the original nor the new" in outcome
    assert file_digest(m) == file_digest(other)


def test_fresh_copy_of_the_base_is_kept_as_base(scene, tmp_path):
    m = place(scene, tmp_path / "m.gguf")
    with open(m, "r+b") as f:
        f.write(scene["base"].read_bytes())
    assert P.recover(m) == "rolled back"  # nothing to undo: every byte is the original
    assert file_digest(m) == file_digest(scene["base"])


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink", "dangling symlink"])
def test_journal_that_is_not_a_regular_file(scene, tmp_path, kind):
    hostile("journal")
    m = tmp_path / "m.gguf"
    shutil.copy(scene["base"], m)
    jp = P.journal_path_for(m)
    if kind == "fifo":
        os.mkfifo(jp)
    elif kind == "directory":
        jp.mkdir()
    elif kind == "symlink":
        (tmp_path / "real").write_bytes(scene["journal"])
        jp.symlink_to(tmp_path / "real")
    else:
        jp.symlink_to(tmp_path / "nowhere")
    signal.alarm(20)  # a FIFO used to hang `run` and `--recover` forever
    try:
        assert P.recover(m).startswith("quarantined")
        assert main(["patch", "--recover", str(m)]) == 0
    finally:
        signal.alarm(0)
    assert not os.path.lexists(jp) and file_digest(m) == file_digest(scene["base"])


@settings(max_examples=1500)
@given(data=st.data())
def test_mutated_journals_roll_back_exactly_or_are_quarantined(scene, tmp_path_factory, data):
    """Any change to a genuine journal — resealed with a valid hash or not — ends in the
    base model (a faithful roll back) or the model left exactly as it was (quarantine or
    an incomplete journal discarded): never other bytes, never another exception."""
    hostile("journal")
    meta, entries = split_journal(scene["journal"])
    how = data.draw(st.sampled_from(["meta", "span", "bytes", "truncate", "flip"]))
    raw = None
    if how == "meta":
        key = data.draw(st.sampled_from(sorted(meta) + ["extra"]))
        meta[key] = data.draw(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                                        st.text(max_size=70), st.lists(st.integers(), max_size=3),
                                        st.just(meta.get(key))))
    elif how == "span":
        k = data.draw(st.integers(0, len(entries) - 1))
        fi, offs, lens, old, new = entries[k]
        i = data.draw(st.integers(0, len(offs) - 1))
        offs = list(offs)
        offs[i] = data.draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(max(0, offs[i] - 300), offs[i] + 300)))
        entries[k] = (data.draw(st.sampled_from([fi, fi, 1, 65535])), offs, lens, old, new)
    elif how == "bytes":
        k = data.draw(st.integers(0, len(entries) - 1))
        fi, offs, lens, old, new = entries[k]
        old, new = bytearray(old), bytearray(new)
        target = data.draw(st.sampled_from([old, new]))
        j = data.draw(st.integers(0, len(target) - 1))
        target[j] ^= data.draw(st.integers(1, 255))
        entries[k] = (fi, offs, lens, bytes(old), bytes(new))
    else:
        raw = bytearray(scene["journal"])
        if how == "truncate":
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
        else:
            j = data.draw(st.integers(0, len(raw) - 1))
            raw[j] ^= 1 << data.draw(st.integers(0, 7))
    journal = bytes(raw) if raw is not None else seal_journal(meta, entries)
    d = tmp_path_factory.mktemp("mj")
    m = place(scene, d / "m.gguf", journal)
    st_ = os.stat(m)
    if how != "meta" and raw is None:  # bind to this copy: the deeper checks must hold
        meta2, entries2 = split_journal(journal)
        meta2["files"][0].update(size=st_.st_size, ino=st_.st_ino, dev=st_.st_dev)
        P.journal_path_for(m).write_bytes(seal_journal(meta2, entries2))
    before = file_digest(m)
    outcome = P.recover(m)
    after = file_digest(m)
    assert m.stat().st_size == st_.st_size
    # never a byte outside the spans the genuine patch touches (header, other tensors)
    _, genuine = split_journal(scene["journal"])
    mask = np.ones(st_.st_size, bool)
    for _, offs, lens, _, _ in genuine:
        for o, n in zip(offs, lens):
            mask[o : o + n] = False
    now, base = np.frombuffer(m.read_bytes(), np.uint8), np.frombuffer(scene["base"].read_bytes(), np.uint8)
    assert np.array_equal(now[mask], base[mask]), outcome
    if after not in (file_digest(scene["base"]), before):
        # only a forger who rewrote the journal's original bytes *and* resealed it can get
        # them written back (docs/security.md: such a local writer owns the model anyway)
        assert how == "bytes" and outcome == "rolled back", outcome
    elif after != file_digest(scene["base"]):
        assert outcome == "discarded" or outcome.startswith("quarantined"), outcome



@pytest.mark.parametrize("offset", [2**63 - 102, 2**63 - 1, 2**64 - 1])
def test_a_journal_span_offset_near_two_to_the_63_is_quarantined(scene, tmp_path, offset):
    """Regression (hypothesis found it): offset + length overflowed int64 into a negative
    number that passed the bounds check, and the read failed with EINVAL."""
    hostile("journal")
    meta, entries = split_journal(scene["journal"])
    fi, offs, lens, old, new = entries[0]
    entries[0] = (fi, [offset] + list(offs[1:]), lens, old, new)
    m = place(scene, tmp_path / "m.gguf", b"")
    st_ = os.stat(m)
    meta["files"][0].update(size=st_.st_size, ino=st_.st_ino, dev=st_.st_dev)
    P.journal_path_for(m).write_bytes(seal_journal(meta, entries))
    before = file_digest(m)
    outcome = P.recover(m)
    assert outcome.startswith("quarantined") and "outside every tensor" in outcome, outcome
    assert file_digest(m) == before


# --- locks: serving and patching exclude each other ------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from cdcca_edge.runtime import load
    m = load(sys.argv[1])
    print("loaded", flush=True)
    time.sleep(float(sys.argv[2]))
    m.close()
""")


@pytest.fixture(scope="module")
def served(exports, tmp_path_factory):
    """A real GGUF export and a delta for it (a q8_0 tensor's first blocks replaced)."""
    d = tmp_path_factory.mktemp("served")
    src = exports("llama", "gguf", "q8_0")
    path = Path(getattr(src, "path", src))
    shutil.copy(path, d / "m.gguf")
    art = open_artifact(d / "m.gguf")
    t = next(t for t in art.tensors if t.type_name == "Q8_0")
    b = DeltaBuilder(d / "m.gguf")
    b.replace_units(t.name, [0], [4], random_units("Q8_0", 4, np.random.default_rng(5)))
    b.write(d / "d.cdcd")
    return d


def test_patch_fails_fast_naming_the_serving_process(served, tmp_path):
    m = tmp_path / "m.gguf"
    shutil.copy(served / "m.gguf", m)
    before = file_digest(m)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(m), "30"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "loaded"
        code = subprocess.run([sys.executable, "-m", "cdcca_edge.cli", "patch", str(m), str(served / "d.cdcd")],
                              capture_output=True, text=True, timeout=120)
        assert code.returncode == 2, code.stderr
        assert f"pid {holder.pid}" in code.stderr and "--wait" in code.stderr
        assert file_digest(m) == before
    finally:
        holder.kill()
        holder.wait()


def test_patch_waits_for_the_server_with_wait(served, tmp_path):
    m = tmp_path / "m.gguf"
    shutil.copy(served / "m.gguf", m)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(m), "2"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "loaded"
        code = subprocess.run([sys.executable, "-m", "cdcca_edge.cli", "patch", str(m), str(served / "d.cdcd"),
                               "--wait", "120"], capture_output=True, text=True, timeout=180)
        assert code.returncode == 0, code.stderr
        assert holder.wait(60) == 0  # it finished serving the old model undisturbed
    finally:
        holder.kill()
    assert read_state(m).version == 1


def test_live_patch_through_the_backend_still_works(served, tmp_path):
    from cdcca_edge.runtime import load

    m = tmp_path / "m.gguf"
    shutil.copy(served / "m.gguf", m)
    with load(m) as model:
        with pytest.raises(UsageError, match="in use"):  # the lock is really held
            P.apply_delta(m, served / "d.cdcd", trust=NONE)
        r = model.apply_patch(served / "d.cdcd", trust=NONE)
        assert r.applied and model.generate("the").tokens
    assert read_state(m).version == 1


# --- memory is bounded by the window and one record ---------------------------------------

HWM = "print(int([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]))"
PEAK = textwrap.dedent("""
    import sys
    from cdcca_edge.core.patch import apply_delta
    from cdcca_edge.core.trust import Trust
    apply_delta(sys.argv[1], sys.argv[2], trust=Trust.none())
""") + HWM  # VmHWM, not ru_maxrss: that one is inherited across exec from the parent


def _dense_qadd_peak_kib(d: Path, rows: int, cols: int = 4096) -> int:
    """Peak memory of a patch process applying a dense 4-bit qadd over a (rows, cols) F32
    tensor, in 1024-row records (4 MiB of values, 2 MiB of codes each)."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(d / "big.gguf"), "llama")
    w.add_tensor("big.w", np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    b = DeltaBuilder(d / "big.gguf")
    rng = np.random.default_rng(1)
    step = 1024
    for r0 in range(0, rows, step):
        groups = [(r0 * cols // 32, step * cols // 32)]
        b.add_quantized("big.w", groups, np.full(step * cols // 32, 1e-3), rng.integers(-7, 8, step * cols), bits=4)
    b.write(d / "d.cdcd")
    run = subprocess.run([sys.executable, "-c", PEAK, str(d / "big.gguf"), str(d / "d.cdcd")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return int(run.stdout)


def test_dense_4bit_qadd_memory_follows_the_chunk_not_the_delta(tmp_path):
    """Peak memory must not grow with the delta: 32 MB and 96 MB dense 4-bit qadd deltas
    (the old patcher decoded and held every record: measured 124 -> 174 MB peak for 48 ->
    96 MB, this one 102 -> 102 MB)."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    small = _dense_qadd_peak_kib(tmp_path / "a", 2048)
    large = _dense_qadd_peak_kib(tmp_path / "b", 6144)  # three times the records and bytes
    idle = int(subprocess.run([sys.executable, "-c", "import cdcca_edge.core.patch, gguf\n" + HWM],
                              capture_output=True, text=True).stdout)
    assert large - small < 20 * 1024, (small, large)
    # a window (old + new bytes, 8 MiB each, and their float32 values) and one record
    assert large - idle < 160 * 1024, (idle, large)


def test_too_many_records_is_refused(tmp_path):
    hostile("delta")
    m = make_gguf(tmp_path / "m.gguf")
    two_record_delta(m, tmp_path / "d.cdcd")

    def many(h, payload):
        h["records"] = [dict(h["records"][0], offset=0, length=0)] * (1 << 16 | 1)
    forged = reseal(tmp_path / "d.cdcd", tmp_path / "f.cdcd", many)
    with pytest.raises(FormatError, match="exceed the limit"):
        P.apply_delta(m, forged, trust=NONE)


# --- the state sidecar ----------------------------------------------------------------------


def test_empty_delta_claiming_a_target_is_refused(tmp_path):
    """A delta with no records that claims target B used to commit B over A's bytes, so the
    genuine A->B delta was then skipped as 'already applied' forever."""
    m = make_gguf(tmp_path / "m.gguf")
    genuine = two_record_delta(m, tmp_path / "ab.cdcd")

    def empty(h, payload):
        h["records"] = []
        payload[:] = b""
    reseal(tmp_path / "ab.cdcd", tmp_path / "empty.cdcd", empty)
    before = file_digest(m)
    with pytest.raises(IntegrityError, match="target"):
        P.apply_delta(m, tmp_path / "empty.cdcd", trust=NONE)
    assert file_digest(m) == before
    assert P.apply_delta(m, tmp_path / "ab.cdcd", trust=NONE).applied
    assert identity(m) == genuine.target_identity


def test_target_identity_lie_is_rolled_back(tmp_path):
    m = make_gguf(tmp_path / "m.gguf")
    two_record_delta(m, tmp_path / "d.cdcd")
    reseal(tmp_path / "d.cdcd", tmp_path / "lie.cdcd", lambda h, p: h.update(target_identity="ab" * 32))
    before = file_digest(m)
    with pytest.raises(IntegrityError, match="lies about what it produces"):
        P.apply_delta(m, tmp_path / "lie.cdcd", trust=NONE)
    assert file_digest(m) == before and not P.journal_path_for(m).exists()


def _edit_state(m: Path, change) -> None:
    sp = state_path(open_artifact(m))
    doc = json.loads(sp.read_text())
    change(doc)
    sp.write_text(json.dumps(doc))


def test_edited_sidecar_identity_is_not_trusted(tmp_path):
    """A sidecar whose identity was edited to another base's used to let that base's delta
    apply (the pre-image digests caught only the touched bytes)."""
    a = make_gguf(tmp_path / "a.gguf", seed=0)
    other = make_gguf(tmp_path / "b.gguf", seed=4)
    two_record_delta(other, tmp_path / "for-b.cdcd")  # a delta for another base
    two_record_delta(a, tmp_path / "for-a.cdcd")
    P.apply_delta(a, tmp_path / "for-a.cdcd", trust=NONE)  # writes a state
    after_a = file_digest(a)
    _edit_state(a, lambda doc: doc.update(identity=identity(other)))
    with pytest.raises(IntegrityError, match="wrong base"):
        P.apply_delta(a, tmp_path / "for-b.cdcd", trust=NONE)
    assert file_digest(a) == after_a


def test_edited_layout_offset_cannot_redirect_writes(tmp_path):
    m = make_gguf(tmp_path / "m.gguf")
    s = two_record_delta(m, tmp_path / "d.cdcd")
    P.apply_delta(m, tmp_path / "d.cdcd", trust=NONE, dry_run=True)
    # a state with an edited offset (header region) but the rest intact
    from cdcca_edge.core.state import current_identity, write_state

    art = open_artifact(m)
    _, state, _ = current_identity(art)
    state.version = 0
    write_state(art, state)

    def move(doc):
        for row in doc["layout"]["tensors"]:
            row[4] = 0  # every offset into the GGUF header
    _edit_state(m, move)
    P.apply_delta(m, tmp_path / "d.cdcd", trust=NONE)
    assert identity(m) == s.target_identity
    assert open_artifact(m).metadata  # the header is intact


@settings(max_examples=600)
@given(data=st.data())
def test_any_sidecar_edit_is_rederived_or_refused(tmp_path_factory, data):
    hostile("sidecar")
    d = tmp_path_factory.mktemp("sc")
    m = make_gguf(d / "m.gguf")
    s = two_record_delta(m, d / "d.cdcd")
    art = open_artifact(m)
    from cdcca_edge.core.state import current_identity, write_state

    _, state, _ = current_identity(art)
    state.version = 0
    write_state(art, state)
    sp = state_path(art)
    doc = json.loads(sp.read_text())
    key = data.draw(st.sampled_from(sorted(doc)))
    doc[key] = data.draw(st.one_of(st.none(), st.integers(-5, 2**70), st.text(max_size=20),
                                   st.just([]), st.just({}), st.just("0" * 64)))
    if data.draw(st.booleans()):  # an editor who also recomputes the content digest
        from cdcca_edge.core.state import _content_digest

        doc["digest"] = _content_digest(doc)
    sp.write_text(json.dumps(doc))
    before = file_digest(m)
    try:
        P.apply_delta(m, d / "d.cdcd", trust=NONE)
    except (FormatError, IntegrityError, UsageError):
        assert file_digest(m) == before
        return
    assert identity(m) == s.target_identity


# --- disk full on a sparse model: an error, never SIGBUS -----------------------------------

SPARSE = textwrap.dedent("""
    import json, os, shutil, subprocess, sys
    from pathlib import Path
    from cdcca_edge.core import state
    src, sidecar, delta, mnt, fs = sys.argv[1:6]
    off, length, room = int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
    if fs == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", mnt], check=True)
    m = os.path.join(mnt, "m.gguf")
    shutil.copy(src, m)
    subprocess.run(["fallocate", "--punch-hole", "--offset", str(off), "--length", str(length), m], check=True)
    # a sidecar bound to this copy: the patcher trusts the identity and reads no hole for it
    doc = json.load(open(sidecar))
    doc["files"][""] = state.fingerprint(Path(m))
    if hasattr(state, "_content_digest"):
        doc["digest"] = state._content_digest(doc)
    json.dump(doc, open(m + ".cdcca-state.json", "w"))
    with open(os.path.join(mnt, "fill"), "wb") as f:  # leave `room` bytes free
        vfs = os.statvfs(mnt)
        f.write(bytes(max(0, vfs.f_bavail * vfs.f_frsize - room)))
    before = open(m, "rb").read()
    code = subprocess.run([sys.executable, "-m", "cdcca_edge.cli", "patch", m, delta],
                          capture_output=True, text=True)
    sys.stderr.write(code.stderr)
    print(code.returncode, open(m, "rb").read() == before, os.path.exists(m + ".cdcca-journal"))
""")


def _small_ext4(tmp_path: Path) -> Path | None:
    """An 8 MiB ext4 file system mounted from a loop image (root only), or None."""
    if os.geteuid() != 0 or shutil.which("mkfs.ext4") is None:
        return None
    img, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    made = subprocess.run(["mkfs.ext4", "-q", "-m", "0", str(img)], capture_output=True)
    ok = made.returncode == 0 and subprocess.run(["mount", "-o", "loop", str(img), str(mnt)],
                                                 capture_output=True).returncode == 0
    return mnt if ok else None


@pytest.mark.skipif(shutil.which("fallocate") is None, reason="needs util-linux fallocate")
@pytest.mark.parametrize("fs,room", [("tmpfs", "old journal fits"), ("tmpfs", "journal fits"),
                                     ("ext4", "old journal fits"), ("ext4", "journal fits")])
def test_disk_full_on_a_sparse_model_is_exit_2_not_sigbus(tmp_path, fs, room):
    """A model file with holes (sparse, as after `cp --sparse`) on a nearly full file
    system: writing the holes needs space. The patcher wrote through a map and died of
    SIGBUS (exit 135, no message, model mixed until the next recovery) — on ext4 with
    room for its journal but not for the holes."""
    from cdcca_edge.core.state import record_export

    m = make_gguf(tmp_path / "m.gguf", rows=64, cols=1024)  # F32.w: 256 KiB
    t = open_artifact(m).tensor("F32.w")
    page = 4096
    off = (t.offset + page - 1) // page * page
    length = (t.offset + t.nbytes) // page * page - off
    subprocess.run(["fallocate", "--punch-hole", "--offset", str(off), "--length", str(length), str(m)], check=True)
    record_export(open_artifact(m), identity(m))
    b = DeltaBuilder(m)  # against the holes (they read as zeros)
    b.replace_tensor("F32.w", random_units("F32", 64 * 1024, np.random.default_rng(2)))
    b.write(tmp_path / "d.cdcd")
    (tmp_path / "mnt").mkdir()
    # "old journal fits": room for the original bytes but not for the holes as well (the
    # old patcher's journal; it then faulted writing the holes); "journal fits": room for
    # this patcher's journal (old + new bytes) but not for the holes
    free = {"old journal fits": t.nbytes + 150 * 1024, "journal fits": 2 * t.nbytes + 160 * 1024}[room]
    args = [str(m), str(state_path(open_artifact(m))), str(tmp_path / "d.cdcd"), str(tmp_path / "mnt"),
            fs, str(off), str(length), str(free)]
    if fs == "tmpfs":
        if shutil.which("unshare") is None:
            pytest.skip("needs util-linux unshare")
        cmd = ["unshare", "-rm", sys.executable, "-c", SPARSE, *args]
    else:
        if _small_ext4(tmp_path) is None:
            pytest.skip("needs root and a loop device to mount a small ext4")
        args[4] = "ready"
        cmd = [sys.executable, "-c", SPARSE, *args]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    finally:
        if fs == "ext4":
            subprocess.run(["umount", str(tmp_path / "mnt")], capture_output=True)
    if run.returncode != 0 and "mount" in run.stderr and "permission" in run.stderr.lower():
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    if run.returncode != 0 and "unshare failed" in run.stderr:
        pytest.skip("cannot create a user namespace here (qemu-user does not emulate unshare)")
    assert run.returncode == 0, run.stderr
    code, unchanged, journal_left = run.stdout.split()
    assert code == "2", run.stderr  # was -7 (SIGBUS) with no message
    assert unchanged == "True" and journal_left == "False"
    assert "space" in run.stderr


# --- versions only move forward -------------------------------------------------------------


def test_downgrade_and_replay_are_refused(tmp_path):
    a = make_gguf(tmp_path / "a.gguf", seed=0)
    b = make_gguf(tmp_path / "b.gguf", seed=5)
    from cdcca_edge.core.delta_build import diff_artifacts

    diff_artifacts(a, b, tmp_path / "ab.cdcd")  # version 0 -> 1
    m = tmp_path / "m.gguf"
    shutil.copy(a, m)
    assert main(["patch", str(m), str(tmp_path / "ab.cdcd")]) == 0
    diff_artifacts(b, a, tmp_path / "ba.cdcd")  # a delta back to A, version 0 -> 1 of b
    reseal(tmp_path / "ba.cdcd", tmp_path / "ba-old.cdcd",
           lambda h, p: h.update(from_version=1, to_version=0))
    before = file_digest(m)
    assert main(["patch", str(m), str(tmp_path / "ba-old.cdcd")]) == 3  # going back
    assert file_digest(m) == before
    reseal(tmp_path / "ba.cdcd", tmp_path / "ba-same.cdcd", lambda h, p: h.update(from_version=1, to_version=1))
    assert main(["patch", str(m), str(tmp_path / "ba-same.cdcd")]) == 3  # not forward either
    assert main(["patch", str(m), str(tmp_path / "ba-old.cdcd"), "--allow-downgrade"]) == 0
    assert identity(m) == identity(a) and read_state(m).version == 0


# --- non-finite results are never written ----------------------------------------------------


def _unchecked_builder(monkeypatch) -> None:
    import cdcca_edge.core.delta_build as db

    monkeypatch.setattr(db, "check_finite", lambda rec, old, new: None)  # a careless sender


def _overflow(case: str, b: DeltaBuilder) -> None:
    rng = np.random.default_rng(0)
    if case == "qadd F16 overflow":
        b.add_quantized("F16.w", [(0, 2)], [600.0, 600.0], [127] * 64, bits=8)  # 76200 > 65504
    elif case == "replace NaN scale":
        blocks = bytearray(random_units("Q8_0", 2, rng))
        blocks[0:2] = np.array([np.nan], np.float16).tobytes()
        b.replace_units("Q8_0.w", [0], [2], bytes(blocks))
    elif case == "lowrank 3e38 scale":
        b.add_low_rank("F32.w", np.ones((1, 256)), np.full((16, 1), 2.0), 3e38)  # 6e38: inf in F32
    else:
        b.replace_units("F32.w", [5], [1], np.array([np.inf], np.float32).tobytes())


@pytest.mark.parametrize("case", ["qadd F16 overflow", "replace NaN scale", "lowrank 3e38 scale", "replace F32 inf"])
def test_non_finite_results_are_refused(tmp_path, monkeypatch, case):
    """These applied with exit 0; `run` then failed with ZeroDivisionError."""
    hostile("delta")
    m = make_gguf(tmp_path / "m.gguf")
    with monkeypatch.context() as mp:
        _unchecked_builder(mp)
        b = DeltaBuilder(m)
        _overflow(case, b)
        b.write(tmp_path / "d.cdcd")
    before = file_digest(m)
    assert main(["patch", str(m), str(tmp_path / "d.cdcd")]) == 3
    assert file_digest(m) == before and not P.journal_path_for(m).exists()
    with pytest.raises(FormatError, match="non-finite"):  # a careful builder never emits it
        _overflow(case, DeltaBuilder(m))


# --- --undo-out is checked before the first write -------------------------------------------


@pytest.mark.parametrize("case", ["missing directory", "the model", "the delta", "a directory", "the sidecar",
                                  "the leaf cache"])
def test_bad_undo_out_is_refused_before_writing(tmp_path, case):
    hostile("cli")
    m = make_gguf(tmp_path / "m.gguf")
    two_record_delta(m, tmp_path / "d.cdcd")
    P.apply_delta(m, tmp_path / "d.cdcd", trust=NONE, dry_run=True)
    out = {"missing directory": tmp_path / "no" / "u.cdcd", "the model": m, "the delta": tmp_path / "d.cdcd",
           "a directory": tmp_path, "the sidecar": tmp_path / "m.gguf.cdcca-state.json",
           "the leaf cache": tmp_path / "m.gguf.cdcca-state.leaves"}[case]
    before = file_digest(m)
    assert main(["patch", str(m), str(tmp_path / "d.cdcd"), "--undo-out", str(out)]) == 2
    assert file_digest(m) == before and open_artifact(m).tensors


# --- trust configuration fails closed ----------------------------------------------------------


@pytest.fixture
def keypair(tmp_path):
    assert main(["delta", "keygen", "-o", str(tmp_path / "k.pem")]) == 0
    return tmp_path / "k.pem.pub"


@pytest.mark.parametrize("case,exit_code", [
    ("directory", 2), ("missing explicit", 2), ("typo key", 3), ("string not list", 3),
    ("not json", 3), ("not an object", 3), ("list of ints", 3), ("missing key file", 2),
])
def test_bad_trust_config_is_an_error(tmp_path, monkeypatch, keypair, case, exit_code):
    hostile("config")
    m = make_gguf(tmp_path / "m.gguf")
    two_record_delta(m, tmp_path / "d.cdcd")  # unsigned: must never apply by accident
    cfg = tmp_path / "config.json"
    docs = {"typo key": {"trusted_key": [str(keypair)]}, "string not list": {"trusted_keys": str(keypair)},
            "not an object": [str(keypair)], "list of ints": {"trusted_keys": [1]},
            "missing key file": {"trusted_keys": [str(tmp_path / "nope.pub")]}}
    if case == "directory":
        cfg.mkdir()
    elif case == "not json":
        cfg.write_text("{trusted_keys: x")
    elif case != "missing explicit":
        cfg.write_text(json.dumps(docs[case]))
    monkeypatch.setenv("CDCCA_CONFIG", str(cfg))
    monkeypatch.delenv("CDCCA_TRUSTED_KEYS", raising=False)
    before = file_digest(m)
    assert main(["patch", str(m), str(tmp_path / "d.cdcd")]) == exit_code
    assert file_digest(m) == before


def test_configured_key_refuses_unsigned(tmp_path, monkeypatch, keypair):
    m = make_gguf(tmp_path / "m.gguf")
    two_record_delta(m, tmp_path / "d.cdcd")
    (tmp_path / "config.json").write_text(json.dumps({"trusted_keys": ["k.pem.pub"]}))  # relative to it
    monkeypatch.setenv("CDCCA_CONFIG", str(tmp_path / "config.json"))
    monkeypatch.delenv("CDCCA_TRUSTED_KEYS", raising=False)
    assert len(Trust.configured().public_keys) == 1
    assert main(["patch", str(m), str(tmp_path / "d.cdcd")]) == 3


def test_trust_policy_is_explicit():
    with pytest.raises(UsageError):
        Trust.keys([])
    assert not Trust.none().requires_signature
    with pytest.raises(TypeError):
        P.apply_delta("m.gguf", "d.cdcd")  # no trust policy: no call


@settings(max_examples=500)
@given(doc=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                        lambda c: st.one_of(st.lists(c, max_size=3),
                                            st.dictionaries(st.sampled_from(["trusted_keys", "trusted_key", "x"]) | st.text(max_size=12), c, max_size=3)),
                        max_leaves=8))
def test_any_config_is_keys_or_a_clean_error(tmp_path_factory, doc):
    hostile("config")
    d = tmp_path_factory.mktemp("cfg")
    (d / "config.json").write_text(json.dumps(doc))
    env = dict(os.environ, CDCCA_CONFIG=str(d / "config.json"))
    env.pop("CDCCA_TRUSTED_KEYS", None)
    old = os.environ.copy()
    os.environ.clear()
    os.environ.update(env)
    try:
        t = Trust.configured()
        assert isinstance(doc, dict) and set(doc) <= {"trusted_keys"}
        assert not t.public_keys and doc.get("trusted_keys", []) == []
    except (FormatError, UsageError):
        pass
    finally:
        os.environ.clear()
        os.environ.update(old)


# --- exit codes of the patch path ----------------------------------------------------------


def _onnx_with_state(d: Path) -> tuple[Path, object]:
    from tests.core.delta_helpers import make_onnx

    m = make_onnx(d / "m")
    from cdcca_edge.core.state import record_export

    record_export(open_artifact(m), identity(m))
    b = DeltaBuilder(m)
    b.replace_units("w32", [3], [2], random_units("F32", 2, np.random.default_rng(3)))
    return m, b.write(d / "d.cdcd")


def test_sidecar_layout_key_out_of_the_directory_is_ignored(tmp_path):
    """A cached file key "../x" must never send reads or writes out of the artefact."""
    from cdcca_edge.core.state import _content_digest

    hostile("sidecar")
    m, s = _onnx_with_state(tmp_path)
    sp = state_path(open_artifact(m))
    doc = json.loads(sp.read_text())
    for row in doc["layout"]["tensors"]:
        row[3] = "../m.onnx_data"
    (tmp_path / "m.onnx_data").write_bytes((m / "model.onnx_data").read_bytes())  # a decoy outside
    doc["digest"] = _content_digest(doc)
    sp.write_text(json.dumps(doc))
    decoy = file_digest(tmp_path / "m.onnx_data")
    assert main(["patch", str(m), str(tmp_path / "d.cdcd")]) == 0
    assert identity(m) == s.target_identity and file_digest(tmp_path / "m.onnx_data") == decoy


def test_missing_onnx_data_file_is_exit_3_from_patch_and_inspect(tmp_path):
    hostile("onnx")
    m, _ = _onnx_with_state(tmp_path)
    (m / "model.onnx_data").unlink()
    assert main(["inspect", str(m)]) == 3
    assert main(["patch", str(m), str(tmp_path / "d.cdcd")]) == 3



# --- found by the review of issue 12's code ------------------------------------------------


def test_undo_of_a_record_split_over_several_undo_records_applies(tmp_path):
    """A record over 8 MiB of original bytes is undone by several undo records; each must
    carry the digests of its own spans (it used to carry the whole record's)."""
    from gguf import GGUFWriter

    m = tmp_path / "m.gguf"
    rng = np.random.default_rng(0)
    w = GGUFWriter(str(m), "llama")
    w.add_tensor("big", rng.standard_normal((3072, 1024)).astype(np.float32))  # 12 MiB
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    base = file_digest(m)
    b = DeltaBuilder(m)
    b.add_low_rank("big", rng.standard_normal((2, 1024)) * 0.01, rng.standard_normal((3072, 2)), 0.1)
    b.write(tmp_path / "fwd.cdcd")
    P.apply_delta(m, tmp_path / "fwd.cdcd", trust=NONE, undo_out=tmp_path / "undo.cdcd")
    from cdcca_edge.core.delta_format import read_delta

    assert len(read_delta(tmp_path / "undo.cdcd").header.records) >= 2
    assert P.apply_delta(m, tmp_path / "undo.cdcd", trust=NONE, allow_downgrade=True).applied
    assert file_digest(m) == base


def test_recovering_one_model_leaves_another_models_temporaries_alone(tmp_path):
    """Two GGUF models in one directory: tidying up after a crash of A's patch must not
    delete B's sidecar being written (the lock covers A only)."""
    a = make_gguf(tmp_path / "a.gguf", seed=0)
    make_gguf(tmp_path / "b.gguf", seed=1)
    two_record_delta(a, tmp_path / "d.cdcd")
    mine = tmp_path / ".a.gguf.cdcca-state.json.left"
    theirs = tmp_path / ".b.gguf.cdcca-state.json.writing"
    for n in range(1, 40):
        if os.WIFSIGNALED(crash_at(a, tmp_path / "d.cdcd", n)) and P.journal_path_for(a).exists():
            break
    mine.write_text("{}")
    theirs.write_text("{}")
    P.recover(a)
    assert not mine.exists() and theirs.exists()


def test_a_patch_committed_before_the_upgrade_rolls_forward(tmp_path):
    """Killed after the commit and before the journal was removed, by a cdcca-edge whose
    sidecars were version 2: the upgraded recovery must see the commit (the old
    sidecar's identity is of the old scheme, as is the journal's target)."""
    from cdcca_edge.core import state as S

    m = make_gguf(tmp_path / "m.gguf", seed=1)
    S.record_export(open_artifact(m), identity(m))
    two_record_delta(m, tmp_path / "d.cdcd")
    sp = S.state_path(open_artifact(m))
    for n in range(1, 60):  # the last crash point that leaves a journal is after the commit
        status = crash_at(m, tmp_path / "d.cdcd", n)
        if not os.WIFSIGNALED(status):
            pytest.fail("no crash point after the commit")
        if P.journal_path_for(m).exists() and json.loads(sp.read_text())["artifact_version"] == 1:
            break
        P.recover(m)
    target = identity(m)
    doc = json.loads(sp.read_text())  # as the previous release wrote it
    doc["version"] = 2
    doc.pop("tensor_digests")
    doc.pop("digest")
    doc["digest"] = S._content_digest(doc)
    sp.write_text(json.dumps(doc))
    assert P.recover(m) == "rolled forward"
    assert identity(m) == target


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_delta_or_bundle_that_is_no_regular_file_is_refused(tmp_path, kind):
    from cdcca_edge.core.delta_format import read_delta
    from cdcca_edge.core.uplink_format import read_uplink
    from tests.core.hostile_fs import no_hang

    p = tmp_path / "x"
    os.mkfifo(p) if kind == "fifo" else p.mkdir()
    for reader in (read_delta, read_uplink):
        hostile("delta")
        with no_hang():
            with pytest.raises(FormatError, match="not a regular file"):
                reader(p)


def test_a_leaf_cache_path_that_is_a_directory_costs_no_whole_model_hash(tmp_path):
    from cdcca_edge.core.state import leaves_path, record_export

    m = make_gguf(tmp_path / "m.gguf")
    record_export(open_artifact(m), identity(m))
    lp = leaves_path(open_artifact(m))
    lp.unlink()
    lp.mkdir()
    size = sum(t.nbytes for t in open_artifact(m).tensors)
    for seed in (1, 2):
        s = two_record_delta(m, tmp_path / f"d{seed}.cdcd", seed=seed)
        r = P.apply_delta(m, tmp_path / f"d{seed}.cdcd", trust=NONE)
        assert r.applied and identity(m) == s.target_identity
        assert r.rehashed_bytes < size  # only the touched tensors, never the whole model
    assert lp.is_dir()
