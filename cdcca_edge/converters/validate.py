"""Export validation: an artefact counts only if its runtime agrees with torch.

Each export is run through the device runtime on a few prompts and its logits at every
prompt position are compared with the torch model's, for the prompt's last tokens fed one
at a time through the KV cache as well as for the prefill, so the decode path is checked
too. One prompt contains the tokenizer's EOS text, so special-token parsing must agree. The criterion is scale-free: the
largest absolute logit difference divided by the standard deviation of the reference
logits must stay under the tolerance of the artefact's format and quant type (the table
below, also in docs/export.md). Tokenisation must match the HF tokenizer exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cdcca_edge.core.errors import ValidationError
from cdcca_edge.runtime.scores import kl_divergence

DECODE_STEPS = 4  # prompt tokens re-fed one at a time through the KV cache
VALIDATION_PROMPTS = (
    "question: what colour is the circle? answer:",
    "The quick brown fox jumps over the lazy dog. Then it",
    "the red square is left of the blue triangle, and there are three",
)

# (format, quant) -> max |logits - torch| / std(torch logits) over all prompt positions.
# Measured (docs/export.md): tiny Llama/Qwen2 and SmolLM2-135M stay at or below
# onnx 1.6e-5, f32 0.0035, f16 0.012, q8_0 0.26, q4_0 2.44; an export with the q/k rotary
# permutation left out measures 3.5-4.7 at every type.
TOLERANCES: dict[tuple[str, str], float] = {
    ("onnx", "f32"): 1e-3,
    ("onnx", "int8"): 0.6,  # MatMulNBits, blocks of 32 (measured below)
    ("onnx", "int4"): 3.0,  # SmolLM2-135M measures 2.68
    ("gguf", "f32"): 0.02,  # llama.cpp keeps its KV cache in F16
    ("gguf", "f16"): 0.05,
    ("gguf", "q8_0"): 0.6,  # llama.cpp also quantises activations to 8 bits
    ("gguf", "q4_0"): 2.8,
    # llama.cpp's mixes; measured at most q4_k_s 1.87, q4_k_m 1.20, q5_k_m 1.34, q6_k 0.43
    ("gguf", "q4_k_s"): 2.8,
    ("gguf", "q4_k_m"): 2.0,
    ("gguf", "q5_k_m"): 2.0,
    ("gguf", "q6_k"): 0.8,
}


@dataclass
class ValidationReport:
    format: str
    quant: str
    backend: str
    n_prompts: int
    n_positions: int  # rows compared: each prompt position twice (prefill, cached decode)
    max_abs_diff: float  # largest |logit - torch logit|
    ref_std: float  # std of the torch logits
    normalized_diff: float  # max_abs_diff / ref_std: compared with the tolerance
    tolerance: float
    top1_agreement: float  # fraction of positions where both argmaxes agree
    mean_kl: float  # mean over positions of KL(torch || runtime), nats
    passed: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_export(
    path: str | Path,
    loaded: Any,
    fmt: str,
    quant: str,
    prompts: tuple[str, ...] = VALIDATION_PROMPTS,
    tolerance: float | None = None,
    lora: str | Path | None = None,
) -> ValidationReport:
    """Compare the artefact at ``path`` with ``loaded.model`` on ``prompts``.

    Raises:
        ValidationError: tokenisation differs, or logits differ beyond the tolerance.
    """
    import torch

    from cdcca_edge.runtime import load

    tol = TOLERANCES[(fmt, quant)] if tolerance is None else tolerance
    tokenizer, model = loaded.tokenizer, loaded.model
    if tokenizer.eos_token:
        prompts = (*prompts, f"yes.{tokenizer.eos_token}no")
    diffs, refs, kls, agree, n_pos = [], [], [], 0, 0
    extra = {"lora": lora} if lora is not None else {}  # a LoRA GGUF on top, unmerged
    with load(path, backend="onnx" if fmt == "onnx" else "llama", **extra) as backend:
        for prompt in prompts:
            hf_ids = list(tokenizer(prompt)["input_ids"])
            rt_ids = backend.tokenize(prompt)
            if rt_ids != hf_ids:
                raise ValidationError(
                    f"{path}: the {backend.name} runtime tokenises {prompt!r} as {rt_ids}, the HF "
                    f"tokenizer as {hf_ids}; the tokenizer metadata is wrong for this model"
                )
            got = backend.prompt_logits(hf_ids)  # (T, V), one prefill
            # the same positions again, the last few decoded one token at a time
            k = min(DECODE_STEPS, len(hf_ids) - 1)
            backend.reset()
            steps = [np.array(backend.forward(hf_ids[: len(hf_ids) - k], all_logits=True))]
            steps += [np.array(backend.forward([t])) for t in hf_ids[len(hf_ids) - k :]]
            got = np.concatenate([got, np.concatenate(steps)])  # (2T, V)
            with torch.no_grad():
                ref = model(torch.tensor([hf_ids])).logits[0].float().numpy()  # (T, V)
            ref = np.concatenate([ref, ref])  # (2T, V): prefill rows, then cached-decode rows
            if got.shape != ref.shape:
                raise ValidationError(f"{path}: runtime logits {got.shape} vs torch {ref.shape}")
            diffs.append(float(np.abs(got - ref).max()))
            kls.append(kl_divergence(ref, got))
            refs.append(ref)
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            n_pos += ref.shape[0]
        backend_name = backend.name
    max_diff = max(diffs)
    ref_std = float(np.concatenate([r.ravel() for r in refs]).std())
    normalized = max_diff / max(ref_std, 1e-12)
    report = ValidationReport(
        format=fmt,
        quant=quant,
        backend=backend_name,
        n_prompts=len(prompts),
        n_positions=n_pos,
        max_abs_diff=max_diff,
        ref_std=ref_std,
        normalized_diff=normalized,
        tolerance=tol,
        top1_agreement=agree / n_pos,
        mean_kl=float(np.concatenate(kls).mean()),
        passed=bool(np.isfinite(normalized) and normalized <= tol),
    )
    if not report.passed:
        raise ValidationError(
            f"{path}: {fmt}/{quant} export disagrees with torch: max |Δlogit| = {max_diff:.4g} "
            f"= {normalized:.4g} x logit std, tolerance {tol} (docs/export.md); the export was "
            "not kept. Check the model's architecture is supported, or pass a looser --tolerance"
        )
    return report

