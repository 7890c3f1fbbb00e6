"""The cloud service as a real process on the loopback interface, and a real HTTP client
(httpx): enrollment, durable idempotent uploads of real uplink bundles, update queries,
Range downloads that resume, status reports; and refusals that change nothing."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from cdcca_edge.cli import main  # noqa: E402
from cdcca_edge.cloud.service.blobs import BlobStore  # noqa: E402
from cdcca_edge.cloud.service.store import database_url, open_db, row_counts  # noqa: E402
from cdcca_edge.core import uplink_format as U  # noqa: E402
from cdcca_edge.core.artifact import compute_identity, open_artifact  # noqa: E402
from tests.core.delta_helpers import make_gguf  # noqa: E402
from tests.hostile import hostile  # noqa: E402
from tests.procs import free_port  # noqa: E402


def _bundle(path: Path, identity: str, n: int = 3, seed: int = 0) -> Path:
    """A real uplink bundle (the format's own writer) collected on ``identity``."""
    rng = np.random.default_rng(seed)
    samples = [U.UplinkSample(f"s{i}", {U.META_PROMPT: f"prompt {i}", U.META_ANSWER: "an answer",
                                        U.META_UNCERTAINTY: 1.5, U.META_RAW_BYTES: 20},
                              {U.PROMPT_IDS: rng.integers(0, 100, 8).astype(np.uint32),
                               U.ANSWER_IDS: rng.integers(0, 100, 4).astype(np.uint32),
                               U.TOKEN_WEIGHTS: np.ones(4, np.float16)}) for i in range(n)]
    U.write_uplink(path, {"artifact_identity": identity, "artifact_version": 0, "selector": "uts",
                          "n_seen": n + 2}, samples)
    return path


def _keys(tmp_path: Path) -> tuple[Path, Path]:
    """(online key, root key) of a cohort, made once per test directory."""
    from cdcca_edge.core.delta_format import generate_keypair

    sign, root = tmp_path / "key.pem", tmp_path / "root.pem"
    if not sign.exists():
        generate_keypair(sign, tmp_path / "key.pem.pub")
        generate_keypair(root, tmp_path / "root.pem.pub")
    return sign, root


def _create(tmp_path: Path, data: Path, name: str, model: Path, *extra: str, db: str | None = None) -> None:
    sign, root = _keys(tmp_path)
    assert main(["cloud", "create-cohort", name, "--artifact", str(model), "--data", str(data),
                 "--sign-key", str(sign), "--root-key", str(root), *_db(db), *extra]) == 0


def _db(db: str | None) -> list[str]:
    return ["--db", db] if db else []


class Service:
    def __init__(self, data: Path, db: str | None = None) -> None:
        self.data, self.db, self.port = data, db, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cdcca_edge.cli", "cloud", "serve", "--data", str(self.data),
             "--port", str(self.port), *_db(self.db), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("the service did not start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def state(self) -> tuple[dict, int]:
        """(rows per table, blobs): what a refused request must leave as it was."""
        return row_counts(open_db(database_url(self.data, self.db))), BlobStore(self.data / "blobs").count()


@pytest.fixture(params=["sqlite", "postgresql"])
def service(request, tmp_path):
    """A service with one cohort, on the embedded SQLite or on a real PostgreSQL."""
    db = request.getfixturevalue("postgres").new_database() if request.param == "postgresql" else None
    model = make_gguf(tmp_path / "m.gguf")
    data = tmp_path / "data"
    _create(tmp_path, data, "demo", model, db=db)
    svc = Service(data, db)
    svc.start("--max-upload-mb", "1")
    svc.model = model
    svc.identity = compute_identity(open_artifact(model)).digest
    yield svc
    svc.stop()


def _enroll(svc: Service, capsys, cohort: str = "demo") -> dict:
    capsys.readouterr()
    assert main(["cloud", "enroll-token", "--cohort", cohort, "--data", str(svc.data), *_db(svc.db), "--json"]) == 0
    token = json.loads(capsys.readouterr().out)["token"]
    r = httpx.post(f"{svc.url}/v1/enroll", json={"token": token})
    assert r.status_code == 201, r.text
    again = httpx.post(f"{svc.url}/v1/enroll", json={"token": token})  # used up
    assert again.status_code == 401 and again.json()["detail"]["error"] == "bad_enroll_token"
    return r.json()


def test_a_device_enrolls_uploads_checks_fetches_and_reports(service, tmp_path, capsys):
    dev = _enroll(service, capsys)
    auth = {"Authorization": f"Bearer {dev['device_token']}"}
    body = _bundle(tmp_path / "b.cdcu", service.identity).read_bytes()
    r = httpx.post(f"{service.url}/v1/uploads", content=body, headers=auth)
    assert r.status_code == 201 and r.json()["stored"] == "now" and r.json()["samples"] == 3
    sha = hashlib.sha256(body).hexdigest()
    assert r.json()["sha256"] == sha  # stored under the file's own SHA-256
    stored = BlobStore(service.data / "blobs").path(r.json()["sha256"])
    assert stored.read_bytes() == body  # acknowledged only once durably stored
    before = service.state()
    r2 = httpx.post(f"{service.url}/v1/uploads", content=body, headers=auth)
    assert r2.status_code == 200 and r2.json()["stored"] == "already" and service.state() == before
    # up to date: nothing to fetch; an unknown model: the whole latest artefact
    assert httpx.get(f"{service.url}/v1/updates", params={"identity": service.identity},
                     headers=auth).json()["update"] is None
    up = httpx.get(f"{service.url}/v1/updates", params={"identity": "0" * 64}, headers=auth).json()["update"]
    assert up["kind"] == "artifact" and up["length"] == service.model.stat().st_size
    # a download cut short resumes with Range and gives the same bytes
    first = httpx.get(f"{service.url}{up['url']}", headers={**auth, "Range": "bytes=0-999"})
    assert first.status_code == 206 and len(first.content) == 1000
    rest = httpx.get(f"{service.url}{up['url']}", headers={**auth, "Range": "bytes=1000-"})
    assert rest.status_code == 206 and rest.headers["content-range"].endswith(f"/{up['length']}")
    got = first.content + rest.content
    assert hashlib.sha256(got).hexdigest() == up["sha256"] and got == service.model.read_bytes()
    r = httpx.post(f"{service.url}/v1/status", json={"identity": service.identity, "healthy": True}, headers=auth)
    assert r.status_code == 204
    assert httpx.get(f"{service.url}/v1/openapi.json").json()["info"]["title"] == "cdcca-edge cloud"
    m = httpx.get(f"{service.url}/metrics").text
    assert 'cdcca_uploads_total{result="stored"} 1.0' in m and 'cdcca_uploads_total{result="already"} 1.0' in m
    assert 'cdcca_published_version{cohort="demo"} 0.0' in m
    assert 'cdcca_devices{cohort="demo",version="0"} 1.0' in m  # it reported version 0's identity
    assert f"cdcca_upload_bytes_total {float(len(body))}" in m


def _refusals(svc: Service, tmp_path: Path, token: str) -> dict[str, tuple[dict, int, str]]:
    auth = {"Authorization": f"Bearer {token}"}
    good = _bundle(tmp_path / "g.cdcu", svc.identity).read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 1
    return {
        "no token": ({"content": good}, 401, "no_token"),
        "wrong token": ({"content": good, "headers": {"Authorization": "Bearer nope"}}, 401, "bad_token"),
        "not a bundle": ({"content": b"hello", "headers": auth}, 422, "malformed_bundle"),
        "empty": ({"content": b"", "headers": auth}, 422, "malformed_bundle"),
        "truncated": ({"content": good[:-10], "headers": auth}, 422, "malformed_bundle"),
        "bit flipped": ({"content": bytes(flipped), "headers": auth}, 422, "malformed_bundle"),
        "unknown model": ({"content": _bundle(tmp_path / "u.cdcu", "ab" * 32).read_bytes(), "headers": auth},
                          409, "unknown_artifact"),
        "too large": ({"content": os.urandom((1 << 20) + 1), "headers": auth}, 413, "too_large"),
    }


def test_refused_uploads_store_nothing(service, tmp_path, capsys):
    dev = _enroll(service, capsys)
    for case, (kw, code, error) in _refusals(service, tmp_path, dev["device_token"]).items():
        hostile("service")
        before = service.state()
        r = httpx.post(f"{service.url}/v1/uploads", **kw)
        assert r.status_code == code, (case, r.status_code, r.text)
        assert r.json()["detail"]["error"] == error and r.json()["detail"]["message"], case
        assert service.state() == before, case
        assert not list((service.data / "incoming").iterdir()), case


def test_bad_downloads_and_queries(service, tmp_path, capsys):
    dev = _enroll(service, capsys)
    auth = {"Authorization": f"Bearer {dev['device_token']}"}
    up = httpx.get(f"{service.url}/v1/updates", params={"identity": "0" * 64}, headers=auth).json()["update"]
    cases = [
        (f"{service.url}{up['url']}", {}, 401),
        (f"{service.url}/v1/blobs/{'0' * 64}", auth, 404),
        (f"{service.url}/v1/blobs/not-a-digest", auth, 404),
        (f"{service.url}{up['url']}", {**auth, "Range": "bytes=999999999-"}, 416),
        (f"{service.url}{up['url']}", {**auth, "Range": "items=0-1"}, 416),
        (f"{service.url}/v1/updates", auth, 422),  # no identity parameter
        # TUF metadata: only this protocol's names, only this cohort's files
        (f"{service.url}/v1/tuf/metadata/1.root.json", {}, 401),
        (f"{service.url}/v1/tuf/metadata/..%2F..%2Fstate.sqlite3", auth, 404),
        (f"{service.url}/v1/tuf/metadata/root.json", auth, 404),
        (f"{service.url}/v1/tuf/metadata/0.root.json", auth, 404),
        (f"{service.url}/v1/tuf/metadata/99.root.json", auth, 404),  # the end of a root chain
        (f"{service.url}/v1/tuf/metadata/timestamp.json.bak", auth, 404),
        (f"{service.url}/v1/tuf/metadata/.lock", auth, 404),
        (f"{service.url}/v1/tuf/targets/artifacts/{'0' * 64}.v0.gguf", auth, 404),
        (f"{service.url}/v1/tuf/targets/artifacts/..%2F..%2Fstate.sqlite3", auth, 404),
        (f"{service.url}/v1/tuf/targets/{up['sha256']}", {}, 401),
    ]
    for url, headers, code in cases:
        hostile("service")
        before = service.state()
        assert httpx.get(url, headers=headers).status_code == code, url
        assert service.state() == before


def test_a_token_of_one_use_enrolls_one_device_when_many_race(service, capsys):
    from concurrent.futures import ThreadPoolExecutor

    capsys.readouterr()
    assert main(["cloud", "enroll-token", "--cohort", "demo", "--data", str(service.data), *_db(service.db),
                 "--json"]) == 0
    token = json.loads(capsys.readouterr().out)["token"]
    hostile("service")
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda _: httpx.post(f"{service.url}/v1/enroll", json={"token": token}).status_code,
                              range(16)))
    assert sorted(codes) == [201] + [401] * 15
    assert service.state()[0]["devices"] == 1


def test_an_acknowledged_upload_survives_kill_9(service, tmp_path, capsys):
    dev = _enroll(service, capsys)
    auth = {"Authorization": f"Bearer {dev['device_token']}"}
    acked = []
    for i in range(5):
        r = httpx.post(f"{service.url}/v1/uploads", headers=auth,
                       content=_bundle(tmp_path / f"b{i}.cdcu", service.identity, seed=i).read_bytes())
        assert r.status_code == 201
        acked.append(r.json()["sha256"])
    service.stop(signal.SIGKILL)
    service.start()
    from cdcca_edge.cloud.service.store import Upload

    sessions = open_db(database_url(service.data, service.db))
    with sessions() as s:
        stored = {u.sha256 for u in s.query(Upload)}
    assert set(acked) <= stored
    blobs = BlobStore(service.data / "blobs")
    assert all(blobs.has(sha) for sha in acked)
    r = httpx.post(f"{service.url}/v1/uploads", headers=auth,  # a retry after the restart
                   content=(tmp_path / "b0.cdcu").read_bytes())
    assert r.status_code == 200 and r.json()["stored"] == "already"


def _fleet(tmp_path: Path, db: str | None = None) -> dict:
    """A cohort "fleet" of tiny models, the exported student, a signing key, and two real
    uplink bundles collected by the runtime on the student (different inputs)."""
    import shutil

    from cdcca_edge.converters.export import export
    from cdcca_edge.demo.tiny import build_tiny_model
    from cdcca_edge.runtime import load
    from cdcca_edge.runtime.uts import calibrate, collect, read_inputs
    from tests.cloud.test_akd import STUDENT, TEACHER, prompts
    from tests.requires import needs_llama

    needs_llama()
    teacher = build_tiny_model(tmp_path / "teacher", TEACHER)
    student = build_tiny_model(tmp_path / "student", STUDENT)
    model = export(student, tmp_path / "student.gguf", "gguf", quant="q8_0").path
    data = tmp_path / "data"
    _create(tmp_path, data, "fleet", model, "--teacher", str(teacher), "--student", str(student), db=db)
    device = tmp_path / "device.gguf"
    shutil.copy(model, device)
    identity = compute_identity(open_artifact(device)).digest
    with open(tmp_path / "in.jsonl", "w") as f:
        for i, p in enumerate(prompts("target", 60, seed=31)):
            f.write(json.dumps({"id": f"t{i}", "prompt": p}) + "\n")
    with open(tmp_path / "in2.jsonl", "w") as f:
        for i, p in enumerate(prompts("target", 40, seed=41)):
            f.write(json.dumps({"id": f"u{i}", "prompt": p}) + "\n")
    with load(device) as m:
        cal = calibrate(m, prompts("source", 30, seed=30), identity, rate=0.3, max_tokens=10)
        collect(m, read_inputs(tmp_path / "in.jsonl"), cal, tmp_path / "b.cdcu", identity)
        collect(m, read_inputs(tmp_path / "in2.jsonl"), cal, tmp_path / "b2.cdcu", identity)
    old_device = tmp_path / "old-device.gguf"  # a second device that stays on version 0
    shutil.copy(model, old_device)
    return {"data": data, "model": model, "device": device, "old_device": old_device, "identity": identity}


def test_a_round_publishes_a_signed_delta_the_device_patches_in_place(tmp_path, capsys):
    """The whole loop through the service: real bundles collected by the runtime on the
    exported student, uploaded; a round (AKD + DWC, signed) publishes version 1; the
    device fetches the delta with Range, checks it, patches its copy in place with the
    cohort's public key as trust, reports; the mirror's identity is the device's."""
    from cdcca_edge.core.patch import apply_delta
    from cdcca_edge.core.trust import Trust
    from cdcca_edge.runtime.sync_client import SyncClient, SyncError

    f = _fleet(tmp_path)
    data, device, old_device, identity = f["data"], f["device"], f["old_device"], f["identity"]
    svc = Service(data)
    svc.start()
    try:
        capsys.readouterr()
        assert main(["cloud", "enroll-token", "--cohort", "fleet", "--data", str(data), "--uses", "2",
                     "--json"]) == 0
        token = json.loads(capsys.readouterr().out)["token"]
        client = SyncClient(tmp_path / "device-state")  # the device's side: urllib3 + TUF ngclient
        enr = client.enroll(svc.url, token)
        auth = {"Authorization": f"Bearer {enr.token}"}
        assert client.upload(tmp_path / "b.cdcu")["stored"] == "now"
        capsys.readouterr()
        assert main(["cloud", "round", "fleet", "--data", str(data), "--json"]) == 0
        published = json.loads(capsys.readouterr().out)
        assert published["version"] == 1 and published["signed"] and published["new_uploads"] == 1
        assert main(["cloud", "round", "fleet", "--data", str(data)]) == 2  # nothing new: publishes nothing
        up = client.check(identity)
        assert up["held_version"] == 0 and up["latest_version"] == 1
        u = up["update"]
        assert u["kind"] == "delta" and u["to_identity"] == published["identity"]
        fetched = client.fetch(u)  # TUF-verified: signed length, SHA-256 and claimed identities
        assert hashlib.sha256(fetched.read_bytes()).hexdigest() == u["sha256"]
        # the second layer: the delta's own signature, by a key the TUF root gives the targets role
        assert client.trust().public_keys == Trust.keys([tmp_path / "key.pem.pub"]).public_keys
        res = apply_delta(device, fetched, trust=client.trust())
        assert res.applied and res.to_version == 1
        now = compute_identity(open_artifact(device)).digest
        assert now == u["to_identity"]
        client.report(now, True)
        from cdcca_edge.cloud.service.ops import mirror_path

        assert compute_identity(open_artifact(mirror_path(data, "fleet"))).digest == now
        assert client.check(now)["update"] is None
        # a device still on an unknown model gets the whole new artefact, which is the mirror's bytes
        whole = client.check("1" * 64)["update"]
        assert whole["kind"] == "artifact" and whole["to_version"] == 1
        assert client.fetch(whole).read_bytes() == device.read_bytes()
        # round 2; a second device left on version 0 gets a delta 0 -> 2, built on demand, signed
        assert client.upload(tmp_path / "b2.cdcu")["stored"] == "now"
        assert main(["cloud", "round", "fleet", "--data", str(data)]) == 0
        other = SyncClient(tmp_path / "old-device-state")
        other.enroll(svc.url, token)
        skip = other.check(identity)["update"]
        assert skip["kind"] == "delta" and (skip["from_version"], skip["to_version"]) == (0, 2)
        # a download that broke off half way resumes from the bytes it has (HTTP Range)
        half = skip["length"] // 2
        partial = httpx.get(f"{svc.url}{skip['url']}", headers={**auth, "Range": f"bytes=0-{half - 1}"}).content
        (tmp_path / "old-device-state" / "downloads").mkdir(parents=True, exist_ok=True)
        part = tmp_path / "old-device-state" / "downloads" / f"{skip['sha256']}.v0-v2.cdcd.part"
        part.write_bytes(partial)
        got = other.fetch(skip)
        assert hashlib.sha256(got.read_bytes()).hexdigest() == skip["sha256"] and not part.exists()
        assert apply_delta(old_device, got, trust=other.trust()).applied
        assert compute_identity(open_artifact(old_device)).digest == skip["to_identity"] == \
            compute_identity(open_artifact(mirror_path(data, "fleet"))).digest
        again = other.check(identity)["update"]
        assert again["sha256"] == skip["sha256"]  # built once, then served from the store
        # an operator revokes the device: its token no longer works
        assert main(["cloud", "revoke", enr.device_id, "--data", str(data)]) == 0
        with pytest.raises(SyncError) as exc:
            client.check(identity)
        assert exc.value.status == 401 and exc.value.code == "bad_token"
    finally:
        svc.stop()


@pytest.mark.parametrize("policy", [("--min-uploads", "1"), ("--every", "1")])
def test_the_service_runs_due_rounds_itself(tmp_path, capsys, policy):
    """`serve --min-uploads 1` (or `--every 1`, seconds since the latest version): the
    embedded default's worker runs the round once an upload arrives, publishes once, and
    counts it in /metrics."""
    f = _fleet(tmp_path)
    svc = Service(f["data"])
    svc.start(*policy, "--round-poll", "0.5")
    try:  # the device side through the CLI, as the README shows it
        capsys.readouterr()
        assert main(["cloud", "enroll-token", "--cohort", "fleet", "--data", str(f["data"])]) == 0
        token = capsys.readouterr().out.strip()
        state = str(tmp_path / "dev")
        assert main(["sync", "enroll", svc.url, token, "--state", state]) == 0
        assert "enrolled as" in capsys.readouterr().out
        assert main(["sync", "upload", str(tmp_path / "b.cdcu"), "--state", state, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)[0]["stored"] == "now"
        auth = {"Authorization": f"Bearer {json.loads((tmp_path / 'dev' / 'device.json').read_text())['token']}"}
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            up = httpx.get(f"{svc.url}/v1/updates", params={"identity": f["identity"]}, headers=auth).json()
            if up["latest_version"] == 1:
                break
            time.sleep(0.5)
        assert up["latest_version"] == 1 and up["update"]["kind"] == "delta"
        time.sleep(1.5)  # a few more polls: nothing new, nothing published again
        m = httpx.get(f"{svc.url}/metrics").text
        assert 'cdcca_rounds_total{result="published"} 1.0' in m and 'result="failed"' not in m
        assert 'cdcca_published_version{cohort="fleet"} 1.0' in m
        assert main(["sync", "update", str(f["device"]), "--state", state, "--json"]) == 0
        done = json.loads(capsys.readouterr().out)
        assert done["update"] == "delta" and done["version"] == 1 and done["identity"] == up["latest_identity"]
        assert main(["sync", "update", str(f["device"]), "--state", state, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["update"] is None  # the latest already
        # a device whose model the cohort never published gets the whole artefact, atomically
        raw = bytearray(f["old_device"].read_bytes())
        raw[-100:] = bytes(100)
        f["old_device"].write_bytes(bytes(raw))
        assert main(["sync", "update", str(f["old_device"]), "--state", state, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["update"] == "artifact"
        assert compute_identity(open_artifact(f["old_device"])).digest == up["latest_identity"]
        assert 'cdcca_devices{cohort="fleet",version="1"} 1.0' in httpx.get(f"{svc.url}/metrics").text
    finally:
        svc.stop()


def test_publish_an_artefact_built_elsewhere(service, tmp_path, capsys):
    """`cloud publish`: version 1 from a changed copy of the model; a device on version 0
    is offered the exact delta, which takes it to the published identity."""
    from cdcca_edge.core.patch import apply_delta
    from cdcca_edge.core.trust import Trust
    from tests.core.delta_helpers import random_units

    new = tmp_path / "new.gguf"
    import shutil

    shutil.copy(service.model, new)
    t = open_artifact(new).tensor("Q8_0.w")
    raw = bytearray(new.read_bytes())
    raw[t.offset : t.offset + 34 * 3] = random_units("Q8_0", 3, np.random.default_rng(9))
    new.write_bytes(bytes(raw))
    capsys.readouterr()
    db = _db(service.db)
    assert main(["cloud", "publish", "demo", "--artifact", str(new), "--data", str(service.data), *db,
                 "--json"]) == 0
    pub = json.loads(capsys.readouterr().out)
    assert pub["version"] == 1 and pub["identity"] == compute_identity(open_artifact(new)).digest
    assert main(["cloud", "publish", "demo", "--artifact", str(new), "--data", str(service.data), *db]) == 2
    dev = _enroll(service, capsys)
    auth = {"Authorization": f"Bearer {dev['device_token']}"}
    up = httpx.get(f"{service.url}/v1/updates", params={"identity": service.identity}, headers=auth).json()["update"]
    assert up["kind"] == "delta" and up["to_identity"] == pub["identity"]
    device = tmp_path / "device.gguf"
    shutil.copy(service.model, device)
    (tmp_path / "u.cdcd").write_bytes(httpx.get(f"{service.url}{up['url']}", headers=auth).content)
    assert apply_delta(device, tmp_path / "u.cdcd", trust=Trust.none()).applied
    assert compute_identity(open_artifact(device)).digest == pub["identity"]


def test_quota_and_wrong_cohort(tmp_path, capsys):
    """429 over a device's hourly upload quota (with Retry-After, nothing stored); 403 for
    another cohort's update file."""
    model = make_gguf(tmp_path / "m.gguf")
    other = make_gguf(tmp_path / "o.gguf", seed=3)
    data = tmp_path / "data"
    _create(tmp_path, data, "demo", model)
    _create(tmp_path, data, "other", other)
    svc = Service(data)
    svc.start("--uploads-per-hour", "2")
    try:
        dev = _enroll(svc, capsys)
        auth = {"Authorization": f"Bearer {dev['device_token']}"}
        ident = compute_identity(open_artifact(model)).digest
        for i in range(2):
            r = httpx.post(f"{svc.url}/v1/uploads", headers=auth,
                           content=_bundle(tmp_path / f"b{i}.cdcu", ident, seed=i).read_bytes())
            assert r.status_code == 201
        before = svc.state()
        hostile("service")
        r = httpx.post(f"{svc.url}/v1/uploads", headers=auth,
                       content=_bundle(tmp_path / "b2.cdcu", ident, seed=2).read_bytes())
        assert r.status_code == 429 and r.json()["detail"]["error"] == "over_quota"
        assert r.headers["retry-after"] == "3600" and svc.state() == before
        theirs = hashlib.sha256(other.read_bytes()).hexdigest()
        hostile("service")
        r = httpx.get(f"{svc.url}/v1/blobs/{theirs}", headers=auth)
        assert r.status_code == 403 and r.json()["detail"]["error"] == "wrong_cohort"
    finally:
        svc.stop()


def test_tokens_never_look_like_options():
    """`cdcca-edge sync enroll URL TOKEN` takes the token as an argument: one starting
    with '-' would be read as an option (it happened: token_urlsafe can start with '-')."""
    from cdcca_edge.cloud.service.store import new_token

    assert all(new_token()[0].isalpha() for _ in range(2000))


def _nudged(src: Path, dst: Path, scale: float) -> Path:
    """A copy of the ONNX directory ``src`` whose largest float tensor is scaled: the same
    layout, another identity."""
    import shutil

    import numpy as np

    shutil.copytree(src, dst)
    for side in ("cdcca-state.json", "cdcca-state.leaves"):
        (dst / side).unlink(missing_ok=True)
    t = max((t for t in open_artifact(dst).tensors if t.type_name == "F32"), key=lambda t: t.nbytes)
    with open(t.file, "r+b") as f:
        f.seek(t.offset)
        x = np.frombuffer(f.read(t.nbytes), np.float32) * np.float32(scale)
        f.seek(t.offset)
        f.write(x.tobytes())
    return dst


def test_directory_artefacts_are_served_packed_patched_by_delta_or_installed_whole(tmp_path, capsys, exports):
    """An ONNX cohort: version 0 and 1 are stored as packs (core.pack); a device on version
    0 takes the delta and patches its directory in place; a device the cloud has no delta
    for gets the pack of version 1, unpacked beside it and swapped in whole."""
    import shutil

    root = open_artifact(exports("llama", "onnx").path).root
    v0 = tmp_path / "v0"
    shutil.copytree(root, v0)
    data = tmp_path / "data"
    _create(tmp_path, data, "dirs", v0)
    v1 = _nudged(v0, tmp_path / "v1", 1.01)
    assert main(["cloud", "publish", "dirs", "--artifact", str(v1), "--data", str(data)]) == 0
    published = compute_identity(open_artifact(v1)).digest
    on_v0 = tmp_path / "on-v0"
    shutil.copytree(v0, on_v0)
    elsewhere = _nudged(v0, tmp_path / "elsewhere", 0.99)
    svc = Service(data)
    svc.start()
    try:
        for device, kind in ((on_v0, "delta"), (elsewhere, "artifact")):
            capsys.readouterr()
            assert main(["cloud", "enroll-token", "--cohort", "dirs", "--data", str(data)]) == 0
            state = tmp_path / f"state-{device.name}"
            assert main(["sync", "enroll", svc.url, capsys.readouterr().out.strip(), "--state", str(state)]) == 0
            capsys.readouterr()
            assert main(["sync", "update", str(device), "--state", str(state), "--json"]) == 0
            done = json.loads(capsys.readouterr().out)
            assert done["update"] == kind and done["version"] == 1 and done["identity"] == published
            assert compute_identity(open_artifact(device)).digest == published
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left
    finally:
        svc.stop()
