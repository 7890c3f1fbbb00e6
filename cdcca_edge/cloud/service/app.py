"""The HTTP API (FastAPI) under `/v1`. Protocol: docs/formats/sync.md.

Every refusal is an HTTP error with a JSON body ``{"detail": {"error": CODE, "message":
...}}`` naming the problem and the fix, and leaves the database and the blob store as they
were. An upload is stored durably (blob fsync'd, row committed) before its 201.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Header, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from uvicorn.protocols.http.h11_impl import H11Protocol
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError as DBIntegrityError

from cdcca_edge import __version__
from cdcca_edge.cloud.service.blobs import BlobStore
from cdcca_edge.cloud.service.ops import sign_targets, unpacked_artifact
from cdcca_edge.cloud.service.store import (
    Cohort,
    Delta,
    Device,
    EnrollToken,
    Upload,
    Version,
    database_url,
    new_token,
    open_db,
    token_hash,
)
from cdcca_edge.cloud.service.tuf_repo import CohortRepository, Target
from cdcca_edge.core.errors import UsageError

API = "/v1"
MAX_UPLOAD_BYTES = 64 << 20  # default; `cloud serve --max-upload-mb`
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass(frozen=True)
class SignedView:
    """A cohort's signed TUF targets, indexed for update queries."""

    artifacts: dict[int, Target]  # version -> its artefact
    deltas: dict[tuple[int, int], Target]  # (from, to) -> the delta
    by_identity: dict[str, int]  # identity -> version

    @classmethod
    def of(cls, targets: Any) -> "SignedView":
        artifacts, deltas = {}, {}
        for t in targets:
            if t.custom.get("kind") == "artifact":
                artifacts[t.custom["to_version"]] = t
            elif t.custom.get("kind") == "delta":
                deltas[(t.custom["from_version"], t.custom["to_version"])] = t
        return cls(artifacts, deltas, {t.custom["to_identity"]: v for v, t in artifacts.items()})


def _fail(status: int, code: str, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail={"error": code, "message": message})


def _round_worker(data_dir: Path, db_url: str | None, sessions: Any, min_uploads: int | None,
                  every: float | None, poll: float, stop: threading.Event, metrics: "Metrics",
                  queue: bool = False) -> None:
    """The embedded default's background work: every ``poll`` seconds, re-sign TUF
    metadata that nears expiry (or lags the published rows), and run a round for every
    cohort that is due, that is
    with ``min_uploads`` new uploads, or with any new upload and ``every`` seconds since
    its latest version. A round that fails publishes nothing and is tried again at the
    next poll; rounds of one cohort never overlap (rounds.py's lock), so none publishes
    twice."""
    import sys
    import time

    from sqlalchemy import func

    from cdcca_edge.cloud.service.ops import refresh_metadata
    from cdcca_edge.cloud.service.rounds import NothingNew, run_round

    while not stop.wait(poll):
        try:
            refresh_metadata(data_dir, sessions)
        except Exception as exc:  # noqa: BLE001 - logged; tried again at the next poll
            print(f"cdcca-edge cloud: re-signing metadata failed ({type(exc).__name__}: {exc})",
                  file=sys.stderr, flush=True)
        if min_uploads is None and every is None:
            continue
        with sessions() as s:
            pending = s.execute(
                select(Cohort.name, func.count(Upload.id)).join(Upload, Upload.cohort_id == Cohort.id)
                .where(Upload.round_version.is_(None), Cohort.teacher_dir.is_not(None))
                .group_by(Cohort.name)).all()
            newest = dict(s.execute(select(Cohort.name, func.max(Version.created))
                                    .join(Version, Version.cohort_id == Cohort.id).group_by(Cohort.name)).all())
        now = time.time()
        due = [name for name, n in pending
               if (min_uploads is not None and n >= min_uploads)
               or (every is not None and n >= 1 and now - newest.get(name, now) >= every)]
        for name in due:
            if queue:  # a worker process runs it; the queueing lock keeps one job per cohort queued
                from cdcca_edge.cloud.service.jobs import defer_round

                defer_round(db_url, data_dir, name, min_new=min_uploads or 1)
                continue
            t0 = time.perf_counter()
            try:
                # re-checked under the round's lock: another process may have just taken them
                run_round(data_dir, name, db_url=db_url, min_new_uploads=min_uploads or 1)
                metrics.rounds.labels("published").inc()
            except NothingNew:  # another API process of this service ran it first
                continue
            except Exception as exc:  # noqa: BLE001 - logged, counted, retried at the next poll
                metrics.rounds.labels("failed").inc()
                print(f"cdcca-edge cloud: round of {name} failed ({type(exc).__name__}: {exc}); "
                      "retrying at the next poll", file=sys.stderr, flush=True)
            metrics.round_seconds.observe(time.perf_counter() - t0)


class Metrics:
    """Prometheus metrics: counters of this process's requests, and gauges read from the
    database at each scrape (so every API process reports the fleet as it is)."""

    def __init__(self, sessions: Any) -> None:
        from prometheus_client import CollectorRegistry, Counter

        self.registry = CollectorRegistry()
        self.uploads = Counter("cdcca_uploads", "Upload requests by outcome", ["result"], registry=self.registry)
        self.upload_bytes = Counter("cdcca_upload_bytes", "Bytes of uplink bundles stored", registry=self.registry)
        self.update_checks = Counter("cdcca_update_checks", "Update queries answered", registry=self.registry)
        self.download_bytes = Counter("cdcca_download_bytes", "Bytes of artefacts and deltas served",
                                      registry=self.registry)
        from prometheus_client import Histogram

        self.rounds = Counter("cdcca_rounds", "Rounds run by this process, by outcome", ["result"],
                              registry=self.registry)
        self.round_seconds = Histogram("cdcca_round_seconds", "Duration of rounds run by this process",
                                       buckets=(1, 5, 15, 60, 300, 900, 3600), registry=self.registry)
        self.registry.register(_FleetCollector(sessions))


class _FleetCollector:
    def __init__(self, sessions: Any) -> None:
        self.sessions = sessions

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily
        from sqlalchemy import func

        versions = GaugeMetricFamily("cdcca_published_version", "Latest published version per cohort",
                                     labels=["cohort"])
        devices = GaugeMetricFamily("cdcca_devices", "Enrolled devices per cohort and reported version "
                                    "(-1: none reported or not a published identity)", labels=["cohort", "version"])
        with self.sessions() as s:
            for name, number in s.execute(select(Cohort.name, func.max(Version.number))
                                          .join(Version, Version.cohort_id == Cohort.id).group_by(Cohort.name)):
                versions.add_metric([name], number)
            rows = s.execute(select(Cohort.name, Version.number, func.count(Device.id))
                             .join(Device, Device.cohort_id == Cohort.id)
                             .outerjoin(Version, (Version.cohort_id == Cohort.id) & (Version.identity == Device.identity))
                             .where(Device.revoked.is_(False)).group_by(Cohort.name, Version.number))
            for name, number, n in rows:
                devices.add_metric([name, str(-1 if number is None else number)], n)
        yield versions
        yield devices


class EnrollRequest(BaseModel):
    token: str


class StatusRequest(BaseModel):
    identity: str
    healthy: bool


def create_app(data_dir: str | Path, db_url: str | None = None, max_upload: int = MAX_UPLOAD_BYTES,
               min_uploads: int | None = None, poll_seconds: float = 5.0,
               uploads_per_hour: int | None = None, every: float | None = None, queue: bool = False) -> FastAPI:
    """The service's app. ``min_uploads``: run a cohort's round in this process as soon as
    that many uploads arrived since its last round (checked every ``poll_seconds``).
    ``every``: also run it when any upload is new and this many seconds passed since the
    cohort's latest version. ``uploads_per_hour``: a device's quota of stored uploads over
    the last hour (429 beyond it). ``queue``: hand due rounds to worker processes through the
    task queue (PostgreSQL) instead of running them in this process."""
    data_dir = Path(data_dir)
    sessions = open_db(database_url(data_dir, db_url))
    blobs = BlobStore(data_dir / "blobs")
    incoming = data_dir / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    metrics = Metrics(sessions)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> Any:
        stop = threading.Event()
        worker = threading.Thread(target=_round_worker, name="cdcca-background", daemon=True,
                                  args=(data_dir, db_url, sessions, min_uploads, every, poll_seconds, stop, metrics,
                                        queue))
        worker.start()
        yield
        stop.set()
        worker.join(timeout=poll_seconds + 1)

    app = FastAPI(title="cdcca-edge cloud", version=__version__, openapi_url=f"{API}/openapi.json",
                  docs_url=f"{API}/docs", redoc_url=None, lifespan=lifespan)

    def device_for(authorization: str | None) -> Device:
        if not authorization or not authorization.startswith("Bearer "):
            raise _fail(401, "no_token", "send the device token as 'Authorization: Bearer TOKEN' "
                        "(enroll first: POST /v1/enroll)")
        with sessions() as s:
            dev = s.scalar(select(Device).where(Device.token_hash == token_hash(authorization[7:])))
        if dev is None or dev.revoked:
            raise _fail(401, "bad_token", "unknown or revoked device token; enroll the device again")
        return dev

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        with sessions() as s:
            s.execute(select(1))
        return {"ok": True, "version": __version__}

    @app.post(f"{API}/enroll", status_code=201)
    def enroll(req: EnrollRequest) -> dict[str, Any]:
        from sqlalchemy import update as sql_update

        device_token = new_token()
        used_up = _fail(401, "bad_enroll_token", "unknown or used-up enrollment token; ask the "
                        "operator for a new one (`cdcca-edge cloud enroll-token`)")
        with sessions.begin() as s:
            et = s.scalar(select(EnrollToken).where(EnrollToken.token_hash == token_hash(req.token)))
            if et is None:
                raise used_up
            cohort = s.get(Cohort, et.cohort_id)
            assert cohort is not None
            name = cohort.name
            try:  # the trust anchor first: a cohort without one enrolls nobody, uses up nothing
                root = json.loads(CohortRepository(data_dir, name).root_bytes())
            except (OSError, ValueError):
                raise _fail(503, "cohort_not_ready", f"cohort {name!r} has no update metadata yet; the "
                            "operator must finish `cdcca-edge cloud create-cohort`") from None
            # one statement decrements only while uses are left, so concurrent enrollments
            # cannot both take the last use (a read-then-write would)
            taken = s.execute(sql_update(EnrollToken).where(EnrollToken.id == et.id, EnrollToken.uses_left > 0)
                              .values(uses_left=EnrollToken.uses_left - 1)).rowcount
            if taken != 1:
                raise used_up
            dev = Device(id=uuid.uuid4().hex, cohort_id=et.cohort_id, token_hash=token_hash(device_token))
            s.add(dev)
        return {"device_id": dev.id, "device_token": device_token, "cohort": name, "tuf_root": root}

    @app.post(f"{API}/uploads", status_code=201)
    async def upload(request: Request, response: Response,
                     authorization: str | None = Header(default=None)) -> dict[str, Any]:
        dev = device_for(authorization)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_upload:
            raise _fail(413, "too_large", f"{declared} bytes is over the {max_upload:,}-byte limit; "
                        "send several smaller bundles")
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".cdcu", dir=incoming)
        tmp = Path(name)
        try:
            size, h = 0, hashlib.sha256()  # the blob's name: the file's own bytes, trailer included
            with os.fdopen(fd, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > max_upload:
                        raise _fail(413, "too_large", f"over the {max_upload:,}-byte limit; send "
                                    "several smaller bundles")
                    h.update(chunk)
                    f.write(chunk)
            # decoding every sample and the fsyncs block: off the event loop
            return await run_in_threadpool(_accept_upload, dev, tmp, size, h.hexdigest(), response)
        finally:
            tmp.unlink(missing_ok=True)

    def _accept_upload(dev: Device, tmp: Path, size: int, sha: str, response: Response) -> dict[str, Any]:
        from cdcca_edge.core.errors import CdccaError
        from cdcca_edge.core.uplink_format import read_uplink

        try:
            bundle = read_uplink(tmp)
            n = sum(1 for _ in bundle.samples())  # every sample decodes within the format's limits
        except (CdccaError, ValueError) as exc:
            raise _fail(422, "malformed_bundle", f"not a valid uplink bundle: {exc}") from None
        identity = bundle.header["artifact_identity"]
        with sessions() as s:
            known = s.scalar(select(Version).where(Version.cohort_id == dev.cohort_id,
                                                   Version.identity == identity))
            dup = s.scalar(select(Upload).where(Upload.device_id == dev.id, Upload.sha256 == sha))
        if known is None:
            raise _fail(409, "unknown_artifact", f"the bundle was collected on artefact {identity[:16]}, "
                        "which this cohort never published; update the device first")
        body = {"sha256": sha, "bundle_digest": bundle.digest, "bytes": size, "samples": n}
        if dup is not None:
            response.status_code = 200  # the same bundle again: already stored
            metrics.uploads.labels("already").inc()
            return {**body, "stored": "already"}
        if uploads_per_hour is not None:  # after the duplicate check: a retry is never refused
            import time

            from sqlalchemy import func

            with sessions() as s:
                recent = s.scalar(select(func.count(Upload.id)).where(
                    Upload.device_id == dev.id, Upload.created > time.time() - 3600)) or 0
            if recent >= uploads_per_hour:
                raise HTTPException(status_code=429, headers={"Retry-After": "3600"}, detail={
                    "error": "over_quota", "message": f"this device stored {recent} uploads in the last "
                    f"hour, its quota is {uploads_per_hour}; keep the bundle and send it later"})
        blobs.put_file(tmp, sha)
        try:
            with sessions.begin() as s:
                s.add(Upload(device_id=dev.id, cohort_id=dev.cohort_id, sha256=sha, size=size,
                             artifact_identity=identity, n_samples=n))
        except DBIntegrityError:  # a concurrent retry of the same bundle won the race
            response.status_code = 200
            metrics.uploads.labels("already").inc()
            return {**body, "stored": "already"}
        metrics.uploads.labels("stored").inc()
        metrics.upload_bytes.inc(size)
        return {**body, "stored": "now"}

    @app.get(f"{API}/updates")
    def updates(identity: str, authorization: str | None = Header(default=None)) -> dict[str, Any]:
        """The answer comes from the cohort's signed TUF targets (cached until its
        timestamp changes), so a device is offered exactly what it can verify, and a check
        costs one database query (the token)."""
        dev = device_for(authorization)
        metrics.update_checks.inc()
        name = cohort_name(dev.cohort_id)
        view = signed_view(name)
        latest = max(view.artifacts)
        held = view.by_identity.get(identity)
        delta = view.deltas.get((held, latest)) if held is not None else None
        if delta is None and held is not None and held < latest:
            if _delta_on_demand(dev.cohort_id, held, latest) is not None:
                view = signed_view(name)
                delta = view.deltas.get((held, latest))
        top = view.artifacts[latest]
        doc: dict[str, Any] = {"latest_version": latest, "latest_identity": top.custom["to_identity"],
                               "held_version": held, "update": None}
        if held == latest:
            return doc
        if delta is not None:  # patch in place from the version held
            doc["update"] = {"kind": "delta", "target": delta.path, "from_identity": delta.custom["from_identity"],
                             "to_identity": delta.custom["to_identity"], "from_version": held,
                             "to_version": latest, "sha256": delta.sha256, "length": delta.length,
                             "url": f"{API}/blobs/{delta.sha256}"}
        else:  # an unknown model, or no delta from its version: the whole latest artefact
            doc["update"] = {"kind": "artifact", "target": top.path, "to_identity": top.custom["to_identity"],
                             "to_version": latest, "sha256": top.sha256, "length": top.length,
                             "url": f"{API}/blobs/{top.sha256}"}
        doc["update"]["tuf"] = {"metadata_url": f"{API}/tuf/metadata/", "targets_url": f"{API}/tuf/targets/"}
        return doc

    names: dict[int, str] = {}

    def cohort_name(cohort_id: int) -> str:
        if cohort_id not in names:  # names never change
            with sessions() as s:
                c = s.get(Cohort, cohort_id)
                assert c is not None
                names[cohort_id] = c.name
        return names[cohort_id]

    views: dict[str, tuple[tuple[int, int], SignedView]] = {}

    def signed_view(cohort: str) -> SignedView:
        """The cohort's signed targets by version (re-read when timestamp.json changed)."""
        repo = CohortRepository(data_dir, cohort)
        st = (repo.dir / "timestamp.json").stat()
        stamp = (st.st_ino, st.st_mtime_ns)  # each write is a rename: a new inode
        got = views.get(cohort)
        if got is None or got[0] != stamp:
            got = (stamp, SignedView.of(repo.targets().values()))
            views[cohort] = got
        return got[1]

    build_lock = threading.Lock()
    failed_builds: set[tuple[int, int, int]] = set()  # (cohort, from, to) whose diff did not check out

    def _delta_on_demand(cohort_id: int, held_number: int, latest_number: int) -> Delta | None:
        """An exact delta from an older version to the latest (``delta diff`` of the two
        published artefacts, signed with the cohort's key), built once and kept. None when
        it cannot be built (the device then gets the whole artefact)."""
        from cdcca_edge.core.delta_build import diff_artifacts
        from cdcca_edge.core.delta_format import load_private_key

        if (cohort_id, held_number, latest_number) in failed_builds:
            return None
        with build_lock:  # one build at a time in this process; the row is unique across processes
            with sessions() as s:
                held = s.scalar(select(Version).where(Version.cohort_id == cohort_id, Version.number == held_number))
                latest = s.scalar(select(Version).where(Version.cohort_id == cohort_id,
                                                        Version.number == latest_number))
                if held is None or latest is None:
                    return None
                got = s.scalar(select(Delta).where(Delta.cohort_id == cohort_id, Delta.from_version == held.number,
                                                   Delta.to_version == latest.number))
                cohort = s.get(Cohort, cohort_id)
            if cohort is None:
                return None
            if got is not None:  # built, maybe not signed yet (a crash between): sign it
                sign_targets(data_dir, sessions, cohort.name)
                return got
            out = incoming / f"delta-{cohort_id}-{held.number}-{latest.number}.cdcd"
            try:
                key = load_private_key(cohort.sign_key) if cohort.sign_key else None
                with tempfile.TemporaryDirectory(dir=incoming) as scratch:  # directory formats: unpacked
                    a, b = Path(scratch) / "held", Path(scratch) / "latest"
                    a.mkdir(), b.mkdir()
                    summary = diff_artifacts(
                        unpacked_artifact(blobs.path(held.artifact_sha256), cohort.artifact_format, a),
                        unpacked_artifact(blobs.path(latest.artifact_sha256), cohort.artifact_format, b),
                        out, sign_key=key, from_version=held.number, to_version=latest.number)
                if summary.target_identity != latest.identity or summary.base_identity != held.identity:
                    failed_builds.add((cohort_id, held_number, latest_number))
                    return None
                sha, size = blobs.put_file(out)
                with sessions.begin() as s:
                    row = Delta(cohort_id=cohort_id, from_version=held.number, to_version=latest.number,
                                sha256=sha, size=size)
                    s.add(row)
                sign_targets(data_dir, sessions, cohort.name)
                return row
            except DBIntegrityError:  # another process built it first
                with sessions() as s:
                    got = s.scalar(select(Delta).where(Delta.cohort_id == cohort_id,
                                                       Delta.from_version == held.number,
                                                       Delta.to_version == latest.number))
                if got is not None:
                    sign_targets(data_dir, sessions, cohort.name)
                return got
            finally:
                out.unlink(missing_ok=True)

    @app.get(f"{API}/blobs/{{sha256}}")
    def blob(sha256: str, range: str | None = Header(default=None),  # noqa: A002
             authorization: str | None = Header(default=None)) -> Response:
        return serve_blob(device_for(authorization), sha256, range)

    @app.get(f"{API}/tuf/metadata/{{name}}")
    def tuf_metadata(name: str, authorization: str | None = Header(default=None)) -> Response:
        dev = device_for(authorization)
        repo = CohortRepository(data_dir, cohort_name(dev.cohort_id))
        try:
            path = repo.metadata_file(name)
            data = path.read_bytes()
        except (UsageError, FileNotFoundError):
            # a 404 (not 401/403) ends a TUF client's walk up the root chain
            raise _fail(404, "no_such_metadata", f"no metadata {name[:80]!r} for this device's cohort; "
                        "TUF clients ask for N.root.json, timestamp.json, N.snapshot.json, N.targets.json") from None
        return Response(data, media_type="application/json", headers={"Cache-Control": "no-store"})

    @app.get(f"{API}/tuf/targets/{{path:path}}")
    def tuf_target(path: str, range: str | None = Header(default=None),  # noqa: A002
                   authorization: str | None = Header(default=None)) -> Response:
        dev = device_for(authorization)
        sha = path.rsplit("/", 1)[-1].split(".", 1)[0]  # consistent snapshots: DIR/SHA256.NAME
        return serve_blob(dev, sha, range)

    def serve_blob(dev: Device, sha256: str, range: str | None) -> Response:  # noqa: A002
        with sessions() as s:
            ok = s.scalar(select(Version.id).where(Version.cohort_id == dev.cohort_id,
                                                   Version.artifact_sha256 == sha256)) or s.scalar(
                select(Delta.id).where(Delta.cohort_id == dev.cohort_id, Delta.sha256 == sha256))
            other = ok is None and (s.scalar(select(Version.id).where(Version.artifact_sha256 == sha256))
                                    or s.scalar(select(Delta.id).where(Delta.sha256 == sha256)))
        if other:
            raise _fail(403, "wrong_cohort", "that update file belongs to another cohort; ask "
                        f"{API}/updates what this device should fetch")
        if ok is None or not blobs.has(sha256):
            raise _fail(404, "no_such_blob", "no such update file for this device's cohort; ask "
                        f"{API}/updates what to fetch")
        size = blobs.path(sha256).stat().st_size
        start, end, status = 0, size, 200
        if range is not None:
            m = _RANGE.match(range.strip())
            if m is None or (not m.group(1) and not m.group(2)):
                raise HTTPException(status_code=416, headers={"Content-Range": f"bytes */{size}"}, detail={
                    "error": "bad_range", "message": f"unsupported Range {range[:80]!r}; use bytes=START-[END]"})
            if m.group(1):
                start = int(m.group(1))
                end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            else:
                start, end = max(0, size - int(m.group(2))), size
            if start >= size or start >= end:
                raise HTTPException(status_code=416, headers={"Content-Range": f"bytes */{size}"}, detail={
                    "error": "bad_range", "message": f"range {range[:80]!r} is outside the {size}-byte file"})
            status = 206
        metrics.download_bytes.inc(end - start)
        headers = {"Accept-Ranges": "bytes", "Content-Length": str(end - start)}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        return StreamingResponse(blobs.read_range(sha256, start, end), status_code=status, headers=headers,
                                 media_type="application/octet-stream")

    @app.post(f"{API}/status", status_code=204)
    def status(req: StatusRequest, authorization: str | None = Header(default=None)) -> Response:
        import time

        dev = device_for(authorization)
        with sessions.begin() as s:
            row = s.get(Device, dev.id)
            assert row is not None
            row.identity, row.healthy, row.status_time = req.identity[:64], req.healthy, time.time()
        return Response(status_code=204)

    @app.get("/metrics")
    def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(HTTPException)
    async def _errors(request: Request, exc: HTTPException) -> JSONResponse:
        if request.url.path == f"{API}/uploads":
            metrics.uploads.labels("refused").inc()
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    return app


CONFIG_ENV = "CDCCA_SERVE_CONFIG"


class NoDelayH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with TCP_NODELAY on every connection. With `--workers N`
    uvicorn binds the socket itself without naming the protocol, and asyncio then leaves
    Nagle's algorithm on: each answer waited ~40 ms for the client's delayed ACK (measured:
    23 requests/s on one connection instead of ~600)."""

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        import socket

        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)


def app_from_env() -> FastAPI:
    """The app of one of `serve --workers N`'s processes: :func:`create_app` with the
    keyword arguments `serve` put in ``$CDCCA_SERVE_CONFIG`` (JSON)."""
    return create_app(**json.loads(os.environ[CONFIG_ENV]))
