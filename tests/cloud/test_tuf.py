"""Update security through TUF: a real service process, the device's ngclient, and the
attacks the reference implementation must refuse (replayed, expired, forged metadata;
tampered, endless and mismatched targets), and key rotation followed by devices."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tuf")
pytest.importorskip("fastapi")

from cdcca_edge.cli import main  # noqa: E402
from cdcca_edge.cloud.service.blobs import BlobStore  # noqa: E402
from cdcca_edge.cloud.service.ops import refresh_metadata  # noqa: E402
from cdcca_edge.cloud.service.store import database_url, open_db  # noqa: E402
from cdcca_edge.cloud.service.tuf_repo import CohortRepository  # noqa: E402
from cdcca_edge.core.artifact import compute_identity, open_artifact  # noqa: E402
from cdcca_edge.core.delta_format import generate_keypair  # noqa: E402
from cdcca_edge.core.errors import IntegrityError, UsageError  # noqa: E402
from cdcca_edge.core.patch import apply_delta  # noqa: E402
from cdcca_edge.runtime.sync_client import SyncClient  # noqa: E402
from tests.cloud.test_service import Service, _create, _keys  # noqa: E402
from tests.core.delta_helpers import make_gguf, random_units  # noqa: E402
from tests.hostile import hostile  # noqa: E402


def _changed(src: Path, dst: Path, seed: int) -> Path:
    """A copy of ``src`` with three Q8_0 blocks rewritten (a next version, same layout)."""
    shutil.copy(src, dst)
    t = open_artifact(dst).tensor("Q8_0.w")
    raw = bytearray(dst.read_bytes())
    raw[t.offset : t.offset + 34 * 3] = random_units("Q8_0", 3, np.random.default_rng(seed))
    dst.write_bytes(bytes(raw))
    return dst


@pytest.fixture
def cohort(tmp_path, capsys):
    model = make_gguf(tmp_path / "m.gguf")
    data = tmp_path / "data"
    _create(tmp_path, data, "demo", model)
    svc = Service(data)
    svc.start("--round-poll", "3600")  # no background re-signing while the test plays attacker
    capsys.readouterr()
    assert main(["cloud", "enroll-token", "--cohort", "demo", "--data", str(data), "--json"]) == 0
    client = SyncClient(tmp_path / "device")
    client.enroll(svc.url, json.loads(capsys.readouterr().out)["token"])
    svc.model, svc.client = model, client
    svc.identity = compute_identity(open_artifact(model)).digest
    yield svc
    svc.stop()


def _publish(svc: Service, tmp_path: Path, seed: int, capsys) -> dict:
    new = _changed(svc.model, tmp_path / f"v{seed}.gguf", seed)
    capsys.readouterr()
    assert main(["cloud", "publish", "demo", "--artifact", str(new), "--data", str(svc.data), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _refused(client: SyncClient, attack: str) -> str:
    """The client refuses: IntegrityError naming the TUF check; nothing downloaded."""
    hostile("tuf")
    before = sorted(p.name for p in (client.dir / "downloads").glob("*")) if (client.dir / "downloads").exists() \
        else []
    with pytest.raises(IntegrityError) as exc:
        client.refresh()
    after = sorted(p.name for p in (client.dir / "downloads").glob("*")) if (client.dir / "downloads").exists() \
        else []
    assert before == after, attack
    return str(exc.value)


def test_replayed_expired_and_forged_metadata_are_refused(cohort, tmp_path, capsys):
    svc, client = cohort, cohort.client
    repo = CohortRepository(svc.data, "demo")
    old_timestamp = (repo.dir / "timestamp.json").read_bytes()
    pub = _publish(svc, tmp_path, 1, capsys)
    up = client.check(svc.identity)["update"]
    assert up["kind"] == "delta" and up["to_identity"] == pub["identity"]
    client.fetch(up)  # the device now trusts the new timestamp
    fresh = (repo.dir / "timestamp.json").read_bytes()

    # replay: an older, validly signed timestamp (a mirror or proxy that froze the device)
    (repo.dir / "timestamp.json").write_bytes(old_timestamp)
    assert "BadVersionNumberError" in _refused(client, "replay")
    (repo.dir / "timestamp.json").write_bytes(fresh)
    client.refresh()

    # expired: a timestamp whose signature is good but whose life is over
    key = svc.data.parent / "key.pem"
    repo.sign_timestamp(key, datetime.now(timezone.utc) - timedelta(hours=1))
    assert "ExpiredMetadataError" in _refused(client, "expired")
    assert "timestamp" in refresh_metadata(svc.data, open_db(database_url(svc.data)))["demo"]  # the service heals
    client.refresh()

    # forged: new metadata signed by a key the root never named
    generate_keypair(tmp_path / "evil.pem", tmp_path / "evil.pem.pub")
    repo.sign_timestamp(tmp_path / "evil.pem", datetime.now(timezone.utc) + timedelta(days=1))
    assert "UnsignedMetadataError" in _refused(client, "forged")
    with pytest.raises(UsageError):  # and the service itself never signs with a key root does not name
        repo.set_targets(tmp_path / "evil.pem", lambda: [])
    refresh_metadata(svc.data, open_db(database_url(svc.data)), force=True)
    client.refresh()


def test_tampered_endless_and_mismatched_targets_are_refused(cohort, tmp_path, capsys):
    svc, client = cohort, cohort.client
    _publish(svc, tmp_path, 1, capsys)
    up = client.check(svc.identity)["update"]
    blob = BlobStore(svc.data / "blobs").path(up["sha256"])
    good = blob.read_bytes()
    downloads = client.dir / "downloads"

    cases = {
        "bit flipped": good[:-1] + bytes([good[-1] ^ 1]),
        "endless": good + b"\0" * 4096,  # more than the signed length: cut off, refused
        "truncated": good[:-7],
    }
    for case, bad in cases.items():
        hostile("tuf")
        blob.chmod(0o644)
        blob.write_bytes(bad)
        with pytest.raises(IntegrityError):
            client.fetch(up)
        assert not list(downloads.glob("*")), case  # nothing kept, partial included
    blob.write_bytes(good)
    for key, value in (("to_identity", "ab" * 32), ("kind", "artifact"), ("target", "deltas/v7-v9.cdcd")):
        hostile("tuf")
        with pytest.raises(IntegrityError):  # the answer disagrees with the signed metadata
            client.fetch({**up, key: value})
    assert client.fetch(up).read_bytes() == good


def test_key_rotation_is_followed_by_devices(cohort, tmp_path, capsys):
    from cdcca_edge.core.trust import Trust
    from cdcca_edge.runtime.sync_client import apply_update

    svc, client = cohort, cohort.client
    sign, root = _keys(tmp_path)
    generate_keypair(tmp_path / "key2.pem", tmp_path / "key2.pem.pub")
    generate_keypair(tmp_path / "root2.pem", tmp_path / "root2.pem.pub")
    old_keys = client.trusted_keys()
    data = ["--data", str(svc.data)]
    device = tmp_path / "device.gguf"
    shutil.copy(svc.model, device)
    v1 = _publish(svc, tmp_path, 1, capsys)  # its delta is signed with the old online key
    # the online key: root v2, signed by the root key; the published delta is re-signed
    assert main(["cloud", "rotate-key", "demo", *data, "--root-key", str(root), "--new-sign-key",
                 str(tmp_path / "key2.pem")]) == 0
    done = apply_update(client, device)  # the device, one version behind, walks root v1 -> v2
    assert done["update"] == "delta" and done["identity"] == v1["identity"]
    assert client.trusted_keys() != old_keys
    assert client.trust().public_keys == Trust.keys([tmp_path / "key2.pem.pub"]).public_keys
    v2 = _publish(svc, tmp_path, 2, capsys)  # signed with the new key from now on
    up = client.plan(v1["identity"])
    got = client.fetch(up)
    with pytest.raises(IntegrityError):  # the old key no longer signs deltas
        apply_delta(device, got, trust=Trust.keys([tmp_path / "key.pem.pub"]))
    assert apply_update(client, device)["identity"] == v2["identity"]
    # the old online key, stolen, can no longer sign a timestamp the device accepts
    CohortRepository(svc.data, "demo").sign_timestamp(sign, datetime.now(timezone.utc) + timedelta(days=1))
    assert "UnsignedMetadataError" in _refused(client, "old key")
    refresh_metadata(svc.data, open_db(database_url(svc.data)), force=True)
    client.refresh()
    # the root key itself: v3 signed by the old and the new root key; the old one is then out
    assert main(["cloud", "rotate-key", "demo", *data, "--root-key", str(root), "--new-root-key",
                 str(tmp_path / "root2.pem")]) == 0
    client.refresh()
    assert json.loads((client.dir / "tuf" / "root.json").read_bytes())["signed"]["version"] == 3
    hostile("tuf")
    capsys.readouterr()
    assert main(["cloud", "rotate-key", "demo", *data, "--root-key", str(root), "--new-sign-key", str(sign)]) == 2
    assert capsys.readouterr().err.count("not this cohort's root key") == 1


def test_a_rotation_cut_short_keeps_devices_working_and_finishes_when_run_again(cohort, tmp_path, capsys,
                                                                                 monkeypatch):
    from cdcca_edge.cloud.service import ops

    svc, client = cohort, cohort.client
    _, root = _keys(tmp_path)
    generate_keypair(tmp_path / "key2.pem", tmp_path / "key2.pem.pub")
    _publish(svc, tmp_path, 1, capsys)

    def crash(*_a, **_k):
        raise OSError("killed")

    with monkeypatch.context() as m:  # the process dies after the database moved to the new key
        m.setattr(CohortRepository, "rotate", crash)
        with pytest.raises(OSError):
            ops.rotate_keys(svc.data, "demo", root, new_sign_key=tmp_path / "key2.pem")
    sessions = open_db(database_url(svc.data))
    assert refresh_metadata(svc.data, sessions, force=True) == {}  # never signs with a key root does not name
    assert client.plan(svc.identity)["kind"] == "delta"  # the old metadata still verifies
    ops.rotate_keys(svc.data, "demo", root, new_sign_key=tmp_path / "key2.pem")  # run again: finished
    from cdcca_edge.runtime.sync_client import apply_update

    device = tmp_path / "device.gguf"
    shutil.copy(svc.model, device)
    assert apply_update(client, device)["update"] == "delta"


def test_the_device_decides_from_signed_metadata_not_from_the_answer(cohort, tmp_path, capsys):
    """A forged or replayed /v1/updates answer cannot roll a device back or hold it: the
    plan comes from the signed targets."""
    svc, client = cohort, cohort.client
    v1 = _publish(svc, tmp_path, 1, capsys)
    assert client.plan(v1["identity"]) is None
    assert client.plan(svc.identity)["kind"] == "delta"  # v0 -> v1
    whole = client.plan("cd" * 32)
    assert whole["kind"] == "artifact" and whole["to_version"] == 1  # never an older version
    v2 = _publish(svc, tmp_path, 2, capsys)
    up = client.plan(v1["identity"])
    assert (up["kind"], up["to_version"], up["to_identity"]) == ("delta", 2, v2["identity"])


def test_one_broken_cohort_does_not_stop_re_signing_the_others(tmp_path, capsys):
    model = make_gguf(tmp_path / "m.gguf")
    data = tmp_path / "data"
    _create(tmp_path, data, "alpha", model)
    generate_keypair(tmp_path / "beta.pem", tmp_path / "beta.pem.pub")
    _, root = _keys(tmp_path)
    assert main(["cloud", "create-cohort", "beta", "--artifact", str(model), "--data", str(data),
                 "--sign-key", str(tmp_path / "beta.pem"), "--root-key", str(root)]) == 0
    (tmp_path / "key.pem").rename(tmp_path / "moved.pem")  # alpha's key is gone
    before = CohortRepository(data, "beta").versions()["timestamp"]
    done = refresh_metadata(data, open_db(database_url(data)), force=True)
    assert "alpha" not in done and "timestamp" in done["beta"]
    assert CohortRepository(data, "beta").versions()["timestamp"] > before
    assert "could not re-sign metadata of alpha" in capsys.readouterr().err


def test_bad_keys_are_refused_at_creation(tmp_path, capsys):
    model = make_gguf(tmp_path / "m.gguf")
    sign, root = _keys(tmp_path)
    (tmp_path / "junk.pem").write_text("not a key")
    data = tmp_path / "data"
    for case, keys in {"same key twice": (sign, sign), "junk root key": (sign, tmp_path / "junk.pem"),
                       "missing sign key": (tmp_path / "none.pem", root)}.items():
        hostile("tuf")
        code = main(["cloud", "create-cohort", "demo", "--artifact", str(model), "--data", str(data),
                     "--sign-key", str(keys[0]), "--root-key", str(keys[1])])
        assert code in (2, 3), case  # 2: a usage error, 3: a file that is not a key
        assert not (data / "tuf").exists() and not (data / "blobs").exists(), case
