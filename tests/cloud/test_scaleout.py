"""The scale-out service: state in a real PostgreSQL, rounds on two `cdcca-edge cloud
worker` processes pulling from the task queue (procrastinate), the AKD stage of the rerun
under `accelerate launch`; a worker killed mid-round has its job run again and one
version published."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

pytest.importorskip("procrastinate")
httpx = pytest.importorskip("httpx")

from cdcca_edge.cli import main  # noqa: E402
from cdcca_edge.cloud.service.ops import mirror_path  # noqa: E402
from cdcca_edge.core.artifact import compute_identity, open_artifact  # noqa: E402
from tests.procs import wait_for  # noqa: E402
from tests.cloud.test_service import Service, _fleet  # noqa: E402


def _worker(data, db, name, *extra):
    log = open(data.parent / f"worker-{name}.log", "w")  # read on failure
    return subprocess.Popen([sys.executable, "-m", "cdcca_edge.cli", "cloud", "worker", "--data", str(data),
                             "--db", db, "--name", name, "--heartbeat", "1", "--stalled", "4", *extra],
                            stdout=log, stderr=subprocess.STDOUT)


def _jobs(db):
    import psycopg

    with psycopg.connect(db) as conn:
        return conn.execute("SELECT id, status, attempts FROM procrastinate_jobs WHERE task_name = 'cdcca.round' "
                            "ORDER BY id").fetchall()


def test_rounds_on_workers_survive_a_killed_worker(tmp_path, capsys, postgres):
    from cdcca_edge.core.patch import apply_delta
    from cdcca_edge.runtime.sync_client import SyncClient

    db = postgres.new_database()
    f = _fleet(tmp_path, db=db)
    data = f["data"]
    svc = Service(data, db)
    svc.start("--queue", "--min-uploads", "1", "--round-poll", "0.3")
    workers = [_worker(data, db, "a"), _worker(data, db, "b")]
    try:
        capsys.readouterr()
        assert main(["cloud", "enroll-token", "--cohort", "fleet", "--data", str(data), "--db", db, "--json"]) == 0
        client = SyncClient(tmp_path / "state")
        client.enroll(svc.url, json.loads(capsys.readouterr().out)["token"])
        # round 1: deferred by the service, run by one of the two workers
        assert client.upload(tmp_path / "b.cdcu")["stored"] == "now"
        up = wait_for("version 1", lambda: (u := client.check(f["identity"]))["latest_version"] == 1 and u)
        fetched = client.fetch(up["update"])
        assert apply_delta(f["device"], fetched, trust=client.trust()).applied
        now = compute_identity(open_artifact(f["device"])).digest
        assert now == up["latest_identity"] == compute_identity(open_artifact(mirror_path(data, "fleet"))).digest
        assert [(s, a) for _, s, a in _jobs(db)] == [("succeeded", 1)]  # one job, run once
        # round 2: one worker only, killed while the round runs; a fresh worker (AKD under
        # `accelerate launch`) finds the stalled job, runs it again, one version is published
        for w in workers:
            w.send_signal(signal.SIGTERM)
            w.wait(timeout=120)
        workers = [_worker(data, db, "c")]
        assert client.upload(tmp_path / "b2.cdcu")["stored"] == "now"
        wait_for("the round to start", lambda: any(s == "doing" for _, s, _ in _jobs(db)))
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait(timeout=30)
        assert any(s == "doing" for _, s, _ in _jobs(db))  # the dead worker's job, not finished
        workers.append(_worker(data, db, "d", "--launcher", "accelerate launch --num_processes 1 --cpu"))
        wait_for("the retried round", lambda: [s for _, s, _ in _jobs(db)] == ["succeeded", "succeeded"], 300)
        assert _jobs(db)[1][2] == 2  # attempts: the killed run and the rerun
        up = client.check(now)
        assert up["latest_version"] == 2 and up["update"]["from_version"] == 1
        with httpx.Client() as http:
            m = http.get(f"{svc.url}/metrics").text
        assert 'cdcca_published_version{cohort="fleet"} 2.0' in m
        assert apply_delta(f["device"], client.fetch(up["update"]), trust=client.trust()).applied
        assert compute_identity(open_artifact(f["device"])).digest == up["latest_identity"] == \
            compute_identity(open_artifact(mirror_path(data, "fleet"))).digest
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
        svc.stop()
