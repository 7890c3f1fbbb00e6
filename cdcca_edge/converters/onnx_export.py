"""HF (Llama / Qwen2) -> ONNX with KV cache, through optimum-onnx.

optimum writes ``model.onnx`` with ``past_key_values`` inputs (task
``text-generation-with-past``); the result loads in
``optimum.onnxruntime.ORTModelForCausalLM``. We then post-process it for the device:

* every initializer moves to one external data file (``model.onnx_data``) so a patch can
  rewrite weights in place without touching the graph;
* the tracer's anonymous names (``onnx::MatMul_733``) become the HF parameter names they
  hold, found by exact value; linear weights stored transposed (in, out) for ``MatMul`` are
  listed in the ``cdcca.transposed`` metadata entry (docs/formats/artifact.md);
* provenance goes into ``metadata_props``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cdcca_edge import __version__
from cdcca_edge.core import artifact as art
from cdcca_edge.core.errors import require
from cdcca_edge.core.onnx_proto import ONNX_DTYPES

def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def name_initializers(graph: Any, state_dict: dict[str, np.ndarray]) -> list[str]:
    """Rename anonymous initializers to the HF parameter whose values they hold.

    Returns the names of initializers stored transposed. Matching is by exact bytes: the
    tracer copies parameters (possibly transposed) without changing a bit.
    """
    from onnx import numpy_helper

    direct: dict[tuple[str, tuple[int, ...]], list[str]] = {}
    transposed: dict[tuple[str, tuple[int, ...]], list[str]] = {}
    for name, w in state_dict.items():
        direct.setdefault((_digest(w), w.shape), []).append(name)
        if w.ndim == 2:
            transposed.setdefault((_digest(w.T), w.T.shape), []).append(name)
    taken = {init.name for init in graph.initializer}
    renames: dict[str, str] = {}
    stored_transposed: list[str] = []
    for init in graph.initializer:
        if init.name in state_dict:
            continue
        arr = numpy_helper.to_array(init)
        if arr.dtype != np.float32 or arr.ndim == 0:
            continue
        key = (_digest(arr), arr.shape)
        for table, is_t in ((direct, False), (transposed, True)):
            free = [c for c in table.get(key, []) if c not in taken]
            if "lm_head.weight" in free:
                # Tied embeddings: the transposed copy for the output MatMul is the LM head.
                free = ["lm_head.weight"]
            if len(free) > 1:
                # Several parameters hold exactly these values (e.g. zero-initialised):
                # naming it after one of them could send a later patch to the wrong
                # tensor, so it keeps its anonymous name and cannot be patched by HF name.
                break
            if free:
                new = free[0]
                renames[init.name] = new
                taken.add(new)
                if is_t:
                    stored_transposed.append(new)
                break
    if renames:
        for init in graph.initializer:
            init.name = renames.get(init.name, init.name)
        for node in graph.node:
            for i, inp in enumerate(node.input):
                if inp in renames:
                    node.input[i] = renames[inp]
    return sorted(stored_transposed)


def write_onnx(loaded: Any, out_dir: str | Path, progress: Callable[[str], None] | None = None) -> str:
    """Export ``loaded`` (a :class:`~cdcca_edge.converters.hf.LoadedModel`) to ``out_dir``.

    Returns the identity digest of the written initializers (also in the model's
    ``cdcca.export_identity`` metadata).
    """
    onnx = require("onnx", "export")
    exporters = require("optimum.exporters.onnx", "export")
    from onnx import numpy_helper

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cdcca-onnx-", dir=out_dir.parent) as tmp:
        if progress:
            progress("tracing the model with optimum-onnx")
        with warnings.catch_warnings():
            # The tracer warns about every Python-level branch in transformers' cache and
            # mask code; the export is checked numerically afterwards instead.
            warnings.simplefilter("ignore")
            exporters.onnx_export_from_model(
                loaded.model, tmp, task="text-generation-with-past", do_validation=False
            )
        if progress:
            progress("moving weights to external data")
        model = onnx.load(str(Path(tmp) / art.ONNX_MODEL_NAME), load_external_data=True)
        sd = {k: v.detach().float().cpu().numpy() for k, v in loaded.model.state_dict().items()}
        stored_t = name_initializers(model.graph, sd)
        entries = []
        for init in model.graph.initializer:
            arr = numpy_helper.to_array(init)
            type_name = ONNX_DTYPES.get(init.data_type, (f"ONNX{init.data_type}", 0))[0]
            entries.append((init.name, type_name, tuple(arr.shape), art.bytes_digest(arr)))
        identity = art.identity_digest(entries)
        meta = {
            art.META_VERSION: __version__,
            art.META_SOURCE_DIGEST: loaded.source_digest,
            art.META_QUANT: "f32",
            art.META_ARCH: loaded.arch,
            art.META_EXPORT_IDENTITY: identity,
            art.META_TRANSPOSED: json.dumps(stored_t),
        }
        del model.metadata_props[:]
        for k, v in meta.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = k, v
        for stale in (art.ONNX_MODEL_NAME, art.ONNX_DATA_NAME):
            (out_dir / stale).unlink(missing_ok=True)
        onnx.save_model(
            model,
            str(out_dir / art.ONNX_MODEL_NAME),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=art.ONNX_DATA_NAME,
            size_threshold=0,  # every initializer external: the patcher edits only this file
        )
        for name in ("config.json", "generation_config.json"):
            if (Path(tmp) / name).is_file():
                shutil.copy2(Path(tmp) / name, out_dir / name)
    loaded.tokenizer.save_pretrained(out_dir)
    return identity
