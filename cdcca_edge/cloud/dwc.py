"""DWC, dynamic weight-update compression: the smallest delta that moves the device's
exact model to the cloud's target, within a byte budget or a quality bound.

The update is computed against a **mirror**: the cloud's byte-exact copy of the device
artefact, advanced with the same patch code after every delta (``cdcca-edge patch
MIRROR DELTA``). Quantisation error therefore never accumulates: each delta aims at the
current target from what the device really holds.

Per tensor, in the artefact's own layout (GGUF row permutation, ONNX transposes, via the
converters' tables):

1. ``delta = target - dequantise(mirror)``; a quant block whose largest change is below
   half its quantisation step is left alone (requantising would give back the old bytes);
2. the remaining blocks are ranked by how much they matter, ``|delta|^2`` (optionally times
   the squared activation of their input columns, from calibration prompts);
3. encodings are priced in bytes: low-rank (the adapter's own LoRA factors, mapped into
   the artefact layout), quantised additive blocks (int4 when 4 bits are within the
   block's quantisation step, else int8), or block replacement; the cheapest that carries
   the update is used;
4. with a byte budget, blocks (and low-rank updates) are taken greedily by error removed
   per byte until it is spent; with a KL bound, the smallest budget meeting it on the probe
   prompts is searched for, measured on the device runtime.
"""

from __future__ import annotations

import heapq
import math
import shutil
import tempfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cdcca_edge.cloud.dwc_nbits import is_nbits, make_nbits_delta
from cdcca_edge.core.adapters import lora_factors
from cdcca_edge.core.artifact import Artifact, TensorInfo, open_artifact, read_tensor
from cdcca_edge.core.delta_build import BuiltRecord, DeltaBuilder, changed_runs
from cdcca_edge.core.encodings import (
    MX_BITS,
    MX_GROUP,
    CLOUD_QUANT_TYPES,
    REQUANT_TYPES,
    dequantize,
    mx_dequantize,
    mx_quantize,
    quantize,
    symmetric_quantize,
)
from cdcca_edge.core.errors import FormatError, IntegrityError, UsageError, require
from cdcca_edge.core.ggml import SCALE_FIRST_TYPES, block_scales, type_layout
from cdcca_edge.core.ggml_quant import QUANT_LEVELS

RECORD_OVERHEAD = 250  # bytes of (compressed) header per record, measured 200-260
MIN_STEP_FRACTION = 0.5  # block changes below this many quantisation steps are skipped
FACTOR_BITS = (2, 3, 4, 5, 6, 8)  # the bit widths a low-rank component may be sent at


@dataclass
class DWCConfig:
    """How to compress. Without budget or KL bound: the whole update, as cheaply as possible."""

    budget_bytes: int | None = None  # spend at most this much (approximately: headers estimated)
    max_kl: float | None = None  # smallest delta whose probe KL vs the target is at most this
    lowrank: bool = True  # allow low-rank records for LoRA-shaped updates
    max_bits: int = 8  # 8: int8 or int4 per tensor; 4: int4 only
    min_step_fraction: float = MIN_STEP_FRACTION
    # bit widths a low-rank component may take under a budget (each singular component
    # gets its own, by error removed per byte); (8,): every component at 8 bits
    factor_bits: tuple[int, ...] = FACTOR_BITS

    def __post_init__(self) -> None:
        if self.budget_bytes is not None and self.max_kl is not None:
            raise UsageError("give a byte budget or a KL bound, not both")
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            raise UsageError("the byte budget must be > 0")
        if self.max_kl is not None and self.max_kl <= 0:
            raise UsageError("the KL bound must be > 0")
        if self.max_bits not in (4, 8):
            raise UsageError("max_bits must be 4 or 8")
        self.factor_bits = tuple(sorted(set(int(b) for b in self.factor_bits)))
        if not self.factor_bits or any(b not in MX_BITS for b in self.factor_bits):
            raise UsageError(f"factor_bits must be bit widths in [2, 8], got {self.factor_bits!r}")


@dataclass
class TensorTarget:
    """One artefact tensor and what the cloud wants it to hold."""

    info: TensorInfo
    target: np.ndarray  # (n_elements,) float32, artefact layout, C order
    lowrank: list[tuple[np.ndarray, np.ndarray, float]] = field(default_factory=list)  # (A, B, s)


# --- targets ------------------------------------------------------------------------------


def load_targets(art: Artifact, target: str | Path, target_base: str | Path | None = None,
                 *, return_model: bool = False, elsewhere: list[str] | None = None) -> tuple[Any, ...]:
    """Read the cloud target (an HF directory, or a PEFT adapter and its base) into the
    artefact's layout. Returns (targets, HF config), and the loaded target model (adapter
    merged) as a third item with ``return_model``, so a caller that needs its logits does
    not load it again.

    A LLaVA target on one GGUF file of a llama.cpp-native pair (the language GGUF, or the
    mmproj) takes the parameters that file holds; the changed ones the other file holds
    are appended to ``elsewhere`` (that file gets its own delta).

    Raises:
        MissingTensorError: a changed parameter has no tensor in the artefact.
        FormatError: a tensor's shape is not the parameter's (a mirror of another model).
        UsageError: a LLaVA update changes nothing this file of the pair holds.
    """
    torch = require("torch", "cloud")
    transformers = require("transformers", "cloud")
    from cdcca_edge.converters.hf import SUPPORTED_MODEL_TYPES, merge_adapter, model_type_of
    from cdcca_edge.converters.mapping import slots_for

    target = Path(target)
    lora: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    base_type = model_type_of(Path(target_base) if target_base is not None else target)
    # a LLaVA model updates a multimodal bundle (its language and vision parts)
    auto = (transformers.LlavaForConditionalGeneration if base_type == "llava"
            else transformers.AutoModelForCausalLM)
    if target_base is not None:
        base_dir = Path(target_base)
        model = auto.from_pretrained(base_dir, dtype=torch.float32)
        base_sd = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
        lora = lora_factors(target)
        model = merge_adapter(model, target)
    else:
        base_dir = target
        model = auto.from_pretrained(target, dtype=torch.float32)
        base_sd = None
    cfg = model.config
    arch = "llava" if base_type == "llava" else SUPPORTED_MODEL_TYPES[base_type]
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    # With an adapter, only the parameters it changed need a slot; with full weights, all.
    names = [k for k in sd if base_sd is None or not np.array_equal(sd[k], base_sd[k])]
    if arch == "llava" and art.format == "gguf":
        from cdcca_edge.converters.mapping import is_mmproj, llava_file_params

        names, others = llava_file_params(art, names)
        if not names:
            raise UsageError(f"{art.path}: the update changes nothing in this "
                             f"{'mmproj' if is_mmproj(art) else 'language GGUF'}; its {len(others)} "
                             "parameters live in the other file of the pair: run delta make on that one")
        if elsewhere is not None:
            elsewhere.extend(others)
    slots = slots_for(art, arch, cfg, names)
    out: dict[str, TensorTarget] = {}
    for hf, places in slots.items():
        for slot in places:
            t = art.tensor(slot.tensor)
            w = slot.to_artifact(sd[hf]).astype(np.float32)
            if tuple(w.shape) != tuple(t.shape):
                raise FormatError(f"{hf!r} is {tuple(w.shape)} in the artefact's layout, the mirror's {t.name!r} "
                                  f"{tuple(t.shape)}: {art.path} was not exported from the model this update is "
                                  "for; give the mirror of the device that runs it")
            w = w.reshape(-1)
            tt = out.setdefault(t.name, TensorTarget(t, w))
            tt.target = w
            if hf in lora:
                a, b, s = lora[hf]
                a2, b2 = slot.factors(a, b)
                tt.lowrank.append((a2, b2, s))
    if return_model:
        return list(out.values()), cfg, model
    return list(out.values()), cfg


# --- per-tensor pricing -------------------------------------------------------------------


def quant_steps(type_name: str, raw: bytes, mirror: np.ndarray, group: int) -> np.ndarray:
    """Quantisation step of every group of ``group`` elements (G,): the block scale for
    Q8_0/Q4_0, the float spacing near the group's largest value otherwise."""
    if type_name in SCALE_FIRST_TYPES:
        return np.abs(block_scales(type_name, raw).astype(np.float32))
    if type_name in QUANT_LEVELS:  # a block's range over its code levels: the coarsest step
        g = mirror.reshape(-1, group)  # its sub-blocks have their own, finer scales
        return np.maximum((g.max(1) - g.min(1)) / QUANT_LEVELS[type_name], np.finfo(np.float32).tiny)
    mags = np.abs(mirror.reshape(-1, group)).max(1)
    eps = {"F32": 2.0**-23, "F16": 2.0**-10, "BF16": 2.0**-7}.get(type_name, 2.0**-23)
    return np.maximum(mags * eps, np.finfo(np.float32).tiny)


@dataclass
class UpdatePlan:
    """A tensor's candidate update: which groups, how encoded, what it costs, what it fixes."""

    t: TensorTarget
    group: int  # elements per group (a quant block, or 32 floats)
    order: np.ndarray  # significant groups, most important first
    gains: np.ndarray  # (len(order),) squared error each removes
    block_cost: float  # bytes per group for the chosen block encoding
    encoding: str  # "qadd4", "qadd8" or "replace"
    residual: np.ndarray  # (G, g) delta, for the qadd payload
    mirror: np.ndarray  # (n,) dequantised mirror
    # low-rank alternative: the update's singular components, strongest first
    lr_a: np.ndarray | None = None  # (R, cols) sqrt(sigma) v^T
    lr_b: np.ndarray | None = None  # (rows, R) u sqrt(sigma)
    lr_gains: np.ndarray | None = None  # (R,) squared error each component removes
    lr_bits: tuple[int, ...] = ()  # (L,) the bit widths priced, ascending
    lr_err: np.ndarray | None = None  # (R, L) squared error a component leaves at each width
    lr_cost: np.ndarray | None = None  # (R, L) its bytes at each width (deflated codes, scales)

    @property
    def prefer_lowrank(self) -> bool:
        """Whether the whole update is cheaper as low rank than as blocks."""
        if self.lr_gains is None:
            return False
        return float(self.lr_cost[:, -1].sum()) < len(self.order) * self.block_cost


def factored_svd(factors: list[tuple[np.ndarray, np.ndarray, float]]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD of ``sum(s * b @ a)`` from the factors, without forming the matrix:
    with ``B = [s b ...]`` (rows, R) = Qb Rb and ``A^T = [a ...]^T`` (cols, R) = Qa Ra,
    ``B A = Qb (Rb Ra^T) Qa^T``, so the SVD of the R x R middle gives the whole one in
    O((rows + cols) R^2) instead of O(rows cols min(rows, cols)) (10.8 s of 34 for SmolLM2).

    Returns (u (rows, R), sv (R,) descending, vt (R, cols))."""
    bb = np.concatenate([s * b.astype(np.float64) for _a, b, s in factors], axis=1)  # (rows, R)
    aa = np.concatenate([a.astype(np.float64) for a, _b, _s in factors], axis=0)  # (R, cols)
    qb, rb = np.linalg.qr(bb)  # (rows, R), (R, R)
    qa, ra = np.linalg.qr(aa.T)  # (cols, R), (R, R)
    uu, sv, vvt = np.linalg.svd(rb @ ra.T)  # (R, R), (R,), (R, R)
    return qb @ uu, sv, (qa @ vvt.T).T


def price(t: TensorTarget, cfg: DWCConfig, importance: np.ndarray | None = None,
          mirror: np.ndarray | None = None) -> UpdatePlan | None:
    """Work out ``t``'s candidate encodings; None when nothing would change.
    ``mirror``: the tensor's dequantised values, when already at hand."""
    info = t.info
    raw = read_tensor(info)
    if info.type_name not in CLOUD_QUANT_TYPES:
        raise UsageError(f"{info.name}: DWC needs a quantiser for {info.type_name}; supported: "
                         f"{', '.join(CLOUD_QUANT_TYPES)}")
    device_requant = info.type_name in REQUANT_TYPES  # else: blocks quantised here, sent whole
    if mirror is None:
        mirror = dequantize(info.type_name, raw)  # (n,)
    delta = t.target - mirror  # (n,)
    block, _ = type_layout(info.type_name)
    group = block if block > 1 else (32 if info.n_elements % 32 == 0 else info.n_elements)
    d = delta.reshape(-1, group)  # (G, g)
    step = quant_steps(info.type_name, raw, mirror, group)  # (G,)
    big = np.abs(d).max(1)
    significant = np.flatnonzero(big >= cfg.min_step_fraction * step)
    if significant.size == 0:
        return None
    energy = (d.astype(np.float64) ** 2).sum(1)  # (G,)
    weight = energy if importance is None else energy * importance
    order = significant[np.argsort(-weight[significant], kind="stable")]
    gains = weight[order]
    # int4 carries the change when 1/15 of its range is within half a quantisation step
    int4_ok = cfg.max_bits == 4 or bool(np.all(big[significant] / 15.0 <= 0.5 * step[significant]))
    _, unit = type_layout(info.type_name)
    replace_cost = group // block * unit * 0.7  # zsub codes updated weights at about 70%
    qadd_cost = 2 + (group / 2 if int4_ok else group)
    if qadd_cost <= replace_cost and device_requant:
        enc, cost = ("qadd4" if int4_ok else "qadd8"), qadd_cost
    else:
        enc, cost = "replace", replace_cost
    plan = UpdatePlan(t, group, order, gains, cost + 4, enc, d, mirror)
    if cfg.lowrank and t.lowrank and device_requant:
        upd = sum(s * (b.astype(np.float64) @ a.astype(np.float64)) for a, b, s in t.lowrank)  # (rows, cols)
        miss = d - upd.reshape(-1, group)  # what the factors leave undone, per group
        # The factors describe target - base; they reach the target only while the mirror
        # still is the quantised base (not after other updates): check, block by block.
        if float(np.mean(np.abs(miss).max(1) <= step)) >= 0.99:
            u, sv, vt = factored_svd(t.lowrank)
            keep = sv > sv[0] * 1e-6 if sv.size else sv > 0
            u, sv, vt = u[:, keep], sv[keep], vt[keep]
            root = np.sqrt(sv)
            plan.lr_a = (root[:, None] * vt).astype(np.float32)  # (R, cols)
            plan.lr_b = (u * root[None, :]).astype(np.float32)  # (rows, R)
            plan.lr_bits = cfg.factor_bits
            plan.lr_gains, plan.lr_err, plan.lr_cost = factor_ladder(plan.lr_a, plan.lr_b, cfg.factor_bits)
    return plan


def factor_ladder(a: np.ndarray, b: np.ndarray, widths: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What each singular component is worth, and costs and leaves undone at each width.

    ``a`` (R, cols), ``b`` (rows, R). Returns (gain (R,), err (R, L), cost (R, L)):
    ``gain[k] = |b_k a_k|^2``, what not sending it leaves; ``err[k, j] = |b_k a_k - b^_k
    a^_k|^2`` with the mx-quantised vectors, exact for a rank-1 term: ``|a|^2 |b|^2 - 2
    (a.a^)(b.b^) + |a^|^2 |b^|^2``; ``cost[k, j]`` the codes' empirical entropy (at least 1
    bit a code: deflate's Huffman codes whole bytes) plus the float16 group scales, in
    bytes. (Weighing the error by the mean square of each input channel on the probe
    prompts, as activation-aware quantisers do, was measured worse: docs/dwc.md.)"""
    rank = a.shape[0]
    gain = np.zeros(rank)
    err = np.zeros((rank, len(widths)))
    cost = np.zeros((rank, len(widths)))
    for k in range(rank):
        va, vb = a[k].astype(np.float64), b[:, k].astype(np.float64)
        aa, bb = float(va @ va), float(vb @ vb)
        gain[k] = aa * bb
        for j, nb in enumerate(widths):
            qa, sa = mx_quantize(a[k], nb, MX_GROUP)
            qb, sb = mx_quantize(b[:, k], nb, MX_GROUP)
            ha = mx_dequantize(qa, sa, MX_GROUP).astype(np.float64)
            hb = mx_dequantize(qb, sb, MX_GROUP).astype(np.float64)
            err[k, j] = max(0.0, aa * bb - 2 * float(va @ ha) * float(vb @ hb) + float(ha @ ha) * float(hb @ hb))
            codes = np.concatenate([qa, qb])
            _, counts = np.unique(codes, return_counts=True)
            pr = counts / codes.size
            bits = max(1.0, float(-(pr * np.log2(pr)).sum()))
            cost[k, j] = codes.size * bits / 8 + 2 * (sa.size + sb.size)
    return gain, err, cost


def _hull(err0: float, err: np.ndarray, cost: np.ndarray, widths: Sequence[int]) -> list[tuple[int, int, float, float]]:
    """The steps up one component's bit ladder that a greedy allocator should take in
    order: the lower convex hull of (bytes, error) from (0, err0) (not sent), so that error
    removed per byte falls step by step. Returns (from bits, to bits, gain, bytes) steps."""
    pts = [(0.0, err0, 0)] + sorted((float(c), float(e), int(w)) for c, e, w in zip(cost, err, widths))
    hull = [pts[0]]
    for p in pts[1:]:
        if p[1] >= hull[-1][1]:
            continue  # costs more and leaves as much
        while len(hull) >= 2:
            (c0, e0, _), (c1, e1, _) = hull[-2], hull[-1]
            # drop the middle point when going straight from hull[-2] to p removes more per byte
            if (e0 - p[1]) * (c1 - c0) >= (e0 - e1) * (p[0] - c0):
                hull.pop()
            else:
                break
        hull.append(p)
    return [(hull[i][2], hull[i + 1][2], hull[i][1] - hull[i + 1][1], hull[i + 1][0] - hull[i][0])
            for i in range(len(hull) - 1)]


# --- selection ----------------------------------------------------------------------------


@dataclass
class Choice:
    plan: UpdatePlan
    n_groups: int = 0  # the first n groups of plan.order are updated (block encodings)
    bits: tuple[int, ...] = ()  # or: each singular component's bit width, 0 = not sent (low rank)

    @property
    def rank(self) -> int:
        return sum(1 for b in self.bits if b)

    @property
    def cost(self) -> float:
        if self.rank:
            p = self.plan
            return sum(float(p.lr_cost[k, p.lr_bits.index(b)]) for k, b in enumerate(self.bits) if b) + RECORD_OVERHEAD
        return self.n_groups * self.plan.block_cost + (RECORD_OVERHEAD if self.n_groups else 0)


def select(plans: list[UpdatePlan], budget: int | None) -> list[Choice]:
    """Greedy allocation by error removed per byte, over block prefixes (most important
    first) or singular components and their bit widths (each component climbs its own
    ladder of widths) of each tensor, whichever carries its whole update more cheaply.
    Without a budget, every tensor gets all of it: every component at its widest.

    Each ladder (a tensor's block prefixes, or one component's widths) is cut to the lower
    convex hull of (bytes, error), so error removed per byte falls along it, and only its
    next step competes: a heap of next steps, best ratio first. A tensor's record header
    is priced into its first step taken; once a tensor has a record, the next steps of
    its other ladders are re-priced without it. A step that does not fit closes its ladder."""
    choices = []
    for p in plans:
        if p.prefer_lowrank:
            choices.append(Choice(p, bits=(p.lr_bits[-1],) * len(p.lr_gains)))
        else:
            choices.append(Choice(p, n_groups=len(p.order)))
    if budget is None:
        return choices
    ladders: dict[tuple[int, int], list[tuple[int, int, float, float]]] = {}  # (tensor, component or -1)
    for i, (p, c) in enumerate(zip(plans, choices)):
        if p.prefer_lowrank:
            c.bits = (0,) * len(p.lr_gains)
            for k in range(len(p.lr_gains)):
                ladders[(i, k)] = _hull(float(p.lr_gains[k]), p.lr_err[k], p.lr_cost[k], p.lr_bits)
        else:
            c.n_groups = 0
            n = len(p.gains)
            edges = sorted({max(1, int(n * f)) for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)})
            cum = np.concatenate([[0.0], np.cumsum(p.gains)])
            ladders[(i, -1)] = _hull(float(cum[-1]), np.array([cum[-1] - cum[e] for e in edges]),
                                     np.array([e * p.block_cost for e in edges], dtype=np.float64), edges)
    keys_of: dict[int, list[tuple[int, int]]] = {}
    for key in ladders:
        keys_of.setdefault(key[0], []).append(key)
    pos = dict.fromkeys(ladders, 0)
    version = dict.fromkeys(ladders, 0)
    started = [False] * len(plans)
    heap: list[tuple[float, tuple[int, int], int]] = []

    def push(key: tuple[int, int]) -> None:
        version[key] += 1
        if pos[key] < len(ladders[key]):
            _b0, _b1, gain, nbytes = ladders[key][pos[key]]
            over = 0 if started[key[0]] else RECORD_OVERHEAD
            heapq.heappush(heap, (-gain / (nbytes + over), key, version[key]))

    for key in ladders:
        push(key)
    spent = 0.0
    while heap:
        _neg, key, ver = heapq.heappop(heap)
        if ver != version[key]:
            continue  # re-priced or closed since
        i, k = key
        _b0, b1, _gain, nbytes = ladders[key][pos[key]]
        cost = nbytes + (0 if started[i] else RECORD_OVERHEAD)
        if spent + cost > budget:
            pos[key] = len(ladders[key])  # closed
            continue
        spent += cost
        c = choices[i]
        if k < 0:
            c.n_groups = b1
        else:
            c.bits = c.bits[:k] + (b1,) + c.bits[k + 1 :]
        pos[key] += 1
        if not started[i]:
            started[i] = True
            for other in keys_of[i]:
                push(other)  # no header to pay any more
        else:
            push(key)
    return choices


def _stochastic_is_closer(p: UpdatePlan, a: np.ndarray, b: np.ndarray) -> bool:
    """Whether a Q8_0 low-rank update should be rounded without bias. Requantising to
    nearest erases every change below half a step: the device holds
    ``dequantise(quantise(W))``, not ``W``, so a small update mostly rounds back to the same
    codes (SmolLM2 in bench/dwc.py: KL 0.42 after the whole update, 0.087 with unbiased
    rounding, 0.037 for a fresh export). Unbiased rounding adds noise instead, which costs
    more than it brings when the update spans several steps (the tiny models). The cloud
    simulates nearest rounding and measures how much of the update it delivers, along the
    update's own direction; under 90%: stochastic. (A plain L2 distance to the target
    prefers nearest even when it drops the update: the erased part is systematic, the
    noise is not, and the model's outputs feel the former far more.)"""
    upd = (b @ a).reshape(-1).astype(np.float32)  # (n,), as the device will add it (up to summation order)
    moved = dequantize("Q8_0", quantize("Q8_0", p.mirror + upd)) - p.mirror
    norm = float(np.dot(upd.astype(np.float64), upd))
    return norm > 0 and float(np.dot(moved.astype(np.float64), upd)) / norm < 0.9


def build(base: Artifact, choices: list[Choice], builder: DeltaBuilder,
          cache: dict[tuple[str, tuple[int, ...], int], tuple[str, list[BuiltRecord]]] | None = None) -> dict[str, int]:
    """Add the chosen records to ``builder``. Returns records per encoding.

    ``cache``: records built for earlier choices on the same base, by (tensor, rank,
    groups); a choice found there is added as built (a --max-kl search tries several
    budgets that mostly choose the same records), and new ones are added to it."""
    counts: dict[str, int] = {}
    for c in choices:
        key = (c.plan.t.info.name, c.bits, c.n_groups)
        if cache is not None and key in cache:
            kind, built = cache[key]
            for b in built:
                builder.add_built(b)
            counts[kind] = counts.get(kind, 0) + 1
            continue
        first = builder.record_count
        kind = _build_one(c, builder)
        if kind is None:
            continue
        counts[kind] = counts.get(kind, 0) + 1
        if cache is not None:
            cache[key] = (kind, builder.built_since(first))
    return counts


def _build_one(c: Choice, builder: DeltaBuilder) -> str | None:
    """Add one choice's records; returns its kind (None when it adds nothing)."""
    p, info = c.plan, c.plan.t.info
    if c.rank:
        sent = [k for k, b in enumerate(c.bits) if b]
        bits = [c.bits[k] for k in sent]
        a, b = p.lr_a[sent], p.lr_b[:, sent]

        def device_side(v: np.ndarray, nb: int) -> np.ndarray:
            return mx_dequantize(*mx_quantize(v, nb, MX_GROUP), MX_GROUP)  # as the device decodes it

        qa = np.stack([device_side(a[j], nb) for j, nb in enumerate(bits)])  # (r, cols)
        qb = np.stack([device_side(b[:, j], nb) for j, nb in enumerate(bits)], axis=1)  # (rows, r)
        stochastic = info.type_name == "Q8_0" and _stochastic_is_closer(p, qa, qb)
        builder.add_low_rank(info.name, a, b, 1.0, factor_dtype="mx", bits=bits, group=MX_GROUP,
                             rounding="stochastic" if stochastic else "nearest",
                             seed=zlib.crc32(info.name.encode()) if stochastic else 0)
        return "lowrank"
    if not c.n_groups:
        return None
    groups = np.sort(p.order[: c.n_groups])
    starts, lengths = changed_runs(np.isin(np.arange(p.residual.shape[0]), groups))
    runs = list(zip(starts, lengths))
    if p.encoding == "replace":
        block, unit = type_layout(info.type_name)
        per = p.group // block  # units per group
        new = p.mirror.copy().reshape(-1, p.group)
        new[groups] = p.t.target.reshape(-1, p.group)[groups]
        q = np.frombuffer(quantize(info.type_name, new[groups].reshape(-1)), np.uint8)
        builder.replace_units(info.name, [s * per for s in starts], [n * per for n in lengths], q.tobytes())
        return "replace"
    bits = 4 if p.encoding == "qadd4" else 8
    q, scale = symmetric_quantize(p.residual[groups], lim=7 if bits == 4 else 127)  # (k, g), (k,)
    kw = {"group": p.group} if info.type_name in ("F32", "F16", "BF16") else {}
    builder.add_quantized(info.name, runs, scale, q.reshape(-1), bits=bits, **kw)
    return "qadd"


# --- measuring ----------------------------------------------------------------------------


def weight_error(art: Artifact, targets: list[TensorTarget], mirror_before: dict[str, np.ndarray],
                 now_values: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """How close the artefact's weights are to the targets, over the targeted tensors
    (``now_values``: the artefact's dequantised values, when already at hand)."""
    resid = upd = tnorm = 0.0
    for t in targets:
        now = (now_values[t.info.name] if now_values is not None
               else dequantize(t.info.type_name, read_tensor(art.tensor(t.info.name))))
        resid += float(((now - t.target).astype(np.float64) ** 2).sum())
        upd += float(((mirror_before[t.info.name] - t.target).astype(np.float64) ** 2).sum())
        tnorm += float((t.target.astype(np.float64) ** 2).sum())
    return {
        "relative_error": math.sqrt(resid / tnorm) if tnorm else 0.0,  # ||W - W*|| / ||W*||
        "update_left": math.sqrt(resid / upd) if upd else 0.0,  # ||W - W*|| / ||W_before - W*||
    }


def probe_kl(artifact: Path, target_logits: list[np.ndarray], prompt_ids: list[list[int]]) -> float:
    """Mean KL(target || artefact) over every probe position, on the device runtime."""
    from cdcca_edge.runtime import load
    from cdcca_edge.runtime.scores import kl_divergence

    kls = []
    with load(artifact) as m:
        for ids, ref in zip(prompt_ids, target_logits):
            kls.append(kl_divergence(ref, m.prompt_logits(ids)))
    return float(np.concatenate(kls).mean())


def target_logits(target: Path, target_base: Path | None, prompts: Sequence[str],
                  model: Any | None = None) -> tuple[list[np.ndarray], list[list[int]]]:
    """Logits of the cloud target (torch) on the probe prompts, and their token ids.
    ``model``: the target already loaded (``load_targets(..., return_model=True)``)."""
    torch = require("torch", "cloud")
    transformers = require("transformers", "cloud")
    from cdcca_edge.converters.hf import merge_adapter

    base = target_base or target
    if model is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        if target_base is not None:
            model = merge_adapter(model, Path(target))
    tok = transformers.AutoTokenizer.from_pretrained(base)
    model.eval()
    logits, ids = [], []
    for p in prompts:
        t = tok(p)["input_ids"]
        with torch.no_grad():
            logits.append(model(torch.tensor([t])).logits[0].float().numpy())
        ids.append(t)
    return logits, ids


# --- the command --------------------------------------------------------------------------


@dataclass
class DWCReport:
    delta: str
    bytes: int
    artifact_bytes: int
    records: int
    records_by_encoding: dict[str, int]
    weights_touched: float  # fraction of the artefact's weights in rewritten blocks
    relative_error: float  # after the patch: ||W - W*|| / ||W*|| over targeted tensors
    update_left: float  # ... / ||W_before - W*||: 0 = the whole update arrived
    relative_error_before: float
    probe_kl: float | None
    probe_kl_before: float | None
    budget_bytes: int | None
    base_identity: str
    target_identity: str
    from_version: int
    to_version: int
    signed: bool
    search: list[dict[str, float]] = field(default_factory=list)  # max-kl: budgets tried
    mirror_advanced: bool = False  # the mirror now is the delta's target
    # a LLaVA update on one file of a language GGUF + mmproj pair: the update's parameters
    # (changed ones, or every one of a full-weights target) the other file holds (its own delta)
    parameters_elsewhere: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_delta(
    base: str | Path,
    target: str | Path,
    out: str | Path,
    target_base: str | Path | None = None,
    config: DWCConfig = DWCConfig(),
    probe: Sequence[str] | None = None,
    sign_key: Any | None = None,
    progress: Callable[[str], None] | None = None,
    advance_mirror: bool = False,
    expect_identity: str | None = None,
) -> DWCReport:
    """Compress ``target`` (HF dir, or adapter + ``target_base``) into a delta for the
    device artefact mirrored at ``base``, in one operation: build, measure, and (with
    ``advance_mirror``) leave the mirror at the delta's target — applied by the same
    patch code the device runs, so the mirror stays the device's model byte for byte.

    Each candidate delta is measured on the mirror itself, in place, and taken back with
    the undo delta the patch writes (no copy of the model; ``trial_undo_path`` keeps the
    undo across a crash, and the next call restores the mirror first). Without
    ``advance_mirror`` the mirror ends exactly as it began.

    ``expect_identity``: the identity the device reports; the mirror must have it (a delta
    built on any other bytes would not apply there).

    Raises:
        UsageError: bad configuration, max_kl without probe prompts, a probe KL on an
            mmproj, or a LLaVA update with nothing for this file of a pair.
        MissingTensorError: an update has no slot in the artefact.
        FormatError: a slot's shape is not the parameter's (a mirror of another model).
        IntegrityError: the mirror is not the device's model (``expect_identity``), or the
            advanced mirror does not have the delta's target identity.
    """
    say = progress or (lambda _m: None)
    if config.max_kl is not None and not probe:
        raise UsageError("--max-kl needs --probe prompts to measure the KL on")
    restored = restore_interrupted_trial(base)
    if restored:
        say(f"the mirror was left mid-measurement by an interrupted run: {restored}")
    art = open_artifact(base)
    mirror = art.path if art.format == "gguf" else art.root
    nbits = is_nbits(art)
    if nbits and (config.budget_bytes is not None or config.max_kl is not None):
        raise UsageError(f"{mirror}: MatMulNBits ({art.metadata['cdcca.quant']}) weights go whole (re-quantised "
                         "blocks); --budget-bytes and --max-kl are not available for them yet")
    if expect_identity is not None:
        from cdcca_edge.core.state import current_identity

        have, _, _ = current_identity(art)
        if have != expect_identity:
            raise IntegrityError(f"{mirror}: the mirror's identity is {have[:16]}, the device reports "
                                 f"{expect_identity[:16]}: they have parted ways; re-seed the mirror "
                                 "from the device's version before building its next delta")
    if nbits:
        return make_nbits_delta(art, Path(target), Path(out), Path(target_base) if target_base else None, probe,
                                sign_key, say, advance_mirror)
    from cdcca_edge.converters.mapping import is_mmproj

    if is_mmproj(art) and (probe or config.max_kl is not None):
        raise UsageError(f"{mirror}: an mmproj has no language model to measure a probe KL on; give "
                         "--budget-bytes or send the whole update (measure on the language GGUF)")
    say("loading the target")
    elsewhere: list[str] = []
    targets, _, target_model = load_targets(art, target, target_base, return_model=True,  # loaded once
                                            elsewhere=elsewhere)
    if elsewhere:
        say(f"{len(elsewhere)} of the update's parameters live in the other file of the pair (its own delta)")
    say("pricing the update")
    mirror_before = {t.info.name: dequantize(t.info.type_name, read_tensor(t.info)) for t in targets}  # once
    plans = [p for p in (price(t, config, mirror=mirror_before[t.info.name]) for t in targets)
             if p is not None]
    total_elems = sum(t.n_elements for t in art.tensors)
    ref = ids = None
    if probe:
        say("target logits on the probe prompts")
        ref, ids = target_logits(Path(target), Path(target_base) if target_base else None, probe,
                                 model=target_model)
    del target_model  # the targets hold what the rest needs

    built: dict[tuple[str, tuple[int, ...], int], tuple[str, list[BuiltRecord]]] = {}  # across budgets

    def attempt(budget: int | None, path: Path) -> tuple[Any, dict[str, int], list[Choice], list[list[bytes]]]:
        choices = select(plans, budget)
        builder = DeltaBuilder(art, created_by="cdcca-edge delta make (DWC)")
        counts = build(art, choices, builder, cache=built if config.max_kl is not None else None)
        # the new bytes the builder computed are applied to the mirror as they are
        return builder.write(path, sign_key=sign_key), counts, choices, builder.new_bytes()

    # the mirror as it is, before any candidate touches it
    kl_before = probe_kl(mirror, ref, ids) if ref is not None else None
    before = weight_error(art, targets, mirror_before, now_values=mirror_before)

    def measure(delta_path: Path, computed: list[list[bytes]],
                keep: bool = False) -> tuple[float | None, dict[str, float]]:
        """Apply ``delta_path`` to the mirror in place, measure, and undo it unless ``keep``."""
        from cdcca_edge.core.patch import apply_delta
        from cdcca_edge.core.trust import Trust

        undo = trial_undo_path(mirror)
        try:
            apply_delta(mirror, delta_path, trust=Trust.none(), undo_out=undo,  # our own delta
                        computed=computed)
            err = weight_error(open_artifact(mirror), targets, mirror_before)
            kl = probe_kl(mirror, ref, ids) if ref is not None else None
        finally:
            if not keep:
                restore_interrupted_trial(mirror)
        undo.unlink(missing_ok=True)
        return kl, err

    out = Path(out)
    search: list[dict[str, float]] = []
    if config.max_kl is not None:
        full = sum(c.cost for c in select(plans, None)) + 1
        lo, hi = 1024, int(full)
        best = None
        for _ in range(8):  # binary search on the budget, in a log scale
            mid = int(math.sqrt(lo * hi))
            with tempfile.NamedTemporaryFile(suffix=".cdcd", dir=out.parent, delete=False) as f:
                trial = Path(f.name)
            summary, counts, choices, computed = attempt(mid, trial)
            kl, _ = measure(trial, computed)
            search.append({"budget": mid, "bytes": summary.bytes, "kl": kl})
            say(f"budget {mid:,} bytes: KL {kl:.4g}")
            if kl is not None and kl <= config.max_kl:
                hi = mid
                if best:
                    best[0].unlink(missing_ok=True)
                best = (trial, summary, counts, choices, computed)
            else:
                lo = mid
                trial.unlink(missing_ok=True)
            if hi / lo < 1.15:
                break
        if best is None:
            summary, counts, choices, computed = attempt(None, out)
        else:
            shutil.move(str(best[0]), out)
            summary, counts, choices, computed = best[1:]
            summary.path = out
        budget = hi if best else None
    else:
        budget = config.budget_bytes
        summary, counts, choices, computed = attempt(budget, out)
    say("advancing the mirror" if advance_mirror else "measuring the patched model")
    kl_after, err = measure(out, computed, keep=advance_mirror)
    touched = sum(c.plan.t.info.n_elements if c.rank else c.n_groups * c.plan.group for c in choices)
    if advance_mirror:
        from cdcca_edge.core.state import current_identity

        now, _, _ = current_identity(open_artifact(mirror))
        if now != summary.target_identity:
            raise IntegrityError(f"{mirror}: after advancing, the mirror's identity is {now[:16]}, "
                                 f"not the delta's target {summary.target_identity[:16]}")
    return DWCReport(
        delta=str(out), bytes=out.stat().st_size, artifact_bytes=art.tensor_bytes,
        records=summary.records, records_by_encoding=counts, weights_touched=touched / total_elems,
        relative_error=err["relative_error"], update_left=err["update_left"],
        relative_error_before=before["relative_error"], probe_kl=kl_after, probe_kl_before=kl_before,
        budget_bytes=budget, base_identity=summary.base_identity,
        target_identity=summary.target_identity, from_version=summary.from_version,
        to_version=summary.to_version, signed=summary.signed, search=search,
        mirror_advanced=advance_mirror, parameters_elsewhere=len(elsewhere),
    )


def trial_undo_path(mirror: str | Path) -> Path:
    """Where :func:`make_delta` keeps the undo delta of the candidate it is measuring on
    the mirror: ``cdcca-trial-undo.cdcd`` in an ONNX or bundle directory, beside a GGUF."""
    m = Path(mirror)
    return m / "cdcca-trial-undo.cdcd" if m.is_dir() else m.with_name(m.name + ".cdcca-trial-undo.cdcd")


def restore_interrupted_trial(mirror: str | Path) -> str | None:
    """Take back a candidate delta left applied to the mirror (a crash or an error while
    measuring it); returns what was done, or None if there was nothing to take back."""
    from cdcca_edge.core.patch import apply_delta
    from cdcca_edge.core.trust import Trust

    undo = trial_undo_path(mirror)
    if not undo.is_file():
        return None
    r = apply_delta(mirror, undo, trust=Trust.none(), allow_downgrade=True)  # written by this module
    undo.unlink()
    return "already as it began" if r.already_applied else f"restored to version {r.to_version}"
