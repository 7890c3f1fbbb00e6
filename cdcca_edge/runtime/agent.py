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
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from cdcca_edge.core.errors import CdccaError, UsageError

DEFAULT_QUEUE = 16
MAX_TOKENS_LIMIT = 4096
_DONE = object()


@dataclass
class Job:
    """A unit of work for the engine thread; its events arrive on ``out``."""

    run: Callable[[Any, "Job"], Any]  # (backend, job) -> result
    out: "queue.Queue[Any]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

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
        from cdcca_edge.runtime.uts import artifact_identity

        return artifact_identity(self.model.artifact_path)


def chat_prompt(messages: list[dict[str, Any]]) -> str:
    """A plain transcript prompt for chat requests ("role: text" lines, then
    "assistant:"). The tiny and exported models carry no chat template; a model that does
    is served the same transcript (documented in docs/device.md)."""
    lines = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # content parts: the text ones (images: not on this path yet)
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        lines.append(f"{m.get('role', 'user')}: {content}")
    return "\n".join(lines) + "\nassistant:"


def _token_dict(score: Any) -> dict[str, Any]:
    d = score.as_dict()
    return {k: d[k] for k in ("token", "entropy", "top1_prob", "logprob") if k in d}


def create_agent_app(model: str | Path, backend: str = "auto", queue_max: int = DEFAULT_QUEUE,
                     model_name: str | None = None, **load_kwargs: Any) -> Any:
    """The agent's FastAPI app over ``model``."""
    import contextlib

    from cdcca_edge import __version__
    from cdcca_edge.runtime.base import GenerationConfig

    state: dict[str, Engine] = {}
    name = model_name or Path(model).name

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> Any:
        state["engine"] = Engine(model, backend, queue_max, **load_kwargs)
        yield
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
            return GenerationConfig(max_tokens=n, temperature=temperature, top_p=top_p, seed=seed)
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

    def generation_job(prompt: str, cfg: GenerationConfig, stream: bool) -> Job:
        def run(m: Any, job: Job) -> Any:
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

    def extension(gen: Any) -> dict[str, Any]:
        return {"sample": gen.sample.as_dict(), "tokens": [_token_dict(s) for s in gen.scores],
                "model_identity": state["engine"].identity()[0]}

    def finish_reason(gen: Any, cfg: GenerationConfig) -> str:
        return "length" if gen.finish_reason == "length" or len(gen.tokens) >= cfg.max_tokens else "stop"

    async def complete(request: Request, chat: bool) -> Any:
        body = await read_body(request)
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
                raise fail(400, "invalid_request_error", "messages must be a non-empty list of objects")
            prompt = chat_prompt(msgs)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise fail(400, "invalid_request_error", "prompt must be a non-empty string")
        cfg = config(body)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        job = submit(generation_job(prompt, cfg, bool(body.get("stream"))))
        if not body.get("stream"):
            try:
                gen = await run_in_threadpool(job.result)
            except CdccaError as exc:
                raise fail(400, "invalid_request_error", str(exc)) from None
            state["engine"].stats["tokens"] += len(gen.tokens)
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
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return app


def iter_sse(lines: Iterator[bytes]) -> Iterator[dict[str, Any]]:
    """The JSON events of a server-sent-events stream (tests and benchmarks)."""
    for raw in lines:
        line = raw.decode() if isinstance(raw, bytes) else raw
        if line.startswith("data: ") and line.strip() != "data: [DONE]":
            yield json.loads(line[6:])
