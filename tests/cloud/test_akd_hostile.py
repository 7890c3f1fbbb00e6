"""Hostile bundles for `distill` (docs/akd.md, "Input"): refused with FormatError (exit 3)
and a message naming the problem and the fix, before any model is loaded, and nothing
written. Each case calls ``hostile("distill")`` once."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdcca_edge.cloud import akd
from cdcca_edge.cloud.akd import MAX_PROMPT_TOKENS, read_samples
from cdcca_edge.core.errors import FormatError
from tests.core.uplink_forge import block, bundle, good_arrays
from tests.hostile import hostile

VOCAB, CONTEXT = 300, 256  # good samples' ids are below 300 (uplink_forge); the tiny models' context


def text_sample(rng: np.random.Generator, sid: str, t_p: int = 6, t_a: int = 4, **arrays: Any) -> tuple[str, bytes]:
    a = good_arrays(rng, t_p, t_a)
    for k, v in arrays.items():
        if v is None:
            del a[k]
        else:
            a[k] = v
    return sid, block(sid, {"prompt": "p", "answer": "a", "uncertainty": 1.0}, a)


def refuse(path: Path, raw: bytes, **kw: Any) -> FormatError:
    path.write_bytes(raw)
    before = sorted(os.listdir(path.parent))
    with pytest.raises(FormatError) as err:
        read_samples([path], **kw)
    assert path.read_bytes() == raw and sorted(os.listdir(path.parent)) == before
    return err.value


@pytest.fixture(scope="module")
def spot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile-distill") / "b.cdcu"


def test_good_samples_read(spot):
    rng = np.random.default_rng(0)
    spot.write_bytes(bundle([text_sample(rng, "a"), text_sample(rng, "b", t_a=0)]))
    got = read_samples([spot], vocab_size=VOCAB, context=CONTEXT, answer_tokens=16)
    assert [s.id for s in got] == ["0:a", "0:b"] and len(got[0].device_weights) == 4
    assert all(isinstance(t, int) for t in got[0].prompt_ids) and got[1].device_weights == []


@st.composite
def distill_attacks(draw: st.DrawFn) -> tuple[bytes, dict[str, Any], str]:
    """(bundle, read_samples arguments, what the message must name)"""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    context = draw(st.integers(16, 300))
    kw = {"vocab_size": VOCAB, "context": context, "answer_tokens": draw(st.integers(1, 8))}
    t_a = draw(st.integers(1, 6))
    kind = draw(st.sampled_from(["weights", "empty-prompt", "prompt-dtype", "prompt-2d", "no-prompt",
                                 "over-context", "over-maximum", "vocab", "weights-length"]))
    extra: dict[str, Any] = {}
    t_p = 6
    if kind == "weights":  # the regression: NaN / inf / negative weights trained to NaN
        w = np.ones(t_a, np.float16)
        w[draw(st.integers(0, t_a - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf, -1.0, -0.01]))
        extra["token_weights"], name = w, "token_weights"
    elif kind == "empty-prompt":
        extra["prompt_ids"], name = np.zeros(0, np.uint32), "prompt_ids"
    elif kind == "prompt-dtype":  # e.g. float ids with NaN among them
        p = rng.random(5).astype(draw(st.sampled_from([np.float32, np.float16, np.int8, np.uint16])))
        if p.dtype.kind == "f":
            p[draw(st.integers(0, 4))] = np.nan
        extra["prompt_ids"], name = p, "prompt_ids"
    elif kind == "prompt-2d":
        extra["prompt_ids"] = rng.integers(0, VOCAB, draw(st.sampled_from([(2, 3), (1, 4), (3, 1, 2)]))
                                           ).astype(np.uint32)
        name = "prompt_ids"
    elif kind == "no-prompt":
        extra["prompt_ids"], name = None, "no prompt_ids"
    elif kind == "over-context":  # prompt + answer one or more tokens past the student's context
        t_p = max(1, context - max(t_a, kw["answer_tokens"]) + draw(st.integers(1, 40)))
        name = "context"
    elif kind == "over-maximum":  # longer than any context distill accepts
        kw["context"] = None
        t_p = MAX_PROMPT_TOKENS + draw(st.integers(1, 5000))
        extra["prompt_ids"], name = np.zeros(t_p, np.uint32), "maximum"
    elif kind == "vocab":
        where = draw(st.sampled_from(["prompt_ids", "answer_ids"]))
        n = t_p if where == "prompt_ids" else t_a
        ids = rng.integers(0, VOCAB, n).astype(np.uint32)
        ids[draw(st.integers(0, n - 1))] = draw(st.integers(VOCAB, 2**32 - 1))
        extra[where], name = ids, "vocabulary"
    else:
        extra["token_weights"] = np.ones(t_a + draw(st.integers(1, 3)), np.float16)
        name = "disagree in length"
    samples = [text_sample(rng, f"g{i}") for i in range(draw(st.integers(0, 2)))]
    samples.insert(draw(st.integers(0, len(samples))), text_sample(rng, "bad", t_p, t_a, **extra))
    return bundle(samples), kw, name


@settings(max_examples=250)
@given(case=distill_attacks())
def test_hostile_distill_inputs(spot, case):
    raw, kw, name = case
    hostile("distill")
    err = refuse(spot, raw, **kw)
    assert name in str(err), str(err)
    assert any(fix in str(err) for fix in ("collect", "distil")), str(err)


def test_total_tokens_are_bounded(spot, monkeypatch):
    """Many samples of allowed length still add up: distill reads at most MAX_TOTAL_TOKENS."""
    hostile("distill")
    monkeypatch.setattr(akd, "MAX_TOTAL_TOKENS", 100)
    rng = np.random.default_rng(2)
    err = refuse(spot, bundle([text_sample(rng, f"s{i}", 20, 5) for i in range(5)]), vocab_size=VOCAB)
    assert "fewer bundles" in str(err)


# --- multimodal samples -------------------------------------------------------------------

IMG = 7  # image token id


def visual_sample(rng: np.random.Generator, *, n: int = 16, width: int = 8, prompt: np.ndarray | None = None,
                  positions: np.ndarray | None = None) -> tuple[str, bytes]:
    k = 4
    a = good_arrays(rng, 5, 3)
    a["prompt_ids"] = np.array([1, 2, IMG, 3, 4], np.uint32) if prompt is None else prompt
    a["visual_features"] = rng.integers(-127, 128, (k, width)).astype(np.int8)
    a["visual_scales"] = np.full(k, 0.01, np.float16)
    a["visual_positions"] = np.arange(k, dtype=np.uint16) if positions is None else positions
    return "v", block("v", {"prompt": "p", "n_visual_tokens": n}, a)


MM_CASES = {
    "image tokens over the context": (dict(n=CONTEXT), "context"),
    "image tokens over the maximum": (dict(n=MAX_PROMPT_TOKENS + 1), "maximum"),
    "tower width differs": (dict(width=12), "width"),
    "no image token": (dict(prompt=np.array([1, 2, 3], np.uint32)), "image tokens"),
    "two image tokens": (dict(prompt=np.array([IMG, 2, IMG], np.uint32)), "image tokens"),
    "token outside the vocabulary": (dict(prompt=np.array([IMG, VOCAB], np.uint32)), "vocabulary"),
    "position past n_visual_tokens": (dict(n=3), "n_visual_tokens"),
    "positions not ascending": (dict(positions=np.array([3, 2, 1, 0], np.uint16)), "ascending"),
}


@pytest.mark.parametrize("case", sorted(MM_CASES))
def test_hostile_visual_samples(spot, case):
    from cdcca_edge.cloud.akd_mm import read_visual_samples

    hostile("distill")
    args, name = MM_CASES[case]
    raw = bundle([visual_sample(np.random.default_rng(0), **args)])
    spot.write_bytes(raw)
    with pytest.raises(FormatError, match=name):
        read_visual_samples([spot], vocab_size=VOCAB, context=CONTEXT, answer_tokens=16, image_token=IMG,
                            vision_width=8)
    assert spot.read_bytes() == raw


def test_good_visual_sample_reads(spot):
    from cdcca_edge.cloud.akd_mm import read_visual_samples

    spot.write_bytes(bundle([visual_sample(np.random.default_rng(0))]))
    (s,) = read_visual_samples([spot], vocab_size=VOCAB, context=CONTEXT, answer_tokens=16, image_token=IMG,
                               vision_width=8)
    assert s.tokens.shape == (4, 8) and s.n_tokens == 16 and s.prompt_ids.count(IMG) == 1


# --- the command line: exit 3 before any model is loaded ----------------------------------

def _cli_case(case: str) -> bytes:
    rng = np.random.default_rng(5)
    bad: dict[str, Any] = {
        "nan weights": dict(token_weights=np.array([1, np.nan, 1, 1], np.float16)),
        "inf weights": dict(token_weights=np.array([1, np.inf, 1, 1], np.float16)),
        "negative weights": dict(token_weights=np.array([1, -2, 1, 1], np.float16)),
        "empty prompt ids": dict(prompt_ids=np.zeros(0, np.uint32)),
        "NaN prompt ids": dict(prompt_ids=np.array([1, np.nan, 3], np.float32)),
        "2-D prompt ids": dict(prompt_ids=np.ones((2, 3), np.uint32)),
        "prompt over the student's context": dict(prompt_ids=np.ones(CONTEXT + 44, np.uint32)),
        "prompt and pseudo-label over the context": dict(prompt_ids=np.ones(CONTEXT - 10, np.uint32)),
        # the regression: a bundle of a few KB whose prompt is 100,000 tokens
        "100k-token prompt": dict(prompt_ids=np.ones(100_000, np.uint32)),
        "token outside the vocabulary": dict(answer_ids=np.array([1, 2, 3, 99_999], np.uint32)),
    }.get(case, {})
    if case == "65-dimension array":
        return bundle([("x", block("x", {}, {"x": np.zeros(1, np.uint8)},
                                   listing=[{"name": "x", "dtype": "u8", "shape": [1] * 65}]))])
    if case == "deeply nested header":
        return bundle([], raw_header=b"[" * 100_000 + b"]" * 100_000)
    return bundle([text_sample(rng, "ok"), text_sample(rng, "bad", **bad)])


CLI_CASES = {  # case: what the message must name
    "nan weights": "token_weights", "inf weights": "token_weights", "negative weights": "token_weights",
    "empty prompt ids": "'prompt_ids' is empty", "NaN prompt ids": "'prompt_ids' is f32",
    "2-D prompt ids": "'prompt_ids' is u32 [2, 3]",
    "prompt over the student's context": f"context of {CONTEXT}",
    "prompt and pseudo-label over the context": f"context of {CONTEXT}",
    "100k-token prompt": f"maximum of {MAX_PROMPT_TOKENS:,}", "token outside the vocabulary": "vocabulary",
    "65-dimension array": "dimensions", "deeply nested header": "nested deeper",
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_distill_exits_3(tiny_models, tmp_path, capsys, case):
    """Regressions: these ran to an adapter full of NaN with exit 0, to exit 1 "unexpected
    error", or (the long prompt) to gigabytes and minutes of teacher generation."""
    from cdcca_edge.cli import main

    hostile("distill")
    raw = _cli_case(case)
    path = tmp_path / "b.cdcu"
    path.write_bytes(raw)
    out = tmp_path / "adapter"
    model = str(tiny_models["llama"])
    cfg = json.loads((tiny_models["llama"] / "config.json").read_text())
    assert cfg["max_position_embeddings"] == CONTEXT and cfg["vocab_size"] > VOCAB  # the table's premises
    assert main(["distill", "--teacher", model, "--student", model, "--bundle", str(path), "-o", str(out),
                 "--epochs", "1", "--json"]) == 3
    err = capsys.readouterr().err
    assert "error (FormatError)" in err and "unexpected" not in err, err
    assert CLI_CASES[case] in err and ("collect" in err or "distil" in err), err
    assert not out.exists() and path.read_bytes() == raw and sorted(os.listdir(tmp_path)) == ["b.cdcu"]
