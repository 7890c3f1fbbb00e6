"""The device agent's local API as a real process, driven by the `openai` Python package
(what apps use): models, completions and chat completions, streaming and not, the
uncertainty extension, OpenAI-shaped refusals, and the bounded queue."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from tests.hostile import hostile  # noqa: E402
from tests.procs import free_port  # noqa: E402


class Agent:
    def __init__(self, model, *extra: str, env: dict | None = None, wait: bool = True) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # read on failure; not beside the model, which may be a read-only fixture
        self.log = Path(tempfile.gettempdir()) / f"cdcca-agent-{self.port}.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "cdcca_edge.cli", "device", "serve", "--model",
                                      str(model), "--port", str(self.port), *extra],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"),
                                     env={**os.environ, **(env or {})})
        if not wait:
            return
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                if self.proc.poll() is not None:
                    raise RuntimeError(self.log.read_text()[-2000:])
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("the agent did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture(params=["gguf", "onnx"])
def agent(request, exports):
    if request.param == "gguf":
        from tests.requires import needs_llama

        needs_llama()
    art = exports("llama", request.param, "q8_0" if request.param == "gguf" else "f32")
    a = Agent(art.path, "--queue-max", "2")
    yield a
    a.stop()


def test_openai_clients_work_unchanged(agent):
    client = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused")
    models = client.models.list()
    assert len(models.data) == 1
    model = models.data[0].id
    assert models.data[0].model_extra["cdcca"]["identity"]
    done = client.completions.create(model=model, prompt="the red circle is", max_tokens=6, temperature=0)
    text = done.choices[0].text
    assert text and done.usage.completion_tokens == len(done.model_extra["cdcca"]["tokens"])
    ext = done.model_extra["cdcca"]
    assert 0 < ext["sample"]["confidence"] <= 1 and all(t["entropy"] >= 0 for t in ext["tokens"])
    # streaming gives the same greedy answer, token by token, and the scores at the end
    parts, final = [], None
    for chunk in client.completions.create(model=model, prompt="the red circle is", max_tokens=6, temperature=0,
                                           stream=True):
        parts.append(chunk.choices[0].text)
        final = chunk
    assert "".join(parts) == text and final.model_extra["cdcca"]["sample"] == ext["sample"]
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "the red circle is"}],
                                          max_tokens=5, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "the red circle is"}], max_tokens=5, temperature=0,
        stream=True))
    assert streamed == chat.choices[0].message.content
    metrics = httpx.get(f"{agent.url}/metrics").text
    assert "cdcca_agent_requests_total 4" in metrics and "cdcca_agent_errors_total 0" in metrics


def test_bad_requests_get_openai_errors_and_change_nothing(agent):
    cases = {
        "not json": b"{",
        "not an object": b"[1, 2]",
        "no prompt": b'{"max_tokens": 3}',
        "empty prompt": b'{"prompt": ""}',
        "prompt not text": b'{"prompt": 7}',
        "too many tokens": b'{"prompt": "a", "max_tokens": 100000}',
        "zero tokens": b'{"prompt": "a", "max_tokens": 0}',
        "negative temperature": b'{"prompt": "a", "temperature": -1}',
        "bad top_p": b'{"prompt": "a", "top_p": 0}',
        "max_tokens not a number": b'{"prompt": "a", "max_tokens": "many"}',
    }
    for case, body in cases.items():
        hostile("agent")
        r = httpx.post(f"{agent.url}/v1/completions", content=body)
        assert r.status_code == 400, (case, r.status_code, r.text)
        assert r.json()["error"]["message"], case
    for case, body in {"no messages": b'{"max_tokens": 3}', "empty messages": b'{"messages": []}',
                       "message not an object": b'{"messages": ["hi"]}'}.items():
        hostile("agent")
        r = httpx.post(f"{agent.url}/v1/chat/completions", content=body)
        assert r.status_code == 400, case
    import base64
    import io

    from PIL import Image

    def png(size, mode="RGB"):
        buf = io.BytesIO()
        Image.new(mode, size).save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    def parts(*urls):
        return {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is it?"}] + [
            {"type": "image_url", "image_url": {"url": u}} for u in urls]}], "max_tokens": 2}

    for case, (body, says) in {
        "remote url": (parts("http://example.com/a.png"), "data URL"),
        "not base64": (parts("data:image/png;base64,!!!!"), "base64"),
        "not base64-encoded": (parts("data:image/png,abc"), "base64"),
        "not an image": (parts("data:image/png;base64," + base64.b64encode(b"GIF89a nonsense").decode()), "Pillow"),
        "pixel bomb": (parts(png((5000, 5000), "1")), "pixels"),
        "two images": (parts(png((8, 8)), png((8, 8))), "one image"),
        "image on a text model": (parts(png((8, 8))), "takes no images"),
    }.items():
        hostile("agent")
        r = httpx.post(f"{agent.url}/v1/chat/completions", json=body)
        assert r.status_code == 400 and says in r.json()["error"]["message"], (case, r.status_code, r.text)
    client = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="m", prompt="", max_tokens=3)
    assert client.completions.create(model="m", prompt="the", max_tokens=2).choices[0].text  # still serving


def test_concurrent_requests_are_queued_or_refused_with_429(agent):
    """12 requests at once against --queue-max 2: each is answered or refused with 429 in
    OpenAI's shape; none fails otherwise."""
    def one(_):
        r = httpx.post(f"{agent.url}/v1/completions", json={"prompt": "the red circle is", "max_tokens": 40},
                       timeout=120)
        return r.status_code, r.json()

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(one, range(12)))
    assert {code for code, _ in got} <= {200, 429}
    assert any(code == 200 for code, _ in got)
    for code, doc in got:
        if code == 429:
            assert doc["error"]["code"] == "server_busy"


def test_the_engine_queue_is_bounded(exports):
    """In process: with the model busy and the queue full, the next job is refused."""
    from cdcca_edge.runtime.agent import Engine, Job

    art = exports("llama", "onnx", "f32")
    engine = Engine(art.path, "onnx", queue_max=1)
    try:
        release = threading.Event()
        started = threading.Event()

        def block(_m, _job):
            started.set()
            release.wait(30)
            return "done"

        first = engine.submit(Job(block))
        assert started.wait(30)
        second = engine.submit(Job(lambda _m, _j: "second"))
        with pytest.raises(queue.Full):
            engine.submit(Job(lambda _m, _j: "third"))
        release.set()
        assert first.result(30) == "done" and second.result(30) == "second"
    finally:
        engine.close()


def test_the_engine_reports_the_served_version_not_the_files(exports, tmp_path):
    """While an update job runs, the file may already be the new version; the engine's
    identity (what /v1/models and uploads report) stays the served one until the job
    refreshes it (a client must not see a version before the agent has counted it)."""
    import shutil

    from cdcca_edge.runtime.agent import Engine, Job
    from cdcca_edge.runtime.sync_client import adopt_version

    model = tmp_path / "m.gguf"
    shutil.copy(exports("llama", "gguf", "f32").path, model)
    engine = Engine(model, "llama")
    try:
        identity, version = engine.identity()
        moved, release = threading.Event(), threading.Event()

        def update(_m, _job):
            adopt_version(model, identity, 7)  # the file says version 7 from here on
            moved.set()
            release.wait(30)
            engine.refresh_identity()
            return "done"

        job = engine.submit(Job(update))
        assert moved.wait(30)
        assert engine.identity() == (identity, version)  # the job has not finished
        release.set()
        assert job.result(30) == "done"
        assert engine.identity() == (identity, 7)
    finally:
        engine.close()
