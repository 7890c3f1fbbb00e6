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

``--quant int4`` / ``int8`` then runs onnxruntime's own weight-only quantiser
(``MatMulNBitsQuantizer``, symmetric, per block along the input dimension) over every
``MatMul`` with a weight initializer: what onnxruntime-genai ships. Each such weight ``W``
becomes ``W_Q4`` (uint8, (N, K / block, block / 2): two 4-bit codes a byte) or ``W_Q8`` and
``W_scales`` (float32, (N, K / block)) feeding a ``com.microsoft.MatMulNBits`` node; the
embedding (a ``Gather``) and the norms stay float32.
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


ONNX_QUANTS = ("f32", "int4", "int8")
NBITS_BLOCK = 32  # weights per scale along K: onnxruntime's choices are 16, 32, 64, 128, 256
NBITS_ACCURACY = 4  # MatMulNBits accuracy_level: 4 = int8 activations on CPU (the fast path)


def write_onnx(loaded: Any, out_dir: str | Path, progress: Callable[[str], None] | None = None,
               quant: str = "f32", block_size: int = NBITS_BLOCK, accuracy_level: int = NBITS_ACCURACY) -> str:
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
        if quant != "f32":
            if progress:
                progress(f"quantising MatMul weights to {quant} with onnxruntime's MatMulNBits quantiser")
            model = quantize_matmul_nbits(model, int(quant.removeprefix("int")), block_size, accuracy_level)
            names = {i.name for i in model.graph.initializer}
            stored_t = [n for n in stored_t if n in names]  # the quantised ones are (N, K) now
        entries = []
        for init in model.graph.initializer:
            arr = numpy_helper.to_array(init)
            type_name = ONNX_DTYPES.get(init.data_type, (f"ONNX{init.data_type}", 0))[0]
            entries.append((init.name, type_name, tuple(arr.shape), art.bytes_digest(arr)))
        identity = art.identity_digest(entries)
        meta = {
            art.META_VERSION: __version__,
            art.META_SOURCE_DIGEST: loaded.source_digest,
            art.META_QUANT: quant,
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


def quantize_matmul_nbits(model: Any, bits: int, block_size: int, accuracy_level: int) -> Any:
    """Every MatMul with a weight initializer -> ``com.microsoft.MatMulNBits`` at ``bits``,
    by onnxruntime's own quantiser (never a re-implementation). Returns the new model.

    Raises:
        UsageError: a block size or accuracy level onnxruntime does not take.
        BackendUnavailableError: onnxruntime's quantiser (or its onnx-ir) is missing.
    """
    import logging

    from cdcca_edge.core.errors import UsageError

    if block_size not in (16, 32, 64, 128, 256):
        raise UsageError(f"--block-size {block_size}: MatMulNBits takes 16, 32, 64, 128 or 256")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise UsageError(f"--accuracy-level {accuracy_level}: MatMulNBits takes 0-4 (4: int8 activations)")
    nbits = require("onnxruntime.quantization.matmul_nbits_quantizer", "export")
    log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = log.level
    log.setLevel(logging.WARNING)  # a line per node otherwise
    try:
        q = nbits.MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                       accuracy_level=accuracy_level)
        q.process()
    finally:
        log.setLevel(level)
    return q.model.model

