"""The backend interface and the generation loop shared by every backend.

A backend only knows how to tokenise and how to push tokens through its model while
keeping a KV cache (:meth:`Backend.forward`). Sampling, stopping, streaming and scoring
live here, once, so that the ONNX and llama.cpp backends behave identically and their
uncertainty scores are comparable.
"""

from __future__ import annotations

import codecs
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generator, Literal, Sequence

import numpy as np

from cdcca_edge.core.errors import UsageError
from cdcca_edge.runtime.scores import (
    RowScorer,
    SampleScore,
    TokenScore,
    sample_score,
    score_logits,
)

if TYPE_CHECKING:
    from cdcca_edge.core.patch import PatchResult
    from cdcca_edge.core.trust import Trust

FinishReason = Literal["eos", "length"]


_UNSCORED = TokenScore(-1, 0.0, 0.0, 0.0, 0.0)  # placeholder when scoring is off


@dataclass(frozen=True)
class GenerationConfig:
    """How to decode. ``temperature == 0`` is greedy (argmax)."""

    max_tokens: int = 32  # new tokens at most
    temperature: float = 0.0  # 0 = greedy; > 0 samples from softmax(logits / T)
    top_k: int = 0  # keep the k most likely tokens before sampling; 0 = all
    top_p: float = 1.0  # nucleus: smallest set with cumulative probability >= top_p
    seed: int | None = None  # sampling seed; same seed, same output
    stop_at_eos: bool = True
    score: bool = True  # score generated tokens (off only to measure what scoring costs)
    score_prompt: bool = False  # also score prompt positions (needs logits for each)

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise UsageError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UsageError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class Generation:
    """One prompt's answer with per-token uncertainty.

    ``scores[i]`` (empty with ``score=False``) scores generated token ``tokens[i]`` against
    the model's distribution
    at that step (raw logits, before temperature or top-k/top-p: uncertainty is the
    model's, whatever the sampler). ``prompt_scores[j]`` (when asked for) scores prompt token ``j + 1`` given
    the tokens before it; the first prompt token has no prediction.
    """

    prompt: str
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    scores: list[TokenScore]
    finish_reason: FinishReason
    prompt_scores: list[TokenScore] | None = None
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    scoring_seconds: float = 0.0  # of decode_seconds, the time spent computing scores
    token_texts: list[str] = field(default_factory=list)

    @property
    def sample(self) -> SampleScore:
        return sample_score(self.scores)

    def as_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "tokens": [
                {"text": txt, **s.as_dict()} for txt, s in zip(self.token_texts, self.scores)
            ],
            "sample": self.sample.as_dict(),
            "prompt_scores": None
            if self.prompt_scores is None
            else [s.as_dict() for s in self.prompt_scores],
            "timings": {
                "prefill_seconds": self.prefill_seconds,
                "decode_seconds": self.decode_seconds,
                "scoring_seconds": self.scoring_seconds,
                "decode_tokens_per_second": (len(self.tokens) - 1) / self.decode_seconds
                if self.decode_seconds > 0 and len(self.tokens) > 1
                else None,
            },
        }


@dataclass(frozen=True)
class StreamEvent:
    """One generated token as it arrives: its id, the text it completes, its score."""

    token: int
    text: str
    score: TokenScore


class Backend(ABC):
    """A loaded model on one inference engine. Not thread-safe: one generation at a time."""

    name: str = "base"

    @property
    def _serving(self) -> threading.RLock:
        """Held while generating and while patching: one of them at a time."""
        lock = self.__dict__.get("_serving_lock")
        if lock is None:
            lock = self.__dict__.setdefault("_serving_lock", threading.RLock())
        return lock

    # --- what a backend implements -----------------------------------------------------
    @property
    @abstractmethod
    def n_vocab(self) -> int: ...

    @property
    @abstractmethod
    def eos_token_ids(self) -> frozenset[int]: ...

    @property
    @abstractmethod
    def n_ctx(self) -> int:
        """Longest sequence (prompt + generated) the backend can hold."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids for ``text``, with the special tokens the model's tokenizer adds."""

    @abstractmethod
    def detokenize(self, tokens: Sequence[int]) -> bytes:
        """UTF-8 bytes of ``tokens`` (may end inside a multi-byte character)."""

    @abstractmethod
    def reset(self) -> None:
        """Forget the KV cache."""

    @abstractmethod
    def forward(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append ``tokens`` (vocabulary ids: see :meth:`check_tokens`) to the sequence,
        returning logits.

        Returns (T, V) float32 logits for every appended position if ``all_logits``, else
        (1, V) for the last one. The array may be reused by the next call: copy to keep.
        """

    def close(self) -> None:
        """Release the model. Idempotent."""

    @abstractmethod
    def reload(self) -> None:
        """Release the model and load it again from disk (after a patch)."""

    @property
    @abstractmethod
    def artifact_path(self) -> Path:
        """The artefact this backend serves (GGUF file or ONNX directory)."""

    def apply_patch(self, delta: str | Path, *, trust: "Trust", **kwargs: Any) -> "PatchResult":
        """Patch the served artefact in place, safely for a live model.

        Stops serving (waits for a running generation, releases the engine's view of the
        file — llama.cpp maps GGUF files shared, so it would otherwise read half-written
        tensors — and the shared serving lock), applies the delta
        (``core.patch.apply_delta``; ``trust`` and ``kwargs`` as there), then loads the
        model again. On failure the file is restored and the old model is reloaded.
        """
        from cdcca_edge.core.patch import apply_delta

        with self._serving:
            self.close()
            try:
                return apply_delta(self.artifact_path, delta, trust=trust, **kwargs)
            finally:
                self.reload()

    # --- the serving lock (docs/formats/delta.md, section 6.4) -----------------------------
    recovered: str | None = None  # what opening the model had to recover, if anything

    def _hold(self, path: Path) -> None:
        """Recover any interrupted patch, then hold a shared lock on the artefact while
        the engine has it mapped: patchers fail fast (naming this pid) or wait."""
        from cdcca_edge.core.patch import hold_for_serving

        self._release_hold()
        lock, self.recovered = hold_for_serving(path)
        self.__dict__["_hold_lock"] = lock

    def _release_hold(self) -> None:
        lock = self.__dict__.pop("_hold_lock", None)
        if lock is not None:
            lock.release()

    # --- shared behaviour -----------------------------------------------------------------
    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_tokens(self, tokens: Sequence[int]) -> list[int]:
        """``tokens`` as ints, each checked to be a vocabulary id.

        Raises:
            UsageError: an id outside ``[0, n_vocab)`` (engines would crash or wrap).
        """
        ids = [int(t) for t in tokens]
        bad = [t for t in ids if not 0 <= t < self.n_vocab]
        if bad:
            raise UsageError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.n_vocab})")
        return ids

    def prompt_logits(self, prompt: str | Sequence[int]) -> np.ndarray:
        """Logits (T, V) at every prompt position, from a fresh cache."""
        ids = self.tokenize(prompt) if isinstance(prompt, str) else self.check_tokens(prompt)
        self._check_len(len(ids))
        self.reset()
        return np.array(self.forward(ids, all_logits=True), dtype=np.float32, copy=True)

    def stream(
        self, prompt: str | Sequence[int], config: GenerationConfig = GenerationConfig()
    ) -> Generator[StreamEvent, None, Generation]:
        """Yield each token as it is generated; the generator returns the
        :class:`Generation` (``StopIteration.value``) when done."""

        def locked() -> Generator[StreamEvent, None, Generation]:
            with self._serving:
                return (yield from self._run(prompt, config))

        return locked()

    def generate(
        self,
        prompt: str | Sequence[int],
        config: GenerationConfig = GenerationConfig(),
        on_token: Callable[[StreamEvent], None] | None = None,
    ) -> Generation:
        """Decode an answer to ``prompt`` (text, or token ids used as they are) and score
        every generated token.

        ``on_token`` is called with each token as it arrives (streaming).
        """
        with self._serving:
            gen = self._run(prompt, config)
            while True:
                try:
                    event = next(gen)
                except StopIteration as stop:
                    return stop.value
                if on_token is not None:
                    on_token(event)

    def _row_scorer(self) -> RowScorer:
        scorer = self.__dict__.get("_scorer")
        if scorer is None:
            scorer = self.__dict__["_scorer"] = RowScorer(self.n_vocab)
        return scorer

    def _check_len(self, n: int) -> None:
        if n == 0:
            raise UsageError("empty prompt: nothing to run")
        if n > self.n_ctx:
            raise UsageError(f"{n} tokens exceed the context of {self.n_ctx}; shorten the "
                             "prompt or load with a larger n_ctx")

    def generate_with_prefix(
        self,
        before: Sequence[int],
        embeds: np.ndarray,
        after: Sequence[int],
        config: GenerationConfig = GenerationConfig(),
    ) -> Generation:
        """Generate after ``before`` tokens, then positions given as embeddings (an image:
        (N, hidden)), then ``after`` tokens. Needs a backend with ``forward_embeds``.
        Prompt scores (when asked for) cover the ``after`` tokens."""
        if not hasattr(self, "forward_embeds"):
            raise UsageError(f"the {self.name} backend cannot take embeddings")
        with self._serving:
            gen = self._run(list(after), config, prefix=(list(before), np.asarray(embeds, np.float32)))
            while True:
                try:
                    next(gen)
                except StopIteration as stop:
                    return stop.value

    def _run(
        self, prompt: str | Sequence[int], config: GenerationConfig,
        prefix: tuple[list[int], np.ndarray] | None = None,
    ) -> Generator[StreamEvent, None, Generation]:
        if isinstance(prompt, str):
            ids = self.tokenize(prompt)
        else:
            ids = self.check_tokens(prompt)
            prompt = self.detokenize(ids).decode("utf-8", errors="replace")
        n_prefix = 0 if prefix is None else len(prefix[0]) + len(prefix[1])
        self._check_len(len(ids) + n_prefix)
        max_new = min(config.max_tokens, self.n_ctx - len(ids) - n_prefix)
        rng = np.random.default_rng(config.seed)
        self.reset()
        t0 = time.perf_counter()
        if prefix is not None:
            if prefix[0]:
                self.forward(prefix[0])
            self.forward_embeds(prefix[1])  # type: ignore[attr-defined]
        logits = self.forward(ids, all_logits=config.score_prompt)
        prompt_scores = None
        if config.score_prompt:
            prompt_scores = score_logits(logits[:-1], ids[1:])
        last = logits[-1]
        t1 = time.perf_counter()

        out: list[int] = []
        scores: list[TokenScore] = []
        texts: list[str] = []
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        finish: FinishReason = "length"
        scoring = 0.0
        scorer = self._row_scorer()
        greedy = config.temperature == 0.0
        for step in range(max_new):
            if config.score:
                ts = time.perf_counter()
                # greedy: the scorer's argmax is the choice, one pass over the vocabulary less
                score = scorer(last) if greedy else scorer(last, self._pick(last, config, rng))
                scoring += time.perf_counter() - ts
                scores.append(score)
                tok = score.token
            else:
                tok = self._pick(last, config, rng)
                score = _UNSCORED
            out.append(tok)
            if config.stop_at_eos and tok in self.eos_token_ids:
                texts.append("")
                finish = "eos"
                break
            piece = decoder.decode(self.detokenize([tok]))
            texts.append(piece)
            yield StreamEvent(tok, piece, score)
            if step + 1 < max_new:
                last = self.forward([tok])[-1]
        tail = decoder.decode(b"", final=True)
        if tail and texts:
            texts[-1] += tail
        t2 = time.perf_counter()
        return Generation(
            prompt=prompt,
            prompt_tokens=ids,
            tokens=out,
            text="".join(texts),
            scores=scores,
            finish_reason=finish,
            prompt_scores=prompt_scores,
            prefill_seconds=t1 - t0,
            decode_seconds=t2 - t1,
            scoring_seconds=scoring,
            token_texts=texts,
        )

    @staticmethod
    def _pick(logits: np.ndarray, config: GenerationConfig, rng: np.random.Generator) -> int:
        if config.temperature == 0.0:
            return int(np.argmax(logits))
        x = np.asarray(logits, dtype=np.float64) / config.temperature  # (V,)
        if config.top_k and config.top_k < x.shape[0]:
            kth = np.partition(x, -config.top_k)[-config.top_k]
            x = np.where(x >= kth, x, -np.inf)
        p = np.exp(x - x.max())
        p /= p.sum()
        if config.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            keep = np.cumsum(p[order]) - p[order] < config.top_p  # always keeps the top token
            mask = np.zeros_like(p, dtype=bool)
            mask[order[keep]] = True
            p = np.where(mask, p, 0.0)
            p /= p.sum()
        return int(rng.choice(p.shape[0], p=p))
