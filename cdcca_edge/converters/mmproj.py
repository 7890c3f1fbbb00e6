"""A LLaVA model's vision side as llama.cpp's ``mmproj`` GGUF (the CLIP tower and the MLP
projector in clip.cpp's format), so that a text GGUF plus this file run in llama.cpp's
mtmd (``llama-mtmd-cli``, ``llama-server --mmproj``, llama-cpp-python's ``mtmd_cpp``).

What clip.cpp's LLaVA graph (``tools/mtmd/models/llava.cpp``) reads, written here from
the HF ``LlavaForConditionalGeneration`` weights:

- ``general.architecture = "clip"``, ``general.type = "mmproj"``;
- ``clip.has_vision_encoder``, ``clip.has_llava_projector``, ``clip.projector_type = "mlp"``
  (linear, GELU, linear: ``mm.0``, ``mm.2``);
- ``clip.vision.{image_size, patch_size, embedding_length, feed_forward_length,
  projection_dim, block_count, attention.head_count, attention.layer_norm_epsilon,
  image_mean, image_std}``, ``clip.use_gelu`` (false: CLIP's quick GELU; true: SigLIP's
  tanh GELU, which is ggml's);
- ``clip.vision.feature_layer``: the model's ``vision_feature_layer`` made non-negative
  (-1 -> block_count: the last layer's output; clip.cpp otherwise stops one layer early,
  as LLaVA-1.5 does);
- tensors ``v.patch_embd.weight`` (D, 3, P, P), ``v.position_embd.weight``,
  ``v.blk.{i}.{attn_q, attn_k, attn_v, attn_out, ln1, ln2, ffn_up, ffn_down}.*``,
  ``mm.0.*``, ``mm.2.*``; a CLIP tower adds ``v.class_embd`` and ``v.pre_ln.*``, a SigLIP
  tower ``v.patch_embd.bias``. The tower's ``post_layernorm`` is left out: LLaVA takes the
  encoder's hidden states before it.

Two towers, as LLaVA selects their features:

- **SigLIP** (no CLS, ``vision_feature_select_strategy = "full"``): clip.cpp runs the
  patches alone at positions 0..n-1 and hands all n of them on, exactly HF's tokens in
  HF's order;
- **CLIP** ("default": drop CLS). A difference that no file can remove (llama.cpp as
  vendored by llama-cpp-python 0.3.36, ``models/llava.cpp``): clip.cpp appends CLS after
  the patches and then keeps rows 1..n, so the image tokens it hands the language model are
  [patch 1 .. patch n-1, CLS] where HF's LLaVA hands [patch 0 .. patch n-1]. The position
  rows are rotated so each of those tokens is exactly HF's; the first patch is still lost
  and the CLS state taken in its place, one position later. docs/export.md gives the
  measured effect on answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal, get_args

import numpy as np

from cdcca_edge.core.errors import FormatError, UsageError

MmprojDtype = Literal["f32", "f16"]
MMPROJ_DTYPES: tuple[str, ...] = get_args(MmprojDtype)
MMPROJ_ARCH = "clip"  # general.architecture of every mmproj (gguf's MODEL_ARCH.MMPROJ name)
Tower = Literal["clip", "siglip"]
DEFAULT_TOWER_TYPE = "clip_vision_model"  # a vision config without model_type (older LLaVA configs)
# vision config model_type -> (our tower name, the feature selection clip.cpp's MLP path
# implements for it, the activations it runs: HF name -> clip.use_gelu)
TOWERS: dict[str, tuple[Tower, str, dict[str, bool]]] = {
    "clip_vision_model": ("clip", "default", {"quick_gelu": False, "gelu": True}),
    "siglip_vision_model": ("siglip", "full", {"gelu_pytorch_tanh": True}),
}
# tower parameters LLaVA never reads (it takes the encoder's hidden states): no mmproj slot,
# and an update to them changes nothing the device computes
UNREAD_PREFIXES = ("vision_tower.vision_model.post_layernorm.", "vision_tower.vision_model.head.")
_LAYER = {  # HF CLIP encoder layer parameter -> clip.cpp tensor
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
    "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
}


def mmproj_names(n_layers: int, tower: Tower = "clip") -> dict[str, str]:
    """HF LLaVA parameter (without the ``model.`` prefix) -> its mmproj tensor, for a
    ``tower`` of ``n_layers`` layers: the writer's table, and DWC's (converters/mapping.py)."""
    vis = "vision_tower.vision_model."
    names = {f"{vis}embeddings.patch_embedding.weight": "v.patch_embd.weight",
             f"{vis}embeddings.position_embedding.weight": "v.position_embd.weight"}
    if tower == "siglip":
        names[f"{vis}embeddings.patch_embedding.bias"] = "v.patch_embd.bias"
    else:
        names[f"{vis}embeddings.class_embedding"] = "v.class_embd"
    for suffix in ("weight", "bias"):
        if tower == "clip":
            names[f"{vis}pre_layrnorm.{suffix}"] = f"v.pre_ln.{suffix}"
        for i in range(n_layers):
            for hf, name in _LAYER.items():
                names[f"{vis}encoder.layers.{i}.{hf}.{suffix}"] = f"v.blk.{i}.{name}.{suffix}"
        names[f"multi_modal_projector.linear_1.{suffix}"] = f"mm.0.{suffix}"
        names[f"multi_modal_projector.linear_2.{suffix}"] = f"mm.2.{suffix}"
    return names


def mmproj_transform(tensor: str, tower: Tower = "clip") -> Callable[[np.ndarray], np.ndarray]:
    """The array transform from an HF parameter to its mmproj ``tensor`` (HF's layout is
    clip.cpp's, but for a CLIP tower's position rows)."""
    if tensor == "v.position_embd.weight" and tower == "clip":
        # clip.cpp's LLaVA graph lays the tokens out as [patch 0 .. patch n-1, CLS] and
        # gives them positions 0..n; HF's order is [CLS, patch 0 ..]. Rotating the rows
        # gives every token HF's own position embedding, so (attention being order-free)
        # every hidden state is HF's.
        return lambda w: np.roll(w, -1, axis=0)
    return lambda w: w


def mmproj_tensors(state: dict[str, np.ndarray], n_layers: int, tower: Tower = "clip") -> dict[str, np.ndarray]:
    """HF LLaVA parameters (``model.`` prefix or not) of a ``tower`` -> clip.cpp's mmproj
    tensors (f32).

    Raises:
        FormatError: a parameter the mmproj needs is missing.
    """
    sd = {k.removeprefix("model."): v for k, v in state.items()}
    out: dict[str, np.ndarray] = {}
    for hf, name in mmproj_names(n_layers, tower).items():
        if hf not in sd:
            raise FormatError(f"the LLaVA checkpoint has no {hf!r}: not a {tower.upper()} tower with an MLP "
                              "projector")
        out[name] = mmproj_transform(name, tower)(np.asarray(sd[hf], np.float32))
    return out


def mmproj_plan(cfg: Any) -> tuple[Tower, int, bool]:
    """What an mmproj of the LLaVA config ``cfg`` is: (tower, clip.cpp's feature layer,
    clip.use_gelu). Checked before anything is written.

    Raises:
        UsageError: a configuration clip.cpp's MLP path cannot run as HF does.
    """
    v = cfg.vision_config
    kind = getattr(v, "model_type", DEFAULT_TOWER_TYPE)
    if kind not in TOWERS:
        raise UsageError(f"mmproj export supports a CLIP or SigLIP vision tower, not {kind!r}")
    tower, strategy, acts = TOWERS[kind]
    if cfg.vision_feature_select_strategy != strategy:
        raise UsageError(f"vision_feature_select_strategy {cfg.vision_feature_select_strategy!r}: clip.cpp's "
                         f"MLP projector path runs a {tower.upper()} tower with {strategy!r} only")
    layer = cfg.vision_feature_layer
    n_layers = v.num_hidden_layers
    if not isinstance(layer, int):
        raise UsageError(f"vision_feature_layer {layer!r}: one layer only for an MLP mmproj")
    if not -n_layers - 1 <= layer <= n_layers:
        raise UsageError(f"vision_feature_layer {layer}: the tower has {n_layers} layers (hidden states "
                         f"{-n_layers - 1}..{n_layers})")
    act = getattr(v, "hidden_act", "quick_gelu")
    if act not in acts:
        raise UsageError(f"vision hidden_act {act!r}: clip.cpp runs {' or '.join(acts)} in a {tower.upper()} tower")
    if getattr(cfg, "projector_hidden_act", "gelu") != "gelu":
        raise UsageError(f"projector_hidden_act {cfg.projector_hidden_act!r}: clip.cpp's MLP projector runs GELU")
    if not getattr(cfg, "multimodal_projector_bias", True):
        raise UsageError("multimodal_projector_bias false: clip.cpp's MLP projector has biases (mm.0.bias, "
                         "mm.2.bias)")
    return tower, layer if layer >= 0 else n_layers + layer + 1, acts[act]


def write_mmproj(llava: Any, image_mean: list[float], image_std: list[float], out: str | Path,
                 dtype: MmprojDtype = "f32") -> dict[str, Any]:
    """Write ``llava`` (a transformers ``LlavaForConditionalGeneration``) as an mmproj GGUF.
    Matrices take ``dtype``; vectors, the patch kernel and the embeddings stay f32.

    Raises:
        UsageError: a configuration clip.cpp's MLP path cannot run.
    """
    import gguf

    cfg = llava.config
    v = cfg.vision_config
    tower, feature_layer, use_gelu = mmproj_plan(cfg)
    n_layers = v.num_hidden_layers
    tensors = mmproj_tensors({k: t.detach().float().cpu().numpy() for k, t in llava.state_dict().items()},
                             n_layers, tower)
    w = gguf.GGUFWriter(str(out), MMPROJ_ARCH)
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    w.add_clip_has_vision_encoder(True)
    w.add_bool("clip.has_llava_projector", True)
    w.add_clip_projector_type("mlp")
    w.add_vision_image_size(v.image_size)
    w.add_vision_patch_size(v.patch_size)
    w.add_vision_embedding_length(v.hidden_size)
    w.add_vision_feed_forward_length(v.intermediate_size)
    w.add_vision_projection_dim(cfg.text_config.hidden_size)
    w.add_vision_block_count(n_layers)
    w.add_vision_head_count(v.num_attention_heads)
    w.add_vision_attention_layernorm_eps(v.layer_norm_eps)
    w.add_vision_image_mean([float(x) for x in image_mean])
    w.add_vision_image_std([float(x) for x in image_std])
    w.add_vision_use_gelu(use_gelu)
    w.add_array("clip.vision.feature_layer", [feature_layer])
    for name, arr in tensors.items():
        matrix = arr.ndim == 2 and name not in ("v.position_embd.weight",)
        w.add_tensor(name, arr.astype(np.float16) if dtype == "f16" and matrix else arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"path": str(out), "bytes": Path(out).stat().st_size, "tensors": len(tensors), "dtype": dtype,
            "feature_layer": feature_layer, "tower": tower}


MMPROJ_TOLERANCE = {"f32": 0.02, "f16": 0.05}  # max |clip.cpp - torch| / std, clip.cpp's token order
VALIDATION_IMAGES = 8


def clip_order(n_patches: int, tower: Tower = "clip") -> list[int]:
    """Which of HF's vision hidden states clip.cpp's LLaVA graph hands the language model,
    in order. CLIP ([CLS, patch 0 ..]): patches 1 .. n-1, then CLS (module docstring);
    SigLIP: every patch, in order, as HF."""
    return list(range(n_patches)) if tower == "siglip" else [*range(2, n_patches + 1), 0]


def export_mmproj(loaded: Any, language_gguf: Path, out: Path, dtype: MmprojDtype = "f32",
                  validate: bool = True, tolerance: float | None = None) -> dict[str, Any]:
    """Write ``loaded`` (a LLaVA :class:`~cdcca_edge.converters.hf.LoadedModel`)'s vision
    side as an mmproj beside its exported language GGUF, and validate the pair on
    llama.cpp: clip.cpp's image embeddings against torch's, token by token in clip.cpp's
    order (gated), and the greedy answers on validation images (reported).

    Raises:
        UsageError: not a LLaVA model, or a dtype we do not write.
        ValidationError: the embeddings differ beyond the tolerance (nothing is kept).
    """
    import os
    import tempfile

    import torch

    from cdcca_edge.converters.llava_export import multimodal_info, torch_greedy, validation_images
    from cdcca_edge.core.bundle import QUESTION_FIELD
    from cdcca_edge.core.errors import ValidationError
    from cdcca_edge.core.fileio import commit_file
    from cdcca_edge.runtime.base import GenerationConfig
    from cdcca_edge.runtime.mtmd import MtmdModel

    if dtype not in MMPROJ_DTYPES:
        raise UsageError(f"--mmproj-dtype {dtype!r}: f32 or f16")
    llava = loaded.model
    if getattr(llava.config, "model_type", "") != "llava":
        raise UsageError("--mmproj needs a LLaVA model (config.json model_type 'llava')")
    size = int(llava.config.vision_config.image_size)
    info = multimodal_info(llava, loaded.source_dir, size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        doc = write_mmproj(llava, info["image_mean"], info["image_std"], tmp, dtype)
        report: dict[str, Any] | None = None
        if validate:
            tol = MMPROJ_TOLERANCE[dtype] if tolerance is None else tolerance
            mean, std = np.asarray(info["image_mean"], np.float32), np.asarray(info["image_std"], np.float32)
            order = clip_order(int(llava.config.image_seq_length), doc["tower"])
            worst, same, images = 0.0, 0, validation_images(VALIDATION_IMAGES, size, seed=3)
            template = info["prompt_template"]
            questions = ["what colour is the shape?", "how many shapes are there?"]
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(loaded.source_dir)
            with MtmdModel(language_gguf, tmp) as m:
                for k, img in enumerate(images):
                    got = m.vision.encode(img)  # (N, D)
                    x = torch.from_numpy(((img.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)[None])
                    with torch.no_grad():
                        h = llava.model.vision_tower(x, output_hidden_states=True).hidden_states[
                            llava.config.vision_feature_layer][0]
                        want = llava.model.multi_modal_projector(h[torch.tensor(order)]).numpy()
                    worst = max(worst, float(np.abs(got - want).max() / want.std()))
                    prompt = template.replace(QUESTION_FIELD, questions[k % 2])
                    ans = m.generate(prompt, GenerationConfig(max_tokens=6), image_embeds=got, image=img).tokens
                    same += list(ans) == torch_greedy(llava, tok, prompt, img, mean.tolist(), std.tolist(), 6)
            report = {"normalized_diff": worst, "tolerance": tol, "passed": worst <= tol,
                      "answers_equal_torch": same / len(images), "answers_checked": len(images)}
            if worst > tol:
                raise ValidationError(f"{out}: clip.cpp's image embeddings differ from torch's by {worst:.3g} x std "
                                      f"(tolerance {tol}); the mmproj was not kept")
        commit_file(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {**doc, "path": str(out), "language": str(language_gguf), "validation": report}
