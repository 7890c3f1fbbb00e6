"""AKD on visual tokens: distil a LLaVA teacher into a LLaVA student from uplink bundles
that carry only part of each image (the kept vision-tower tokens and their positions).

Both models share the frozen vision tower, so the uploaded tokens mean the same to both;
each feeds them through its own projector. Dropped tokens are **masked**: their positions
keep their place in the sequence (positions are counted as on the device, which sees whole
images) but no other position attends to them, in the teacher and the student alike
(docs/akd.md, "Visual tokens"). Losses, as for text (``cloud/akd.py``): cross-entropy on
the teacher's pseudo-labels, logit KD on the answer positions, and feature KD between the
student's and the teacher's projected visual tokens through a learned linear aligner.
LoRA goes on the language model and the projector only; the tower stays frozen.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cdcca_edge.cloud.akd import (AKDConfig, kd_divergence, make_accelerator, teacher_confidence, train_loop,
                                  weighted_mean)
from cdcca_edge.core import uplink_format as U
from cdcca_edge.core.errors import FormatError, UsageError, require

# language model and projector linears; the vision tower (CLIP/SigLIP q/k/v/out_proj) never
LORA_TARGET_REGEX = (r".*(language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
                     r"|multi_modal_projector\.linear_[12])")
# files a LLaVA model directory carries besides weights (copied next to a merged model)


@dataclass
class VisualSample:
    """One uploaded image question, as training needs it."""

    id: str
    prompt_ids: list[int]  # with one image token where the image goes
    tokens: np.ndarray  # (k, Dv) float32: the kept vision-tower tokens
    positions: np.ndarray  # (k,) int: their indices among the image's N tokens
    n_tokens: int  # N
    device_answer: list[int] = field(default_factory=list)
    teacher_answer: list[int] = field(default_factory=list)


def read_visual_samples(bundles: Sequence[str | Path], vocab_size: int | None = None,
                        context: int | None = None, answer_tokens: int = 0, image_token: int | None = None,
                        vision_width: int | None = None) -> list[VisualSample]:
    """The image samples of uplink bundles (samples without visual tokens are skipped),
    checked before any training as :func:`cloud.akd.read_samples` checks text samples.

    Args:
        vocab_size, context, answer_tokens: as for ``read_samples``; a prompt counts its
            image's ``n_visual_tokens`` tokens in place of the image token.
        image_token: the student's image token id: each prompt must hold it exactly once.
        vision_width: the vision tower's width: the uploaded tokens' last dimension.

    Raises:
        FormatError: a malformed bundle or a sample that does not fit the student.
        UsageError: no sample has visual tokens.
    """
    from cdcca_edge.cloud.akd import check_sample_tokens
    from cdcca_edge.core.uplink_format import dequantize_tokens, read_uplink

    out = []
    total = 0
    for i, path in enumerate(bundles):
        for s in read_uplink(path).samples():
            a = s.arrays
            if U.VISUAL_FEATURES not in a:
                continue
            where = f"{path}: sample {s.id!r}"
            if U.VISUAL_POSITIONS not in a or U.PROMPT_IDS not in a or U.N_VISUAL_TOKENS not in s.meta:
                raise FormatError(f"{where} has visual tokens without positions, prompt_ids or "
                                  "n_visual_tokens; collect the bundle again with `cdcca-edge uplink collect`")
            # the reader checks dtypes, shapes, finite values, and positions ascending and < n
            prompt = a[U.PROMPT_IDS]  # (T_p,) u32
            answer = a.get(U.ANSWER_IDS)  # (T_a,) u32
            n = int(s.meta[U.N_VISUAL_TOKENS])
            # the image token stands for the image's n positions
            total = check_sample_tokens(path, where, prompt, answer, len(prompt) - 1 + n, answer_tokens,
                                        context, vocab_size, total)
            if image_token is not None and int((prompt == image_token).sum()) != 1:
                raise FormatError(f"{where}: its prompt has {int((prompt == image_token).sum())} image tokens "
                                  f"(id {image_token}), expected 1; distil the bundle into the student its "
                                  "device runs, or collect it again")
            width = a[U.VISUAL_FEATURES].shape[1]
            if vision_width is not None and width != vision_width:
                raise FormatError(f"{where}: visual tokens of width {width}, the student's vision tower gives "
                                  f"{vision_width}; distil the bundle into the student its device runs")
            tokens = (dequantize_tokens(a[U.VISUAL_FEATURES], a[U.VISUAL_SCALES]) if U.VISUAL_SCALES in a
                      else np.asarray(a[U.VISUAL_FEATURES], np.float32))
            pos = np.asarray(a[U.VISUAL_POSITIONS], np.int64)
            if not np.isfinite(tokens).all():
                raise FormatError(f"{where}: visual tokens overflow float32; collect the bundle again")
            out.append(VisualSample(f"{i}:{s.id}", prompt.tolist(), tokens, pos, n,
                                    [] if answer is None else answer.tolist()))
    if not out:
        raise UsageError("the bundles hold no samples with visual tokens: nothing to distil")
    return out


def build_inputs(model: Any, batch: list[VisualSample], answers: list[list[int]], pad: int) -> dict[str, Any]:
    """inputs_embeds (B, T, D), attention_mask (B, T) with dropped image tokens masked,
    position_ids (B, T), the projected visual tokens (B, N, D) and their keep mask (B, N),
    and the answer mask (B, T): 1 where the position predicts an answer token."""
    import torch

    img_id = int(model.config.image_token_index)
    emb = model.get_input_embeddings()
    seqs, img_at = [], []
    for s, ans in zip(batch, answers):
        if s.prompt_ids.count(img_id) != 1:
            raise FormatError(f"sample {s.id}: its prompt has {s.prompt_ids.count(img_id)} image tokens; expected 1")
        k = s.prompt_ids.index(img_id)
        seqs.append(s.prompt_ids[:k] + [pad] * s.n_tokens + s.prompt_ids[k + 1 :] + ans)
        img_at.append(k)
    T = max(len(q) for q in seqs)
    N = max(s.n_tokens for s in batch)
    dv = batch[0].tokens.shape[-1]
    ids = torch.full((len(batch), T), pad)
    mask = torch.zeros((len(batch), T))
    ans_mask = torch.zeros((len(batch), T))
    feats = torch.zeros((len(batch), N, dv))
    keep = torch.zeros((len(batch), N))
    for b, (s, q, ans) in enumerate(zip(batch, seqs, answers)):
        ids[b, : len(q)] = torch.tensor(q)
        mask[b, : len(q)] = 1
        mask[b, img_at[b] : img_at[b] + s.n_tokens] = 0
        pos = torch.from_numpy(s.positions)
        mask[b, img_at[b] + pos] = 1  # the kept image tokens
        feats[b, pos] = torch.from_numpy(s.tokens)
        keep[b, pos] = 1
        end = len(q) - 1  # position t predicts token t + 1
        ans_mask[b, end - len(ans) : end] = 1
    projected = model.model.multi_modal_projector(feats)  # (B, N, D)
    x = emb(ids).clone()  # (B, T, D)
    for b, s in enumerate(batch):
        x[b, img_at[b] : img_at[b] + s.n_tokens] = projected[b, : s.n_tokens]
    positions = torch.arange(T).unsqueeze(0).expand(len(batch), T)
    return {"inputs_embeds": x, "attention_mask": mask.long(), "position_ids": positions, "ids": ids,
            "projected": projected, "keep": keep, "answer_mask": ans_mask}


def greedy(model: Any, batch: list[VisualSample], max_new: int, eos: int) -> list[list[int]]:
    """Greedy answers from partial images (no KV cache: answers are a few tokens)."""
    import torch

    answers: list[list[int]] = [[] for _ in batch]
    done = [False] * len(batch)
    for _ in range(max_new):
        with torch.no_grad():
            inp = build_inputs(model, batch, answers, eos)
            logits = model(inputs_embeds=inp["inputs_embeds"], attention_mask=inp["attention_mask"],
                           position_ids=inp["position_ids"]).logits
        for b, s in enumerate(batch):
            if done[b]:
                continue
            last = int(inp["attention_mask"][b].nonzero().max())  # last real position
            t = int(logits[b, last].argmax())
            answers[b].append(t)
            done[b] = t == eos
        if all(done):
            break
    return answers


def answer_accuracy(model: Any, samples: list[VisualSample], eos: int) -> float:
    """Fraction whose first answer token matches the teacher's (answers are one word)."""
    if not samples:
        return 0.0
    got = []
    for k in range(0, len(samples), 32):
        got += greedy(model, samples[k : k + 32], 1, eos)
    return float(np.mean([g[:1] == s.teacher_answer[:1] for g, s in zip(got, samples)]))


@dataclass
class MultimodalDistillReport:
    n_train: int
    n_holdout: int
    steps: int
    seconds: float
    trainable_params: int
    kept_token_fraction: float
    losses: list[dict[str, float]]
    agreement_before: dict[str, float]
    agreement_after: dict[str, float]
    output: str
    merged: str | None
    processes: int = 1  # data-parallel processes (`accelerate launch --num_processes`)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def distill_multimodal(teacher_dir: str | Path, student_dir: str | Path, bundles: Sequence[str | Path],
                       out_dir: str | Path, config: AKDConfig = AKDConfig(), merge: bool = True,
                       progress: Callable[[str, int, int], None] | None = None) -> MultimodalDistillReport:
    """:func:`cdcca_edge.cloud.akd.distill` for LLaVA teacher and student (it calls this):
    distil from the image samples of ``bundles``; writes the LoRA adapter to ``out_dir``
    and, with ``merge``, the merged student (a LLaVA directory) to ``out_dir/merged``."""
    torch = require("torch", "cloud")
    transformers = require("transformers", "cloud")
    peft = require("peft", "cloud")
    accelerate = require("accelerate", "cloud")
    t0 = time.perf_counter()
    tick = progress or (lambda _s, _i, _n: None)
    out_dir = Path(out_dir)
    torch.manual_seed(config.seed)
    accelerator = make_accelerator(accelerate)
    if config.adapter != "lora":
        raise UsageError("multimodal distillation supports the lora adapter")

    # the bundles first: a bad one is refused before any model is loaded
    s_cfg = transformers.AutoConfig.from_pretrained(student_dir)
    layers = s_cfg.vision_feature_layer  # the projector reads these tower layers, concatenated
    samples = read_visual_samples(
        bundles, vocab_size=s_cfg.text_config.vocab_size,
        context=getattr(s_cfg.text_config, "max_position_embeddings", None),
        answer_tokens=config.max_new_tokens, image_token=int(s_cfg.image_token_index),
        vision_width=s_cfg.vision_config.hidden_size * (len(layers) if isinstance(layers, (list, tuple)) else 1))
    Llava = transformers.LlavaForConditionalGeneration
    teacher = Llava.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    student = Llava.from_pretrained(student_dir, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(student_dir)
    if (teacher.config.image_token_index != student.config.image_token_index
            or teacher.config.vision_config.hidden_size != student.config.vision_config.hidden_size):
        raise UsageError("teacher and student do not share a vision tower layout and image token; "
                         "AKD on visual tokens needs the shared tower")
    for p in teacher.parameters():
        p.requires_grad_(False)
    eos = int(tok.eos_token_id)

    tick("pseudo-labels", 0, len(samples))
    for k in range(0, len(samples), 32):
        part = samples[k : k + 32]
        for s, a in zip(part, greedy(teacher, part, config.max_new_tokens, eos)):
            s.teacher_answer = a if a and a[-1] == eos else a + [eos]
    order = list(range(len(samples)))
    random.Random(config.seed).shuffle(order)
    n_hold = int(round(len(samples) * config.holdout))
    hold = [samples[i] for i in order[:n_hold]]
    train = [samples[i] for i in order[n_hold:]] or hold
    before = {"bundle": answer_accuracy(student, train, eos), "holdout": answer_accuracy(student, hold, eos)}

    lcfg = peft.LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=LORA_TARGET_REGEX,
                           lora_dropout=0.0, bias="none")
    model = peft.get_peft_model(student, lcfg)
    d_s, d_t = student.config.text_config.hidden_size, teacher.config.text_config.hidden_size
    aligner = torch.nn.Linear(d_s, d_t, bias=False) if d_s != d_t else torch.nn.Identity()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # the same loop as text AKD; the inputs' embeddings come from the model under the
    # adapter, the forward goes through the prepared model (under `accelerate launch`, the
    # DDP wrapper, whose forward is what synchronises the gradients)
    losses, step, model = train_loop(
        accelerator, model, aligner, train, config, tick,
        lambda m, al, batch: visual_batch_losses(accelerator.unwrap_model(m).base_model.model, teacher, al,
                                                 batch, config, eos, forward=m))
    inner = accelerator.unwrap_model(model)
    after = {"bundle": answer_accuracy(inner.base_model.model, train, eos),
             "holdout": answer_accuracy(inner.base_model.model, hold, eos)}
    merged_path = None
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        inner.save_pretrained(out_dir)
        if merge:
            merged_path = out_dir / "merged"
            from cdcca_edge.converters.hf import merge_and_unload

            merged = merge_and_unload(inner)
            merged.save_pretrained(merged_path)
            tok.save_pretrained(merged_path)
            # the student's side files (image preprocessing, prompt template, ...) that the
            # merged model's own save did not write
            for side in Path(student_dir).iterdir():
                if (side.is_file() and side.suffix in (".json", ".txt") and not side.name.endswith(".index.json")
                        and not (merged_path / side.name).exists()):
                    shutil.copy(side, merged_path / side.name)
    kept = float(np.mean([len(s.positions) / s.n_tokens for s in samples]))
    report = MultimodalDistillReport(
        n_train=len(train), n_holdout=len(hold), steps=step, seconds=time.perf_counter() - t0,
        trainable_params=trainable, kept_token_fraction=kept, losses=losses, agreement_before=before,
        agreement_after=after, output=str(out_dir), merged=str(merged_path) if merged_path else None,
        processes=accelerator.num_processes)
    if accelerator.is_main_process:
        (out_dir / "report.json").write_text(json.dumps(report.as_dict(), indent=1) + "\n")
    accelerator.wait_for_everyone()
    return report


def visual_batch_losses(student: Any, teacher: Any, aligner: Any, batch: list[VisualSample],
                        cfg: AKDConfig, eos: int, forward: Any = None) -> dict[str, Any]:
    """CE on the teacher's answers, logit KD on the answer positions, feature KD between
    projected visual tokens (kept ones only). ``forward``: what runs the student's forward
    (the prepared model; default ``student``)."""
    import torch
    import torch.nn.functional as F

    answers = [s.teacher_answer for s in batch]
    inp_s = build_inputs(student, batch, answers, eos)
    with torch.no_grad():
        inp_t = build_inputs(teacher, batch, answers, eos)
        logits_t = teacher(inputs_embeds=inp_t["inputs_embeds"], attention_mask=inp_t["attention_mask"],
                           position_ids=inp_t["position_ids"]).logits[:, :-1]
    logits_s = (forward or student)(inputs_embeds=inp_s["inputs_embeds"], attention_mask=inp_s["attention_mask"],
                                    position_ids=inp_s["position_ids"]).logits[:, :-1]  # (B, T-1, V)
    targets = inp_s["ids"][:, 1:]
    w = inp_s["answer_mask"][:, :-1]
    if cfg.teacher_weighting == "confidence":
        w = w * teacher_confidence(logits_t, targets)  # the labels the teacher is unsure of teach less
    w, targets = w.reshape(-1), targets.reshape(-1)
    V = logits_s.shape[-1]
    zero = torch.zeros(())
    terms = {"ce": zero, "kd": zero, "feature": zero}
    if cfg.ce_weight > 0:
        terms["ce"] = weighted_mean(F.cross_entropy(logits_s.reshape(-1, V), targets, reduction="none"), w)
    if cfg.kd_weight > 0:
        d = kd_divergence(logits_s.reshape(-1, V), logits_t.reshape(-1, V), cfg.kd_loss, cfg.kd_temperature)
        terms["kd"] = weighted_mean(d, w)
    if cfg.feature_weight > 0:
        target = inp_t["projected"]
        # relative to the teacher tokens' spread: the term's size does not depend on their scale
        mse = ((aligner(inp_s["projected"]) - target) ** 2).mean(-1) / target.var().clamp_min(1e-6)  # (B, N)
        terms["feature"] = weighted_mean(mse.reshape(-1), inp_s["keep"].reshape(-1))
    return terms
