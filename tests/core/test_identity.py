"""Identity scheme v2 (docs/formats/artifact.md, section 2): tensor digests are Merkle
roots over 4 KiB leaves, so a patch re-hashes only the leaves it wrote; the leaf cache
beside the sidecar is checked before use; older sidecars are migrated once."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdcca_edge.core import artifact
from cdcca_edge.core import patch as P
from cdcca_edge.core.artifact import (
    ID_CHUNK,
    TensorInfo,
    bytes_digest,
    chunk_count,
    compute_identity,
    digest_from_chunks,
    hash_chunks,
    open_artifact,
    rehash_chunks,
    tensor_digest,
    touched_chunks,
)
from cdcca_edge.core.delta_build import DeltaBuilder
from cdcca_edge.core.delta_format import FORMAT_VERSION, PREAMBLE
from cdcca_edge.core.errors import FormatError
from cdcca_edge.core.state import (
    LEAVES_HEADER,
    STATE_VERSION,
    _content_digest,
    leaves_path,
    read_state,
    record_export,
    state_path,
)
from cdcca_edge.core.trust import Trust
from tests.core.delta_helpers import file_digest, make_gguf, random_units
from tests.hostile import hostile

NONE = Trust.none()


def _ident(path: Path) -> str:
    return compute_identity(open_artifact(path)).digest


def test_tensor_digest_is_the_merkle_root_of_its_leaves():
    data = np.random.default_rng(0).integers(0, 256, 3 * ID_CHUNK + 100, dtype=np.uint8).tobytes()
    leaves = b"".join(hashlib.sha256(data[i : i + ID_CHUNK]).digest() for i in range(0, len(data), ID_CHUNK))
    want = hashlib.sha256(b"cdcca-tensor-v2\0" + len(data).to_bytes(8, "little") + leaves).hexdigest()
    assert bytes_digest(data) == want == digest_from_chunks(len(data), hash_chunks(data))
    assert bytes_digest(data) != bytes_digest(data[:-1]) != bytes_digest(data[:-1] + b"\0")
    with pytest.raises(ValueError):
        digest_from_chunks(len(data), leaves[:-32])


def test_file_and_memory_digests_agree(tmp_path):
    m = make_gguf(tmp_path / "m.gguf", rows=64, cols=512)
    for t in open_artifact(m).tensors:
        with open(t.file, "rb") as f:
            f.seek(t.offset)
            assert tensor_digest(t) == bytes_digest(f.read(t.nbytes)), t.name


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_rehash_of_touched_leaves_equals_a_full_hash(tmp_path_factory, data):
    """Splicing spans into a tensor and re-hashing only the leaves they touch gives the
    digest of the spliced bytes, for any tensor size and any set of spans."""
    n = data.draw(st.integers(1, 40 * ID_CHUNK + 7), label="nbytes")
    lead = data.draw(st.integers(0, 40), label="tensor offset")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    raw = bytearray(rng.integers(0, 256, lead + n + 9, dtype=np.uint8).tobytes())
    path = tmp_path_factory.mktemp("rh") / "t.bin"
    path.write_bytes(raw)
    t = TensorInfo("t", "U8", (n,), path, lead, n)
    spans, pos = [], 0
    while pos < n and len(spans) < 8:
        start = data.draw(st.integers(pos, min(n - 1, pos + 12 * ID_CHUNK)))
        length = data.draw(st.integers(1, min(n - start, 3 * ID_CHUNK)))
        spans.append((lead + start, rng.integers(0, 256, length, dtype=np.uint8).tobytes()))
        pos = start + length + data.draw(st.integers(0, ID_CHUNK))
    leaves = bytearray(hash_chunks(bytes(raw[lead : lead + n])))
    mask = touched_chunks(t, [o for o, _ in spans], [len(b) for _, b in spans])
    for o, b in spans:  # exactly the leaves the spans overlap are flagged
        assert mask[(o - lead) // ID_CHUNK] and mask[(o - lead + len(b) - 1) // ID_CHUNK]
    assert int(mask.sum()) <= sum(chunk_count(len(b)) + 1 for _, b in spans)
    # short reads, so that windows cut runs of flagged leaves, dense and sparse ones
    per_read = data.draw(st.sampled_from([1, 2, 3, 8, 16, 256]), label="leaves per read")
    monkey = pytest.MonkeyPatch()
    monkey.setattr(artifact, "REHASH_WINDOW", per_read * ID_CHUNK)
    try:
        rehash_chunks(t, leaves, mask, splice=spans)
    finally:
        monkey.undo()
    for o, b in spans:
        raw[o : o + len(b)] = b
    assert digest_from_chunks(n, leaves) == bytes_digest(bytes(raw[lead : lead + n]))
    path.write_bytes(raw)  # and from the file after the write, no splice
    leaves2 = bytearray(hash_chunks(b"\0" * n))  # stale leaves everywhere flagged...
    full = np.ones(chunk_count(n), bool)
    rehash_chunks(t, leaves2, full)
    assert digest_from_chunks(n, leaves2) == bytes_digest(bytes(raw[lead : lead + n]))


def _big(tmp_path: Path) -> Path:
    """Six 64 x 2048 matrices (F32: 512 KiB, 128 leaves) and a sidecar from export."""
    m = make_gguf(tmp_path / "m.gguf", rows=64, cols=2048)
    art = open_artifact(m)
    record_export(art, compute_identity(art).digest)
    return m


def _small_delta(m: Path, out: Path, seed: int = 1):
    rng = np.random.default_rng(seed)
    b = DeltaBuilder(m)
    b.replace_units("Q8_0.w", [5, 3000], [2, 1], random_units("Q8_0", 3, rng))
    b.replace_units("F32.w", [70000], [64], random_units("F32", 64, rng))
    return b.write(out)


def test_patch_rehashes_only_the_leaves_it_wrote(tmp_path):
    m = _big(tmp_path)
    s = _small_delta(m, tmp_path / "d.cdcd")
    size = sum(t.nbytes for t in open_artifact(m).tensors)
    r = P.apply_delta(m, tmp_path / "d.cdcd", trust=NONE)
    assert r.identity_check == "state"
    # three spans: at most two leaves each (a span may straddle a boundary)
    assert 0 < r.rehashed_bytes <= 6 * ID_CHUNK < size // 50
    assert _ident(m) == s.target_identity == read_state(m).identity
    # the leaf cache now holds the new leaves: the next patch again reads only its own
    s2 = _small_delta(m, tmp_path / "d2.cdcd", seed=2)
    r2 = P.apply_delta(m, tmp_path / "d2.cdcd", trust=NONE)
    assert r2.rehashed_bytes <= 6 * ID_CHUNK and _ident(m) == s2.target_identity


def _corrupt_cache(kind: str, lp: Path, m: Path) -> None:
    raw = bytearray(lp.read_bytes())
    if kind == "flipped leaf":
        raw[LEAVES_HEADER.size + 40] ^= 1
    elif kind == "every leaf zero":
        raw[LEAVES_HEADER.size:] = bytes(len(raw) - LEAVES_HEADER.size)
    elif kind == "truncated":
        raw = raw[: len(raw) // 2]
    elif kind == "extended":
        raw += b"\0" * 32
    elif kind == "bad magic":
        raw[:8] = b"NOTLEAF!"
    elif kind == "other leaf size":
        raw[8:12] = struct.pack("<I", 8192)
    elif kind == "other layout":
        raw[16:48] = bytes(32)
    elif kind == "empty":
        raw = bytearray()
    if kind == "directory":
        lp.unlink()
        lp.mkdir()
    elif kind == "symlink to a copy":
        copy = lp.with_name("copy")
        copy.write_bytes(raw)
        lp.unlink()
        lp.symlink_to(copy)
    elif kind == "fifo":
        lp.unlink()
        os.mkfifo(lp)
    elif kind == "missing":
        lp.unlink()
    else:
        lp.write_bytes(bytes(raw))


CACHE_CASES = ["flipped leaf", "every leaf zero", "truncated", "extended", "bad magic",
               "other leaf size", "other layout", "empty", "directory", "symlink to a copy",
               "fifo", "missing"]


@pytest.mark.parametrize("kind", CACHE_CASES)
def test_a_bad_leaf_cache_is_rederived_never_trusted(tmp_path, kind):
    """The cache is not trusted: a leaf that does not give the sidecar's tensor digest is
    recomputed from the bytes, so a forged or stale cache cannot make a patch commit a
    wrong identity, nor fail a good patch."""
    m = _big(tmp_path)
    s = _small_delta(m, tmp_path / "d.cdcd")
    lp = leaves_path(open_artifact(m))
    _corrupt_cache(kind, lp, m)
    hostile("leaves")
    r = P.apply_delta(m, tmp_path / "d.cdcd", trust=NONE)
    assert r.applied and _ident(m) == s.target_identity == read_state(m).identity
    if kind == "flipped leaf":  # only the damaged tensor was re-read whole
        assert r.rehashed_bytes < sum(t.nbytes for t in open_artifact(m).tensors) // 2
    s2 = _small_delta(m, tmp_path / "d2.cdcd", seed=3)
    assert P.apply_delta(m, tmp_path / "d2.cdcd", trust=NONE).applied
    assert _ident(m) == s2.target_identity


def test_a_stale_cache_from_before_a_rollback_is_not_used(tmp_path):
    """A kill after the new leaves were written but before the commit: the data rolls
    back, the cache holds leaves of bytes that are no longer there."""
    m = _big(tmp_path)
    s = _small_delta(m, tmp_path / "d.cdcd")
    lp = leaves_path(open_artifact(m))
    before = lp.read_bytes()
    from tests.core.test_patch_hostile import crash_at

    for n in range(1, 40):
        status = crash_at(m, tmp_path / "d.cdcd", n)
        if os.WIFSIGNALED(status) and lp.read_bytes() != before:
            break
    else:
        pytest.fail("no crash point between the cache write and the commit")
    P.recover(m)
    assert _ident(m) == s.base_identity
    r = P.apply_delta(m, tmp_path / "d.cdcd", trust=NONE)
    assert r.applied and _ident(m) == s.target_identity == read_state(m).identity


def _as_version_2(m: Path, version: int) -> None:
    """Rewrite the sidecar as the version-2 one an older cdcca-edge left (identity of the
    old scheme, sealed with its content digest)."""
    sp = state_path(open_artifact(m))
    doc = json.loads(sp.read_text())
    doc.update(version=2, identity="11" * 32, artifact_version=version,
               tensor_digests={k: "22" * 32 for k in doc["tensor_digests"]})
    doc["digest"] = _content_digest(doc)
    sp.write_text(json.dumps(doc))
    leaves_path(open_artifact(m)).unlink(missing_ok=True)


def test_an_older_sidecar_is_migrated_once_keeping_its_version(tmp_path):
    m = _big(tmp_path)
    _as_version_2(m, version=4)
    st = read_state(m)
    assert st.migrated_from == 2 and st.version == 4 and st.identity == ""
    b = DeltaBuilder(m)  # the cloud's mirror migrates the same way
    assert b.from_version == 4 and b.base_identity == _ident(m)
    _as_version_2(m, version=4)
    rng = np.random.default_rng(0)
    b.replace_units("Q8_0.w", [1], [1], random_units("Q8_0", 1, rng))
    s = b.write(tmp_path / "d.cdcd")
    r = P.apply_delta(m, tmp_path / "d.cdcd", trust=NONE)
    assert r.identity_check == "migrated" and r.version_before == 4
    after = read_state(m)
    assert after.migrated_from is None and after.version == 5 and after.identity == s.target_identity
    assert json.loads(state_path(open_artifact(m)).read_text())["version"] == STATE_VERSION
    assert leaves_path(open_artifact(m)).exists()
    # the version rule holds across the migration: version 4 -> 5 cannot be replayed
    _as_version_2(m, version=5)
    r = P.apply_delta(m, tmp_path / "d.cdcd", trust=NONE)
    assert r.already_applied


def test_a_migrated_sidecar_whose_bytes_changed_is_dropped(tmp_path):
    """An old sidecar vouches for a version only while the files are the ones it saw."""
    m = _big(tmp_path)
    _as_version_2(m, version=4)
    os.utime(m, ns=(1, 1))  # any change of the fingerprint
    assert DeltaBuilder(m).from_version == 0  # version unknown: not carried over


def test_a_version_1_delta_names_the_fix(tmp_path):
    m = _big(tmp_path)
    _small_delta(m, tmp_path / "d.cdcd")
    raw = bytearray((tmp_path / "d.cdcd").read_bytes())
    magic, version, flags, hlen = PREAMBLE.unpack_from(raw)
    assert version == FORMAT_VERSION == 2
    PREAMBLE.pack_into(raw, 0, magic, 1, flags, hlen)
    (tmp_path / "old.cdcd").write_bytes(bytes(raw))
    before = file_digest(m)
    hostile("delta")
    with pytest.raises(FormatError, match="make the delta again"):
        P.apply_delta(m, tmp_path / "old.cdcd", trust=NONE)
    assert file_digest(m) == before


def test_a_read_window_that_begins_inside_a_run_of_touched_leaves(tmp_path, monkeypatch):
    """Leaves 0-16 and 31 touched, 16 leaves per read: the second window begins inside
    the first run and is sparse (read per run); every flagged leaf is re-hashed."""
    n = 32 * ID_CHUNK
    raw = np.random.default_rng(1).integers(0, 256, n, dtype=np.uint8).tobytes()
    (tmp_path / "t.bin").write_bytes(raw)
    t = TensorInfo("t", "U8", (n,), tmp_path / "t.bin", 0, n)
    mask = np.zeros(32, bool)
    mask[:17] = mask[31] = True
    leaves = bytearray(32 * 32)  # all wrong: only re-hashed leaves become right
    monkeypatch.setattr(artifact, "REHASH_WINDOW", 16 * ID_CHUNK)
    rehash_chunks(t, leaves, mask)
    want = hash_chunks(raw)
    got = [bytes(leaves[k * 32 : (k + 1) * 32]) == want[k * 32 : (k + 1) * 32] for k in range(32)]
    assert got == mask.tolist()



def test_a_name_holding_separators_cannot_make_two_tables_collide():
    """Fields of the identity are length-prefixed: with a plain separator encoding, a
    tensor name holding NUL and newline could spell a second tensor's record."""
    from cdcca_edge.core.artifact import identity_digest

    d = "ab" * 32
    one = [("a\0F32\0" + "4" + "\0" + d + "\nb", "F32", (4,), d)]
    two = [("a", "F32", (4,), d), ("b", "F32", (4,), d)]
    assert identity_digest(one) != identity_digest(two)


def test_a_sidecar_with_an_overflowing_number_is_rederived(tmp_path):
    from cdcca_edge.core.state import _content_digest

    m = _big(tmp_path)
    sp = state_path(open_artifact(m))
    doc = json.loads(sp.read_text())
    doc["artifact_version"] = float("inf")
    doc["digest"] = _content_digest(doc)
    sp.write_text(json.dumps(doc))
    hostile("sidecar")
    assert read_state(m) is None
