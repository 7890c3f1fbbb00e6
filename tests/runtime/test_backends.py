"""Both backends behind one API: KV cache, streaming, scores, sampling, limits."""

from __future__ import annotations

import numpy as np
import pytest

from cdcca_edge.core.errors import FormatError, UsageError
from cdcca_edge.runtime import GenerationConfig, load

PROMPT = "question: what colour is the circle? answer:"


@pytest.fixture(params=["llama", "onnx"])
def backend(request, exports):
    fmt = "gguf" if request.param == "llama" else "onnx"
    result = exports("llama", fmt, "f32")
    with load(result.path, backend=request.param) as model:
        yield model


def test_incremental_cache_equals_full_prefill(backend):
    ids = backend.tokenize(PROMPT + " red. question: how many circles are there?")
    full = backend.prompt_logits(ids)  # (T, V)
    backend.reset()
    parts = [backend.forward(ids[:3], all_logits=True).copy()]
    for tok in ids[3:]:
        parts.append(backend.forward([tok]).copy())
    np.testing.assert_allclose(np.concatenate(parts), full, atol=2e-3)


def test_stream_matches_generate_and_scores(backend):
    cfg = GenerationConfig(max_tokens=24, score_prompt=True)
    events = []
    gen = backend.generate(PROMPT, cfg, on_token=events.append)
    assert "".join(e.text for e in events) == gen.text
    assert len(gen.scores) == len(gen.tokens) <= 24
    assert [s.token for s in gen.scores] == gen.tokens
    assert len(gen.prompt_scores) == len(gen.prompt_tokens) - 1
    assert [s.token for s in gen.prompt_scores] == gen.prompt_tokens[1:]
    for s in gen.scores:
        assert 0.0 <= s.entropy and 0.0 < s.top1_prob <= 1.0 and 0.0 <= s.margin <= s.top1_prob
    # the tiny model is trained to end its answers: a one-word answer, then EOS
    assert gen.finish_reason == "eos" and gen.tokens[-1] in backend.eos_token_ids
    assert not set(gen.tokens[:-1]) & backend.eos_token_ids and len(events) == len(gen.tokens) - 1
    short = backend.generate(PROMPT, GenerationConfig(max_tokens=1))
    assert short.finish_reason == "length" and len(short.tokens) == 1
    # the stream generator returns the same result
    stream = backend.stream(PROMPT, cfg)
    while True:
        try:
            next(stream)
        except StopIteration as stop:
            assert stop.value.tokens == gen.tokens
            break


def test_sampling_is_seeded(backend):
    cfg = GenerationConfig(max_tokens=12, temperature=1.5, seed=7, stop_at_eos=False)
    a = backend.generate("there are", cfg).tokens
    b = backend.generate("there are", cfg).tokens
    assert a == b and len(a) == 12
    others = {tuple(backend.generate("there are", GenerationConfig(max_tokens=12, temperature=1.5,
                                                                 seed=s, stop_at_eos=False)).tokens)
              for s in range(5)}
    assert len(others) > 1


def test_limits(backend):
    with pytest.raises(UsageError, match="empty prompt"):
        backend.generate("")
    long = "the red circle is left of the blue square. " * 200
    with pytest.raises(UsageError, match="exceed the context"):
        backend.generate(long)
    # max_tokens stops at the context end instead of overflowing it
    unit = "the red circle is left of the blue square. "
    k = max(k for k in range(1, 60) if len(backend.tokenize(unit * k)) < backend.n_ctx - 4)
    gen = backend.generate(unit * k, GenerationConfig(max_tokens=500, stop_at_eos=False))
    assert len(gen.prompt_tokens) + len(gen.tokens) == backend.n_ctx


def test_backends_agree(exports):
    """Same weights (f32) on both engines: same greedy answer, close scores."""
    with load(exports("qwen2", "gguf", "f32").path) as a, load(exports("qwen2", "onnx").path) as b:
        ga, gb = a.generate(PROMPT), b.generate(PROMPT)
        assert ga.tokens == gb.tokens and ga.text == gb.text
        np.testing.assert_allclose([s.entropy for s in ga.scores], [s.entropy for s in gb.scores], atol=5e-3)


def test_backend_must_fit_format(exports):
    with pytest.raises(FormatError, match="use --backend onnx"):
        load(exports("llama", "onnx").path, backend="llama")
    with pytest.raises(FormatError, match="use --backend llama"):
        load(exports("llama", "gguf", "f32").path, backend="onnx")
    with pytest.raises(UsageError, match="unknown backend"):
        load(exports("llama", "gguf", "f32").path, backend="tensorrt")  # type: ignore[arg-type]


def test_detokenize_round_trips_utf8(backend):
    """Multi-byte characters split across byte-level tokens come back exactly, token by
    token (what streaming relies on)."""
    text = "café ☕ naïve — 東京"
    ids = backend.tokenize(text)
    assert len(ids) > len(text.split())  # really split into byte tokens
    assert backend.detokenize(ids) == text.encode()
    assert b"".join(backend.detokenize([t]) for t in ids) == text.encode()
    assert backend.detokenize(sorted(backend.eos_token_ids)) == b""


def test_out_of_range_tokens_are_refused(backend):
    """llama.cpp would abort the process on such an id; onnxruntime would wrap it."""
    for bad in ([backend.n_vocab + 5], [-1]):
        with pytest.raises(UsageError, match="outside the vocabulary"):
            backend.generate(bad)
        with pytest.raises(UsageError, match="outside the vocabulary"):
            backend.forward(bad)


def test_special_tokens_parse_alike(exports, tiny_models):
    AutoTokenizer = pytest.importorskip("transformers").AutoTokenizer  # absent in the aarch64 lane

    text = "yes.<|endoftext|>no"
    hf = AutoTokenizer.from_pretrained(tiny_models["llama"])(text)["input_ids"]
    assert 0 in hf  # the EOS text is one control token
    with load(exports("llama", "gguf", "f32").path) as a, load(exports("llama", "onnx").path) as b:
        assert a.tokenize(text) == b.tokenize(text) == hf
