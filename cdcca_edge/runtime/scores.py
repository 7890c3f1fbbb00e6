"""Per-token uncertainty from logits the backend already produced (no extra forward pass).

All functions take raw logits ``(..., V)`` and are numerically stable in float32; the
same code serves both backends so that their scores are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenScore:
    """Uncertainty of one position's next-token distribution, and the token actually taken.

    ``logprob`` is the log-probability of ``token`` under that distribution: for a prompt
    position it scores the *next* prompt token, for a generated one the sampled token.
    """

    token: int
    logprob: float
    entropy: float  # nats
    top1_prob: float
    margin: float  # top-1 minus top-2 probability

    def as_dict(self) -> dict[str, float | int]:
        return {
            "token": self.token,
            "logprob": self.logprob,
            "entropy": self.entropy,
            "top1_prob": self.top1_prob,
            "margin": self.margin,
        }


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Stable log-softmax over the last axis, float32. (..., V) -> (..., V)."""
    x = np.asarray(logits, dtype=np.float32)
    m = x.max(axis=-1, keepdims=True)
    shifted = x - m
    lse = np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return shifted - lse


def score_logits(logits: np.ndarray, tokens: np.ndarray | list[int]) -> list[TokenScore]:
    """Score each row of ``logits`` (T, V) against the token taken after it (T,)."""
    logits = np.atleast_2d(np.asarray(logits, dtype=np.float32))  # (T, V)
    tokens = np.asarray(tokens, dtype=np.int64)  # (T,)
    if logits.shape[0] != tokens.shape[0]:
        raise ValueError(f"{logits.shape[0]} logit rows for {tokens.shape[0]} tokens")
    logp = log_softmax(logits)  # (T, V)
    p = np.exp(logp)
    entropy = -(p * logp).sum(axis=-1)  # (T,)
    top2 = np.partition(p, -2, axis=-1)[:, -2:] if p.shape[-1] > 1 else np.concatenate(
        [np.zeros_like(p), p], axis=-1
    )  # (T, 2): second-best, best
    top1 = top2[:, 1]
    margin = top2[:, 1] - top2[:, 0]
    taken = logp[np.arange(len(tokens)), tokens]
    return [
        TokenScore(int(t), float(lp), float(max(h, 0.0)), float(p1), float(mg))
        for t, lp, h, p1, mg in zip(tokens, taken, entropy, top1, margin)
    ]


@dataclass(frozen=True)
class SampleScore:
    """Per-sample uncertainty over generated tokens.

    ``confidence`` is the CDCCA reference score: the product of top-1 probabilities over
    generated tokens (the paper's code uploads a sample when it is below a threshold).
    """

    confidence: float
    mean_entropy: float
    max_entropy: float
    n_tokens: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "confidence": self.confidence,
            "mean_entropy": self.mean_entropy,
            "max_entropy": self.max_entropy,
            "n_tokens": self.n_tokens,
        }


def sample_score(scores: list[TokenScore]) -> SampleScore:
    if not scores:
        return SampleScore(1.0, 0.0, 0.0, 0)
    ent = np.array([s.entropy for s in scores], dtype=np.float64)
    log_conf = float(np.sum(np.log(np.maximum([s.top1_prob for s in scores], 1e-30))))
    return SampleScore(float(np.exp(log_conf)), float(ent.mean()), float(ent.max()), len(scores))
