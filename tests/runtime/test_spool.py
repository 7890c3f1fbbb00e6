"""The agent's spool: capped, crash-safe, and a sealed bundle is sent as the same bytes
until acknowledged (never its samples again as a new bundle)."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from cdcca_edge.core import uplink_format as U
from cdcca_edge.runtime.spool import Spool


def _sample(i: int) -> U.UplinkSample:
    rng = np.random.default_rng(i)
    return U.UplinkSample(f"s{i}", {U.META_PROMPT: f"p{i}", U.META_ANSWER: "a", U.META_UNCERTAINTY: 2.0,
                                    U.META_RAW_BYTES: 3},
                          {U.PROMPT_IDS: rng.integers(0, 99, 6).astype(np.uint32),
                           U.ANSWER_IDS: rng.integers(0, 99, 3).astype(np.uint32),
                           U.TOKEN_WEIGHTS: np.ones(3, np.float16)})


HEADER = {"artifact_identity": "ab" * 32, "artifact_version": 0}


def test_seal_ack_and_restart(tmp_path):
    sp = Spool(tmp_path / "s", 1 << 20)
    for i in range(5):
        sp.add(HEADER, _sample(i))
    sp.add({**HEADER, "artifact_identity": "cd" * 32}, _sample(9))
    bundles = sp.seal()
    assert len(bundles) == 2  # one per identity
    assert sp.seal() == bundles  # sealed once: the same files again, no new bundle
    counts = sorted(len(list(U.read_uplink(b).samples())) for b in bundles)
    assert counts == [1, 5]
    sp2 = Spool(tmp_path / "s", 1 << 20)  # a restart keeps them as they were
    assert sp2.seal() == bundles
    b = bundles[0]
    assert not sp2.acknowledged(b, "0" * 64) and b.exists()  # not this file's digest: kept
    assert sp2.acknowledged(b, hashlib.sha256(b.read_bytes()).hexdigest())
    assert not b.exists() and len(sp2.seal()) == 1
    sp2.discard(sp2.seal()[0])
    assert sp2.seal() == [] and sp2.size()[0] == 0


def test_a_seal_cut_short_is_undone_at_restart(tmp_path):
    sp = Spool(tmp_path / "s", 1 << 20)
    names = [sp.add(HEADER, _sample(i)).name for i in range(3)]
    (sp.outbox / "000000000099.json").write_text(json.dumps({"entries": names}))  # manifest, no bundle
    sp2 = Spool(tmp_path / "s", 1 << 20)
    bundles = sp2.seal()
    assert len(bundles) == 1 and len(list(U.read_uplink(bundles[0]).samples())) == 3


def test_damaged_entries_are_dropped_not_sent(tmp_path):
    """A truncated or bit-flipped entry (a disk error) is dropped at sealing; the others
    are sealed as usual."""
    from tests.hostile import hostile

    sp = Spool(tmp_path / "s", 1 << 20)
    paths = [sp.add(HEADER, _sample(i)) for i in range(4)]
    hostile("spool", 2)
    paths[1].write_bytes(paths[1].read_bytes()[:-9])
    raw = bytearray(paths[2].read_bytes())
    raw[40] ^= 1
    paths[2].write_bytes(bytes(raw))
    (bundle,) = sp.seal()
    assert [s.id for s in U.read_uplink(bundle).samples()] == ["s0", "s3"]
    assert not paths[1].exists() and not paths[2].exists()


def test_the_cap_drops_the_oldest_and_counts_them(tmp_path):
    one = Spool(tmp_path / "probe", 1 << 20).add(HEADER, _sample(0)).stat().st_size
    sp = Spool(tmp_path / "s", 3 * one + one // 2)
    for i in range(6):
        sp.add(HEADER, _sample(i))
    assert sp.size()[0] == 3 and sp.dropped == 3
    ids = [s.id for s in U.read_uplink(sp.seal()[0]).samples()]
    assert ids == ["s3", "s4", "s5"]


def test_a_bundle_re_sent_after_a_crash_is_stored_once(tmp_path, capsys):
    """The agent dies after the service stored a bundle and before it forgot the entries:
    after the restart the same file goes again, the service answers "already", and the
    samples are stored once."""
    import pytest

    pytest.importorskip("fastapi")
    pytest.importorskip("sqlalchemy")  # the cloud service's stack (absent in the aarch64 lane)
    from cdcca_edge.cli import main
    from cdcca_edge.cloud.service.store import database_url, open_db, row_counts
    from cdcca_edge.core.artifact import compute_identity, open_artifact
    from cdcca_edge.runtime.sync_client import SyncClient
    from tests.cloud.test_service import Service, _create
    from tests.core.delta_helpers import make_gguf

    model = make_gguf(tmp_path / "m.gguf")
    data = tmp_path / "data"
    _create(tmp_path, data, "demo", model)
    svc = Service(data)
    svc.start()
    try:
        capsys.readouterr()
        assert main(["cloud", "enroll-token", "--cohort", "demo", "--data", str(data)]) == 0
        client = SyncClient(tmp_path / "dev")
        client.enroll(svc.url, capsys.readouterr().out.strip())
        header = {"artifact_identity": compute_identity(open_artifact(model)).digest, "artifact_version": 0}
        sp = Spool(tmp_path / "spool", 1 << 20)
        for i in range(4):
            sp.add(header, _sample(i))
        (bundle,) = sp.seal()
        assert client.upload(bundle)["stored"] == "now"
        # -- killed here: acknowledged() never ran --
        sp2 = Spool(tmp_path / "spool", 1 << 20)
        (again,) = sp2.seal()
        assert again == bundle  # the same file, not the samples in a new bundle
        doc = client.upload(again)
        assert doc["stored"] == "already" and sp2.acknowledged(again, doc["sha256"])
        assert sp2.seal() == [] and sp2.size()[0] == 0
        assert row_counts(open_db(database_url(data)))["uploads"] == 1
    finally:
        svc.stop()
