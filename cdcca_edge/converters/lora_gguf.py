"""PEFT LoRA adapter -> llama.cpp's LoRA GGUF (what ``convert_lora_to_gguf.py`` writes),
for a device that runs the base GGUF with the adapter beside it (``llama-cli --lora``,
``Llama(lora_path=...)``, our llama backend's ``lora=``) instead of a merged model.

The file: ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha``,
and for every adapted matrix ``W`` (named as in the base GGUF) two tensors,
``<name>.lora_a`` (r, in) and ``<name>.lora_b`` (out, r) in numpy order. llama.cpp adds
``alpha / r * (B @ (A @ x))`` to ``W @ x``, with r read from ``lora_a``; we write
``alpha = scale * r`` with PEFT's own scale (``lora_alpha / r``, or ``/ sqrt(r)`` for
rsLoRA), so the product is the adapter's. The q/k rotary row permutation that the base
export applies to ``W`` is applied to ``B`` (``P (B A) = (P B) A``): the same slot mapping
DWC uses (converters/mapping.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np

from cdcca_edge.core.errors import UsageError

LoraDtype = Literal["f16", "f32"]


def write_lora_gguf(adapter: str | Path, base_gguf: str | Path, base_model: str | Path, out: str | Path,
                    dtype: LoraDtype = "f16") -> dict:
    """Write ``adapter`` (a PEFT LoRA directory trained on the HF model ``base_model``) as
    llama.cpp's LoRA GGUF for ``base_gguf`` (an export of ``base_model``). Returns a
    summary (path, bytes, tensors, rank).

    Raises:
        UsageError: not a LoRA adapter, or a dtype we do not write.
        MissingTensorError: an adapted matrix has no tensor in ``base_gguf``.
    """
    import gguf
    from transformers import AutoConfig

    from cdcca_edge.core.adapters import lora_factors
    from cdcca_edge.converters.gguf_export import _gguf_arch
    from cdcca_edge.converters.hf import SUPPORTED_MODEL_TYPES, model_type_of
    from cdcca_edge.converters.mapping import slots_for
    from cdcca_edge.core.artifact import META_LORA_BASE, META_SOURCE_DIGEST, open_artifact
    from cdcca_edge.core.fileio import commit_file

    adapter, out = Path(adapter), Path(out)
    if dtype not in ("f16", "f32"):
        raise UsageError(f"--dtype {dtype!r}: a LoRA GGUF is written as f16 or f32")
    cfg_path = adapter / "adapter_config.json"
    if not cfg_path.is_file():
        raise UsageError(f"{adapter} has no adapter_config.json: give a PEFT adapter directory")
    if json.loads(cfg_path.read_text()).get("peft_type") != "LORA":
        raise UsageError(f"{adapter} is not a LoRA adapter; llama.cpp's adapter GGUF holds LoRA only")
    factors = lora_factors(adapter)
    art = open_artifact(base_gguf)
    if art.format != "gguf":
        raise UsageError(f"{base_gguf} is not a GGUF file: a LoRA GGUF goes beside a GGUF base")
    model_type = model_type_of(Path(base_model))
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UsageError(f"{base_model}: model type {model_type!r}; LoRA GGUF supports "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    config = AutoConfig.from_pretrained(base_model)
    arch = SUPPORTED_MODEL_TYPES[model_type]
    slots = slots_for(art, arch, config, sorted(factors))
    ranks = {a.shape[0] for a, _, _ in factors.values()}
    scales = {s for _, _, s in factors.values()}
    if len(ranks) != 1 or len(scales) != 1:  # one alpha / r for the whole file
        raise UsageError(f"{adapter}: the modules have ranks {sorted(ranks)} and scales {sorted(scales)}; "
                         "llama.cpp's LoRA GGUF has one alpha for every module")
    (rank,), (scale,) = ranks, scales
    np_dtype = np.float16 if dtype == "f16" else np.float32
    gguf_arch = gguf.MODEL_ARCH_NAMES[_gguf_arch(arch)]
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), gguf_arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(scale * rank))
    writer.add_name(f"{adapter.name} (LoRA)")
    source = art.metadata.get(META_SOURCE_DIGEST)
    if source:  # our backend refuses the LoRA on an export of another model
        writer.add_string(META_LORA_BASE, source)
    n = 0
    for hf in sorted(factors):
        a, b, _ = factors[hf]
        for slot in slots[hf]:
            a2, b2 = slot.factors(a, b)  # (r, in), (out, r) in the base GGUF's layout
            writer.add_tensor(f"{slot.tensor}.lora_a", np.ascontiguousarray(a2, dtype=np_dtype))
            writer.add_tensor(f"{slot.tensor}.lora_b", np.ascontiguousarray(b2, dtype=np_dtype))
            n += 2
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        commit_file(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(out), "bytes": out.stat().st_size, "tensors": n, "rank": rank, "alpha": scale * rank,
            "dtype": dtype}
