"""Per-token uncertainty from logits the backend already produced (no extra forward pass).

All functions take raw logits ``(..., V)`` and are numerically stable in float32; the
same code serves both backends so that their scores are comparable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cdcca_edge.core.errors import UsageError


REF_TEMPERATURE = 0.1  # the CDCCA reference code's softmax temperature for its confidence
# exp((x - max) / 0.1) for x - max < -2 is below 2e-9: invisible in a float32 sum next to 1
_REF_CUT = np.float32(-2.0)
_REF_SECOND = math.exp(-2.0)


@dataclass(frozen=True)
class TokenScore:
    """Uncertainty of one position's next-token distribution, and the token actually taken.

    ``logprob`` is the log-probability of ``token`` under that distribution: for a prompt
    position it scores the *next* prompt token, for a generated one the sampled token.
    ``ref_top1`` is the top-1 probability at temperature REF_TEMPERATURE (the paper's).
    """

    token: int
    logprob: float
    entropy: float  # nats
    top1_prob: float
    margin: float  # top-1 minus top-2 probability
    ref_top1: float = 1.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "token": self.token,
            "logprob": self.logprob,
            "entropy": self.entropy,
            "top1_prob": self.top1_prob,
            "margin": self.margin,
            "ref_top1": self.ref_top1,
        }


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Stable log-softmax over the last axis, float32. (..., V) -> (..., V)."""
    x = np.asarray(logits, dtype=np.float32)
    m = x.max(axis=-1, keepdims=True)
    shifted = x - m
    lse = np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return shifted - lse


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(p) || softmax(q)) per row, nats, computed in float64 (float32 rounding
    would make near-identical rows come out slightly negative). (T, V), (T, V) -> (T,)"""
    def lsm(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    lp, lq = lsm(p_logits), lsm(q_logits)
    return np.maximum((np.exp(lp) * (lp - lq)).sum(axis=-1), 0.0)


def score_logits(logits: np.ndarray, tokens: np.ndarray | list[int]) -> list[TokenScore]:
    """Score each row of ``logits`` (T, V) against the token taken after it (T,).

    Runs once per generated token, so it makes few passes over the vocabulary: one exp,
    one sum, one dot for the entropy (H = log Z - E_p[x - m]), and top-2 by two maxima
    rather than a partition.
    """
    x = np.atleast_2d(np.asarray(logits, dtype=np.float32))  # (T, V)
    tokens = np.asarray(tokens, dtype=np.int64)  # (T,)
    if x.shape[0] != tokens.shape[0]:
        raise UsageError(f"{x.shape[0]} logit rows for {tokens.shape[0]} tokens")
    rows = np.arange(x.shape[0])
    top = x.argmax(axis=-1)  # (T,)
    m = x[rows, top][:, None]  # (T, 1)
    shifted = x - m  # (T, V), <= 0
    e = np.exp(shifted)
    z = e.sum(axis=-1)  # (T,), >= 1
    log_z = np.log(z)
    entropy = log_z - np.einsum("tv,tv->t", e, shifted) / z
    e[rows, top] = 0.0  # the best token out of the way: the max of the rest is the second
    p1 = 1.0 / z
    p2 = e.max(axis=-1) / z if x.shape[1] > 1 else np.zeros_like(z)
    taken = shifted[rows, tokens] - log_z
    # paper's confidence: softmax(x / 0.1); most terms underflow to 0, the sum stays >= 1
    ref = 1.0 / np.exp(shifted * np.float32(1.0 / REF_TEMPERATURE)).sum(axis=-1)
    return [
        TokenScore(int(t), float(lp), float(max(h, 0.0)), float(a), float(a - b), float(r))
        for t, lp, h, a, b, r in zip(tokens, taken, entropy, p1, p2, ref)
    ]


class RowScorer:
    """Scores one row of logits per call, for the decode loop: the numbers of
    :func:`score_logits` in five passes over the vocabulary and no allocation.

    Right after a decode step the caches hold the model's weights, not the logits, so each
    pass costs tens of microseconds; bench/uts.py measures the total against decode time.
    Two shortcuts, both exact to float32 or documented: ``exp(x)`` directly when the top
    logit is below 64 (no overflow, and one subtraction pass saved), and the T=0.1
    confidence from the top two logits when the second is more than 2 below the first
    (every other term is then below exp(-20): the error is at most 2e-9 per vocabulary
    entry, 1e-4 for 50k entries).
    """

    _FAST_MAX = 64.0  # exp(64) * 50k tokens stays far below float32's 3.4e38

    def __init__(self, n_vocab: int) -> None:
        self._e = np.empty(n_vocab, dtype=np.float32)
        self._ones = np.ones(n_vocab, dtype=np.float32)

    def __call__(self, logits: np.ndarray, token: int | None = None) -> TokenScore:
        """Score ``token`` (default: the argmax, i.e. the greedy choice) against ``logits``."""
        x = np.asarray(logits, dtype=np.float32).reshape(-1)  # (V,)
        e = self._e
        top = int(x.argmax())
        if token is None:
            token = top
        m = float(x[top])
        if m < self._FAST_MAX:
            shift = m  # e = exp(x) = exp(x - m) * exp(m)
            np.exp(x, out=e)
        else:
            shift = 0.0  # e = exp(x - m)
            np.subtract(x, np.float32(m), out=e)
            np.exp(e, out=e)
        scale = math.exp(shift)
        z = float(np.dot(e, self._ones)) / scale  # sum exp(x - m) >= 1
        log_z = math.log(z)
        # entropy = log z - sum p (x - m), with p = e / (z * scale)
        entropy = log_z - (float(np.dot(e, x)) / (z * scale) - m)
        e[top] = 0.0
        second = float(e.max()) / scale  # exp(x2 - m)
        p1, p2 = 1.0 / z, second / z
        if second < _REF_SECOND:
            ref = 1.0 / (1.0 + second ** (1.0 / REF_TEMPERATURE))
        else:
            near = x[x > np.float32(m) + _REF_CUT] - np.float32(m)
            ref = 1.0 / float(np.exp(near * np.float32(1.0 / REF_TEMPERATURE)).sum())
        return TokenScore(int(token), float(x[token]) - m - log_z, max(entropy, 0.0), p1, p1 - p2, ref)


@dataclass(frozen=True)
class SampleScore:
    """Per-sample uncertainty over generated tokens.

    ``ref_confidence`` is the CDCCA reference score: the product over generated tokens of
    the top-1 probability at temperature 0.1 (the paper's code uploads a sample when it is
    below 0.5). ``confidence`` is the same product at temperature 1.
    """

    confidence: float
    ref_confidence: float
    mean_entropy: float
    max_entropy: float
    n_tokens: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "confidence": self.confidence,
            "ref_confidence": self.ref_confidence,
            "mean_entropy": self.mean_entropy,
            "max_entropy": self.max_entropy,
            "n_tokens": self.n_tokens,
        }


def sample_score(scores: list[TokenScore]) -> SampleScore:
    if not scores:
        return SampleScore(1.0, 1.0, 0.0, 0.0, 0)
    ent = np.array([s.entropy for s in scores], dtype=np.float64)
    log_conf = float(np.sum(np.log(np.maximum([s.top1_prob for s in scores], 1e-30))))
    log_ref = float(np.sum(np.log(np.maximum([s.ref_top1 for s in scores], 1e-30))))
    return SampleScore(float(np.exp(log_conf)), float(np.exp(log_ref)), float(ent.mean()),
                       float(ent.max()), len(scores))
