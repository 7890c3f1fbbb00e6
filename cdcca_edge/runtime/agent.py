"""The device agent's local API (`cdcca-edge device serve`): an OpenAI-compatible server
over the device runtime (llama.cpp or onnxruntime), so apps written for llama-server,
Ollama or the OpenAI SDK work unchanged. Every answer is scored; the scores come back in
an extension field (``cdcca``) that clients may ignore. Protocol: docs/device.md.

One engine thread owns the model and runs one request at a time from a bounded queue (429
when it is full), so work that must not overlap a generation (a patch and reload) is just
another job in that queue: requests that arrive meanwhile wait, none fails.

Device path: FastAPI, uvicorn and the runtime; no torch.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from cdcca_edge.core.errors import CdccaError, UsageError

DEFAULT_QUEUE = 16
MAX_TOKENS_LIMIT = 4096
HEALTH_ENTROPY_SHARE = 0.85  # of ln(vocab): above it on the probes, an updated model is noise
HEALTH_ENTROPY_RISE = 0.10  # of ln(vocab): a model already above the share may rise this much
_DONE = object()


@dataclass
class Job:
    """A unit of work for the engine thread; its events arrive on ``out``."""

    run: Callable[[Any, "Job"], Any]  # (backend, job) -> result
    out: "queue.Queue[Any]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    visual: tuple[Any, list[int]] | None = None  # an image request's (vision tokens (N, Dv), prompt ids)

    def result(self, timeout: float | None = None) -> Any:
        """Block until the job ends; its result, or its exception raised here."""
        while True:
            item = self.out.get(timeout=timeout)
            if isinstance(item, _Final):
                if item.error is not None:
                    raise item.error
                return item.value


@dataclass
class _Final:
    value: Any = None
    error: BaseException | None = None


class Engine:
    """The model and the thread that runs jobs on it, one at a time."""

    def __init__(self, model: str | Path, backend: str = "auto", queue_max: int = DEFAULT_QUEUE,
                 **load_kwargs: Any) -> None:
        from cdcca_edge.runtime import load

        self.path = Path(model)
        self.backend_name = backend
        self.model = load(model, backend, **load_kwargs)  # type: ignore[arg-type]
        self._serving = self._read_identity()
        self.jobs: "queue.Queue[Job | None]" = queue.Queue(maxsize=queue_max)
        self.busy = False
        self.stats = {"requests": 0, "refused_busy": 0, "tokens": 0, "errors": 0}
        self.thread = threading.Thread(target=self._loop, name="cdcca-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Job:
        """Queue ``job``.

        Raises:
            queue.Full: the queue is full (the caller answers 429).
        """
        self.jobs.put_nowait(job)
        return job

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            self.busy = True
            try:
                job.out.put(_Final(value=job.run(self.model, job)))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
                self.stats["errors"] += 1
                job.out.put(_Final(error=exc))
            finally:
                self.busy = False

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)
        self.model.close()

    def identity(self) -> tuple[str, int | None]:
        """(identity, version) of the model being served. Kept, not read from the disk on
        each call: while an update job runs, the file is already the new version before
        the job has reloaded, checked and counted it, and a client must not see the new
        version before then (:meth:`refresh_identity` is called at the job's end)."""
        return self._serving

    def refresh_identity(self) -> None:
        """Re-read the served model's identity and version (after an update or an adopted
        version); a tuple assignment, so readers on other threads see old or new, whole."""
        self._serving = self._read_identity()

    def _read_identity(self) -> tuple[str, int | None]:
        from cdcca_edge.runtime.uts import artifact_identity

        return artifact_identity(self.model.artifact_path)


def _text_of(content: Any) -> str:
    if isinstance(content, list):  # content parts: their text ones, in order
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "" if content is None else str(content)


def chat_prompt(messages: list[dict[str, Any]]) -> str:
    """A plain transcript prompt for chat requests ("role: text" lines, then
    "assistant:"). The tiny and exported models carry no chat template; a model that does
    is served the same transcript (documented in docs/device.md)."""
    lines = [f"{m.get('role', 'user')}: {_text_of(m.get('content'))}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


def image_parts(messages: list[dict[str, Any]]) -> list[str]:
    """The ``image_url`` URLs of a chat request's content parts, in order."""
    urls = []
    for m in messages:
        content = m.get("content")
        for p in content if isinstance(content, list) else ():
            if isinstance(p, dict) and p.get("type") == "image_url":
                iu = p.get("image_url")
                urls.append(iu.get("url") if isinstance(iu, dict) else iu)
    return urls


MAX_IMAGE_BYTES = 16 << 20
MAX_IMAGE_PIXELS = 4096 * 4096


def decode_data_url(url: Any) -> Any:
    """An ``image_url`` data URL (``data:image/png;base64,...``, PNG/JPEG/WebP, any
    format Pillow reads) as an (H, W, 3) uint8 array.

    Raises:
        UsageError: not a base64 data URL of an image (remote URLs are never fetched: the
            agent serves apps on the device, and a model must not reach out for them).
    """
    import base64
    import binascii
    import io

    import numpy as np

    from cdcca_edge.core.errors import require

    if not isinstance(url, str) or not url.startswith("data:"):
        raise UsageError("image_url must be a data URL (data:image/png;base64,...); the agent never "
                         "fetches remote images: read the file in the app and send its bytes")
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise UsageError("image_url: only base64 data URLs are read (data:image/png;base64,...)")
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise UsageError(f"image_url: the image is larger than {MAX_IMAGE_BYTES >> 20} MiB; send a smaller one")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError("image_url: the data URL is not valid base64") from None
    pil = require("PIL.Image", "device")
    try:
        with pil.open(io.BytesIO(raw)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:  # checked before decoding: no pixel bomb
                raise UsageError(f"image_url: {im.width}x{im.height} pixels, more than "
                                 f"{MAX_IMAGE_PIXELS:,}; send a smaller image")
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds on hostile bytes
        raise UsageError(f"image_url: not an image Pillow can read ({type(exc).__name__}); send PNG or JPEG") from None


def _token_dict(score: Any) -> dict[str, Any]:
    d = score.as_dict()
    return {k: d[k] for k in ("token", "entropy", "top1_prob", "logprob") if k in d}


@dataclass
class SyncConfig:
    """The agent's link to the cloud service (all optional: without it, a local server)."""

    state: Path | None = None  # a `cdcca-edge sync enroll` state directory
    calib: Path | None = None  # the UTS calibration: answers above its threshold are spooled
    spool: Path | None = None  # the spool directory
    spool_max_bytes: int = 64 << 20
    every: float = 300.0  # seconds between syncs
    low_weight: float = 0.1
    probes: tuple[str, ...] = ("the",)  # health check prompts after an update


def create_agent_app(model: str | Path, backend: str = "auto", queue_max: int = DEFAULT_QUEUE,
                     model_name: str | None = None, sync: SyncConfig | None = None, **load_kwargs: Any) -> Any:
    """The agent's FastAPI app over ``model``; with ``sync``, it spools uncertain answers
    and syncs with the cloud service in a background thread."""
    import contextlib

    from cdcca_edge import __version__
    from cdcca_edge.runtime.base import GenerationConfig

    state: dict[str, Any] = {}
    name = model_name or Path(model).name
    sync = sync or SyncConfig()
    calib = None
    if sync.calib is not None:
        from cdcca_edge.core.calibration import Calibration

        calib = Calibration.load(sync.calib)
    spool = None
    if calib is not None:
        from cdcca_edge.runtime.spool import Spool

        spool = Spool(sync.spool or Path(model).with_name(Path(model).name + ".spool"), sync.spool_max_bytes)
    counters = {"spooled": 0, "uploaded_bundles": 0, "updates": 0, "update_failures": 0, "sync_errors": 0}

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> Any:
        state["engine"] = Engine(model, backend, queue_max, **load_kwargs)
        stop = threading.Event()
        syncer = None
        if sync.state is not None:
            syncer = threading.Thread(target=_sync_loop, args=(state["engine"], sync, spool, counters, stop),
                                      name="cdcca-sync", daemon=True)
            syncer.start()
        yield
        stop.set()
        if syncer is not None:
            syncer.join(timeout=60)
        state["engine"].close()

    app = FastAPI(title="cdcca-edge device agent", version=__version__, lifespan=lifespan,
                  openapi_url="/v1/openapi.json", docs_url=None, redoc_url=None)

    def fail(status: int, code: str, message: str) -> HTTPException:
        # OpenAI's error shape, so SDK clients raise their usual exceptions
        return HTTPException(status, detail={"error": {"message": message, "type": code, "code": code}})

    @app.exception_handler(HTTPException)
    async def _errors(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(exc.detail if isinstance(exc.detail, dict) else {"error": {"message": str(exc.detail)}},
                            status_code=exc.status_code, headers=exc.headers)

    def config(body: dict[str, Any]) -> GenerationConfig:
        try:
            raw_n = body.get("max_tokens", body.get("max_completion_tokens"))
            n = 64 if raw_n is None else int(raw_n)
            temperature = float(body.get("temperature", 0.0) or 0.0)
            top_p = float(body.get("top_p", 1.0) if body.get("top_p") is not None else 1.0)
            seed = int(body["seed"]) if body.get("seed") is not None else None
        except (TypeError, ValueError):
            raise fail(400, "invalid_request_error", "max_tokens, temperature, top_p and seed must be numbers") from None
        if not 1 <= n <= MAX_TOKENS_LIMIT:
            raise fail(400, "invalid_request_error", f"max_tokens must be 1-{MAX_TOKENS_LIMIT}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise fail(400, "invalid_request_error", "temperature must be >= 0 and top_p in (0, 1]")
        try:
            from cdcca_edge.runtime.uts import NEEDS_PROMPT_SCORES

            return GenerationConfig(max_tokens=n, temperature=temperature, top_p=top_p, seed=seed,
                                    score_prompt=calib is not None and calib.score in NEEDS_PROMPT_SCORES)
        except (TypeError, ValueError, UsageError) as exc:
            raise fail(400, "invalid_request_error", str(exc)) from None

    async def read_body(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise fail(400, "invalid_request_error", "the body is not JSON") from None
        if not isinstance(body, dict):
            raise fail(400, "invalid_request_error", "the body must be a JSON object")
        return body

    def generation_job(prompt: str, cfg: GenerationConfig, stream: bool, image: Any = None) -> Job:
        def run(m: Any, job: Job) -> Any:
            if image is not None:  # a multimodal bundle (checked before submitting): vision, then language
                feats, embeds = m.encode_image(image)
                full = m.prompt(prompt)
                gen = m.generate(full, cfg, image_embeds=embeds)  # not token by token: sent whole
                job.visual = (feats, m.language.tokenize(full))
                if stream:
                    from cdcca_edge.runtime.base import StreamEvent

                    job.out.put(StreamEvent(text=gen.text, token=-1, score=None))  # type: ignore[arg-type]
                return gen
            gen = m.stream(prompt, cfg)
            while True:
                try:
                    event = next(gen)
                except StopIteration as stop:
                    return stop.value
                if stream:
                    job.out.put(event)
                if job.cancelled.is_set():  # the client went away: stop decoding for it
                    gen.close()
                    return None
        return Job(run)

    def submit(job: Job) -> Job:
        engine = state["engine"]
        engine.stats["requests"] += 1
        try:
            return engine.submit(job)
        except queue.Full:
            engine.stats["refused_busy"] += 1
            raise fail(429, "server_busy", f"{engine.jobs.maxsize} requests are waiting already; retry "
                       "shortly (or start the agent with a larger --queue-max)") from None

    def keep_if_unsure(prompt: str, gen: Any, job: Job) -> None:
        """UTS on the device: an answer above the calibration's threshold goes to the
        spool; with an image, scored with its vision tokens and spooled with the most
        unfamiliar of them (not the image, docs/formats/uplink.md)."""
        if calib is None or spool is None or not gen.tokens:
            return
        from cdcca_edge.runtime.uts import add_visual, item_uncertainty, text_sample

        feats = job.visual[0] if job.visual is not None and calib.visual is not None else None
        u = item_uncertainty(gen, feats, calib.score, calib.visual)
        if u <= calib.threshold:
            return
        identity, version = state["engine"].identity()
        sample = text_sample(gen, uuid.uuid4().hex[:16], prompt, len(prompt.encode()), u, calib, sync.low_weight)
        if feats is not None:
            add_visual(sample, feats, job.visual[1], calib)  # type: ignore[index]
        spool.add({"artifact_identity": identity, "artifact_version": version, "low_weight": sync.low_weight,
                   "calibration": {"score": calib.score, "threshold": calib.threshold}}, sample)
        counters["spooled"] += 1

    def extension(gen: Any) -> dict[str, Any]:
        return {"sample": gen.sample.as_dict(), "tokens": [_token_dict(s) for s in gen.scores],
                "model_identity": state["engine"].identity()[0]}

    def finish_reason(gen: Any, cfg: GenerationConfig) -> str:
        return "length" if gen.finish_reason == "length" or len(gen.tokens) >= cfg.max_tokens else "stop"

    async def complete(request: Request, chat: bool) -> Any:
        body = await read_body(request)
        image = None
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
                raise fail(400, "invalid_request_error", "messages must be a non-empty list of objects")
            images = image_parts(msgs)
            if len(images) > 1:
                raise fail(400, "invalid_request_error", "one image per request: the model's prompt has "
                           "one image slot; send the images in separate requests")
            if images:  # the question in the bundle's own prompt template (docs/device.md)
                try:
                    image = await run_in_threadpool(decode_data_url, images[0])
                except UsageError as exc:
                    raise fail(400, "invalid_request_error", str(exc)) from None
                prompt = " ".join(_text_of(m.get("content")) for m in msgs if m.get("role", "user") == "user")
                if not prompt.strip():
                    raise fail(400, "invalid_request_error", "an image needs a question in a text part")
            else:
                prompt = chat_prompt(msgs)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise fail(400, "invalid_request_error", "prompt must be a non-empty string")
        cfg = config(body)
        if image is not None and not hasattr(state["engine"].model, "encode_image"):
            raise fail(400, "invalid_request_error", "this model takes no images; serve a multimodal bundle "
                       "(exported from a LLaVA model) for image_url parts")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        job = submit(generation_job(prompt, cfg, bool(body.get("stream")), image))
        if not body.get("stream"):
            try:
                gen = await run_in_threadpool(job.result)
            except CdccaError as exc:
                raise fail(400, "invalid_request_error", str(exc)) from None
            state["engine"].stats["tokens"] += len(gen.tokens)
            await run_in_threadpool(keep_if_unsure, prompt, gen, job)
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason(gen, cfg), "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": gen.text}
            else:
                choice["text"] = gen.text
            n_prompt = len(gen.prompt_tokens) if getattr(gen, "prompt_tokens", None) is not None else None
            return {"id": rid, "object": kind, "created": created, "model": name, "choices": [choice],
                    "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(gen.tokens),
                              "total_tokens": (n_prompt or 0) + len(gen.tokens)},
                    "cdcca": extension(gen)}

        def chunk(delta: str | None, final: Any = None) -> str:
            choice: dict[str, Any] = {"index": 0, "finish_reason": None if final is None else finish_reason(final, cfg)}
            if chat:
                choice["delta"] = {} if delta is None else {"content": delta}
            else:
                choice["text"] = delta or ""
            doc: dict[str, Any] = {"id": rid, "object": kind + ".chunk" if chat else kind, "created": created,
                                   "model": name, "choices": [choice]}
            if final is not None:
                doc["cdcca"] = extension(final)
            return f"data: {json.dumps(doc)}\n\n"

        async def events() -> Any:
            try:
                if chat:
                    yield f"data: {json.dumps({'id': rid, 'object': 'chat.completion.chunk', 'created': created, 'model': name, 'choices': [{'index': 0, 'delta': {'role': 'assistant'}, 'finish_reason': None}]})}\n\n"
                while True:
                    item = await run_in_threadpool(job.out.get)
                    if isinstance(item, _Final):
                        if item.error is not None:
                            err = {"error": {"message": str(item.error), "type": "generation_error"}}
                            yield f"data: {json.dumps(err)}\n\n"
                        elif item.value is not None:
                            state["engine"].stats["tokens"] += len(item.value.tokens)
                            await run_in_threadpool(keep_if_unsure, prompt, item.value, job)
                            yield chunk(None, item.value)
                        yield "data: [DONE]\n\n"
                        return
                    yield chunk(item.text, None)
            finally:
                job.cancelled.set()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await complete(request, chat=True)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        identity, version = state["engine"].identity()
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "cdcca-edge",
                                            "cdcca": {"identity": identity, "version": version,
                                                      "backend": state["engine"].model.name}}]}

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True, "version": __version__, "queue": state["engine"].jobs.qsize()}

    @app.get("/metrics")
    def metrics() -> Any:
        from fastapi.responses import PlainTextResponse

        e = state["engine"]
        _, version = e.identity()
        lines = [
            "# TYPE cdcca_agent_requests_total counter", f"cdcca_agent_requests_total {e.stats['requests']}",
            "# TYPE cdcca_agent_refused_busy_total counter",
            f"cdcca_agent_refused_busy_total {e.stats['refused_busy']}",
            "# TYPE cdcca_agent_errors_total counter", f"cdcca_agent_errors_total {e.stats['errors']}",
            "# TYPE cdcca_agent_tokens_total counter", f"cdcca_agent_tokens_total {e.stats['tokens']}",
            "# TYPE cdcca_agent_queue_depth gauge", f"cdcca_agent_queue_depth {e.jobs.qsize() + int(e.busy)}",
            "# TYPE cdcca_agent_model_version gauge", f"cdcca_agent_model_version {-1 if version is None else version}",
        ]
        for key, value in counters.items():
            lines += [f"# TYPE cdcca_agent_{key}_total counter", f"cdcca_agent_{key}_total {value}"]
        if spool is not None:
            waiting, nbytes = spool.size()
            lines += ["# TYPE cdcca_agent_spool_bytes gauge", f"cdcca_agent_spool_bytes {nbytes}",
                      "# TYPE cdcca_agent_spool_entries gauge", f"cdcca_agent_spool_entries {waiting}",
                      "# TYPE cdcca_agent_spool_dropped_total counter", f"cdcca_agent_spool_dropped_total {spool.dropped}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return app


def _sync_loop(engine: Engine, sync: SyncConfig, spool: Any, counters: dict[str, int], stop: threading.Event) -> None:
    """Every ``sync.every`` seconds: upload the spool, then take the cloud's update. A
    failure waits longer each time (exponential, with jitter, up to 10 minutes); serving
    never stops for it."""
    import random

    from cdcca_edge.runtime.sync_client import SyncClient

    client = SyncClient(sync.state)  # type: ignore[arg-type]
    delay, failures = min(2.0, sync.every), 0
    refused: set[str] = set()  # identities whose health check failed here: not tried again
    while not stop.wait(delay):
        try:
            _sync_once(engine, client, sync, spool, counters, refused)
            failures, delay = 0, sync.every
        except Exception as exc:  # noqa: BLE001 - logged, counted, retried later
            failures += 1
            counters["sync_errors"] += 1
            delay = min(600.0, sync.every * 2 ** min(failures, 8)) * random.uniform(0.5, 1.0)
            print(f"cdcca-edge device: sync failed ({type(exc).__name__}: {exc}); next try in {delay:.0f} s",
                  file=sys.stderr, flush=True)


def _sync_once(engine: Engine, client: Any, sync: SyncConfig, spool: Any, counters: dict[str, int],
               refused: set[str]) -> None:
    from cdcca_edge.runtime.sync_client import SyncError

    if spool is not None:
        for bundle in spool.seal():
            try:
                doc = client.upload(bundle)
            except SyncError as exc:
                if exc.status in (409, 422):  # never storable (e.g. collected on an unpublished model)
                    spool.discard(bundle)
                    continue
                raise
            if os.environ.get("CDCCA_TEST_KILL_AFTER_UPLOAD"):  # test hook: stored, not yet acknowledged
                os.kill(os.getpid(), signal.SIGKILL)
            if spool.acknowledged(bundle, doc["sha256"]):
                counters["uploaded_bundles"] += 1
    identity, _ = engine.identity()
    try:
        client.check(identity)  # a hint that makes the service build a delta from an old version
    except SyncError as exc:
        if exc.status == 0:
            raise
    up = client.plan(identity)
    if up is None and engine.identity()[1] is None:  # a copy without its state: learn its version
        from cdcca_edge.runtime.sync_client import adopt_version, version_of

        known = version_of(client, identity)
        if known is not None:
            adopt_version(engine.path, identity, known)
            engine.refresh_identity()
    if up is None or up["to_identity"] in refused:
        return
    path = client.fetch(up)  # outside the engine: serving goes on while it downloads
    if client.resumed_at:
        print(f"cdcca-edge device: the download of version {up['to_version']} resumed at byte "
              f"{client.resumed_at}", file=sys.stderr, flush=True)
    def apply(m: Any, _job: Job) -> tuple[str, bool]:
        try:
            now, healthy = _apply(m, client, up, path, sync)
            # counted inside the engine's job, before a client can see the new version (the
            # engine's identity is refreshed below); done whether or not the report arrives
            counters["updates" if healthy else "update_failures"] += 1
            return now, healthy
        finally:
            engine.refresh_identity()  # whatever the file is now, after an error too

    now, healthy = engine.submit(Job(apply)).result()
    client.report(now, healthy)
    if not healthy:
        refused.add(up["to_identity"])
        print(f"cdcca-edge device: version {up['to_version']} failed the health check; reverted to "
              f"{now[:16]} and reported", file=sys.stderr, flush=True)
    path.unlink(missing_ok=True)


def _apply(m: Any, client: Any, up: dict[str, Any], path: Path, sync: SyncConfig) -> tuple[str, bool]:
    """In the engine thread (requests wait in the queue meanwhile): apply the update,
    reload, run the health check; revert a delta that fails it."""
    import math

    from cdcca_edge.core.trust import Trust
    from cdcca_edge.runtime.base import GenerationConfig
    from cdcca_edge.runtime.uts import artifact_identity

    def probe_entropy() -> float | None:
        """Mean token entropy on the probes; None when the model gives no finite answer."""
        ents = []
        for p in sync.probes:
            g = m.generate(p, GenerationConfig(max_tokens=4))
            if not g.tokens or not all(math.isfinite(s.entropy) for s in g.scores):
                return None
            ents += [s.entropy for s in g.scores]
        return sum(ents) / len(ents)

    try:
        before = probe_entropy()
    except Exception:  # noqa: BLE001 - the serving model fails its probes: judge the update alone
        before = None
    undo = path.with_name(path.name + ".undo")
    if up["kind"] == "delta":
        m.apply_patch(path, trust=client.trust(), undo_out=undo)
    else:
        from cdcca_edge.runtime.sync_client import install_artifact

        was = artifact_identity(m.artifact_path)
        m.close()  # the engine lets go of the file while it is replaced
        try:
            install_artifact(path, m.artifact_path, up["to_identity"], up["to_version"], keep=True)
        finally:
            m.reload()

    def healthy() -> bool:
        """Finite scores, an answer, and not near-uniform next-token distributions (a
        model whose weights were damaged answers noise with finite logits): the mean
        entropy on the probes stays under HEALTH_ENTROPY_SHARE of ln(vocabulary), or, for
        a model that was above it before the update too (probes outside its domain, as
        text alone is for an image-question model), rises by at most HEALTH_ENTROPY_RISE
        of it; and the identity the update promised."""
        try:
            after = probe_entropy()
            if after is None:
                return False
            ln_v = math.log(m.n_vocab)
            limit = HEALTH_ENTROPY_SHARE * ln_v
            if before is not None and before > limit:
                limit = before + HEALTH_ENTROPY_RISE * ln_v
            if after > limit:
                return False
            return artifact_identity(m.artifact_path)[0] == up["to_identity"]
        except Exception:  # noqa: BLE001 - any failure of the new model is "unhealthy"
            return False

    ok = healthy()
    if not ok and up["kind"] == "delta" and undo.exists():
        m.apply_patch(undo, trust=Trust.none(), allow_downgrade=True)  # back to the version it had
    elif up["kind"] != "delta":
        from cdcca_edge.runtime.sync_client import discard_previous, restore_artifact

        if not ok:  # the whole artefact it replaced comes back
            m.close()
            try:
                restore_artifact(m.artifact_path, *was)
            finally:
                m.reload()
        discard_previous(m.artifact_path)
    undo.unlink(missing_ok=True)
    return artifact_identity(m.artifact_path)[0], ok
