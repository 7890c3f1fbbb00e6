"""Fleet benchmark: simulated devices against one `cdcca-edge cloud serve` on this
machine, on the embedded default (SQLite) and on PostgreSQL. Devices are light clients
(httpx, asyncio, one client process) replaying real uplink bundles and downloading a real
delta; no model runs.

    python bench/fleet.py [--levels 10,100,1000] [--seconds 15] [--backends sqlite,postgresql] [--workers 1]

Per concurrency level: durable uploads/s of ~10 KB bundles (each acknowledged only once
stored), update checks/s, delta downloads (MB/s), p50/p99 latency. Then a kill -9 of the
server in the middle of an upload run: every acknowledged upload must be stored after the
restart. Writes bench/results/fleet.json and the "fleet" section of docs/benchmarks.md.
PostgreSQL is a throwaway cluster (tests/postgres.py) with fsync on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
    def __init__(self, data: Path, db: str | None, workers: int) -> None:
        self.data, self.db, self.workers, self.port = data, db, workers, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        import httpx

        self.proc = subprocess.Popen([sys.executable, "-m", "cdcca_edge.cli", "cloud", "serve", "--data",
                                      str(self.data), "--port", str(self.port), "--workers", str(self.workers),
                                      *(["--db", self.db] if self.db else [])],
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
            if sig == signal.SIGKILL:  # every process of the server (uvicorn workers included)
                subprocess.run(["pkill", "-9", "-P", str(self.proc.pid)], check=False)
            self.proc.send_signal(sig)
            self.proc.wait()


class Conn:
    """One device's keep-alive HTTP/1.1 connection: a raw asyncio client, light enough
    that 1,000 of them in one process measure the server, not the client (httpx's pool
    in one process topped out near 100 requests/s at 100 connections here)."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.auth = port, f"Authorization: Bearer {token}\r\n"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = f"{method} {path} HTTP/1.1\r\nHost: fleet\r\n{self.auth}"
        if body:
            head += f"Content-Length: {len(body)}\r\nContent-Type: application/octet-stream\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        await self.writer.drain()
        assert self.reader is not None
        lines = (await self.reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(b":") for x in lines[1:] if x)}
        if headers.get(b"transfer-encoding") == b"chunked":
            data = b""
            while size := int((await self.reader.readuntil(b"\r\n")).strip(), 16):
                data += await self.reader.readexactly(size + 2)
                data = data[:-2]
            await self.reader.readuntil(b"\r\n")
        else:
            data = await self.reader.readexactly(int(headers.get(b"content-length", b"0")))
        if headers.get(b"connection") == b"close":
            self.close()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _run(port: int, tokens: list[str], seconds: float, make_request, stop_after=None) -> dict:
    """``len(tokens)`` devices, each looping ``make_request(conn, device_index, n)``
    for ``seconds``; returns throughput and latencies of the successful requests."""
    lat: list[float] = []
    ok = errors = nbytes = 0
    acked: list[str] = []
    deadline = time.perf_counter() + seconds
    conns = [Conn(port, t) for t in tokens]

    async def device(i: int) -> None:
        nonlocal ok, errors, nbytes
        n = 0
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                got, size, ack = await asyncio.wait_for(make_request(conns[i], i, n), 60)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
                conns[i].close()
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
    for c in conns:
        c.close()
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else None  # noqa: E731
    return {"ok": ok, "errors": errors, "per_second": ok / wall, "mb_per_second": nbytes / wall / 1e6,
            "p50_ms": q(0.50), "p99_ms": q(0.99), "seconds": wall, "acked": acked}


async def _run_open(port: int, tokens: list[str], seconds: float, rate: float, make_request) -> dict:
    """Open loop: the devices together offer ``rate`` requests/s (each device one every
    ``len(tokens) / rate`` s, staggered), as a fleet that checks on a schedule does;
    latency counts from each request's scheduled time, so a slow server cannot hide its
    queue (no coordinated omission)."""
    lat: list[float] = []
    errors = 0
    conns = [Conn(port, t) for t in tokens]
    period = len(tokens) / rate
    t0 = time.perf_counter()

    async def device(i: int) -> None:
        nonlocal errors
        k = 0
        while True:
            due = t0 + i / rate + k * period
            if due - t0 >= seconds:
                return
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            try:
                got, _, _ = await asyncio.wait_for(make_request(conns[i], i, k), 60)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
                conns[i].close()
                got = False
            if got:
                lat.append(time.perf_counter() - due)
            else:
                errors += 1
            k += 1

    await asyncio.gather(*(device(i) for i in range(len(tokens))))
    wall = time.perf_counter() - t0
    for c in conns:
        c.close()
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else None  # noqa: E731
    return {"offered_per_second": rate, "ok": len(lat), "errors": errors, "per_second": len(lat) / wall,
            "p50_ms": q(0.50), "p99_ms": q(0.99), "seconds": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="10,100,1000")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--phases", default="uploads,update_checks,delta_downloads")
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--workers", type=int, default=1, help="API processes (serve --workers)")
    ap.add_argument("--no-write", action="store_true", help="print only (for experiments)")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    out = {}
    for backend in args.backends.split(","):
        pg = None
        if backend == "postgresql":
            from tests.postgres import Postgres

            pg = Postgres()
        try:
            out[backend] = _bench(backend, pg.new_database() if pg else None, levels, args)
        finally:
            if pg:
                pg.stop()
    if args.no_write:
        return
    doc = {"machine": machine(), "seconds_per_phase": args.seconds, "api_processes": args.workers,
           "backends": out}
    path = write_results("fleet", doc)
    rows = []
    for backend, res in out.items():
        for level, row in res["levels"].items():
            u, c, d = row["uploads"], row["update_checks"], row["delta_downloads"]
            rows.append(f"| {backend} | {level} | {u['per_second']:.0f} ({u['p50_ms']:.0f} / {u['p99_ms']:.0f}) | "
                        f"{c['per_second']:.0f} ({c['p50_ms']:.0f} / {c['p99_ms']:.0f}) | "
                        f"{d['mb_per_second']:.1f} ({d['p50_ms']:.0f} / {d['p99_ms']:.0f}) | "
                        f"{u['errors'] + c['errors'] + d['errors']} |")
    open_rows = [f"| {b} | {name.replace('_', ' ')} at {r['offered_per_second']:.0f}/s | {r['per_second']:.0f} | "
                 f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} |"
                 for b, res in out.items() for name, r in res["open_loop"].items() if name != "devices"]
    kills = "; ".join(f"{b}: {r['kill9']['acknowledged']} uploads acknowledged, {r['kill9']['lost']} missing"
                      for b, r in out.items())
    any_res = next(iter(out.values()))
    md = f"""## Fleet: simulated devices against `cloud serve` (`bench/fleet.py`)

One server ({args.workers} API process{'es' if args.workers > 1 else ''}; SQLite in WAL mode with
`synchronous=FULL`, or PostgreSQL 15 with fsync on; blobs fsync'd before each 201) and one
client process of asyncio devices, all on this 2-core machine; {args.seconds:.0f} s per phase.
Bundles of {any_res['bundle_bytes']:,} bytes (real uplink bundles), a delta of
{any_res['delta_bytes']:,} bytes. Cells: requests/s (p50 / p99 ms).

| database | devices | durable uploads/s | update checks/s | delta downloads MB/s | errors |
|---|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

Closed loop above: every device sends its next request as soon as the last is answered,
so latency at 1,000 devices is bound below by 1,000 / throughput (Little's law). Open loop
below: {any_res['open_loop']['devices']} devices together offer the goal rate (each on its own
schedule), latency counted from each request's scheduled time.

| database | offered | achieved/s | p50 ms | p99 ms | errors |
|---|---|---:|---:|---:|---:|
{chr(10).join(open_rows)}

kill -9 of the server 3 s into an upload run of {any_res['kill9']['devices']} devices: {kills}.
"""
    update_section("fleet", md)
    print(f"wrote {path}", file=sys.stderr)
    print(md)


def _bench(backend: str, db: str | None, levels: list[int], args: argparse.Namespace) -> dict:
    work = cache_dir() / "bench" / "fleet"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    from bench.patch import make_change, synthetic_gguf
    from cdcca_edge.cli import main as cli
    from cdcca_edge.core.artifact import compute_identity, open_artifact
    from cdcca_edge.core.delta_format import generate_keypair

    model = synthetic_gguf(work / "model.gguf", 32 << 20)
    make_change(model, work / "new.gguf", "rows", fraction=0.01)
    data = work / "data"
    generate_keypair(work / "key.pem", work / "key.pem.pub")
    generate_keypair(work / "root.pem", work / "root.pem.pub")
    dbo = ["--db", db] if db else []
    assert cli(["cloud", "create-cohort", "fleet", "--artifact", str(model), "--data", str(data), "--sign-key",
                str(work / "key.pem"), "--root-key", str(work / "root.pem"), *dbo]) == 0
    assert cli(["cloud", "publish", "fleet", "--artifact", str(work / "new.gguf"), "--data", str(data), *dbo]) == 0
    identity = compute_identity(open_artifact(model)).digest
    n_dev = max(levels)
    from cdcca_edge.cloud.service.ops import enroll_token

    token = enroll_token(data, "fleet", uses=n_dev, db_url=db)
    import itertools

    bundles = _bundles(12000, identity, work)  # every upload of the runs below is a new one
    taken = itertools.count()
    server = Server(data, db, args.workers)
    server.start()
    import httpx

    tokens = [httpx.post(f"{server.url}/v1/enroll", json={"token": token}).json()["device_token"]
              for _ in range(n_dev)]
    delta = httpx.get(f"{server.url}/v1/updates", params={"identity": identity},
                      headers={"Authorization": f"Bearer {tokens[0]}"}).json()["update"]
    results: dict[str, dict] = {}
    for level in levels:
        toks = tokens[:level]

        async def up(conn, i, n):  # the next bundle nobody uploaded yet
            body = bundles[next(taken) % len(bundles)]
            status, data = await conn.request("POST", "/v1/uploads", body)
            return status in (200, 201), len(body), json.loads(data)["sha256"] if status == 201 else None

        async def check(conn, i, n):
            status, data = await conn.request("GET", f"/v1/updates?identity={identity}")
            return status == 200 and json.loads(data)["latest_version"] == 1, 0, None

        async def down(conn, i, n):
            status, data = await conn.request("GET", delta["url"])
            return status == 200 and len(data) == delta["length"], len(data), None

        row = {}
        for name, fn in (("uploads", up), ("update_checks", check), ("delta_downloads", down)):
            if name not in args.phases.split(","):
                continue
            res = asyncio.run(_run(server.port, toks, args.seconds, fn))
            res.pop("acked")
            row[name] = res
            print(f"{backend}, {level} devices, {name}: {res['per_second']:.0f}/s, {res['mb_per_second']:.2f} MB/s, "
                  f"p50 {res['p50_ms']:.0f} ms, p99 {res['p99_ms']:.0f} ms, errors {res['errors']}",
                  file=sys.stderr)
        results[str(level)] = row
    # open loop at the goal rates, by the largest fleet: does p99 stay under 500 ms?
    n = max(levels)
    open_loop = {}
    for name, fn, rate in (("uploads", up, 200.0), ("update_checks", check, 2000.0)):
        res = asyncio.run(_run_open(server.port, tokens[:n], args.seconds, rate, fn))
        open_loop[name] = res
        print(f"{backend}, {n} devices, open loop {name} at {rate:.0f}/s offered: {res['per_second']:.0f}/s, "
              f"p50 {res['p50_ms']:.0f} ms, p99 {res['p99_ms']:.0f} ms, errors {res['errors']}", file=sys.stderr)
    # kill -9 in the middle of an upload run: what was acknowledged must be stored
    crash_level = min(100, n_dev)
    fresh = _bundles(3000, identity, work, first=100000)  # never uploaded before: every 201 is a new row
    fresh_taken = itertools.count()

    async def up_new(conn, i, n):
        body = fresh[next(fresh_taken) % len(fresh)]
        status, data = await conn.request("POST", "/v1/uploads", body)
        return status in (200, 201), len(body), json.loads(data)["sha256"] if status == 201 else None

    crash = asyncio.run(_run(server.port, tokens[:crash_level], 6.0, up_new,
                             stop_after=(3.0, lambda: server.kill(signal.SIGKILL))))
    server.start()
    from cdcca_edge.cloud.service.store import Upload, database_url, open_db

    with open_db(database_url(data, db))() as s:
        stored = {u.sha256 for u in s.query(Upload)}
    lost = [a for a in crash["acked"] if a not in stored]
    server.kill()
    print(f"{backend}: kill -9: {len(crash['acked'])} acknowledged, {len(lost)} lost", file=sys.stderr)
    return {"database": "sqlite (WAL, synchronous=FULL)" if db is None else "postgresql 15 (fsync on)",
            "bundle_bytes": len(bundles[0]), "delta_bytes": delta["length"], "levels": results,
            "open_loop": {"devices": max(levels), **open_loop},
            "kill9": {"devices": crash_level, "acknowledged": len(crash["acked"]), "lost": len(lost)}}


if __name__ == "__main__":
    main()
