"""``cdcca-edge demo``: what exists of the loop so far, end to end.

Builds (once, cached) the embedded tiny model, exports it to GGUF and ONNX through the
validated exporters, and answers one prompt on both device backends with per-token
uncertainty. Later issues extend this to full cloud-device rounds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from cdcca_edge.core.paths import cache_dir


def tiny_model_dir(spec: Any, on_stage: Callable[[str], None]) -> Path:
    """The demo's tiny model, built on first use and cached by its spec."""
    from cdcca_edge.cloud.tiny import build_tiny_model

    key = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"tiny-{spec.arch}-{key}"
    if (target / "config.json").is_file():
        return target
    on_stage(f"training the tiny {spec.arch} model (first run only)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        build_tiny_model(tmp, spec)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def run_demo(
    out_dir: Path | None = None,
    prompt: str = "question: what colour is the circle? answer:",
    on_stage: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    from cdcca_edge.cloud.tiny import TinySpec
    from cdcca_edge.converters.export import export
    from cdcca_edge.runtime import GenerationConfig, load

    out_dir = Path(out_dir) if out_dir else cache_dir() / "demo"
    model_dir = tiny_model_dir(TinySpec(), on_stage)
    exports = {
        "llama": export(model_dir, out_dir / "tiny-q8_0.gguf", "gguf", quant="q8_0", on_stage=on_stage),
        "onnx": export(model_dir, out_dir / "tiny-onnx", "onnx", on_stage=on_stage),
    }
    answers = {}
    for backend, result in exports.items():
        on_stage(f"answering on the {backend} backend")
        with load(result.path, backend=backend) as model:  # type: ignore[arg-type]
            gen = model.generate(prompt, GenerationConfig(max_tokens=16))
        answers[backend] = {"artifact": str(result.path), **gen.as_dict()}
    return {
        "model_dir": str(model_dir),
        "prompt": prompt,
        "exports": {k: v.as_dict() for k, v in exports.items()},
        "answers": answers,
        "backends_agree": answers["llama"]["text"] == answers["onnx"]["text"],
    }
