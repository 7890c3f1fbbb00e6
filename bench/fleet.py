"""Fleet benchmark: simulated devices against one `cdcca-edge cloud serve` (embedded
default: SQLite) on this machine. Devices are light clients (httpx, asyncio, one client
process) replaying real uplink bundles and downloading a real delta; no model runs.

    python bench/fleet.py [--levels 10,100,1000] [--seconds 15]

Per concurrency level: durable uploads/s of ~10 KB bundles (each acknowledged only once
stored), update checks/s, delta downloads (MB/s), p50/p99 latency. Then a kill -9 of the
server in the middle of an upload run: every acknowledged upload must be stored after the
restart. Writes bench/results/fleet.json and the "fleet" section of docs/benchmarks.md.
PostgreSQL and worker processes are not built yet: not measured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, update_section, write_results  # noqa: E402
from cdcca_edge.core.paths import cache_dir  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bundles(n: int, identity: str, work: Path, first: int = 0) -> list[bytes]:
    """``n`` distinct real uplink bundles of about 10 KB (written through the format's own
    writer on tmpfs, where its fsync is cheap)."""
    from cdcca_edge.core import uplink_format as U

    out = []
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else work
    for i in range(first, first + n):
        rng = np.random.default_rng(i)
        samples = [U.UplinkSample(f"s{k}", {U.META_PROMPT: "x" * 40, U.META_ANSWER: "y" * 20,
                                            U.META_UNCERTAINTY: 1.0, U.META_RAW_BYTES: 60},
                                  {U.PROMPT_IDS: rng.integers(0, 50000, 900).astype(np.uint32),
                                   U.ANSWER_IDS: rng.integers(0, 50000, 32).astype(np.uint32),
                                   U.TOKEN_WEIGHTS: np.ones(32, np.float16)}) for k in range(4)]
        path = shm / f"cdcca-fleet-{os.getpid()}.cdcu"
        U.write_uplink(path, {"artifact_identity": identity, "artifact_version": 0, "selector": "uts",
                              "n_seen": 8}, samples)
        out.append(path.read_bytes())
    path.unlink(missing_ok=True)
    return out


class Server:
    def __init__(self, data: Path) -> None:
        self.data, self.port = data, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        import httpx

        self.proc = subprocess.Popen([sys.executable, "-m", "cdcca_edge.cli", "cloud", "serve", "--data",
                                      str(self.data), "--port", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(600):
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait()


async def _run(url: str, tokens: list[str], seconds: float, make_request, stop_after=None) -> dict:
    """``len(tokens)`` devices, each looping ``make_request(client, device_index, n)``
    for ``seconds``; returns throughput and latencies of the successful requests."""
    import httpx

    lat: list[float] = []
    ok = errors = nbytes = 0
    acked: list[str] = []
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=len(tokens), max_keepalive_connections=len(tokens))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        async def device(i: int) -> None:
            nonlocal ok, errors, nbytes
            n = 0
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    got, size, ack = await make_request(client, i, n)
                except httpx.HTTPError:
                    errors += 1
                    if stop_after is not None:
                        return
                    continue
                n += 1
                if got:
                    ok += 1
                    nbytes += size
                    lat.append(time.perf_counter() - t0)
                    if ack:
                        acked.append(ack)
                else:
                    errors += 1
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(device(i)) for i in range(len(tokens))]
        if stop_after is not None:
            await asyncio.sleep(stop_after[0])
            stop_after[1]()
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else None  # noqa: E731
    return {"ok": ok, "errors": errors, "per_second": ok / wall, "mb_per_second": nbytes / wall / 1e6,
            "p50_ms": q(0.50), "p99_ms": q(0.99), "seconds": wall, "acked": acked}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="10,100,1000")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--phases", default="uploads,update_checks,delta_downloads")
    ap.add_argument("--no-write", action="store_true", help="print only (for experiments)")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    work = cache_dir() / "bench" / "fleet"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    from bench.patch import make_change, synthetic_gguf
    from cdcca_edge.cli import main as cli
    from cdcca_edge.core.artifact import compute_identity, open_artifact

    model = synthetic_gguf(work / "model.gguf", 32 << 20)
    make_change(model, work / "new.gguf", "rows", fraction=0.01)
    data = work / "data"
    assert cli(["cloud", "create-cohort", "fleet", "--artifact", str(model), "--data", str(data)]) == 0
    assert cli(["cloud", "publish", "fleet", "--artifact", str(work / "new.gguf"), "--data", str(data)]) == 0
    identity = compute_identity(open_artifact(model)).digest
    n_dev = max(levels)
    from cdcca_edge.cloud.service.ops import enroll_token

    token = enroll_token(data, "fleet", uses=n_dev)
    import itertools

    bundles = _bundles(12000, identity, work)  # every upload of the runs below is a new one
    taken = itertools.count()
    server = Server(data)
    server.start()
    import httpx

    tokens = [httpx.post(f"{server.url}/v1/enroll", json={"token": token}).json()["device_token"]
              for _ in range(n_dev)]
    delta = httpx.get(f"{server.url}/v1/updates", params={"identity": identity},
                      headers={"Authorization": f"Bearer {tokens[0]}"}).json()["update"]
    results: dict[str, dict] = {}
    for level in levels:
        toks = tokens[:level]
        hdr = [{"Authorization": f"Bearer {t}"} for t in toks]

        async def up(client, i, n):  # the next bundle nobody uploaded yet
            body = bundles[next(taken) % len(bundles)]
            r = await client.post("/v1/uploads", content=body, headers=hdr[i])
            return r.status_code in (200, 201), len(body), r.json().get("sha256") if r.status_code == 201 else None

        async def check(client, i, n):
            r = await client.get("/v1/updates", params={"identity": identity}, headers=hdr[i])
            return r.status_code == 200, 0, None

        async def down(client, i, n):
            r = await client.get(delta["url"], headers=hdr[i])
            return r.status_code == 200 and len(r.content) == delta["length"], len(r.content), None

        row = {}
        for name, fn in (("uploads", up), ("update_checks", check), ("delta_downloads", down)):
            if name not in args.phases.split(","):
                continue
            res = asyncio.run(_run(server.url, toks, args.seconds, fn))
            res.pop("acked")
            row[name] = res
            print(f"{level} devices, {name}: {res['per_second']:.0f}/s, {res['mb_per_second']:.2f} MB/s, "
                  f"p50 {res['p50_ms']:.0f} ms, p99 {res['p99_ms']:.0f} ms, errors {res['errors']}",
                  file=sys.stderr)
        results[str(level)] = row
    if args.no_write:
        server.kill()
        return
    # kill -9 in the middle of an upload run: what was acknowledged must be stored
    crash_level = min(100, n_dev)
    hdr = [{"Authorization": f"Bearer {t}"} for t in tokens[:crash_level]]
    fresh = _bundles(3000, identity, work, first=100000)  # never uploaded before: every 201 is a new row
    fresh_taken = itertools.count()

    async def up_new(client, i, n):
        body = fresh[next(fresh_taken) % len(fresh)]
        r = await client.post("/v1/uploads", content=body, headers=hdr[i])
        return r.status_code in (200, 201), len(body), r.json().get("sha256") if r.status_code == 201 else None

    crash = asyncio.run(_run(server.url, tokens[:crash_level], 6.0, up_new,
                             stop_after=(3.0, lambda: server.kill(signal.SIGKILL))))
    server.start()
    from cdcca_edge.cloud.service.store import Upload, database_url, open_db

    with open_db(database_url(data))() as s:
        stored = {u.sha256 for u in s.query(Upload)}
    lost = [a for a in crash["acked"] if a not in stored]
    server.kill()
    doc = {"machine": machine(), "seconds_per_phase": args.seconds, "database": "sqlite (WAL, synchronous=FULL)",
           "bundle_bytes": len(bundles[0]), "delta_bytes": delta["length"], "levels": results,
           "kill9": {"devices": crash_level, "acknowledged": len(crash["acked"]), "lost": len(lost)}}
    path = write_results("fleet", doc)
    rows = []
    for level, row in results.items():
        u, c, d = row["uploads"], row["update_checks"], row["delta_downloads"]
        rows.append(f"| {level} | {u['per_second']:.0f} ({u['p50_ms']:.0f} / {u['p99_ms']:.0f}) | "
                    f"{c['per_second']:.0f} ({c['p50_ms']:.0f} / {c['p99_ms']:.0f}) | "
                    f"{d['mb_per_second']:.1f} ({d['p50_ms']:.0f} / {d['p99_ms']:.0f}) | "
                    f"{u['errors'] + c['errors'] + d['errors']} |")
    md = f"""## Fleet: simulated devices against `cloud serve` (`bench/fleet.py`)

One server process (embedded default: SQLite in WAL mode, `synchronous=FULL`; blobs
fsync'd before each 201) and one client process of asyncio devices on this 2-core machine;
{args.seconds:.0f} s per phase. Bundles of {len(bundles[0]):,} bytes (real uplink bundles), a
delta of {delta['length']:,} bytes. Cells: requests/s (p50 / p99 ms).

| devices | durable uploads/s | update checks/s | delta downloads MB/s | errors |
|---|---:|---:|---:|---:|
{chr(10).join(rows)}

kill -9 of the server 3 s into an upload run of {crash_level} devices: {len(crash['acked'])} uploads
acknowledged, {len(lost)} of them missing after the restart.
PostgreSQL and separate worker processes are not built yet, so not measured.
"""
    update_section("fleet", md)
    print(f"wrote {path}", file=sys.stderr)
    print(md)


if __name__ == "__main__":
    main()
