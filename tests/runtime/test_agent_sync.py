"""The device agent with the cloud service, both real processes: apps ask the agent
(openai package), the uncertain answers go to the spool and up to the service, a round
runs there, and the agent takes the signed update in place, reloads, passes its health
check and reports the identity the cloud published; later answers come from the new
weights."""

from __future__ import annotations

import json
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from cdcca_edge.cli import main  # noqa: E402
from cdcca_edge.cloud.service.ops import mirror_path  # noqa: E402
from cdcca_edge.core.artifact import compute_identity, open_artifact  # noqa: E402
from tests.procs import wait_for  # noqa: E402
from tests.cloud.test_service import Service, _fleet  # noqa: E402
from tests.runtime.test_agent import Agent  # noqa: E402


def _enrolled_state(svc: Service, f: dict, tmp_path, capsys):
    """An agent's sync state, enrolled in the fleet cohort through the CLI."""
    capsys.readouterr()
    assert main(["cloud", "enroll-token", "--cohort", "fleet", "--data", str(f["data"])]) == 0
    state = tmp_path / "agent-state"
    assert main(["sync", "enroll", svc.url, capsys.readouterr().out.strip(), "--state", str(state)]) == 0
    return state


def _calibration(f: dict, tmp_path):
    """UTS calibration of the device model on 30 in-distribution prompts."""
    from cdcca_edge.demo.tiny import text_prompts

    with open(tmp_path / "source.jsonl", "w") as fh:
        for i, p in enumerate(text_prompts("source", 30, seed=30)):
            fh.write(json.dumps({"id": f"s{i}", "prompt": p}) + "\n")
    assert main(["uplink", "calibrate", str(f["device"]), "--inputs", str(tmp_path / "source.jsonl"),
                 "-o", str(tmp_path / "calib.json"), "--rate", "0.3", "-n", "10"]) == 0
    return tmp_path / "calib.json"



def published_versions(data, cohort: str) -> tuple[dict[int, str], int]:
    """(the cohort's published versions {number: identity}, uploads no round used yet)."""
    from sqlalchemy import select

    from cdcca_edge.cloud.service.store import Upload, Version, cohort_named, database_url, open_db

    with open_db(database_url(data))() as s:
        c = cohort_named(s, cohort)
        versions = {v.number: v.identity for v in s.scalars(select(Version).where(Version.cohort_id == c.id))}
        waiting = len(list(s.scalars(select(Upload.id).where(Upload.cohort_id == c.id, Upload.round_version.is_(None)))))
    return versions, waiting


def settled(data, cohort: str, client, agent_url: str):
    """The agent's model info once it runs the cohort's latest version (at least 1), its
    spool is empty and every upload was used by a round, so no further round can come
    (uploads arrive in several bundles, so more than one round may have run); else None."""
    info = client.models.list().data[0].model_extra["cdcca"]
    versions, waiting = published_versions(data, cohort)
    latest = max(versions)
    ok = (latest >= 1 and info["version"] == latest and info["identity"] == versions[latest] and waiting == 0
          and "cdcca_agent_spool_entries 0\n" in httpx.get(f"{agent_url}/metrics").text)
    return info if ok else None


def test_the_agent_uploads_what_it_is_unsure_of_and_updates_in_place(tmp_path, capsys):
    from cdcca_edge.demo.tiny import text_prompts

    f = _fleet(tmp_path)
    svc = Service(f["data"])
    svc.start("--min-uploads", "1", "--round-poll", "0.5")
    agent = None
    try:
        state = _enrolled_state(svc, f, tmp_path, capsys)
        agent = Agent(f["device"], "--cloud-state", str(state), "--calib", str(_calibration(f, tmp_path)),
                      "--sync-every", "1")
        client = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused")
        before = client.models.list().data[0].model_extra["cdcca"]["identity"]
        assert before == f["identity"]
        # a copy of the model without its state: the first sync learns its version from the metadata
        wait_for("version 0", lambda: client.models.list().data[0].model_extra["cdcca"]["version"] == 0, 60)
        probe = client.completions.create(model="m", prompt="the red circle is", max_tokens=10)
        for p in text_prompts("target", 30, seed=31):  # drifted inputs: the agent is unsure of many
            client.completions.create(model="m", prompt=p, max_tokens=10)
        spooled = httpx.get(f"{agent.url}/metrics").text
        assert "cdcca_agent_spooled_total 0" not in spooled
        after = wait_for("the agent to settle on the latest version",
                         lambda: settled(f["data"], "fleet", client, agent.url))
        published = compute_identity(open_artifact(mirror_path(f["data"], "fleet"))).digest
        assert after["identity"] == published == compute_identity(open_artifact(f["device"])).digest
        m = httpx.get(f"{agent.url}/metrics").text
        assert "cdcca_agent_updates_total 0\n" not in m and "cdcca_agent_update_failures_total 0\n" in m
        n = after["version"]
        wait_for("the agent's report", lambda: f'cdcca_devices{{cohort="fleet",version="{n}"}} 1.0' in httpx.get(
            f"{svc.url}/metrics").text, 30)
        again = client.completions.create(model="m", prompt="the red circle is", max_tokens=10)
        assert again.model_extra["cdcca"]["model_identity"] == published
        assert again.model_extra["cdcca"]["tokens"] != probe.model_extra["cdcca"]["tokens"]  # new weights
    finally:
        if agent is not None:
            agent.stop()
        svc.stop()


def _broken_copy(src, dst):
    """``src`` with every Q8_0 block scale of one tensor at float16's largest finite value:
    finite weights (a delta may carry them) whose activations overflow, so the model loads
    and runs but its logits are not numbers."""
    import shutil

    shutil.copy(src, dst)
    q8 = [t for t in open_artifact(dst).tensors if t.type_name == "Q8_0"]
    t = next((t for t in q8 if "output" in t.name), q8[-1])
    raw = bytearray(dst.read_bytes())
    for off in range(t.offset, t.offset + t.nbytes, 34):
        raw[off:off + 2] = b"\xff\x7b"  # float16 65504
    dst.write_bytes(bytes(raw))
    return dst


def _changed_copy(src, dst, seed: int):
    """``src`` with 8 blocks of its first Q8_0 tensor replaced: a model of the same layout
    and another identity."""
    import shutil

    import numpy as np

    from tests.core.delta_helpers import random_units

    shutil.copy(src, dst)
    t = next(t for t in open_artifact(dst).tensors if t.type_name == "Q8_0")
    raw = bytearray(dst.read_bytes())
    raw[t.offset : t.offset + 34 * 8] = random_units("Q8_0", 8, np.random.default_rng(seed))
    dst.write_bytes(bytes(raw))
    return dst


def _published_v1(f: dict, tmp_path):
    """Version 1 published as a changed copy of version 0: (its file, its identity)."""
    new = _changed_copy(f["model"], tmp_path / "v1.gguf", seed=5)
    assert main(["cloud", "publish", "fleet", "--artifact", str(new), "--data", str(f["data"])]) == 0
    return new, compute_identity(open_artifact(new)).digest


def _killed_agent(f: dict, state, hook: dict, *extra: str) -> None:
    """An agent started with a test hook that SIGKILLs it; returns once it died so."""
    agent = Agent(f["device"], "--cloud-state", str(state), "--sync-every", "1", *extra, env=hook)
    wait_for(f"the agent to die at {sorted(hook)}", lambda: agent.proc.poll() is not None, 120)
    assert agent.proc.returncode == -9


@pytest.mark.parametrize("kind", ["delta", "artifact"])
def test_an_update_that_fails_the_health_check_is_reverted_and_reported(tmp_path, capsys, kind):
    """The published version is broken. A device on version 0 takes it as a delta and
    reverts with the undo delta; a device the cloud has no delta for (a local model of
    the same layout, no published version) takes the whole artefact and gets the file it
    replaced back, with its state. Either reports the failure and does not try again."""
    from cdcca_edge.cloud.service.store import Device, database_url, open_db

    f = _fleet(tmp_path)
    broken = _broken_copy(f["model"], tmp_path / "broken.gguf")
    assert main(["cloud", "publish", "fleet", "--artifact", str(broken), "--data", str(f["data"])]) == 0
    if kind == "artifact":
        _changed_copy(f["model"], f["device"], seed=7)
    expect = compute_identity(open_artifact(f["device"])).digest
    svc = Service(f["data"])
    svc.start()
    agent = None
    try:
        state = _enrolled_state(svc, f, tmp_path, capsys)
        agent = Agent(f["device"], "--cloud-state", str(state), "--sync-every", "1")
        wait_for("the failed update", lambda: "cdcca_agent_update_failures_total 1" in httpx.get(
            f"{agent.url}/metrics").text, 120)
        client = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused")
        assert client.models.list().data[0].model_extra["cdcca"]["identity"] == expect  # reverted
        assert compute_identity(open_artifact(f["device"])).digest == expect
        assert client.completions.create(model="m", prompt="the red", max_tokens=3).choices[0].text
        assert not list(tmp_path.glob(".device.gguf.*"))  # nothing left behind
        with open_db(database_url(f["data"]))() as s:
            dev = s.query(Device).one()
        assert dev.identity == expect and dev.healthy is False
        time.sleep(3)  # more syncs: the refused version is not tried again
        assert "cdcca_agent_update_failures_total 1" in httpx.get(f"{agent.url}/metrics").text
    finally:
        if agent is not None:
            agent.stop()
        svc.stop()


def test_serving_goes_on_with_the_cloud_down(tmp_path, capsys):
    from cdcca_edge.demo.tiny import text_prompts

    f = _fleet(tmp_path)
    svc = Service(f["data"])
    svc.start()
    state = _enrolled_state(svc, f, tmp_path, capsys)
    svc.stop()  # and it never comes back
    agent = Agent(f["device"], "--cloud-state", str(state), "--calib", str(_calibration(f, tmp_path)),
                  "--sync-every", "0.5", "--spool-max-mb", "1")
    try:
        client = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused")
        for p in text_prompts("target", 20, seed=31):
            assert client.completions.create(model="m", prompt=p, max_tokens=10).choices[0].text is not None
        wait_for("a failed sync", lambda: "cdcca_agent_sync_errors_total 0" not in httpx.get(f"{agent.url}/metrics").text)
        m = httpx.get(f"{agent.url}/metrics").text
        assert "cdcca_agent_spool_entries 0" not in m and "cdcca_agent_uploaded_bundles_total 0" in m
    finally:
        agent.stop()


def test_an_agent_killed_mid_patch_restarts_consistent_and_finishes_the_update(tmp_path, capsys):
    """kill -9 (the patcher's crash hook SIGKILLs the agent at its 3rd crash point, inside
    the journaled patch); the restarted agent finds the model old or new (the journal
    recovered), serves, and completes the update to the published identity."""
    f = _fleet(tmp_path)
    _, published = _published_v1(f, tmp_path)
    svc = Service(f["data"])
    svc.start()
    agent = None
    try:
        state = _enrolled_state(svc, f, tmp_path, capsys)
        _killed_agent(f, state, {"CDCCA_TEST_CRASH_AFTER": "3"})
        assert (f["device"].parent / (f["device"].name + ".cdcca-journal")).exists() or \
            compute_identity(open_artifact(f["device"])).digest in (f["identity"], published)
        agent = Agent(f["device"], "--cloud-state", str(state), "--sync-every", "1")  # restarted
        client = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused")
        first = client.models.list().data[0].model_extra["cdcca"]["identity"]
        assert first in (f["identity"], published)  # old or new, never half
        wait_for("the update to finish", lambda: client.models.list().data[0].model_extra["cdcca"]["identity"]
                 == published, 120)
        assert compute_identity(open_artifact(f["device"])).digest == published
        assert client.completions.create(model="m", prompt="the red", max_tokens=3).choices[0].text
    finally:
        if agent is not None:
            agent.stop()
        svc.stop()


def test_an_agent_killed_mid_download_resumes_from_its_offset(tmp_path, capsys):
    """kill -9 after the first 40,000 bytes of a whole-artefact download: the partial file
    has exactly those bytes, the restarted agent asks for the rest (Range) and installs
    the signed version."""
    f = _fleet(tmp_path)
    new, published = _published_v1(f, tmp_path)
    _changed_copy(f["model"], f["device"], seed=9)  # no delta from here: the whole artefact comes
    svc = Service(f["data"])
    svc.start()
    agent = None
    try:
        state = _enrolled_state(svc, f, tmp_path, capsys)
        _killed_agent(f, state, {"CDCCA_TEST_KILL_DOWNLOAD_AT": "40000"})
        parts = list((state / "downloads").glob("*.part"))
        assert len(parts) == 1 and parts[0].stat().st_size == 40000
        assert parts[0].read_bytes() == new.read_bytes()[:40000]  # the same bytes, no more
        agent = Agent(f["device"], "--cloud-state", str(state), "--sync-every", "1")
        client = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused")
        wait_for("the update", lambda: client.models.list().data[0].model_extra["cdcca"]["identity"]
                 == published, 120)
        assert "resumed at byte 40000" in agent.log.read_text()
        assert compute_identity(open_artifact(f["device"])).digest == published
        assert not list((state / "downloads").glob("*.part"))
    finally:
        if agent is not None:
            agent.stop()
        svc.stop()


def test_an_agent_killed_between_upload_and_acknowledgement_sends_no_bundle_twice(tmp_path, capsys):
    """kill -9 right after the service stored a bundle, before the spool marked it sent:
    the restarted agent sends the same sealed bundle again, the service keeps it once,
    and every spooled sample reaches the service exactly once."""
    from cdcca_edge.cloud.service.blobs import BlobStore
    from cdcca_edge.cloud.service.store import Upload, database_url, open_db
    from cdcca_edge.core.uplink_format import read_uplink
    from cdcca_edge.demo.tiny import text_prompts

    f = _fleet(tmp_path)
    svc = Service(f["data"])
    svc.start()  # no rounds: the uploads stay as they arrive
    agent = None
    try:
        state = _enrolled_state(svc, f, tmp_path, capsys)
        calib = _calibration(f, tmp_path)
        spool = tmp_path / "spool"
        # serve without sync first, so the spool fills before the first upload
        agent = Agent(f["device"], "--calib", str(calib), "--spool", str(spool))
        client = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused")
        for p in text_prompts("target", 30, seed=31):
            client.completions.create(model="m", prompt=p, max_tokens=10)
        spooled = int(next(ln.split()[1] for ln in httpx.get(f"{agent.url}/metrics").text.splitlines()
                           if ln.startswith("cdcca_agent_spool_entries ")))
        assert spooled > 0
        agent.stop()
        _killed_agent(f, state, {"CDCCA_TEST_KILL_AFTER_UPLOAD": "1"}, "--calib", str(calib), "--spool", str(spool))
        agent = Agent(f["device"], "--cloud-state", str(state), "--calib", str(calib), "--spool", str(spool),
                      "--sync-every", "1")
        wait_for("the spool to empty", lambda: "cdcca_agent_spool_entries 0\n" in httpx.get(
            f"{agent.url}/metrics").text, 120)
        with open_db(database_url(f["data"]))() as s:
            shas = [u.sha256 for u in s.query(Upload).all()]
        assert len(shas) == len(set(shas)) >= 1
        ids = [x.id for sha in shas for x in read_uplink(BlobStore(f["data"] / "blobs").path(sha)).samples()]
        assert len(ids) == len(set(ids)) == spooled  # none lost, none twice
    finally:
        if agent is not None:
            agent.stop()
        svc.stop()


@pytest.mark.parametrize("attack", ["corrupted", "expired", "foreign", "replayed"])
def test_a_bad_update_is_refused_and_the_model_untouched(tmp_path, capsys, attack):
    """A delta whose bytes were changed, metadata past its expiry, metadata signed by a
    key the root never named, or an older validly signed timestamp replayed to an agent
    that saw a newer one: the agent refuses (a sync error, logged), the model keeps its
    bytes and identity, and serving goes on."""
    from datetime import datetime, timedelta, timezone

    from cdcca_edge.cloud.service.tuf_repo import CohortRepository
    from cdcca_edge.core.delta_format import generate_keypair

    f = _fleet(tmp_path)
    repo = CohortRepository(f["data"], "fleet")
    old_timestamp = (repo.dir / "timestamp.json").read_bytes()
    _, v1 = _published_v1(f, tmp_path)
    svc = Service(f["data"])
    svc.start("--round-poll", "3600")  # no background re-signing while the test plays attacker
    agent = None
    try:
        state = _enrolled_state(svc, f, tmp_path, capsys)
        expect = f["identity"]
        if attack == "corrupted":
            targets = json.loads((repo.dir / "2.targets.json").read_bytes())["signed"]["targets"]
            sha = next(t["hashes"]["sha256"] for p, t in targets.items() if p.startswith("deltas/"))
            blob = f["data"] / "blobs" / sha[:2] / sha
            blob.chmod(0o644)
            good = blob.read_bytes()
            blob.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
        elif attack == "expired":
            repo.sign_timestamp(tmp_path / "key.pem", datetime.now(timezone.utc) - timedelta(hours=1))
        elif attack == "foreign":
            generate_keypair(tmp_path / "evil.pem", tmp_path / "evil.pem.pub")
            repo.sign_timestamp(tmp_path / "evil.pem", datetime.now(timezone.utc) + timedelta(days=1))
        agent = Agent(f["device"], "--cloud-state", str(state), "--sync-every", "1")
        client = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused")
        if attack == "replayed":  # the agent takes version 1 and trusts its timestamp; then the old one
            expect = v1
            wait_for("version 1", lambda: client.models.list().data[0].model_extra["cdcca"]["identity"] == expect)
            (repo.dir / "timestamp.json").write_bytes(old_timestamp)
        before = f["device"].read_bytes()
        wait_for("a refused sync", lambda: "cdcca_agent_sync_errors_total 0" not in httpx.get(
            f"{agent.url}/metrics").text, 60)
        assert f["device"].read_bytes() == before
        assert compute_identity(open_artifact(f["device"])).digest == expect
        assert client.models.list().data[0].model_extra["cdcca"]["identity"] == expect
        assert client.completions.create(model="m", prompt="the red", max_tokens=3).choices[0].text
        log = agent.log.read_text()
        assert {"corrupted": "SHA-256", "expired": "Expired", "foreign": "Unsigned",
                "replayed": "BadVersion"}[attack] in log, log[-1500:]
        assert "cdcca_agent_updates_total " + ("1" if attack == "replayed" else "0") in httpx.get(
            f"{agent.url}/metrics").text
    finally:
        if agent is not None:
            agent.stop()
        svc.stop()
