"""Loading a Hugging Face causal LM (and merging a PEFT adapter) for export.

Everything here needs the ``cloud`` extra (torch, transformers, peft); imports are
deferred so that importing ``cdcca_edge.converters`` stays cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from cdcca_edge.core.adapters import BIAS_ADAPTER_DIR
from cdcca_edge.core.errors import FormatError, UsageError, require

# HF ``model_type`` -> our architecture family. Both are decoder-only with RMSNorm, SwiGLU
# and rotary embeddings; they differ in q/k/v biases and in the rotary layout GGUF expects.
SUPPORTED_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2"}


@dataclass
class LoadedModel:
    """A float32 HF model ready to export, with what the artefact's provenance records."""

    model: Any  # transformers PreTrainedModel, eval mode, float32
    tokenizer: Any  # transformers PreTrainedTokenizerFast
    arch: str  # "llama" | "qwen2"
    source_dir: Path
    adapter_dir: Path | None
    source_digest: str  # sha256 over the (merged) weights exported


def read_model_json(model_dir: Path, name: str, missing: str) -> Any:
    """A JSON file of a model directory; ``missing``: what to say when it is not there.

    Raises:
        FormatError: missing, or not valid JSON.
    """
    path = model_dir / name
    if not path.is_file():
        raise FormatError(f"{model_dir}: no {name}; {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from exc


def model_type_of(model_dir: Path) -> str:
    cfg = read_model_json(model_dir, "config.json", "expected a Hugging Face model directory")
    return str(cfg.get("model_type", "")) if isinstance(cfg, dict) else ""


def load_for_export(model_dir: str | Path, adapter_dir: str | Path | None = None) -> LoadedModel:
    """Load ``model_dir`` in float32, merge ``adapter_dir`` (a PEFT adapter) if given.

    Raises:
        FormatError: not a supported HF model / adapter directory.
        UsageError: the adapter does not fit the model.
        BackendUnavailableError: torch/transformers/peft missing.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UsageError(f"{model_dir}: not a directory; pass a Hugging Face model directory")
    model_type = model_type_of(model_dir)
    if model_type == "llava":
        return _load_llava(model_dir, adapter_dir)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise FormatError(
            f"{model_dir}: model_type {model_type!r} is not supported; supported families: "
            f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )
    torch = require("torch", "cloud")
    transformers = require("transformers", "cloud")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    if adapter_dir is not None:
        model = merge_adapter(model, Path(adapter_dir))
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        arch=SUPPORTED_MODEL_TYPES[model_type],
        source_dir=model_dir,
        adapter_dir=Path(adapter_dir) if adapter_dir is not None else None,
        source_digest=state_dict_digest(model),
    )


def _load_llava(model_dir: Path, adapter_dir: str | Path | None) -> LoadedModel:
    """A LLaVA-style model (vision tower, projector, Llama/Qwen2 language model)."""
    torch = require("torch", "cloud")
    transformers = require("transformers", "cloud")
    cfg = json.loads((model_dir / "config.json").read_text())
    text_type = cfg.get("text_config", {}).get("model_type", "llama")
    if text_type not in SUPPORTED_MODEL_TYPES:
        raise FormatError(f"{model_dir}: LLaVA language model type {text_type!r} is not supported; "
                          f"supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}")
    model = transformers.LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    if adapter_dir is not None:
        model = merge_adapter(model, Path(adapter_dir))
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, arch="llava", source_dir=model_dir,
                       adapter_dir=Path(adapter_dir) if adapter_dir is not None else None,
                       source_digest=state_dict_digest(model))


@contextlib.contextmanager
def peft_notices_known() -> Iterator[None]:
    """Silence two peft notices we know the reason for, and only those: LN tuning calls
    Llama/Qwen2's RMSNorm an "unsupported layer type" (it tunes its weight as it does a
    LayerNorm's; tests/cloud/test_akd.py checks it trains), and a merge says tied input
    and output embeddings are untied in the merged config (our adapters never train the
    embeddings, so both keep the same values; only the config's flag changes, and the
    exporters handle either)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
        warnings.filterwarnings("ignore", message="Input and output embeddings are no longer tied",
                                category=UserWarning)
        yield


def merge_and_unload(peft_model: Any) -> Any:
    """``peft_model.merge_and_unload(safe_merge=True)`` (NaN-checked), quietly."""
    with peft_notices_known():
        return peft_model.merge_and_unload(safe_merge=True)


def merge_adapter(model: Any, adapter_dir: Path) -> Any:
    """Merge a PEFT adapter into ``model`` (checked for NaN/inf before committing)."""
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FormatError(
            f"{adapter_dir}: no adapter_config.json; expected a PEFT adapter directory "
            "(as written by PeftModel.save_pretrained)"
        )
    peft = require("peft", "cloud")
    try:
        with peft_notices_known():
            peft_model = peft.PeftModel.from_pretrained(model, adapter_dir)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UsageError(
            f"{adapter_dir}: adapter does not fit the model ({exc}); pass the base model the "
            "adapter was trained on"
        ) from exc
    try:
        merged = merge_and_unload(peft_model)
    except ValueError as exc:  # peft raises ValueError when the merge yields NaNs
        raise UsageError(f"{adapter_dir}: merging the adapter failed ({exc})") from exc
    # AKD's bias-norm mode keeps bias deltas in a second adapter beside the first
    bias_dir = adapter_dir / BIAS_ADAPTER_DIR
    if (bias_dir / "adapter_config.json").is_file():
        merged = merge_adapter(merged, bias_dir)
    return merged


def state_dict_digest(model: Any) -> str:
    """SHA-256 over the model's parameters (names, shapes, float32 bytes), sorted by name."""
    h = hashlib.sha256(b"cdcca-src-v1\n")
    sd = model.state_dict()
    for name in sorted(sd):
        t = sd[name].detach().to("cpu").float().contiguous()
        h.update(f"{name}\0{tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
