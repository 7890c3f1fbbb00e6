"""Multimodal bundles on the device: the vision part in onnxruntime, the language part on
llama.cpp or onnxruntime, image embeddings fed in as embeddings.

    >>> with MultimodalModel("tiny-llava-bundle") as m:
    ...     m.answer(image, "what colour is the triangle?")

The vision part outputs the vision tower's tokens (what UTS scores and uploads) and their
projection into the language model (what the language model reads, where the prompt has
its image token). Never imports torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cdcca_edge.core.artifact import ONNX_MODEL_NAME
from cdcca_edge.core.bundle import LANGUAGE_PART, MANIFEST_NAME, VISION_PART, Multimodal, read_manifest
from cdcca_edge.core.errors import FormatError, UsageError, require
from cdcca_edge.runtime.base import Backend, Generation, GenerationConfig, StreamEvent


def load_image(path: str | Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 (``.npy`` arrays too)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such image file; pass --image PATH to a PNG, JPEG or .npy (H, W, 3) array")
    if path.suffix == ".npy":
        img = np.load(path)
    else:
        pil = require("PIL.Image", "device")
        try:
            with pil.open(path) as im:
                img = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise FormatError(f"{path}: not an image Pillow can read ({exc})") from exc
    if img.ndim != 3 or img.shape[2] != 3:
        raise FormatError(f"{path}: expected an RGB image, got an array of shape {img.shape}")
    return img.astype(np.uint8)


class MultimodalModel(Backend):
    """A multimodal bundle (docs/formats/artifact.md, section 6) loaded for inference:
    a :class:`Backend` whose text interface is its language part's, plus images.

    ``runtime.load(bundle)`` returns one, so everything that takes a backend (the probe
    KL of ``delta make``, ``Backend.apply_patch``, ``run``) takes a bundle too.

    Args:
        path: the bundle directory.
        backend: for the language part: ``auto`` (by its format), ``llama`` or ``onnx``.
    """

    def __init__(self, path: str | Path, backend: str = "auto", n_threads: int | None = None) -> None:
        self.path = Path(path)
        if not (self.path / MANIFEST_NAME).is_file():
            raise FormatError(f"{self.path}: no {MANIFEST_NAME}; not a multimodal bundle")
        self._args = (backend, n_threads)
        self._open()

    def _open(self) -> None:
        ort = require("onnxruntime", "device")
        from cdcca_edge.runtime import load

        # The bundle's journal covers the vision and language parts alike: recover it,
        # then hold the bundle's shared lock for as long as either part is loaded.
        self._hold(self.path)
        try:
            self._load(ort, load, self.path / MANIFEST_NAME, *self._args)
        except BaseException:
            self._release_hold()
            raise

    def _load(self, ort: Any, load: Any, manifest: Path, backend: str, n_threads: int | None) -> None:
        m = read_manifest(manifest)
        if m.multimodal is None:
            raise FormatError(f"{manifest}: the bundle has no LLaVA multimodal section")
        if not {VISION_PART, LANGUAGE_PART} <= set(m.parts):
            raise FormatError(f"{manifest}: a multimodal bundle needs a {VISION_PART!r} and a "
                              f"{LANGUAGE_PART!r} part; export it again")
        self.info: Multimodal = m.multimodal
        parts = m.parts
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = n_threads or os.cpu_count() or 1
        opts.log_severity_level = 3
        self._vision = ort.InferenceSession(str(parts[VISION_PART] / ONNX_MODEL_NAME), opts,
                                            providers=["CPUExecutionProvider"])
        self.language: Backend = load(parts[LANGUAGE_PART], backend=backend, n_threads=n_threads)  # type: ignore[arg-type]
        if not hasattr(self.language, "forward_embeds"):
            raise FormatError(f"{self.path}: the {self.language.name} backend cannot take embeddings")
        self._mean = np.asarray(self.info.image_mean, np.float32).reshape(1, 1, 3)
        self._std = np.asarray(self.info.image_std, np.float32).reshape(1, 1, 3)

    def close(self) -> None:
        if getattr(self, "language", None) is not None:
            self.language.close()
        self._vision = None
        self._release_hold()

    def reload(self) -> None:
        self.close()
        self._open()

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.language.name}+onnx-vision"

    # --- the language part's text interface ------------------------------------------------
    @property
    def artifact_path(self) -> Path:
        return self.path

    @property
    def n_vocab(self) -> int:
        return self.language.n_vocab

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.language.eos_token_ids

    @property
    def n_ctx(self) -> int:
        return self.language.n_ctx

    def tokenize(self, text: str) -> list[int]:
        return self.language.tokenize(text)

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        return self.language.detokenize(tokens)

    def reset(self) -> None:
        self.language.reset()

    def forward(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        return self.language.forward(tokens, all_logits)

    def forward_embeds(self, embeds: np.ndarray, all_logits: bool = False) -> np.ndarray:
        return self.language.forward_embeds(embeds, all_logits)  # type: ignore[attr-defined]

    # --- vision ----------------------------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (1, 3, H, W) float32, normalised as the vision tower expects."""
        img = np.asarray(image)
        size = self.info.image_size
        if img.shape != (size, size, 3):
            pil = require("PIL.Image", "device")
            img = np.asarray(pil.fromarray(img.astype(np.uint8)).convert("RGB").resize((size, size)))
        x = (img.astype(np.float32) / 255.0 - self._mean) / self._std
        return x.transpose(2, 0, 1)[None]

    def encode_image(self, image: np.ndarray | str | Path) -> tuple[np.ndarray, np.ndarray]:
        """(vision tower tokens (N, Dv), image embeddings for the language model (N, D))."""
        if isinstance(image, (str, Path)):
            image = load_image(image)
        feats, embeds = self._vision.run(None, {"pixel_values": self.preprocess(image)})
        return feats[0], embeds[0]

    # --- generation ------------------------------------------------------------------------
    def prompt(self, question: str) -> str:
        """``question`` in the prompt format the bundled model was trained on (the
        manifest's template); a text already holding the image token is kept as is."""
        return self.info.prompt(question)

    def generate(
        self,
        prompt: str | Sequence[int],
        config: GenerationConfig = GenerationConfig(),
        on_token: Callable[[StreamEvent], None] | None = None,
        *,
        image: np.ndarray | str | Path | None = None,
        image_embeds: np.ndarray | None = None,
    ) -> Generation:
        """Answer ``prompt`` (text only without an image, as any backend); with ``image``
        (or its ``image_embeds`` (N, D)) the prompt's image token (or the start, if it has
        none) receives the image's embeddings."""
        lm = self.language
        if image_embeds is None:
            if image is None:
                return lm.generate(prompt, config, on_token)
            _, image_embeds = self.encode_image(image)
        if on_token is not None:
            raise UsageError("streaming is not supported for image prompts yet")
        ids = lm.tokenize(prompt) if isinstance(prompt, str) else lm.check_tokens(prompt)
        img_id = self.info.image_token_id
        cut = ids.index(img_id) if img_id in ids else 0
        before, after = ids[:cut], [t for t in ids[cut:] if t != img_id]
        if not after:
            raise UsageError("the prompt needs text after the image")
        return lm.generate_with_prefix(before, np.asarray(image_embeds, np.float32), after, config)

    def answer(self, image: np.ndarray | str | Path, question: str, max_tokens: int = 4) -> str:
        """The first word of the greedy answer (the shapes task's answers are one word)."""
        gen = self.generate(self.prompt(question), GenerationConfig(max_tokens=max_tokens), image=image)
        words = gen.text.replace(".", " ").split()
        return words[0] if words else ""
