"""LLaVA-style HF model -> multimodal bundle: a vision part (ONNX: vision tower, feature
selection and projector) and a language part (GGUF, or ONNX taking ``inputs_embeds``),
under one manifest (docs/formats/artifact.md, section 6).

The vision part outputs both the vision tower's selected tokens (``image_features``: what
UTS scores and uploads, meaningful to any model sharing the tower) and their projection
into the language model (``image_embeds``: what the device feeds its language model).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cdcca_edge import __version__
from cdcca_edge.core import artifact as art
from cdcca_edge.core.bundle import (
    DEFAULT_PROMPT_TEMPLATE,
    LANGUAGE_PART,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    VISION_PART,
    Multimodal,
)
from cdcca_edge.core.errors import FormatError, ValidationError, require
from cdcca_edge.core.fileio import replace_dir

PREPROCESSOR = "preprocessor_config.json"
# the prompt the model was trained on, ``{question}`` standing for the question; a model
# directory may give its own in this file (LLaVA-1.5's convention is the default)
PROMPT_TEMPLATE_FILE = "prompt_template.txt"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation, when the model
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # directory has no preprocessor config
# vision part: max |onnx - torch| / std(torch) for image embeddings and features
VISION_TOLERANCE = 1e-3


def is_llava(model_dir: Path) -> bool:
    from cdcca_edge.converters.hf import model_type_of

    try:
        return model_type_of(Path(model_dir)) == "llava"
    except FormatError:
        return False


class VisionWrapper:
    """Module computing (image_features, image_embeds) from pixel values; attribute names
    match the HF model's, so ONNX initializers keep HF parameter names."""

    @staticmethod
    def build(llava: Any) -> Any:
        import torch

        class _Vision(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = torch.nn.Module()
                self.model.vision_tower = llava.model.vision_tower
                self.model.multi_modal_projector = llava.model.multi_modal_projector
                self.layer = llava.config.vision_feature_layer
                self.strategy = llava.config.vision_feature_select_strategy

            def forward(self, pixel_values: Any) -> tuple[Any, Any]:
                out = self.model.vision_tower(pixel_values, output_hidden_states=True)
                feats = out.hidden_states[self.layer]  # (B, 1 + N, Dv)
                if self.strategy == "default":
                    feats = feats[:, 1:]  # drop CLS: (B, N, Dv)
                return feats, self.model.multi_modal_projector(feats)  # (B, N, Dv), (B, N, D)

        return _Vision().eval()


def language_model_dir(llava: Any, tokenizer: Any, out: Path) -> Path:
    """The language model alone, as an HF causal LM directory (exportable like any other)."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = llava.config.text_config
    lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    sd = {}
    for k, v in llava.state_dict().items():
        if k.startswith("model.language_model."):
            sd["model." + k[len("model.language_model."):]] = v
        elif k == "lm_head.weight":
            sd[k] = v
    missing, unexpected = lm.load_state_dict(sd, strict=False)
    if [m for m in missing if not (m == "lm_head.weight" and cfg.tie_word_embeddings)] or unexpected:
        raise FormatError(f"language model weights do not fit: missing {missing}, unexpected {unexpected}")
    lm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_vision_onnx(llava: Any, out_dir: Path, image_size: int, stage: Callable[[str], None]) -> str:
    """Export the vision part; returns its identity."""
    torch = require("torch", "cloud")
    onnx = require("onnx", "export")
    from onnx import numpy_helper

    from cdcca_edge.converters.onnx_export import name_initializers
    from cdcca_edge.core.onnx_proto import ONNX_DTYPES

    out_dir.mkdir(parents=True, exist_ok=True)
    wrapper = VisionWrapper.build(llava)
    dummy = torch.zeros(1, 3, image_size, image_size)
    stage("exporting the vision part to ONNX")
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "vision.onnx"
        torch.onnx.export(wrapper, (dummy,), str(path), input_names=["pixel_values"],
                          output_names=["image_features", "image_embeds"], opset_version=17,
                          dynamic_axes={"pixel_values": {0: "batch"}, "image_features": {0: "batch"},
                                        "image_embeds": {0: "batch"}}, dynamo=False)
        model = onnx.load(str(path), load_external_data=True)
    sd = {k: v.detach().float().numpy() for k, v in wrapper.state_dict().items()}
    stored_t = name_initializers(model.graph, sd)
    entries = []
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        entries.append((init.name, ONNX_DTYPES.get(init.data_type, (f"ONNX{init.data_type}", 0))[0],
                        tuple(arr.shape), art.bytes_digest(arr)))
    identity = art.identity_digest(entries)
    del model.metadata_props[:]
    for k, v in {art.META_VERSION: __version__, art.META_EXPORT_IDENTITY: identity,
                 art.META_TRANSPOSED: json.dumps(stored_t)}.items():
        e = model.metadata_props.add()
        e.key, e.value = k, v
    onnx.save_model(model, str(out_dir / art.ONNX_MODEL_NAME), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=art.ONNX_DATA_NAME, size_threshold=0)
    return identity


def embeds_input_surgery(model_path: Path) -> None:
    """Make an optimum decoder take ``inputs_embeds`` instead of ``input_ids``: the graph's
    token-embedding Gather is removed and its output becomes a graph input. The embedding
    table stays in the external data (the runtime embeds text tokens with it)."""
    onnx = require("onnx", "export")
    from onnx import TensorProto, helper

    model = onnx.load(str(model_path), load_external_data=False)
    g = model.graph
    gathers = [n for n in g.node if n.op_type == "Gather" and "input_ids" in n.input]
    uses = [n for n in g.node if "input_ids" in n.input]
    if len(gathers) != 1 or len(uses) != 1:
        raise FormatError(f"{model_path}: expected input_ids to feed one embedding Gather only")
    gather = gathers[0]
    table = next(i for i in g.initializer if i.name == gather.input[0])
    hidden = int(table.dims[1])
    out = gather.output[0]
    for n in g.node:
        for k, name in enumerate(n.input):
            if name == out:
                n.input[k] = "inputs_embeds"
    g.node.remove(gather)
    ids_input = next(i for i in g.input if i.name == "input_ids")
    g.input.remove(ids_input)
    g.input.insert(0, helper.make_tensor_value_info(
        "inputs_embeds", TensorProto.FLOAT, ["batch_size", "sequence_length", hidden]))
    onnx.save_model(model, str(model_path))  # data stays in the external file


def multimodal_info(llava: Any, model_dir: Path, image_size: int) -> dict[str, Any]:
    """The manifest's ``multimodal`` section: what the device needs to feed images."""
    pre = _read_json(model_dir / PREPROCESSOR)
    template = model_dir / PROMPT_TEMPLATE_FILE
    return Multimodal(
        image_token_id=int(llava.config.image_token_index),
        image_seq_length=int(llava.config.image_seq_length),
        image_size=image_size,
        image_mean=tuple(float(v) for v in pre.get("image_mean", CLIP_MEAN)),  # type: ignore[arg-type]
        image_std=tuple(float(v) for v in pre.get("image_std", CLIP_STD)),  # type: ignore[arg-type]
        vision_feature_dim=int(llava.config.vision_config.hidden_size),
        hidden_size=int(llava.config.text_config.hidden_size),
        prompt_template=template.read_text().strip("\n") if template.is_file() else DEFAULT_PROMPT_TEMPLATE,
    ).to_json()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def write_bundle(loaded: Any, out_dir: Path, fmt: str, quant: str, stage: Callable[[str], None]) -> str:
    """Write the bundle into ``out_dir`` (empty); returns the bundle's identity."""
    from cdcca_edge.converters.gguf_export import write_gguf
    from cdcca_edge.converters.hf import load_for_export
    from cdcca_edge.converters.onnx_export import write_onnx

    llava, tok = loaded.model, loaded.tokenizer
    image_size = int(llava.config.vision_config.image_size)
    write_vision_onnx(llava, out_dir / VISION_PART, image_size, stage)
    with tempfile.TemporaryDirectory() as tmp:
        lm_dir = language_model_dir(llava, tok, Path(tmp) / "lm")
        lm = load_for_export(lm_dir)
        lm.source_digest = loaded.source_digest
        if fmt == "gguf":
            stage(f"writing the language part as GGUF ({quant})")
            write_gguf(lm, out_dir / f"{LANGUAGE_PART}.gguf", quant)
            lang_path = f"{LANGUAGE_PART}.gguf"
        else:
            stage("writing the language part as ONNX")
            write_onnx(lm, out_dir / LANGUAGE_PART, progress=stage)
            embeds_input_surgery(out_dir / LANGUAGE_PART / art.ONNX_MODEL_NAME)
            lang_path = LANGUAGE_PART
    tok.save_pretrained(out_dir / "tokenizer")
    (out_dir / MANIFEST_NAME).write_text(json.dumps({
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
        "parts": [{"name": VISION_PART, "path": VISION_PART}, {"name": LANGUAGE_PART, "path": lang_path}],
        "multimodal": multimodal_info(llava, loaded.source_dir, image_size),
        "provenance": {art.META_VERSION: __version__, art.META_SOURCE_DIGEST: loaded.source_digest,
                       art.META_QUANT: quant, art.META_ARCH: "llava"},
    }, indent=1) + "\n")
    return art.compute_identity(art.open_artifact(out_dir)).digest


VALIDATION_QUESTIONS = ("what colour is the triangle?", "how many circles are there?",
                        "is the square left of the circle?", "what is in the picture?")


def validation_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8: smooth colour fields with a few bright rectangles."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), np.uint8)
    for k in range(n):
        base = 0.5 + 0.3 * np.sin(rng.uniform(2, 9) * xx + rng.uniform(0, 6))[..., None] * rng.uniform(-1, 1, 3)
        for _ in range(3):
            x0, y0 = rng.integers(0, size * 3 // 4, 2)
            w = rng.integers(size // 8, size // 3)
            base[y0 : y0 + w, x0 : x0 + w] = rng.uniform(0, 1, 3)
        out[k] = (np.clip(base, 0, 1) * 255).astype(np.uint8)
    return out


def torch_greedy(llava: Any, tokenizer: Any, prompt: str, image: np.ndarray, mean: Any, std: Any,
                 max_new_tokens: int) -> list[int]:
    """The torch model's greedy answer tokens (the runtime's reference)."""
    import torch

    ids = tokenizer(prompt)["input_ids"]
    img = int(llava.config.image_token_index)
    k = ids.index(img)
    ids = ids[:k] + [img] * int(llava.config.image_seq_length) + ids[k + 1 :]
    x = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        gen = llava.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             pixel_values=x.float(), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=eos)
    out = gen[0, len(ids):].tolist()
    return out[: out.index(eos) + 1] if eos in out else out


def validate_bundle(bundle: Path, loaded: Any, fmt: str, quant: str, tolerance: float | None,
                    n_images: int = 4) -> dict[str, Any]:
    """Each part against torch: the vision outputs on generated images, the language
    model's logits on text (the export validation), and whole image questions answered
    through the runtime, token for token."""
    import torch

    from cdcca_edge.converters.validate import TOLERANCES, validate_export
    from cdcca_edge.runtime.base import GenerationConfig
    from cdcca_edge.runtime.multimodal import MultimodalModel

    llava, tok = loaded.model, loaded.tokenizer
    report: dict[str, Any] = {}
    with MultimodalModel(bundle, backend="llama" if fmt == "gguf" else "onnx") as mm:
        info = mm.info
        images = validation_images(n_images, info.image_size)
        x = torch.from_numpy(np.stack([mm.preprocess(im)[0] for im in images]))
        with torch.no_grad():
            ref_f, ref_e = VisionWrapper.build(llava)(x)
        diffs = []
        for k, im in enumerate(images):
            f, e = mm.encode_image(im)
            diffs.append(max(np.abs(f - ref_f[k].numpy()).max() / ref_f.std().item(),
                             np.abs(e - ref_e[k].numpy()).max() / ref_e.std().item()))
        vis = float(max(diffs))
        report["vision"] = {"normalized_diff": vis, "tolerance": VISION_TOLERANCE}
        if vis > VISION_TOLERANCE:
            raise ValidationError(f"{bundle}: the vision part disagrees with torch ({vis:.3g} x std, "
                                  f"tolerance {VISION_TOLERANCE}); the export was not kept")
        same = total = 0
        for k, im in enumerate(images):
            for q in VALIDATION_QUESTIONS[: 2 if k else None]:
                prompt = mm.prompt(q)
                want = torch_greedy(llava, tok, prompt, im, list(info.image_mean), list(info.image_std), 6)
                got = mm.generate(prompt, GenerationConfig(max_tokens=6), image=im).tokens
                total += 1
                same += got == want  # both end with EOS when the answer does
        report["answers_equal_torch"] = same / total
        report["answers_checked"] = total
    with tempfile.TemporaryDirectory() as tmp:
        from cdcca_edge.converters.hf import load_for_export

        lm = load_for_export(language_model_dir(llava, tok, Path(tmp) / "lm"))
        if fmt == "gguf":
            report["language"] = validate_export(bundle / f"{LANGUAGE_PART}.gguf", lm, "gguf", quant,
                                                 tolerance=tolerance).as_dict()
        else:
            report["language"] = _validate_onnx_embeds(bundle / LANGUAGE_PART, lm,
                                                       tolerance or TOLERANCES[("onnx", "f32")])
    # float artefacts answer exactly as torch does; quantised ones are held to the
    # language part's logit tolerance above (their greedy answers may differ)
    if (fmt == "onnx" or quant in ("f32", "f16")) and same != total:
        raise ValidationError(f"{bundle}: {total - same} of {total} image questions are answered "
                              "differently from torch; the export was not kept")
    return report


def _validate_onnx_embeds(path: Path, lm: Any, tolerance: float) -> dict[str, Any]:
    """Logits of the inputs_embeds ONNX language model against torch on text prompts."""
    import torch

    from cdcca_edge.converters.validate import VALIDATION_PROMPTS
    from cdcca_edge.runtime import load

    diffs, refs = [], []
    with load(path, backend="onnx") as m:
        for p in VALIDATION_PROMPTS:
            ids = list(lm.tokenizer(p)["input_ids"])
            got = m.prompt_logits(ids)
            with torch.no_grad():
                ref = lm.model(torch.tensor([ids])).logits[0].numpy()
            diffs.append(float(np.abs(got - ref).max()))
            refs.append(ref)
    std = float(np.concatenate([r.ravel() for r in refs]).std())
    norm = max(diffs) / std
    if norm > tolerance:
        raise ValidationError(f"{path}: the language part disagrees with torch ({norm:.3g} x std)")
    return {"max_abs_diff": max(diffs), "normalized_diff": norm, "tolerance": tolerance, "passed": True}


def export_llava(loaded: Any, out: Path, fmt: str, quant: str, validate: bool, tolerance: float | None,
                 stage: Callable[[str], None]) -> tuple[str, dict[str, Any] | None]:
    """Write, validate, then move the bundle into place. Returns (identity, validation)."""

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        identity = write_bundle(loaded, tmp, fmt, quant, stage)
        report = None
        if validate:
            stage("validating the bundle against torch")
            report = validate_bundle(tmp, loaded, fmt, quant, tolerance)
        from cdcca_edge.core.state import record_export

        record_export(art.open_artifact(tmp), identity)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)
    return identity, report
