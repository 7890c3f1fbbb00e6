"""AKD, adapter-based knowledge distillation: the cloud teacher teaches the device student
from what the device uploaded, through PEFT adapters.

For every uploaded sample the teacher answers the prompt (greedy pseudo-labels). The
student, wrapped in a PEFT adapter, then learns from three signals, each weighted in
:class:`AKDConfig`:

* **CE** on the teacher's answer tokens (pseudo-labels);
* **logit KD** — forward KL (or reverse KL, or JSD) between teacher and student
  next-token distributions at temperature T — on the teacher's answer and, on-policy, on
  the device's own uploaded answer, weighted per token by the uplink's token weights
  (tokens the device was unsure about count most);
* **feature KD** on last hidden states, MSE, through a learned linear aligner when the
  widths differ (the paper's feature term, without its wavelet part).

Runs on CPU for tests and on GPUs through accelerate (``accelerate launch -m
cdcca_edge.cli distill ...``); deterministic for a seed. Needs the ``cloud`` extra.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, get_args

from cdcca_edge.core.adapters import BIAS_ADAPTER_DIR
from cdcca_edge.core import uplink_format as U
from cdcca_edge.core.errors import FormatError, UsageError, require

AdapterKind = Literal["lora", "bias-norm"]
KDLoss = Literal["forward_kl", "reverse_kl", "jsd"]
TeacherWeighting = Literal["none", "confidence"]
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NORM_TARGETS = ("input_layernorm", "post_attention_layernorm", "norm")
# Input limits (docs/akd.md, "Input"): an uploaded bundle is hostile until checked.
MAX_PROMPT_TOKENS = 8192  # one prompt, whatever the student's context
MAX_TOTAL_TOKENS = 1 << 22  # prompt and answer tokens of all bundles of one run


@dataclass
class AKDConfig:
    """How to distil. Loss weights of 0 switch a term off (the ablations)."""

    adapter: AdapterKind = "lora"  # lora, or bias-norm (LN tuning + bias terms, LLaMA-Adapter-V2 style)
    lora_r: int = 8  # LoRA rank
    lora_alpha: int = 16  # LoRA scale numerator (scale = alpha / r)
    target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS  # LoRA targets
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 8
    max_new_tokens: int = 16  # teacher pseudo-label length
    ce_weight: float = 1.0  # cross-entropy on the teacher's answer tokens
    kd_weight: float = 1.0  # logit KD
    kd_loss: KDLoss = "forward_kl"
    kd_temperature: float = 1.0  # T=2 agreed less with the teacher in bench/akd.py
    kd_on_device_answer: bool = True  # also KD on the device's uploaded answer (token-weighted)
    feature_weight: float = 1.0  # MSE between (aligned) last hidden states
    # "confidence": each answer token's CE and logit-KD weight is the teacher's own
    # probability of that token, so the labels the teacher is unsure of teach less (the
    # uploads UTS picks are where the student is unsure, and some are where the teacher is
    # too); "none": every answer token weighs the same (the paper's loss)
    teacher_weighting: TeacherWeighting = "none"
    holdout: float = 0.2  # fraction of uploaded samples kept out of training, for the report
    seed: int = 0

    def __post_init__(self) -> None:
        if self.adapter not in ("lora", "bias-norm"):
            raise UsageError(f"adapter must be lora or bias-norm, got {self.adapter!r}")
        if self.teacher_weighting not in get_args(TeacherWeighting):
            raise UsageError(f"teacher_weighting must be none or confidence, got {self.teacher_weighting!r}")
        if self.kd_loss not in ("forward_kl", "reverse_kl", "jsd"):
            raise UsageError(f"kd_loss must be forward_kl, reverse_kl or jsd, got {self.kd_loss!r}")
        for name in ("ce_weight", "kd_weight", "feature_weight"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be >= 0")
        if self.ce_weight == self.kd_weight == self.feature_weight == 0:
            raise UsageError("every loss weight is 0: nothing to learn")
        if not 0.0 <= self.holdout < 1.0:
            raise UsageError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.epochs < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise UsageError("epochs, batch_size and max_new_tokens must be >= 1")
        if self.kd_temperature <= 0 or self.lr <= 0:
            raise UsageError("kd_temperature and lr must be > 0")
        self.target_modules = tuple(self.target_modules)


@dataclass
class Sample:
    """One uploaded sample, as training needs it."""

    id: str
    prompt_ids: list[int]
    device_answer: list[int] = field(default_factory=list)
    device_weights: list[float] = field(default_factory=list)  # per device-answer token
    teacher_answer: list[int] = field(default_factory=list)


def read_samples(bundles: Sequence[str | Path], vocab_size: int | None = None, context: int | None = None,
                 answer_tokens: int = 0) -> list[Sample]:
    """Samples from uplink bundles (ids made unique per bundle), checked before any
    training: the reader checks the bundle (token weights finite and >= 0, arrays of the
    format's types and sizes); this checks what training needs (docs/akd.md, "Input").

    Args:
        vocab_size: the student's vocabulary; every token id must be below it.
        context: the student's context (``max_position_embeddings``); each prompt, plus the
            longer of its device answer and ``answer_tokens``, must fit it.
        answer_tokens: the teacher's pseudo-label length (``max_new_tokens``).

    Raises:
        FormatError: a malformed bundle, a sample without prompt tokens, token ids outside
            the vocabulary, a prompt longer than the context or :data:`MAX_PROMPT_TOKENS`,
            more than :data:`MAX_TOTAL_TOKENS` tokens in all.
        UsageError: the bundles hold no samples.
    """
    from cdcca_edge.core.uplink_format import read_uplink

    out = []
    total = 0
    for i, path in enumerate(bundles):
        b = read_uplink(path)
        for s in b.samples():
            where = f"{path}: sample {s.id!r}"
            prompt = s.arrays.get(U.PROMPT_IDS)  # (T_p,) u32, not empty: the reader checks
            if prompt is None:
                raise FormatError(f"{where} has no prompt_ids; distillation needs the prompt's tokens: "
                                  "collect the bundle with `cdcca-edge uplink collect`")
            answer = s.arrays.get(U.ANSWER_IDS)  # (T_a,) u32
            total = check_sample_tokens(path, where, prompt, answer, len(prompt), answer_tokens, context,
                                        vocab_size, total)
            weights = s.arrays.get(U.TOKEN_WEIGHTS)  # (T_a,) f16, finite and >= 0: the reader checks
            out.append(Sample(
                id=f"{i}:{s.id}",
                prompt_ids=prompt.tolist(),
                device_answer=[] if answer is None else answer.tolist(),
                device_weights=[] if weights is None else weights.astype(float).tolist(),
            ))
    if not out:
        raise UsageError("the bundles hold no samples: nothing to distil")
    return out


def check_sample_tokens(path: Path | str, where: str, prompt: Any, answer: Any | None, n_prompt: int,
                        answer_tokens: int, context: int | None, vocab_size: int | None, total: int) -> int:
    """One uplinked sample's token checks, shared by text and multimodal distillation:
    the prompt (``n_prompt`` positions; a LLaVA prompt counts its image's tokens) with the
    longer of the device's answer and ``answer_tokens`` fits the context, every id is in
    the vocabulary, and the run's ``total`` stays within :data:`MAX_TOTAL_TOKENS`.
    Returns the new total.

    Raises:
        FormatError: naming the sample, the limit and the fix.
    """
    n_answer = 0 if answer is None else len(answer)
    check_prompt_length(where, n_prompt, max(n_answer, answer_tokens), context)
    total += n_prompt + n_answer
    if total > MAX_TOTAL_TOKENS:
        raise FormatError(f"{path}: the bundles hold more than {MAX_TOTAL_TOKENS:,} prompt and answer "
                          "tokens, distill's maximum per run; distil from fewer bundles at a time")
    if vocab_size is not None:
        top = max(int(prompt.max()), int(answer.max()) if n_answer else 0)
        if top >= vocab_size:
            raise FormatError(f"{where}: token id {top} is outside the student's vocabulary of "
                              f"{vocab_size}; the bundle was made by another model family: "
                              "distil it into the student its device runs")
    return total


def check_prompt_length(where: str, n_prompt: int, n_answer: int, context: int | None) -> None:
    """A prompt of ``n_prompt`` tokens (a LLaVA prompt counts its image's tokens) with an
    answer of ``n_answer`` must fit the student's ``context`` and :data:`MAX_PROMPT_TOKENS`.

    Raises:
        FormatError: naming the lengths, the limit and the fix.
    """
    if n_prompt > MAX_PROMPT_TOKENS:
        raise FormatError(f"{where}: a prompt of {n_prompt:,} tokens is longer than distill's maximum of "
                          f"{MAX_PROMPT_TOKENS:,}; collect the bundle again without such prompts")
    if context is not None and n_prompt + n_answer > context:
        raise FormatError(f"{where}: a prompt of {n_prompt:,} tokens and an answer of {n_answer:,} do not fit "
                          f"the student's context of {context:,} tokens (max_position_embeddings); collect "
                          "the bundle again without such prompts, or lower --max-new-tokens")


# --- losses (tested against hand computations) --------------------------------------------


def kd_divergence(student_logits: Any, teacher_logits: Any, kind: KDLoss, temperature: float) -> Any:
    """Per-position divergence between teacher and student at temperature T, times T^2
    (Hinton's scaling keeps gradients comparable across T). (N, V), (N, V) -> (N,)"""
    import torch.nn.functional as F

    t = temperature
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    if kind == "forward_kl":  # KL(teacher || student): mass-covering
        d = (log_t.exp() * (log_t - log_s)).sum(-1)
    elif kind == "reverse_kl":  # KL(student || teacher): mode-seeking
        d = (log_s.exp() * (log_s - log_t)).sum(-1)
    else:  # Jensen-Shannon: symmetric, bounded by log 2
        import torch

        log_m = torch.logsumexp(torch.stack([log_s, log_t]), dim=0) - math.log(2.0)
        d = 0.5 * ((log_t.exp() * (log_t - log_m)).sum(-1) + (log_s.exp() * (log_s - log_m)).sum(-1))
    return d * t * t


def make_accelerator(accelerate: Any) -> Any:
    """The run's ``accelerate.Accelerator``; refuses a launch where each process would
    train alone (and all write the same adapter)."""
    import os

    accelerator = accelerate.Accelerator()
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and accelerator.num_processes == 1:
        raise UsageError(
            f"WORLD_SIZE is {world} but accelerate sees one process, so each process would train alone; "
            "on CPU launch with ACCELERATE_USE_CPU=1 (`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
            "--num_processes N ...`), or run `accelerate launch --cpu` under mpirun (docs/akd.md, "
            "\"Several processes\")")
    return accelerator


def teacher_confidence(teacher_logits: Any, targets: Any) -> Any:
    """(B, T, V) teacher logits, (B, T) target tokens -> (B, T): the teacher's probability of
    each target token, without gradient (AKDConfig.teacher_weighting)."""
    import torch

    with torch.no_grad():
        return torch.softmax(teacher_logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def weighted_mean(values: Any, weights: Any) -> Any:
    """sum(w * v) / sum(w); 0 when there is no weight."""
    total = weights.sum()
    return (values * weights).sum() / total.clamp_min(1e-12)


# --- adapters -----------------------------------------------------------------------------


def wrap_student(model: Any, cfg: AKDConfig) -> tuple[Any, dict[str, tuple[Any, Any]]]:
    """(PEFT model, trained biases). LoRA; or LN tuning on the norms plus the linear
    layers' own biases where the architecture has them (Qwen2's q/k/v), trained in place:
    ``{module name: (bias parameter, its value before training)}``."""
    peft = require("peft", "cloud")
    if cfg.adapter == "lora":
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        targets = [t for t in cfg.target_modules if t in names]
        if not targets:
            raise UsageError(f"none of the LoRA target modules {cfg.target_modules} is in the model")
        lcfg = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=targets,
                               lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        return peft.get_peft_model(model, lcfg), {}
    from cdcca_edge.converters.hf import peft_notices_known

    with peft_notices_known():  # RMSNorm is tuned as a LayerNorm is
        wrapped = peft.get_peft_model(model, peft.LNTuningConfig(target_modules=list(NORM_TARGETS),
                                                                 task_type="CAUSAL_LM"))
    biases = {}
    for name, module in wrapped.base_model.model.named_modules():
        bias = getattr(module, "bias", None)
        if module.__class__.__name__ == "Linear" and bias is not None:
            biases[name] = (bias, bias.detach().clone())
            bias.requires_grad_(True)
    return wrapped, biases


def save_bias_adapter(student_dir: str | Path, biases: dict[str, tuple[Any, Any]], out: Path) -> None:
    """The trained bias deltas as a PEFT BEFT adapter (a second adapter type cannot share
    the LN-tuning PeftModel): ``PeftModel.from_pretrained(student, out)`` adds them."""
    import torch

    peft = require("peft", "cloud")
    transformers = require("transformers", "cloud")
    fresh = transformers.AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    short = sorted({n.rsplit(".", 1)[-1] for n in biases})
    bm = peft.get_peft_model(fresh, peft.BeftConfig(target_modules=short, task_type="CAUSAL_LM"))
    layers = {n: m for n, m in bm.base_model.model.named_modules() if hasattr(m, "beft_bias")}
    for name, (param, before) in biases.items():
        layer = layers[name]
        with torch.no_grad():
            layer.beft_bias["default"].copy_((param.detach().cpu() - before.cpu()).reshape(1, -1))
    bm.save_pretrained(out)


# --- the run ------------------------------------------------------------------------------


@dataclass
class DistillReport:
    config: dict[str, Any]
    teacher: str
    student: str
    bundles: list[str]
    n_train: int
    n_holdout: int
    steps: int
    seconds: float
    trainable_params: int
    losses: list[dict[str, float]]  # per epoch: total and each term
    agreement_before: dict[str, float]
    agreement_after: dict[str, float]
    output: str
    merged: str | None = None
    processes: int = 1  # data-parallel processes (`accelerate launch --num_processes`)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_vocab(teacher_tok: Any, student_tok: Any, teacher: Any, student: Any) -> None:
    """Logit KD compares distributions over the same vocabulary: refuse anything else."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        only_t = len(set(tv) - set(sv))
        only_s = len(set(sv) - set(tv))
        moved = sum(1 for k in set(tv) & set(sv) if tv[k] != sv[k])
        raise UsageError(
            f"teacher and student tokenizers differ ({len(tv)} vs {len(sv)} tokens; {only_t} only "
            f"in the teacher, {only_s} only in the student, {moved} with other ids): logit "
            "distillation needs one vocabulary. Use a teacher of the student's family"
        )
    vt, vs = teacher.config.vocab_size, student.config.vocab_size
    if vt != vs:
        raise UsageError(f"teacher output size {vt} != student output size {vs}: logit "
                         "distillation needs the same vocabulary size")


def _pad(seqs: list[list[int]], pad: int) -> tuple[Any, Any]:
    import torch

    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask  # (B, T), (B, T)


def _answer_targets(samples: list[Sample], which: str) -> tuple[list[list[int]], list[list[float]], list[int]]:
    """Sequences prompt+answer, per-answer-token weights, and prompt lengths."""
    seqs, weights, plen = [], [], []
    for s in samples:
        ans = s.teacher_answer if which == "teacher" else s.device_answer
        w = [1.0] * len(ans) if which == "teacher" else (s.device_weights or [1.0] * len(ans))
        seqs.append(s.prompt_ids + ans)
        weights.append(w[: len(ans)])
        plen.append(len(s.prompt_ids))
    return seqs, weights, plen


def _position_weights(seqs: list[list[int]], weights: list[list[float]], plen: list[int], T: int) -> Any:
    """(B, T) weight of predicting token t+1 at position t: the answer tokens only."""
    import torch

    w = torch.zeros((len(seqs), T))
    for i, (ws, p) in enumerate(zip(weights, plen)):
        for j, v in enumerate(ws):
            pos = p - 1 + j  # position predicting answer token j
            if 0 <= pos < T:
                w[i, pos] = v
    return w


def pseudo_label(teacher: Any, samples: list[Sample], max_new_tokens: int, eos: int | None,
                 device: Any) -> None:
    """Teacher's greedy answers, in place (stop at EOS, which is kept)."""
    import torch

    for s in samples:
        ids = torch.tensor([s.prompt_ids], device=device)
        with torch.no_grad():
            out = teacher.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                   do_sample=False, pad_token_id=eos if eos is not None else 0)
        new = out[0, len(s.prompt_ids):].tolist()
        if eos is not None and eos in new:
            new = new[: new.index(eos) + 1]
        s.teacher_answer = new or [eos if eos is not None else 0]


def agreement(student: Any, teacher: Any, samples: list[Sample], device: Any, batch: int = 16) -> dict[str, float]:
    """Teacher-student agreement on the teacher's answers: top-1 token agreement
    (teacher-forced), the fraction of answers the student reproduces exactly, and the mean
    KL(teacher || student) over the answer positions (nats, temperature 1)."""
    import torch

    if not samples:
        return {"token_agreement": float("nan"), "answer_match": float("nan"), "teacher_kl": float("nan")}
    agree = total = exact = 0
    kl_sum = 0.0
    for k in range(0, len(samples), batch):
        chunk = samples[k : k + batch]
        seqs, weights, plen = _answer_targets(chunk, "teacher")
        ids, mask = _pad(seqs, 0)
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            logits_s = student(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
            logits_t = teacher(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        pred = logits_s.argmax(-1)  # (B, T)
        for i, s in enumerate(chunk):
            p, n = plen[i], len(s.teacher_answer)
            got = pred[i, p - 1 : p - 1 + n].tolist()
            hits = sum(int(a == b) for a, b in zip(got, s.teacher_answer))
            agree += hits
            total += n
            exact += int(hits == n)
            kl_sum += float(kd_divergence(logits_s[i, p - 1 : p - 1 + n], logits_t[i, p - 1 : p - 1 + n],
                                          "forward_kl", 1.0).sum())
    return {"token_agreement": agree / total, "answer_match": exact / len(samples), "teacher_kl": kl_sum / total}


def distill(
    teacher_dir: str | Path,
    student_dir: str | Path,
    bundles: Sequence[str | Path],
    out_dir: str | Path,
    config: AKDConfig = AKDConfig(),
    merge: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> DistillReport:
    """Distil ``teacher_dir`` into an adapter on ``student_dir`` from uplink ``bundles``.

    Writes the PEFT adapter to ``out_dir`` (``PeftModel.from_pretrained(student,
    out_dir)`` loads it), ``out_dir/report.json`` and, with ``merge``, the merged model
    to ``out_dir/merged``.

    LLaVA teacher and student (bundles of visual tokens) are distilled by
    :func:`cdcca_edge.cloud.akd_mm.distill_multimodal`, chosen here; its report is a
    :class:`~cdcca_edge.cloud.akd_mm.MultimodalDistillReport`.

    Raises:
        FormatError: a bundle is malformed or does not fit the student (:func:`read_samples`).
        UsageError: vocabularies differ, no samples, bad configuration, or only one of
            teacher and student is a LLaVA model.
    """
    from cdcca_edge.converters.llava_export import is_llava

    if is_llava(Path(teacher_dir)) or is_llava(Path(student_dir)):  # AKD on visual tokens
        from cdcca_edge.cloud.akd_mm import distill_multimodal

        if not (is_llava(Path(teacher_dir)) and is_llava(Path(student_dir))):
            raise UsageError("teacher and student must both be LLaVA models for AKD on visual tokens")
        return distill_multimodal(teacher_dir, student_dir, bundles, out_dir, config, merge=merge,  # type: ignore[return-value]
                                  progress=progress)
    torch = require("torch", "cloud")
    transformers = require("transformers", "cloud")
    accelerate = require("accelerate", "cloud")
    t0 = time.perf_counter()
    tick = progress or (lambda _s, _i, _n: None)
    out_dir = Path(out_dir)

    random.seed(config.seed)
    torch.manual_seed(config.seed)
    # the bundles first: a bad one is refused before any model is loaded
    s_cfg = transformers.AutoConfig.from_pretrained(student_dir)
    samples = read_samples(bundles, vocab_size=s_cfg.vocab_size,
                           context=getattr(s_cfg, "max_position_embeddings", None),
                           answer_tokens=config.max_new_tokens)
    accelerator = make_accelerator(accelerate)
    device = accelerator.device

    tok_t = transformers.AutoTokenizer.from_pretrained(teacher_dir)
    tok_s = transformers.AutoTokenizer.from_pretrained(student_dir)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).to(device).eval()
    student = transformers.AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    check_vocab(tok_t, tok_s, teacher, student)
    for p in teacher.parameters():
        p.requires_grad_(False)

    eos = tok_s.eos_token_id
    tick("pseudo-labels", 0, len(samples))
    pseudo_label(teacher, samples, config.max_new_tokens, eos, device)
    order = list(range(len(samples)))
    random.Random(config.seed).shuffle(order)
    n_hold = int(round(len(samples) * config.holdout))
    hold = [samples[i] for i in order[:n_hold]]
    train = [samples[i] for i in order[n_hold:]] or hold

    student = student.to(device)
    before = {"bundle": agreement(student, teacher, train, device),
              "holdout": agreement(student, teacher, hold, device)}

    model, biases = wrap_student(student, config)
    d_s, d_t = student.config.hidden_size, teacher.config.hidden_size
    aligner = torch.nn.Linear(d_s, d_t, bias=False) if d_s != d_t else torch.nn.Identity()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    losses, step, model = train_loop(
        accelerator, model, aligner, train, config, tick,
        lambda m, al, batch: _batch_losses(m, teacher, al, batch, config, device))
    unwrapped = accelerator.unwrap_model(model)
    after = {"bundle": agreement(unwrapped, teacher, train, device),
             "holdout": agreement(unwrapped, teacher, hold, device)}

    merged_path = None
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        unwrapped.save_pretrained(out_dir)
        if biases:
            save_bias_adapter(student_dir, biases, out_dir / BIAS_ADAPTER_DIR)
        if merge:
            merged_path = out_dir / "merged"
            # the biases were trained in place, so the merged model already has them
            from cdcca_edge.converters.hf import merge_and_unload

            merged = merge_and_unload(unwrapped)
            merged.save_pretrained(merged_path)
            tok_s.save_pretrained(merged_path)
    report = DistillReport(
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        teacher=str(teacher_dir), student=str(student_dir), bundles=[str(b) for b in bundles],
        n_train=len(train), n_holdout=len(hold), steps=step, seconds=time.perf_counter() - t0,
        trainable_params=trainable, losses=losses, agreement_before=before, agreement_after=after,
        output=str(out_dir), merged=str(merged_path) if merged_path else None,
        processes=accelerator.num_processes,
    )
    if accelerator.is_main_process:
        (out_dir / "report.json").write_text(json.dumps(report.as_dict(), indent=1) + "\n")
    accelerator.wait_for_everyone()
    return report


def train_loop(accelerator: Any, model: Any, aligner: Any, train: list[Any], config: AKDConfig,
               tick: Callable[[str, int, int], None],
               batch_losses: Callable[[Any, Any, list[Any]], dict[str, Any]]) -> tuple[list[dict[str, float]], int, Any]:
    """The one AKD optimisation loop, for text and visual samples alike: AdamW on the
    adapter's trainable parameters and the feature aligner, prepared by accelerate (so
    ``accelerate launch`` runs it on several GPUs unchanged), seeded shuffles, the loss
    terms ``batch_losses(model, aligner, batch)`` returns (ce, kd, kd_device, feature)
    weighted by ``config``. Returns (per-epoch mean losses, steps, the prepared model,
    in eval mode)."""
    torch = require("torch", "cloud")
    weights = {"ce": config.ce_weight, "kd": config.kd_weight, "kd_device": config.kd_weight,
               "feature": config.feature_weight}
    params = [p for p in model.parameters() if p.requires_grad] + list(aligner.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    if any(True for _ in aligner.parameters()):  # DDP refuses a module without parameters
        model, aligner, opt = accelerator.prepare(model, aligner, opt)
    else:
        model, opt = accelerator.prepare(model, opt)
    # data parallel (`accelerate launch --num_processes N`): each process takes every N-th
    # sample of the batch and DDP averages the gradients; a batch smaller than N is taken
    # whole by every process (equal gradients, so the average is that batch's)
    world, rank = accelerator.num_processes, accelerator.process_index
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    losses: list[dict[str, float]] = []
    step = 0
    gen = random.Random(config.seed + 1)
    model.train()
    for epoch in range(config.epochs):
        idx = list(range(len(train)))
        gen.shuffle(idx)
        sums: dict[str, float] = {"total": 0.0}
        for k in range(0, len(idx), config.batch_size):
            batch = [train[i] for i in idx[k : k + config.batch_size]]
            terms = batch_losses(model, aligner, batch[rank::world] if len(batch) >= world else batch)
            loss = sum(weights[name] * value for name, value in terms.items())
            opt.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            opt.step()
            step += 1
            # the report's losses are the mean over processes: the same figures as one process's
            logged = {"total": loss.detach(), **{n: v.detach() for n, v in terms.items()}}
            if world > 1:
                logged = {n: accelerator.reduce(v.reshape(1), reduction="mean")[0] for n, v in logged.items()}
            for name, value in logged.items():
                sums[name] = sums.get(name, 0.0) + float(value)
            tick("training", step, total_steps)
        losses.append({k: v / steps_per_epoch for k, v in sums.items()} | {"epoch": epoch + 1})
    model.eval()
    return losses, step, model


def _batch_losses(model: Any, teacher: Any, aligner: Any, batch: list[Sample], cfg: AKDConfig,
                  device: Any) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    zero = torch.zeros((), device=device)
    terms = {"ce": zero, "kd": zero, "kd_device": zero, "feature": zero}
    # teacher's answers: CE (pseudo-labels), logit KD, feature KD
    seqs, weights, plen = _answer_targets(batch, "teacher")
    ids, mask = _pad(seqs, 0)
    ids, mask = ids.to(device), mask.to(device)
    w = _position_weights(seqs, weights, plen, ids.shape[1]).to(device)  # (B, T)
    need_hidden = cfg.feature_weight > 0
    out_s = model(input_ids=ids, attention_mask=mask, output_hidden_states=need_hidden)
    logits_s = out_s.logits[:, :-1]  # (B, T-1, V): position t predicts token t+1
    targets = ids[:, 1:]
    pos_w = w[:, :-1]
    out_t = None
    if cfg.kd_weight > 0 or need_hidden or cfg.teacher_weighting == "confidence":
        with torch.no_grad():
            out_t = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=need_hidden)
        if cfg.teacher_weighting == "confidence":
            pos_w = pos_w * teacher_confidence(out_t.logits[:, :-1], targets)
    if cfg.ce_weight > 0:
        ce = F.cross_entropy(logits_s.reshape(-1, logits_s.shape[-1]), targets.reshape(-1), reduction="none")
        terms["ce"] = weighted_mean(ce, pos_w.reshape(-1))
    if out_t is not None:
        if cfg.kd_weight > 0:
            d = kd_divergence(logits_s.reshape(-1, logits_s.shape[-1]),
                              out_t.logits[:, :-1].reshape(-1, logits_s.shape[-1]),
                              cfg.kd_loss, cfg.kd_temperature)
            terms["kd"] = weighted_mean(d, pos_w.reshape(-1))
        if need_hidden:
            h_s = aligner(out_s.hidden_states[-1][:, :-1])  # (B, T-1, D_t)
            h_t = out_t.hidden_states[-1][:, :-1]  # (B, T-1, D_t)
            mse = ((h_s - h_t) ** 2).mean(-1)  # (B, T-1)
            terms["feature"] = weighted_mean(mse.reshape(-1), (pos_w > 0).float().reshape(-1))
    # the device's own answers: on-policy logit KD, weighted by the uplink's token weights
    on_device = [s for s in batch if s.device_answer]
    if cfg.kd_weight > 0 and cfg.kd_on_device_answer and on_device:
        seqs, weights, plen = _answer_targets(on_device, "device")
        ids, mask = _pad(seqs, 0)
        ids, mask = ids.to(device), mask.to(device)
        w = _position_weights(seqs, weights, plen, ids.shape[1]).to(device)[:, :-1]
        logits_d = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        with torch.no_grad():
            logits_td = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
        d = kd_divergence(logits_d.reshape(-1, logits_d.shape[-1]), logits_td.reshape(-1, logits_d.shape[-1]),
                          cfg.kd_loss, cfg.kd_temperature)
        terms["kd_device"] = weighted_mean(d, w.reshape(-1))
    return terms
