"""llama.cpp backend (llama-cpp-python), driven through its low-level decode API.

``Llama(logits_all=True)`` computes vocabulary logits for every position of every batch,
which is slow on long prompts and which llama-cpp-python's own ``token_logprobs`` then
reads one position off. We instead fill our own ``llama_batch`` and ask llama.cpp for
logits only at the positions we need: the last prompt position (and every prompt
position only when prompt scoring is requested), then one per generated token.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cdcca_edge.core.errors import (
    CdccaError,
    FormatError,
    UsageError,
    require,
)
from cdcca_edge.core.artifact import META_LORA_BASE, META_SOURCE_DIGEST
from cdcca_edge.core.gguf_file import read_gguf_header
from cdcca_edge.runtime.base import Backend


def _check_lora(path: Path, lora: list, model: list) -> None:
    """A LoRA GGUF must pair ``X.lora_a`` (r, in) with ``X.lora_b`` (out, r) for a matrix X
    (out, in) of the model. Checked here because llama-cpp-python 0.3.36 goes on serving
    the base alone when llama.cpp refuses an adapter (it logs "incorrect shape" and still
    returns the adapter).

    Raises:
        FormatError: naming the first tensor that does not fit.
    """
    shapes = {t.name: tuple(t.ne) for t in model}  # GGML order: (in, out)
    factors = {t.name: tuple(t.ne) for t in lora}
    if not factors:
        raise FormatError(f"{path}: a LoRA GGUF without tensors; convert the adapter again")
    for name, ne in factors.items():
        base, _, part = name.rpartition(".lora_")
        other = f"{base}.lora_{'b' if part == 'a' else 'a'}"
        if part not in ("a", "b") or other not in factors:
            raise FormatError(f"{path}: tensor {name!r} is not one of a lora_a / lora_b pair")
        if base not in shapes:
            raise FormatError(f"{path}: {name!r} adapts {base!r}, which the model does not have: "
                              "another model's LoRA; convert the adapter against this base")
        if part == "a":
            a, b, w = ne, factors[other], shapes[base]
            if len(a) != 2 or len(b) != 2 or len(w) != 2 or a[0] != w[0] or b[1] != w[1] or a[1] != b[0]:
                raise FormatError(f"{path}: {base!r} is {w[::-1]} but its LoRA factors are {a[::-1]} and "
                                  f"{b[::-1]} (need (r, in) and (out, r)): another model's LoRA; convert "
                                  "the adapter against this base")


class LlamaCppBackend(Backend):
    """A GGUF file on llama.cpp.

    Args:
        path: the .gguf file.
        n_ctx: context length to allocate (default 2048; never more than the model's
            training context is used).
        n_threads: CPU threads (default: all cores; llama-cpp-python's default is half).
        n_batch: tokens per llama_decode call for prompts.
        lora: a LoRA GGUF (llama.cpp's adapter format, converters/lora_gguf.py) applied
            on top of the model at full scale, unmerged.
    """

    name = "llama"

    def __init__(
        self,
        path: str | Path,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        n_batch: int = 512,
        lora: str | Path | None = None,
    ) -> None:
        self._llama_cpp = require("llama_cpp", "llama")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such GGUF file")
        self._lora = None if lora is None else Path(lora)
        if self._lora is not None and not self._lora.is_file():
            raise FileNotFoundError(f"{self._lora}: no such LoRA GGUF file")
        self._args = (n_ctx, n_threads or os.cpu_count() or 1, n_batch)
        self._closed = True
        self._open()

    def _open(self) -> None:
        self._hold(self.path)
        try:
            self._load()
        except BaseException:
            self._release_hold()
            raise

    def _load(self) -> None:
        lc = self._llama_cpp
        n_ctx, threads, n_batch = self._args
        header = read_gguf_header(self.path)  # malformed files fail here, with a clear error
        if self._lora is not None:
            lora_header = read_gguf_header(self._lora)
            lora_kv = lora_header.kv
            kind = lora_kv.get("general.type")
            if kind != "adapter":
                raise FormatError(f"{self._lora}: general.type is {kind!r}, not 'adapter': not a "
                                  "LoRA GGUF; convert the PEFT adapter first")
            _check_lora(self._lora, lora_header.tensors, header.tensors)
            # llama.cpp checks shapes only: a LoRA for another model of the same shape loads
            made_for, source = lora_kv.get(META_LORA_BASE), header.kv.get(META_SOURCE_DIGEST)
            if made_for and source and made_for != source:
                raise FormatError(f"{self._lora} was made for a base exported from source {str(made_for)[:16]}, "
                                  f"{self.path} from {str(source)[:16]}: another model; convert the adapter "
                                  "against this base (cdcca-edge export --adapter A --lora-gguf BASE.gguf)")
        arch = header.kv.get("general.architecture")
        train_ctx = header.kv.get(f"{arch}.context_length")
        # Positions past the training context are garbage even where llama.cpp allows them.
        ctx = n_ctx or 2048
        if isinstance(train_ctx, int) and train_ctx > 0:
            ctx = min(ctx, train_ctx)
        try:
            self._llm = lc.Llama(
                model_path=str(self.path),
                n_ctx=ctx,
                n_batch=n_batch,
                n_ubatch=n_batch,
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=False,
                verbose=False,
                **({"lora_path": str(self._lora)} if self._lora is not None else {}),
            )
        except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
            raise FormatError(f"{self.path}: llama.cpp could not load this GGUF ({exc})") from exc
        except RuntimeError as exc:  # llama-cpp-python's "Failed to apply LoRA ..."
            if self._lora is None:
                raise
            raise FormatError(f"{self._lora}: llama.cpp could not apply this LoRA to {self.path} ({exc}); "
                              "convert the adapter against this very base (cdcca-edge export "
                              "--lora-gguf)") from exc
        self._ctx = self._llm._ctx.ctx  # raw llama_context*
        self._vocab = self._llm._model.vocab
        self._n_vocab = self._llm.n_vocab()
        self._n_ctx = self._llm.n_ctx()
        self._n_batch = n_batch
        self._batch = lc.llama_batch_init(n_batch, 0, 1)
        self._n_past = 0
        self._add_bos = bool(lc.llama_vocab_get_add_bos(self._vocab))
        self._eog = frozenset(
            t for t in range(self._n_vocab) if lc.llama_vocab_is_eog(self._vocab, t)
        )
        self._piece_buf = ctypes.create_string_buffer(256)
        self._closed = False

    # --- Backend interface -----------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eog

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def artifact_path(self) -> Path:
        return self.path

    def reload(self) -> None:
        self.close()
        self._open()

    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        """``add_bos``: None adds BOS as the model's tokenizer does at a prompt's start;
        False for text that continues a prompt (after an image)."""
        # special=True: "<|im_start|>" in the text is the control token, as the HF tokenizer
        # (and so the ONNX backend) parses it, not a dozen byte tokens.
        bos = self._add_bos if add_bos is None else add_bos and self._add_bos
        return self._llm.tokenize(text.encode("utf-8"), add_bos=bos, special=True)

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        lc = self._llama_cpp
        out = bytearray()
        for t in tokens:
            buf = self._piece_buf
            n = lc.llama_token_to_piece(self._vocab, int(t), buf, len(buf), 0, False)
            if n < 0:  # the piece needs -n bytes: grow the buffer and ask again
                buf = self._piece_buf = ctypes.create_string_buffer(-n)
                n = lc.llama_token_to_piece(self._vocab, int(t), buf, len(buf), 0, False)
            out += buf.raw[:n]
        return bytes(out)

    def reset(self) -> None:
        self._llm._ctx.kv_cache_clear()
        self._n_past = 0

    def forward(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        tokens = self.check_tokens(tokens)  # an out-of-range id aborts llama.cpp's process
        if not tokens:
            raise UsageError("forward() needs at least one token")

        def fill(b: Any, start: int, m: int) -> None:
            for i, tok in enumerate(tokens[start : start + m]):
                b.token[i] = int(tok)

        return self._decode(len(tokens), fill, self._batch, all_logits)

    def forward_embeds(self, embeds: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Append positions given as input embeddings (T, n_embd) instead of tokens, the
        way llama.cpp's own multimodal front ends feed image embeddings. Returns logits as
        :meth:`forward` does."""
        lc = self._llama_cpp
        x = np.ascontiguousarray(embeds, dtype=np.float32)  # (T, n_embd)
        n_embd = lc.llama_model_n_embd(self._llm._model.model)
        if x.ndim != 2 or x.shape[1] != n_embd or len(x) == 0:
            raise UsageError(f"embeddings of shape {x.shape}; this model takes (T, {n_embd}), T >= 1")

        def fill(b: Any, start: int, m: int) -> None:
            ctypes.memmove(b.embd, x[start : start + m].ctypes.data, m * n_embd * 4)

        b = lc.llama_batch_init(self._n_batch, n_embd, 1)  # a batch carrying embd, not tokens
        try:
            # copied out: the batch (and llama.cpp's view of the logits) goes away here
            return np.array(self._decode(len(x), fill, b, all_logits))
        finally:
            lc.llama_batch_free(b)

    def _decode(self, n: int, fill: Callable[[Any, int, int], None], b: Any, all_logits: bool) -> np.ndarray:
        """Decode ``n`` positions in batches of ``n_batch``; ``fill(batch, start, m)`` sets
        their tokens or embeddings. Logits (T, V) with ``all_logits``, else the last (1, V)."""
        lc = self._llama_cpp
        if self._n_past + n > self.n_ctx:
            raise UsageError(f"sequence of {self._n_past + n} positions exceeds n_ctx={self.n_ctx}")
        rows = np.empty((n, self._n_vocab), dtype=np.float32) if all_logits else None  # (T, V)
        last = None
        for start in range(0, n, self._n_batch):
            m = min(self._n_batch, n - start)
            b.n_tokens = m
            fill(b, start, m)
            for i in range(m):
                b.pos[i] = self._n_past + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = all_logits
            b.logits[m - 1] = True
            rc = lc.llama_decode(self._ctx, b)
            if rc == 1:
                raise UsageError(f"llama.cpp found no room in its KV cache at position "
                                 f"{self._n_past}; load with a larger n_ctx")
            if rc != 0:
                raise CdccaError(f"{self.path}: llama_decode failed with code {rc}")
            self._n_past += m
            if rows is not None:
                for i in range(m):
                    rows[start + i] = self._logits_at(i)
            elif start + m == n:
                # llama.cpp's own buffer, no copy: the decode loop scores it while it is
                # still in cache. Valid until the next decode (the interface's contract).
                last = self._logits_at(m - 1)[None, :]
        return rows if rows is not None else last

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._llama_cpp.llama_batch_free(self._batch)
        self._llm.close()
        self._release_hold()  # after the engine dropped its map of the file

    def __del__(self) -> None:  # pragma: no cover - GC timing
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass

    # --- internals -------------------------------------------------------------------------
    def _logits_at(self, i: int) -> np.ndarray:
        ptr = self._llama_cpp.llama_get_logits_ith(self._ctx, i)
        if not ptr:
            raise CdccaError(f"{self.path}: llama.cpp produced no logits for batch position {i}")
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))
