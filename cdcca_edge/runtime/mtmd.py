"""A text GGUF plus an ``mmproj`` GGUF on llama.cpp's own multimodal stack (mtmd):
clip.cpp turns the image into the language model's image embeddings, and our llama
backend generates with them in place of the prompt's image marker, as
``llama-mtmd-cli -m model.gguf --mmproj mmproj.gguf`` does.

    with MtmdModel("language.gguf", "mmproj.gguf") as m:
        m.generate("<image>\\nquestion: what colour is the circle? answer:", image=img)

The image marker is the language model's ``<image>`` token text or mtmd's own
``<__media__>``; a prompt without one gets the image first.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cdcca_edge.core.errors import FormatError, UsageError, require
from cdcca_edge.runtime.base import GenerationConfig, Generation

MARKERS = ("<image>", "<__media__>")
_LOG_ERROR = 3  # GGML_LOG_LEVEL_ERROR
_log_callback: Any = None  # kept alive: the C side holds a pointer to it


def _quiet(m: Any) -> None:
    """mtmd and clip.cpp print several lines per image to stderr; keep only errors."""
    global _log_callback
    if _log_callback is None:
        import sys

        llama_cpp = require("llama_cpp", "llama")

        @llama_cpp.llama_log_callback
        def errors_only(level: int, text: bytes, _user: Any) -> None:
            if level == _LOG_ERROR:
                sys.stderr.write(text.decode("utf-8", "replace"))

        _log_callback = errors_only
    m.mtmd_log_set(_log_callback, ctypes.c_void_p(0))
    m.mtmd_helper_log_set(_log_callback, ctypes.c_void_p(0))


class MtmdVision:
    """clip.cpp (through llama-cpp-python's ``mtmd_cpp``) for one mmproj: an RGB image ->
    the image embeddings (N, D) the language model takes."""

    def __init__(self, mmproj: str | Path, llama_model: Any, n_embd: int, n_threads: int = 1) -> None:
        self.n_embd = n_embd  # the language model's width: each image token's length
        self._m = require("llama_cpp.mtmd_cpp", "llama")
        _quiet(self._m)
        self.path = Path(mmproj)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such mmproj GGUF file")
        from cdcca_edge.core.gguf_file import read_gguf_header

        kind = read_gguf_header(self.path).kv.get("general.type")  # malformed files fail here
        if kind not in ("mmproj", None):
            raise FormatError(f"{self.path}: general.type is {kind!r}, not 'mmproj'")
        p = self._m.mtmd_context_params_default()
        p.use_gpu, p.n_threads, p.print_timings, p.warmup = False, n_threads, False, False
        self._ctx = self._m.mtmd_init_from_file(str(self.path).encode(), llama_model, p)
        if not self._ctx:
            raise FormatError(f"{self.path}: llama.cpp's clip could not load this mmproj for the language model "
                              "(its log says why); export it from the same LLaVA model")
        if not self._m.mtmd_support_vision(self._ctx):
            self.close()
            raise FormatError(f"{self.path}: this mmproj has no vision encoder")

    def encode(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (N, D) float32: what clip.cpp hands the language model."""
        m = self._m
        img = np.ascontiguousarray(image, dtype=np.uint8)
        if img.ndim != 3 or img.shape[2] != 3:
            raise UsageError(f"an image is (H, W, 3) RGB, got {img.shape}")
        bitmap = m.mtmd_bitmap_init(img.shape[1], img.shape[0],
                                    (ctypes.c_uint8 * img.size).from_buffer_copy(img.tobytes()))
        chunks = m.mtmd_input_chunks_init()
        try:
            text = m.mtmd_default_marker()
            part = m.mtmd_input_text(text, len(text), False, True)
            if m.mtmd_tokenize(self._ctx, chunks, ctypes.byref(part), (m.mtmd_bitmap_p_ctypes * 1)(bitmap), 1):
                raise FormatError(f"{self.path}: mtmd could not take this image")
            for i in range(m.mtmd_input_chunks_size(chunks)):
                chunk = m.mtmd_input_chunks_get(chunks, i)
                if m.mtmd_input_chunk_get_type(chunk) != 1:  # MTMD_INPUT_CHUNK_TYPE_IMAGE
                    continue
                if m.mtmd_encode_chunk(self._ctx, chunk):
                    raise FormatError(f"{self.path}: clip.cpp failed to encode the image")
                n = m.mtmd_input_chunk_get_n_tokens(chunk)
                out = m.mtmd_get_output_embd(self._ctx)
                flat = np.ctypeslib.as_array(out, shape=(n * self.n_embd,))
                return flat.reshape(n, self.n_embd).copy()
            raise FormatError(f"{self.path}: mtmd made no image tokens")
        finally:
            m.mtmd_input_chunks_free(chunks)
            m.mtmd_bitmap_free(bitmap)

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            self._m.mtmd_free(self._ctx)
            self._ctx = None


class MtmdModel:
    """A language GGUF on our llama backend with an mmproj on clip.cpp."""

    def __init__(self, model: str | Path, mmproj: str | Path, n_threads: int | None = None) -> None:
        from cdcca_edge.runtime import load

        self.language = load(model, backend="llama", n_threads=n_threads)
        try:
            llm = self.language._llm  # type: ignore[attr-defined]
            self.vision = MtmdVision(mmproj, llm._model.model, int(llm.n_embd()), n_threads or 1)
        except BaseException:
            self.language.close()
            raise
        self.name = "llama+mtmd"
        self.recovered = self.language.recovered

    def __enter__(self) -> "MtmdModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.vision.close()
        self.language.close()

    def split(self, prompt: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the prompt's image marker (the image goes first
        when there is none); BOS, if the model adds one, before the image."""
        head, tail = "", prompt
        for marker in MARKERS:
            if marker in prompt:
                head, tail = prompt.split(marker, 1)
                break
        lm = self.language
        return lm.tokenize(head), lm.tokenize(tail, add_bos=False)  # type: ignore[call-arg]

    def generate(self, prompt: str, config: GenerationConfig = GenerationConfig(), *,
                 image: np.ndarray | str | Path, image_embeds: np.ndarray | None = None) -> Generation:
        if image_embeds is None:
            if isinstance(image, (str, Path)):
                from cdcca_edge.runtime.multimodal import load_image

                image = load_image(image)
            image_embeds = self.vision.encode(np.asarray(image))
        before, after = self.split(prompt)
        if not after:
            raise UsageError("the prompt needs text after the image")
        return self.language.generate_with_prefix(before, image_embeds, after, config)

    def tokenize(self, text: str) -> Sequence[int]:
        return self.language.tokenize(text)
