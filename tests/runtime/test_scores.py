"""Token and sample uncertainty scores against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cdcca_edge.runtime.base import Backend, GenerationConfig
from cdcca_edge.runtime.scores import log_softmax, sample_score, score_logits


def test_token_score_by_hand():
    logits = np.log(np.array([[0.5, 0.3, 0.2]], dtype=np.float32))
    (s,) = score_logits(logits, [1])
    assert s.top1_prob == pytest.approx(0.5, abs=1e-6)
    assert s.margin == pytest.approx(0.2, abs=1e-6)
    assert s.logprob == pytest.approx(math.log(0.3), abs=1e-6)
    h = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    assert s.entropy == pytest.approx(h, abs=1e-6)


def test_uniform_and_peaked_extremes():
    v = 1000
    (u,) = score_logits(np.zeros((1, v), np.float32), [0])
    assert u.entropy == pytest.approx(math.log(v), rel=1e-5)
    assert u.margin == pytest.approx(0.0, abs=1e-7)
    peaked = np.full((1, v), -1e4, np.float32)
    peaked[0, 7] = 1e4  # huge logits must not overflow
    (p,) = score_logits(peaked, [7])
    assert p.entropy == pytest.approx(0.0, abs=1e-6) and p.top1_prob == pytest.approx(1.0)


def test_log_softmax_shift_invariant():
    x = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
    np.testing.assert_allclose(log_softmax(x), log_softmax(x + 100.0), atol=1e-5)


def test_sample_score_is_product_of_top1():
    logits = np.log(np.array([[0.8, 0.2], [0.6, 0.4]], dtype=np.float32))
    s = sample_score(score_logits(logits, [0, 0]))
    assert s.confidence == pytest.approx(0.8 * 0.6, rel=1e-6)
    assert s.n_tokens == 2
    assert s.max_entropy >= s.mean_entropy > 0


def test_sampling_rules():
    rng = np.random.default_rng(0)
    logits = np.array([2.0, 1.0, 0.5, -1.0], np.float32)
    assert Backend._pick(logits, GenerationConfig(), rng) == 0
    # top_k=1 and a tiny top_p are greedy whatever the temperature
    for cfg in (GenerationConfig(temperature=5.0, top_k=1), GenerationConfig(temperature=5.0, top_p=1e-6)):
        assert {Backend._pick(logits, cfg, rng) for _ in range(50)} == {0}
    # top_k=2 never picks outside the two best
    picks = {Backend._pick(logits, GenerationConfig(temperature=5.0, top_k=2), rng) for _ in range(200)}
    assert picks == {0, 1}


@pytest.mark.parametrize("kwargs", [dict(max_tokens=-1), dict(temperature=-0.1), dict(top_p=0.0), dict(top_k=-2)])
def test_generation_config_validates(kwargs):
    from cdcca_edge.core.errors import UsageError

    with pytest.raises(UsageError):
        GenerationConfig(**kwargs)


def test_kl_divergence():
    from cdcca_edge.runtime.scores import kl_divergence

    p = np.log(np.array([[0.5, 0.5]], np.float32))
    q = np.log(np.array([[0.9, 0.1]], np.float32))
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_divergence(p, q)[0] == pytest.approx(expected, rel=1e-5)
    assert kl_divergence(p, p)[0] == pytest.approx(0.0, abs=1e-7)


def test_row_scorer_matches_score_logits():
    from cdcca_edge.runtime.scores import RowScorer

    rng = np.random.default_rng(0)
    scorer = RowScorer(1000)
    for scale in (0.1, 3.0, 30.0):
        x = (rng.standard_normal(1000) * scale).astype(np.float32)
        tok = int(rng.integers(1000))
        a, b = scorer(x, tok), score_logits(x[None], [tok])[0]
        for field in ("logprob", "entropy", "top1_prob", "margin", "ref_top1"):
            assert getattr(a, field) == pytest.approx(getattr(b, field), rel=1e-4, abs=1e-5), field
        assert a.token == b.token == tok
