"""Where each HF parameter lives in an exported artefact, and in what layout.

The exporters' own tables, read backwards: the GGUF name map and q/k row permutation of
``gguf_export``, the HF initializer names and transposed-``MatMul`` list that
``onnx_export`` records. The DWC delta builder uses this to express a cloud-side update in
the device file's layout; a parameter with no slot in the artefact is an error naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from cdcca_edge.converters.gguf_export import hf_tensor_transform, hf_to_gguf_name
from cdcca_edge.core.artifact import META_TRANSPOSED, Artifact
from cdcca_edge.core.bundle import LANGUAGE_PART, VISION_PART
from cdcca_edge.core.errors import FormatError, MissingTensorError


@dataclass(frozen=True)
class Slot:
    """One artefact tensor holding (a transform of) an HF parameter."""

    tensor: str  # artefact tensor name
    to_artifact: Callable[[np.ndarray], np.ndarray]  # HF layout (out, in) -> artefact layout
    # the same transform for a low-rank update B @ A: returns (A', B') in artefact layout
    factors: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _identity_factors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return a, b


def slots_for(art: Artifact, arch: str, config: Any, hf_names: list[str]) -> dict[str, list[Slot]]:
    """HF parameter name -> the artefact tensors that hold it (tied embeddings may be two).

    Raises:
        MissingTensorError: a parameter has no tensor in the artefact (e.g. a bias the
            architecture has no slot for).
        FormatError: the artefact is neither an exported GGUF nor ONNX.
    """
    if art.format == "bundle":
        return _bundle_slots(art, config, hf_names)
    if arch == "llava" and art.format == "gguf":
        return _llava_file_slots(art, config, hf_names)
    names = {t.name for t in art.tensors}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out: dict[str, list[Slot]] = {}
    for hf in hf_names:
        if art.format == "gguf":
            if hf == "lm_head.weight" and tied:
                continue  # stored once, as token_embd
            try:
                name = hf_to_gguf_name(arch, config.num_hidden_layers, hf)
            except FormatError:
                name = None
            if name is None or name not in names:
                raise MissingTensorError(
                    f"HF parameter {hf!r} has no tensor in {art.path} (expected {name!r}); the "
                    f"artefact's architecture cannot hold this update"
                )
            transform = hf_tensor_transform(arch, config, hf)
            # W' = P W for the q/k permutation: (B A)' = (P B) A
            out[hf] = [Slot(name, transform, lambda a, b, t=transform: (a, t(b)))]
        elif art.format == "onnx":
            transposed = set(json.loads(art.metadata.get(META_TRANSPOSED, "[]")))
            slots = []
            candidates = [hf]
            if tied and hf == "model.embed_tokens.weight":
                candidates.append("lm_head.weight")  # the tracer's transposed copy
            for cand in candidates:
                if cand not in names:
                    continue
                if cand in transposed:  # stored (in, out) for MatMul: (B A)^T = A^T B^T
                    slots.append(Slot(cand, lambda w: np.ascontiguousarray(w.T),
                                      lambda a, b: (np.ascontiguousarray(b.T), np.ascontiguousarray(a.T))))
                else:
                    slots.append(Slot(cand, lambda w: w, _identity_factors))
            if not slots:
                if hf == "lm_head.weight" and tied:
                    continue
                raise MissingTensorError(f"HF parameter {hf!r} has no initializer in {art.path}; "
                                         "the artefact's architecture cannot hold this update")
            out[hf] = slots
        else:
            raise FormatError(f"{art.path}: DWC works on exported GGUF files and ONNX directories, "
                              f"this is a {art.format}")
    return out


# LLaVA parameter prefixes -> (bundle part, the name the part's own export gave it)
_LLAVA_PARTS = (
    ("model.language_model.", LANGUAGE_PART, "model."),
    ("lm_head.", LANGUAGE_PART, "lm_head."),
    ("model.multi_modal_projector.", VISION_PART, "model.multi_modal_projector."),
    ("model.vision_tower.", VISION_PART, "model.vision_tower."),
)


def _bundle_slots(art: Artifact, config: Any, hf_names: list[str]) -> dict[str, list[Slot]]:
    """A multimodal bundle: each LLaVA parameter goes to its part, mapped by that part's
    own exporter table, and named ``<part>/<tensor>``."""
    from cdcca_edge.converters.hf import SUPPORTED_MODEL_TYPES
    from cdcca_edge.core.artifact import open_artifact
    from cdcca_edge.core.bundle import read_manifest

    parts = read_manifest(art.path).parts
    text_cfg = getattr(config, "text_config", None)
    if text_cfg is None:
        raise FormatError(f"{art.path}: a bundle takes a LLaVA model's update; this config has no text_config")
    by_part: dict[str, list[tuple[str, str]]] = {}
    for hf in hf_names:
        for prefix, part, renamed in _LLAVA_PARTS:
            if hf.startswith(prefix):
                by_part.setdefault(part, []).append((hf, renamed + hf[len(prefix):]))
                break
        else:
            raise MissingTensorError(f"HF parameter {hf!r} belongs to no part of the bundle {art.root}")
    out: dict[str, list[Slot]] = {}
    for part, pairs in by_part.items():
        if part not in parts:
            raise MissingTensorError(f"{art.root}: the update touches the {part!r} part, which the bundle lacks")
        sub = open_artifact(parts[part])
        lang = part == LANGUAGE_PART
        arch = SUPPORTED_MODEL_TYPES.get(text_cfg.model_type, text_cfg.model_type) if lang else "vision"
        sub_slots = slots_for(sub, arch, text_cfg if lang else config.vision_config,
                              [renamed for _, renamed in pairs])
        for hf, renamed in pairs:
            out[hf] = [Slot(f"{part}/{s.tensor}", s.to_artifact, s.factors) for s in sub_slots.get(renamed, [])]
    return out


def is_mmproj(art: Artifact) -> bool:
    """``art`` is llama.cpp's mmproj GGUF (a LLaVA model's vision side, docs/formats/mmproj.md)."""
    from cdcca_edge.converters.mmproj import MMPROJ_ARCH

    # the artefact reader keeps general.architecture among the GGUF keys
    return art.format == "gguf" and art.metadata.get("general.architecture") == MMPROJ_ARCH


def llava_file_params(art: Artifact, hf_names: list[str]) -> tuple[list[str], list[str]]:
    """A LLaVA update on one GGUF file of a llama.cpp-native pair: (the parameters this
    file holds, those the other file holds). The mmproj holds the vision tower and the
    projector; the language GGUF the language model. Tower parameters LLaVA never reads
    (``converters.mmproj.UNREAD_PREFIXES``) belong to neither.

    Raises:
        MissingTensorError: a parameter that is no part of a LLaVA model.
    """
    from cdcca_edge.converters.mmproj import UNREAD_PREFIXES

    vision = tuple(prefix for prefix, part, _ in _LLAVA_PARTS if part == VISION_PART)
    known = tuple(prefix for prefix, _, _ in _LLAVA_PARTS)
    mine, others = [], []
    mmproj = is_mmproj(art)
    for n in hf_names:
        if not n.startswith(known):
            raise MissingTensorError(f"HF parameter {n!r} belongs to no part of a LLaVA model (the vision tower, "
                                     "the projector, the language model)")
        if n.removeprefix("model.").startswith(UNREAD_PREFIXES):
            continue
        (mine if n.startswith(vision) == mmproj else others).append(n)
    return mine, others


def _llava_file_slots(art: Artifact, config: Any, hf_names: list[str]) -> dict[str, list[Slot]]:
    """A LLaVA update on an mmproj (by clip.cpp's names, converters/mmproj.py) or on the
    language GGUF of the pair (by the language model's own table)."""
    from cdcca_edge.converters.hf import SUPPORTED_MODEL_TYPES

    mine, others = llava_file_params(art, hf_names)
    if others:
        raise MissingTensorError(f"{art.path} holds {'the vision side' if is_mmproj(art) else 'the language model'} "
                                 f"of a LLaVA model; {others[0]!r} lives in the other file of the pair")
    if is_mmproj(art):
        from cdcca_edge.converters.mmproj import mmproj_names, mmproj_plan, mmproj_transform

        tower, _, _ = mmproj_plan(config)  # the towers and selections an mmproj can hold
        names = {t.name for t in art.tensors}
        if ("v.class_embd" in names) != (tower == "clip"):
            raise MissingTensorError(f"{art.path} was written from a {'CLIP' if 'v.class_embd' in names else 'SigLIP'} "
                                     f"tower; the update is for a {tower.upper()} one: give this model's mmproj")
        table = mmproj_names(config.vision_config.num_hidden_layers, tower)
        out: dict[str, list[Slot]] = {}
        for hf in mine:
            name = table.get(hf.removeprefix("model."))
            if name is None:
                raise MissingTensorError(f"HF parameter {hf!r} has no slot in clip.cpp's mmproj format")
            if name not in names:
                raise MissingTensorError(f"{art.path} has no {name!r} (for {hf!r}): it was not written from "
                                         "this model")
            transform = mmproj_transform(name, tower)
            out[hf] = [Slot(name, transform, _identity_factors)]  # a matrix's layout is HF's
        return out
    text_cfg = config.text_config
    renamed = {}
    for hf in mine:
        prefix, _, new = next(p for p in _LLAVA_PARTS if p[1] == LANGUAGE_PART and hf.startswith(p[0]))
        renamed[hf] = new + hf[len(prefix):]
    sub = slots_for(art, SUPPORTED_MODEL_TYPES.get(text_cfg.model_type, text_cfg.model_type), text_cfg,
                    list(renamed.values()))
    # slots_for leaves out only a tied lm_head (stored once, as the embedding)
    return {hf: sub[new] for hf, new in renamed.items() if new in sub}
