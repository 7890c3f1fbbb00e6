"""UTS, uncertainty-guided sampling: what the device uploads, decided on the device.

Sample stage: each input is answered as usual; its uncertainty (computed from the logits
already produced) is compared with a threshold calibrated on in-distribution inputs so that
a chosen fraction of them would be uploaded. Token stage: answer tokens whose entropy is
above a calibrated threshold are flagged and weigh more in the cloud's distillation loss;
visual tokens (multimodal models) are scored as out of distribution against calibration
statistics — a diagonal Mahalanobis distance — and only the top fraction is kept. The
``uts-diverse`` selector (image inputs) uploads as many samples as ``uts``, chosen for
uncertainty and diversity together; ``random`` uploads as many, chosen at random, for fair
comparisons.
Spec of the calibration file: docs/formats/uplink.md, section 5.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np

from cdcca_edge.core import uplink_format as U
from cdcca_edge.core.errors import FormatError, UsageError
from cdcca_edge.core.calibration import SCORE_NAMES, Calibration, VisualStats
from cdcca_edge.runtime.base import Backend, Generation, GenerationConfig

SAMPLE_SCORES = ("confidence", "ref_confidence", "mean_entropy", "max_entropy")
Selector = Literal["uts", "uts-diverse", "random", "all"]
DIVERSE_POOL = 2  # uts-diverse picks its k uploads among the k * DIVERSE_POOL most uncertain

def _prompt_nll(g: Generation) -> float:
    """Mean negative log-likelihood of the prompt's tokens under the model (nats)."""
    if not g.prompt_scores:
        return 0.0
    return -sum(s.logprob for s in g.prompt_scores) / len(g.prompt_scores)


# Sample uncertainty scores, larger = less certain. The answer-side ones follow the paper;
# the prompt-side ones measure how surprising the input itself is, which is what finds
# inputs from another domain when the model answers them confidently anyway
# (docs/formats/uplink.md, section 5, has the measured comparison).
SCORES: dict[str, Callable[[Generation], float]] = {
    "mean_entropy": lambda g: g.sample.mean_entropy,
    "max_entropy": lambda g: g.sample.max_entropy,
    "neg_log_confidence": lambda g: -math.log(max(g.sample.confidence, 1e-300)),
    # the paper's: product of top-1 probabilities at temperature 0.1 (below 0.5 -> upload)
    "ref_confidence": lambda g: -math.log(max(g.sample.ref_confidence, 1e-300)),
    "prompt_nll": _prompt_nll,
    "surprise": lambda g: _prompt_nll(g) + g.sample.mean_entropy,  # input + answer
}
assert tuple(SCORES) == SCORE_NAMES  # the calibration format names them (core/calibration.py)
NEEDS_PROMPT_SCORES = ("prompt_nll", "surprise")
DEFAULT_SCORE = "surprise"


def generation_config(score: str, max_tokens: int) -> GenerationConfig:
    """What to compute while answering: prompt scores only when the score needs them."""
    return GenerationConfig(max_tokens=max_tokens, score_prompt=score in NEEDS_PROMPT_SCORES)


def sample_uncertainty(gen: Generation, score: str) -> float:
    try:
        return SCORES[score](gen)
    except KeyError:
        raise UsageError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}") from None


def is_multimodal(model: Any) -> bool:
    return hasattr(model, "encode_image")



def answer_item(model: Any, item: dict[str, Any], cfg: GenerationConfig) -> tuple[Generation, np.ndarray | None]:
    """Answer one input: (generation, the vision tower's tokens (N, Dv) or None)."""
    if "image" not in item:
        return model.generate(item["prompt"], cfg), None
    if not is_multimodal(model):
        raise UsageError("these inputs have images; image inputs need a multimodal artefact (a bundle "
                         "exported from a LLaVA model)")
    feats, embeds = model.encode_image(item["image"])
    return model.generate(model.prompt(item["prompt"]), cfg, image_embeds=embeds), feats


def item_uncertainty(gen: Generation, feats: np.ndarray | None, score: str, visual: "VisualStats | None") -> float:
    """The sample score; with an image, plus its drift score, so that an unfamiliar image
    raises the uncertainty as an unfamiliar prompt does: ``image_weight`` times the
    image-level drift (:meth:`VisualStats.image_drift`) when the calibration has image
    descriptors, else the log of its tokens' mean out-of-distribution score."""
    u = sample_uncertainty(gen, score)
    if feats is not None and visual is not None:
        if visual.images is not None:
            u += visual.image_weight * visual.image_drift(feats)
        else:
            u += math.log(max(float(visual.ood_scores(feats).mean()), 1e-12))
    return u


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a :func:`read_inputs` file (DWC's probe prompts)."""
    return [item["prompt"] for item in read_inputs(path)]


def read_inputs(path: str | Path) -> list[dict[str, Any]]:
    """JSON Lines of ``{"id"?: str, "prompt": str, "image"?: path}``; ids default to
    the line number. Image paths are relative to the file.

    Raises:
        FormatError: a line is not such an object.
    """
    path = Path(path)
    out = []
    seen = set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FormatError(f"{path}:{n}: not valid JSON ({exc})") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise FormatError(f'{path}:{n}: expected {{"prompt": "...", "id"?: ..., "image"?: ...}}')
        sid = str(obj.get("id", n))
        if sid in seen:
            raise FormatError(f"{path}:{n}: duplicate id {sid!r}")
        seen.add(sid)
        item = {"id": sid, "prompt": obj["prompt"], "raw_bytes": len(line.encode())}
        if obj.get("image") is not None:
            img = (path.parent / str(obj["image"])).resolve()
            if not img.is_file():
                raise FormatError(f"{path}:{n}: image {obj['image']!r} not found")
            item["image"] = img
            item["raw_bytes"] += img.stat().st_size
        out.append(item)
    if not out:
        raise FormatError(f"{path}: no inputs")
    return out


def calibrate(
    model: Any,
    prompts: Iterable[str | dict[str, Any]],
    artifact_identity: str,
    rate: float = 0.1,
    token_rate: float = 0.2,
    score: str = DEFAULT_SCORE,
    max_tokens: int = 32,
    keep: float = 0.5,
    progress: Callable[[int], None] | None = None,
) -> Calibration:
    """Fit the thresholds that upload ``rate`` of these in-distribution samples and flag
    ``token_rate`` of their answer tokens. Inputs with images (dicts with ``image``, on a
    multimodal model) also fit the visual-token statistics; ``keep`` is the fraction of
    visual tokens an upload carries."""
    for name, r in (("rate", rate), ("token_rate", token_rate), ("keep", keep)):
        if not 0.0 < r < 1.0 and not (name == "keep" and r == 1.0):
            raise UsageError(f"{name} must be in (0, 1), got {r}")
    if score not in SCORES:
        raise UsageError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
    cfg = generation_config(score, max_tokens)
    answered = []
    token_h: list[float] = []
    for i, p in enumerate(prompts):
        item = p if isinstance(p, dict) else {"prompt": p}
        gen, feats = answer_item(model, item, cfg)
        answered.append((gen, feats))
        token_h.extend(s.entropy for s in gen.scores)
        if progress:
            progress(i + 1)
    if len(answered) < 10:
        raise UsageError(f"{len(answered)} calibration inputs are too few; give at least 10")
    feats_all = [f for _, f in answered if f is not None]
    visual = VisualStats.fit(np.concatenate(feats_all), keep=keep) if feats_all else None
    if visual is not None and len(feats_all) == len(answered):
        # every input has an image: the image-level drift score, each calibration image
        # scored without itself among its neighbours (else its own distance 0 would count)
        text = np.asarray([sample_uncertainty(g, score) for g, _ in answered])
        drift = visual.fit_images(feats_all, text)  # sets image_weight
        u = text + visual.image_weight * drift
    else:
        u = np.asarray([item_uncertainty(g, f, score, visual) for g, f in answered])
    h = np.asarray(token_h) if token_h else np.zeros(1)
    return Calibration(
        artifact_identity=artifact_identity, score=score, rate=rate,
        threshold=float(np.quantile(u, 1.0 - rate)), token_rate=token_rate,
        token_threshold=float(np.quantile(h, 1.0 - token_rate)), max_tokens=max_tokens,
        n_samples=len(u), n_tokens=len(token_h),
        quantiles={f"q{int(q * 100)}": float(np.quantile(u, q)) for q in (0.1, 0.5, 0.9, 0.99)},
        visual=visual,
    )


@dataclass
class Decision:
    """One input's outcome: its answer, uncertainty, and whether it goes up."""

    item: dict[str, Any]
    generation: Generation
    uncertainty: float
    upload: bool = False
    visual: np.ndarray | None = None  # the vision tower's tokens (N, Dv), image inputs


def decide(decisions: list[Decision], calib: Calibration, selector: Selector, seed: int = 0) -> None:
    """Mark uploads: ``uts`` above the threshold; ``uts-diverse`` as many, by uncertainty and
    diversity (:func:`diverse_picks`); ``random`` as many at random; ``all`` every input
    (an anchor set of in-distribution samples, sent once)."""
    chosen = [d.uncertainty > calib.threshold for d in decisions]
    if selector == "all":
        chosen = [True] * len(decisions)
    elif selector == "uts-diverse":
        if any(d.visual is None for d in decisions):
            raise UsageError("the uts-diverse selector spreads uploads over images; these inputs include "
                             "some without one: use --selector uts")
        picks = diverse_picks([d.uncertainty for d in decisions], [d.visual for d in decisions],  # type: ignore[misc]
                              sum(chosen))
        chosen = [i in picks for i in range(len(decisions))]
    elif selector == "random":
        k = sum(chosen)
        rng = np.random.default_rng(seed)
        picks = set(rng.choice(len(decisions), size=k, replace=False).tolist()) if k else set()
        chosen = [i in picks for i in range(len(decisions))]
    elif selector != "uts":
        raise UsageError(f"unknown selector {selector!r}; choose uts, uts-diverse, random or all")
    for d, c in zip(decisions, chosen):
        d.upload = c


def diverse_picks(uncertainty: list[float], visual: list[np.ndarray], k: int) -> set[int]:
    """k indices by uncertainty and diversity: among the ``k * DIVERSE_POOL`` most uncertain
    inputs, the most uncertain first, then again and again the one farthest (cosine
    distance) from all picked so far, over each image's mean vision-tower token (``visual``:
    (N, Dv) each). Uncertainty alone can pile uploads onto one kind of input the student
    finds hard; this spreads them over the images. Measured on the demo: no gain over
    random uploads of the same count (docs/demo.md, "Tried since, not kept")."""
    if k <= 0:
        return set()
    pool = sorted(range(len(uncertainty)), key=lambda i: (-uncertainty[i], i))[: k * DIVERSE_POOL]
    emb = np.stack([np.asarray(visual[i], np.float64).mean(0) for i in pool])  # (P, Dv)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
    picked = [0]
    far = 1.0 - emb @ emb[0]  # (P,): each candidate's distance to the nearest pick
    far[0] = -1.0
    while len(picked) < min(k, len(pool)):
        j = int(np.argmax(far))
        picked.append(j)
        far = np.minimum(far, 1.0 - emb @ emb[j])
        far[picked] = -1.0  # never twice, even among identical images
    return {pool[j] for j in picked}


def token_weights(gen: Generation, calib: Calibration, low_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """(flags, weights) for the answer tokens: flagged where entropy > token threshold."""
    ent = np.array([s.entropy for s in gen.scores], dtype=np.float32)
    flags = ent > calib.token_threshold
    return flags.astype(np.uint8), np.where(flags, 1.0, low_weight).astype(np.float16)


def text_sample(g: Generation, sample_id: str, prompt: str, raw_bytes: int, uncertainty: float,
                calib: Calibration, low_weight: float) -> U.UplinkSample:
    """An uploaded sample's text part: the answer, its scores and the token weights AKD
    uses (docs/formats/uplink.md section 3). ``collect`` and the device agent's spool
    both build samples with it."""
    flags, weights = token_weights(g, calib, low_weight)
    sc = g.sample
    arrays: dict[str, Any] = {
        U.PROMPT_IDS: np.asarray(g.prompt_tokens, dtype=np.uint32),
        U.ANSWER_IDS: np.asarray(g.tokens, dtype=np.uint32),
        U.TOKEN_ENTROPY: np.asarray([s.entropy for s in g.scores], dtype=np.float16),
        U.TOKEN_FLAGS: flags,
        U.TOKEN_WEIGHTS: weights,
        # confidence, ref_confidence, mean_entropy, max_entropy (SAMPLE_SCORES order)
        U.SAMPLE_SCORES: np.asarray([getattr(sc, k) for k in SAMPLE_SCORES], dtype=np.float32),
    }
    if g.prompt_scores is not None:  # log-probability of prompt tokens 1..n-1
        arrays[U.PROMPT_LOGPROB] = np.asarray([s.logprob for s in g.prompt_scores], dtype=np.float16)
    meta: dict[str, Any] = {U.META_PROMPT: prompt, U.META_ANSWER: g.text,
                            U.META_UNCERTAINTY: round(uncertainty, 6), U.META_RAW_BYTES: raw_bytes}
    return U.UplinkSample(sample_id, meta, arrays)


def add_visual(sample: U.UplinkSample, feats: np.ndarray, prompt_ids: list[int], calib: Calibration,
               raw_image: np.ndarray | None = None) -> None:
    """The token stage on an image (docs/formats/uplink.md): only the image's most
    out-of-distribution vision tokens (``feats`` (N, Dv)) go up, int8 with a scale per
    token, with their positions; the prompt ids become ``prompt_ids``, the whole prompt in
    the bundle's template, its image token standing for the N positions. ``raw_image``:
    the image's bytes too, when configured.

    Raises:
        UsageError: more visual tokens than the format's u16 positions hold.
    """
    assert calib.visual is not None
    if len(feats) > U.MAX_VISUAL_TOKENS:
        raise UsageError(f"sample {sample.id!r}: {len(feats)} visual tokens, more than the uplink "
                         f"format's {U.MAX_VISUAL_TOKENS}; use a smaller image size")
    keep = calib.visual.select(feats)
    q, scale = U.quantize_tokens(feats[keep])
    sample.arrays[U.VISUAL_FEATURES], sample.arrays[U.VISUAL_SCALES] = q, scale
    sample.arrays[U.VISUAL_POSITIONS] = keep.astype(np.uint16)
    sample.meta[U.N_VISUAL_TOKENS] = int(len(feats))
    sample.arrays[U.PROMPT_IDS] = np.asarray(prompt_ids, np.uint32)
    if raw_image is not None:
        sample.arrays[U.RAW_IMAGE] = raw_image


@dataclass
class CollectReport:
    bundle: str
    selector: str
    n_seen: int
    n_uploaded: int
    bundle_bytes: int
    raw_input_bytes: int  # every input seen (prompt JSON line + image file)
    uploaded_raw_bytes: int  # the raw inputs of the uploaded samples only
    decode_seconds: float
    scoring_seconds: float  # part of decode_seconds spent on uncertainty scores
    uploaded_ids: list[str]
    calibration_matches: bool  # calibration made on this very artefact identity

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def collect(
    model: Backend,
    inputs: list[dict[str, Any]],
    calib: Calibration,
    out: str | Path,
    artifact_identity: str,
    artifact_version: int | None = None,
    selector: Selector = "uts",
    include_raw: bool = False,
    low_weight: float = 0.1,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> CollectReport:
    """Answer every input, select uploads, write the bundle, report what it cost."""
    from cdcca_edge.core.uplink_format import write_uplink

    if not (math.isfinite(low_weight) and low_weight >= 0):  # the bundle's loss weights (uplink.md)
        raise UsageError(f"low_weight must be a finite number >= 0, got {low_weight}")
    if any("image" in it for it in inputs) and not is_multimodal(model):
        raise UsageError("these inputs have images; image inputs need a multimodal artefact (a bundle "
                         "exported from a LLaVA model)")
    if any("image" in it for it in inputs) and calib.visual is None:
        raise UsageError("the calibration has no visual statistics; calibrate with image inputs "
                         "on this multimodal artefact")
    cfg = generation_config(calib.score, calib.max_tokens)
    decisions = []
    decode = scoring = 0.0
    for i, item in enumerate(inputs):
        gen, feats = answer_item(model, item, cfg)
        decode += gen.prefill_seconds + gen.decode_seconds
        scoring += gen.scoring_seconds
        decisions.append(Decision(item, gen, item_uncertainty(gen, feats, calib.score, calib.visual), visual=feats))
        if progress:
            progress(i + 1)
    decide(decisions, calib, selector, seed)
    samples = []
    for d in decisions:
        if not d.upload:
            continue
        base = text_sample(d.generation, d.item["id"], d.item["prompt"], d.item["raw_bytes"], d.uncertainty,
                           calib, low_weight)
        if d.visual is not None and calib.visual is not None:
            img = d.item["image"]
            raw = None
            if include_raw:  # the image file's bytes, or the pixels of an in-memory frame
                raw = (np.asarray(img, np.uint8) if isinstance(img, np.ndarray)
                       else np.frombuffer(Path(img).read_bytes(), np.uint8))
            add_visual(base, d.visual, model.language.tokenize(model.prompt(d.item["prompt"])), calib, raw)
        samples.append(base)
    header = {
        "artifact_identity": artifact_identity,
        "artifact_version": artifact_version,
        "selector": selector,
        "n_seen": len(decisions),
        "raw_input_bytes": sum(d.item["raw_bytes"] for d in decisions),
        "include_raw": include_raw,
        "calibration": {k: v for k, v in asdict(calib).items() if k not in ("visual", "quantiles")},
        "low_weight": low_weight,
    }
    write_uplink(out, header, samples)
    return CollectReport(
        bundle=str(out), selector=selector, n_seen=len(decisions), n_uploaded=len(samples),
        bundle_bytes=Path(out).stat().st_size, raw_input_bytes=header["raw_input_bytes"],
        uploaded_raw_bytes=sum(d.item["raw_bytes"] for d in decisions if d.upload),
        decode_seconds=decode, scoring_seconds=scoring,
        uploaded_ids=[d.item["id"] for d in decisions if d.upload],
        calibration_matches=calib.artifact_identity == artifact_identity,
    )


def artifact_identity(artifact: str | Path) -> tuple[str, int | None]:
    """(identity, version) of the artefact at ``artifact``: the verified sidecar's, else
    computed from the bytes (version None when unknown)."""
    from cdcca_edge.core.artifact import open_artifact
    from cdcca_edge.core.state import current_identity

    identity, state, _ = current_identity(open_artifact(artifact))
    return identity, (state.version if state is not None and state.version >= 0 else None)


def calibrate_artifact(artifact: str | Path, inputs: str | Path, output: str | Path, *,
                       backend: str = "auto", progress: Callable[[int, int], None] | None = None,
                       **options: Any) -> Calibration:
    """``uplink calibrate``: open the artefact, answer the inputs file, fit and save the
    calibration. ``options``: :func:`calibrate`'s (rate, token_rate, score, max_tokens, keep)."""
    from cdcca_edge.runtime import load

    items = read_inputs(inputs)
    identity, _ = artifact_identity(artifact)
    tick = (lambda done: progress(done, len(items))) if progress else None
    with load(artifact, backend=backend) as model:  # type: ignore[arg-type]
        cal = calibrate(model, items, identity, progress=tick, **options)
    cal.save(output)
    return cal


def collect_artifact(artifact: str | Path, inputs: str | Path, calib: str | Path, output: str | Path, *,
                     backend: str = "auto", progress: Callable[[int, int], None] | None = None,
                     **options: Any) -> "CollectReport":
    """``uplink collect``: open the artefact, answer the inputs file, write the uplink
    bundle of the samples selected. ``options``: :func:`collect`'s (selector,
    include_raw, low_weight, seed)."""
    from cdcca_edge.runtime import load

    items = read_inputs(inputs)
    cal = Calibration.load(calib)
    identity, version = artifact_identity(artifact)
    tick = (lambda done: progress(done, len(items))) if progress else None
    with load(artifact, backend=backend) as model:  # type: ignore[arg-type]
        return collect(model, items, cal, output, identity, version, progress=tick, **options)
