"""Tiny LLaVA-style models (transformers' ``LlavaForConditionalGeneration``: a CLIP (or
SigLIP) vision tower, a projector, a Llama or Qwen2 language model) built and trained
offline on the embedded shapes VQA task (``demo/scenes.py``).

A teacher and a student share one frozen vision tower, as the paper's device and cloud
models share one Q-Former: the teacher (and its tower) is trained first; the student
reuses the tower, frozen, and trains its own projector and language model.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import numpy as np

from cdcca_edge.demo.scenes import ANSWERS, IMAGE_SIZE, Example, dataset, prompt_for
from cdcca_edge.demo.tiny import EOS_TOKEN
from cdcca_edge.core.bundle import IMAGE_TOKEN
from cdcca_edge.converters.llava_export import CLIP_MEAN, CLIP_STD, PROMPT_TEMPLATE_FILE, PREPROCESSOR

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast



@dataclass(frozen=True)
class TinyLlavaSpec:
    """Shape and training of a tiny LLaVA model."""

    arch: Literal["llama", "qwen2"] = "llama"  # language model family
    hidden_size: int = 64  # language model width
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vision_hidden: int = 64  # vision tower width (shared by teacher and student)
    vision_layers: int = 2
    patch_size: int = 8  # 64x64 images -> 64 patches (+ CLS, dropped) = 64 image tokens
    # "siglip": a SigLIP tower (no CLS; LLaVA keeps every patch, "full"), which clip.cpp's
    # LLaVA graph runs token for token as HF does (converters/mmproj.py)
    vision_tower: Literal["clip", "siglip"] = "clip"
    domains: tuple[str, ...] = ("source",)  # scene domains it is trained on
    train_steps: int = 800
    batch_size: int = 32
    lr: float = 2e-3
    vision_pretrain_steps: int = 300  # the shared tower's own pretraining (teacher only)
    vision_pretrain_images: int = 2000  # its training set (fewer overfit: per-patch shape accuracy stalls)
    seed: int = 0


def vqa_tokenizer() -> "PreTrainedTokenizerFast":
    """A byte-level BPE tokenizer for the VQA prompts, with ``<image>`` as a special token."""
    from cdcca_edge.demo.scenes import PALETTE, SHAPES
    from cdcca_edge.demo.tiny import train_tokenizer

    texts = []
    for s in SHAPES:
        texts += [f"question: is there a {s}? answer: yes." , "question: how many shapes are there? answer: one."]
        texts += [f"question: what colour is the {s}? answer: {c}." for c in PALETTE]
        texts += [f"question: what shape is the {c} thing? answer: {s}." for c in PALETTE]
        texts += [f"question: is the {s} left of the {t}? answer: yes." for t in SHAPES]
    # answers repeated so that each becomes one token: the answer's first token then
    # carries the whole decision, which keeps accuracy and token-level KD aligned
    texts += [f"answer: {a}." for a in ANSWERS] * 40
    tok = train_tokenizer(texts * 20, vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def llava_config(spec: TinyLlavaSpec, tokenizer: Any) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, Qwen2Config, SiglipVisionConfig

    n_tokens = (IMAGE_SIZE // spec.patch_size) ** 2
    shape = dict(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 2,
                 num_hidden_layers=spec.vision_layers, num_attention_heads=4, image_size=IMAGE_SIZE,
                 patch_size=spec.patch_size)
    if spec.vision_tower == "siglip":
        # no pooling head: LLaVA reads the encoder's hidden states only
        vision = SiglipVisionConfig(**shape, vision_use_head=False)
    else:
        vision = CLIPVisionConfig(**shape, projection_dim=spec.vision_hidden)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=256, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    text = LlamaConfig(**common) if spec.arch == "llama" else Qwen2Config(**common, use_sliding_window=False)
    return LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1, image_seq_length=n_tokens,
        vision_feature_select_strategy="full" if spec.vision_tower == "siglip" else "default",
    )


def pixel_values(images: np.ndarray) -> Any:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 tensor, CLIP-normalised. The device runtime
    does the same in numpy (``runtime/multimodal.py``)."""
    import torch

    x = torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0).permute(0, 3, 1, 2)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def encode_examples(tokenizer: Any, examples: list[Example], n_image_tokens: int,
                    with_answer: bool = True) -> tuple[Any, Any, Any]:
    """input_ids (with the image token repeated as the model expects), attention mask, and
    labels on the answer only."""
    import torch

    seqs, labels = [], []
    eos = tokenizer.eos_token_id
    img = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for ex in examples:
        ids = tokenizer(prompt_for(ex.question, IMAGE_TOKEN))["input_ids"]
        i = ids.index(img)
        ids = ids[:i] + [img] * n_image_tokens + ids[i + 1 :]
        ans = tokenizer(" " + ex.question.answer + ".")["input_ids"] + [eos] if with_answer else []
        seqs.append(ids + ans)
        labels.append([-100] * len(ids) + ans)
    n = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), n), eos)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    lab = torch.full((len(seqs), n), -100)
    for k, (s, l_) in enumerate(zip(seqs, labels)):
        input_ids[k, : len(s)] = torch.tensor(s)
        mask[k, : len(s)] = 1
        lab[k, : len(l_)] = torch.tensor(l_)
    return input_ids, mask, lab


def build_tiny_llava(out_dir: str | Path, spec: TinyLlavaSpec, vision_from: str | Path | None = None,
                     progress: Callable[[int, int, float], None] | None = None) -> Path:
    """Build and train a tiny LLaVA on the shapes task; with ``vision_from`` (a teacher's
    directory), reuse its vision tower, frozen. Deterministic for a spec."""
    import torch
    from transformers import LlavaForConditionalGeneration

    out_dir = Path(out_dir)
    torch.manual_seed(spec.seed)
    tok = vqa_tokenizer()
    cfg = llava_config(spec, tok)
    model = LlavaForConditionalGeneration(cfg)
    if vision_from is not None:
        teacher = LlavaForConditionalGeneration.from_pretrained(vision_from)
        model.model.vision_tower.load_state_dict(teacher.model.vision_tower.state_dict())
    else:
        pretrain_vision(model.model.vision_tower, spec)
    # the tower stays frozen in both models: what the device uploads (its output tokens)
    # then means the same to teacher and student
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    data = dataset(max(2000, spec.train_steps * 4), seed=spec.seed + 17, domains=spec.domains)
    n_img = cfg.image_seq_length
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=max(1, spec.train_steps))
    rng = random.Random(spec.seed)
    model.train()
    for step in range(spec.train_steps):
        batch = rng.sample(data, spec.batch_size)
        ids, mask, labels = encode_examples(tok, batch, n_img)
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values(np.stack([e.image for e in batch])),
                     labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if progress:
            progress(step + 1, spec.train_steps, float(loss.detach()))
    model.eval()
    model.generation_config.do_sample = False
    model.generation_config.pad_token_id = tok.eos_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    (out_dir / "tiny_llava_spec.json").write_text(json.dumps(asdict(spec), indent=1) + "\n")
    (out_dir / PROMPT_TEMPLATE_FILE).write_text(prompt_for("{question}", IMAGE_TOKEN) + "\n")
    (out_dir / PREPROCESSOR).write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": False, "do_center_crop": False,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    }, indent=1) + "\n")
    return out_dir


def patch_labels(ex: Example, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Per patch (grid*grid,): the shape at its centre (0 = background, 1 + SHAPES index)
    and its colour (0 = background, 1 + PALETTE index)."""
    from cdcca_edge.demo.scenes import PALETTE, SHAPES

    centre = (np.arange(grid) + 0.5) / grid
    shape = np.zeros((grid, grid), np.int64)
    colour = np.zeros((grid, grid), np.int64)
    for t in ex.things:
        inside = (np.abs(centre[None, :] - t.x) <= t.size) & (np.abs(centre[:, None] - t.y) <= t.size)
        shape[inside] = 1 + SHAPES.index(t.shape)
        colour[inside] = 1 + list(PALETTE).index(t.colour)
    return shape.reshape(-1), colour.reshape(-1)


def pretrain_vision(tower: Any, spec: TinyLlavaSpec) -> None:
    """Pretrain the vision tower on every domain with dense per-patch labels (what shape,
    what colour), as real vision towers come pretrained (CLIP) before any LLaVA training:
    a tower trained from scratch through a tiny language model learns far too slowly."""
    import torch

    from cdcca_edge.demo.scenes import DOMAINS, PALETTE, SHAPES

    grid = IMAGE_SIZE // spec.patch_size
    data = dataset(spec.vision_pretrain_images, seed=spec.seed + 5, domains=DOMAINS)
    labels = [patch_labels(e, grid) for e in data]
    n_s, n_c = 1 + len(SHAPES), 1 + len(PALETTE)
    head = torch.nn.Linear(tower.config.hidden_size, n_s + n_c)
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=spec.lr)
    # one cycle: at the same steps, per-patch shape accuracy 0.87 against 0.84 at a constant rate
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=max(1, spec.vision_pretrain_steps))
    rng = random.Random(spec.seed + 5)
    tower.train()
    for _ in range(spec.vision_pretrain_steps):
        idx = rng.sample(range(len(data)), spec.batch_size)
        h = tower(pixel_values(np.stack([data[i].image for i in idx]))).last_hidden_state  # (B, [1 +] N, Dv)
        if spec.vision_tower == "clip":  # CLIP's last state has CLS first and no final norm
            h = tower.vision_model.post_layernorm(h[:, 1:])
        o = head(h)  # (B, N, n_s + n_c)
        s = torch.from_numpy(np.stack([labels[i][0] for i in idx]))
        c = torch.from_numpy(np.stack([labels[i][1] for i in idx]))
        loss = (torch.nn.functional.cross_entropy(o[..., :n_s].reshape(-1, n_s), s.reshape(-1))
                + torch.nn.functional.cross_entropy(o[..., n_s:].reshape(-1, n_c), c.reshape(-1)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    tower.eval()


def answer(model: Any, tokenizer: Any, examples: list[Example], max_new_tokens: int = 6,
           batch_size: int = 64) -> list[str]:
    """Greedy one-word answers of a torch LLaVA (the reference for runtime parity), in
    left-padded batches: the padding is masked and the positions count from each prompt's
    first real token, so each answer is the one the prompt alone would get."""
    import torch

    n_img = model.config.image_seq_length
    eos = tokenizer.eos_token_id
    outs: list[str] = []
    for k in range(0, len(examples), batch_size):
        part = examples[k : k + batch_size]
        ids, mask, _ = encode_examples(tokenizer, part, n_img, with_answer=False)  # right-padded
        lengths = mask.sum(1)
        width = int(lengths.max())
        left_ids = torch.full((len(part), width), eos)
        left_mask = torch.zeros((len(part), width), dtype=torch.long)
        for b, n in enumerate(lengths.tolist()):
            left_ids[b, width - n :] = ids[b, :n]
            left_mask[b, width - n :] = 1
        with torch.no_grad():
            gen = model.generate(input_ids=left_ids, attention_mask=left_mask,
                                 pixel_values=pixel_values(np.stack([e.image for e in part])),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=eos)
        outs += [first_word(tokenizer.decode(g[width:], skip_special_tokens=True)) for g in gen]
    return outs


def first_word(text: str) -> str:
    words = text.replace(".", " ").split()
    return words[0] if words else ""


def accuracy(predictions: list[str], examples: list[Example]) -> float:
    return float(np.mean([p == e.question.answer for p, e in zip(predictions, examples)])) if examples else 0.0


__all__ = ["ANSWERS", "EOS_TOKEN", "IMAGE_TOKEN", "TinyLlavaSpec", "accuracy", "answer", "build_tiny_llava",
           "encode_examples", "first_word", "llava_config", "pixel_values", "vqa_tokenizer"]
