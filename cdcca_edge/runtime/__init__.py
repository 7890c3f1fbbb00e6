"""The on-device runtime: load an artefact on a backend, generate, score.

Never imports torch, transformers, peft or optimum (a test checks this in a subprocess).

    >>> from cdcca_edge.runtime import load, GenerationConfig
    >>> with load("model.gguf") as model:
    ...     answer = model.generate("question: what colour is the circle? answer:")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

from cdcca_edge.core.errors import FormatError, UsageError
from cdcca_edge.runtime.base import Backend, Generation, GenerationConfig, StreamEvent
from cdcca_edge.runtime.scores import SampleScore, TokenScore, sample_score, score_logits

if TYPE_CHECKING:
    from cdcca_edge.core.artifact import Artifact

BackendName = Literal["auto", "onnx", "llama"]

__all__ = [
    "Answer",
    "Backend",
    "BackendName",
    "Generation",
    "GenerationConfig",
    "SampleScore",
    "StreamEvent",
    "TokenScore",
    "answer",
    "load",
    "sample_score",
    "score_logits",
]


def load(path: str | Path, backend: BackendName = "auto", **kwargs: object) -> Backend:
    """Open an artefact on a backend.

    Args:
        path: a .gguf file, an ONNX export directory or its model.onnx, or a multimodal
            bundle directory (a :class:`~cdcca_edge.runtime.multimodal.MultimodalModel`,
            whose ``backend`` is its language part's).
        backend: ``"llama"`` (GGUF), ``"onnx"`` (ONNX), or ``"auto"`` to pick by format.
        **kwargs: passed to the backend (``n_threads``; ``n_ctx`` for llama).

    Raises:
        FormatError: the artefact's format does not fit the backend.
        UsageError: unknown backend name.
        BackendUnavailableError: the backend's package is not installed.
    """
    from cdcca_edge.core.artifact import open_artifact
    from cdcca_edge.core.patch import hold_for_serving

    # An interrupted patch is recovered first (never serve a half-written model); the
    # backend then holds its own shared lock for as long as it has the model mapped.
    whole = None
    if not Path(path).exists():  # a whole-directory update cut short between its renames
        from cdcca_edge.core.pack import finish_directory_install

        whole = finish_directory_install(Path(path).parent if Path(path).suffix == ".onnx" else Path(path))
    lock, recovered = hold_for_serving(path)
    recovered = recovered or whole
    try:
        art = open_artifact(path)
    finally:
        lock.release()
    backend_obj = _open_backend(path, art, backend, kwargs)
    if recovered and not backend_obj.recovered:
        backend_obj.recovered = recovered  # the caller reports it (cdcca-edge run does)
    return backend_obj


@dataclass
class Answer:
    """One answer and what served it."""

    generation: Generation
    backend: str  # the backend's name
    recovered: str | None  # what recovery did when the model was opened, if anything
    multimodal: bool


def answer(path: str | Path, prompt: str, config: GenerationConfig = GenerationConfig(), *,
           image: str | Path | None = None, backend: BackendName = "auto", n_threads: int | None = None,
           on_token: Callable[[StreamEvent], None] | None = None, mmproj: str | Path | None = None) -> Answer:
    """Open the artefact at ``path``, answer ``prompt`` and close it. With ``image`` (a
    multimodal bundle), ``prompt`` is the question, put into the bundle's prompt template;
    with ``image`` and ``mmproj`` (``path`` a language GGUF), clip.cpp encodes the image
    and ``prompt`` is used as given (its ``<image>`` marker, or the image first); tokens
    are then not streamed.

    Raises:
        UsageError: an image for a text model, or an mmproj without an image or a GGUF
            (checked before the model is loaded).
    """
    from cdcca_edge.core.artifact import open_artifact

    if mmproj is not None:
        if image is None:
            raise UsageError("--mmproj encodes an image: give --image too")
        if open_artifact(path).format != "gguf" or backend not in ("auto", "llama"):
            raise UsageError(f"--mmproj runs on llama.cpp beside a language GGUF; {path} is not one")
        from cdcca_edge.runtime.mtmd import MtmdModel

        with MtmdModel(path, mmproj, n_threads=n_threads) as mm:
            return Answer(mm.generate(prompt, config, image=image), mm.name, mm.recovered, True)

    if image is not None and open_artifact(path).format != "bundle":
        raise UsageError(f"--image needs a multimodal bundle; {path} is a text model")
    with load(path, backend=backend, n_threads=n_threads) as model:
        if image is not None:
            result = model.generate(model.prompt(prompt), config, image=image)  # type: ignore[attr-defined]
        else:
            result = model.generate(prompt, config, on_token=on_token)
        return Answer(result, model.name, model.recovered, hasattr(model, "encode_image"))


def _open_backend(path: str | Path, art: "Artifact", backend: BackendName, kwargs: dict) -> Backend:
    if art.format == "bundle":
        from cdcca_edge.runtime.multimodal import MultimodalModel

        unknown = set(kwargs) - {"n_threads"}
        if unknown:
            raise UsageError(f"{path}: a multimodal bundle takes n_threads only, not {sorted(unknown)}")
        if backend not in ("auto", "llama", "onnx"):
            raise UsageError(f"unknown backend {backend!r}; choose auto, onnx or llama")
        return MultimodalModel(path, backend=backend, n_threads=kwargs.get("n_threads"))  # type: ignore[arg-type]
    chosen = backend
    if backend == "auto":
        chosen = "llama" if art.format == "gguf" else "onnx"
    if chosen == "llama":
        if art.format != "gguf":
            raise FormatError(f"{path}: the llama backend runs GGUF files, this is {art.format}; "
                              "use --backend onnx")
        from cdcca_edge.runtime.llama_backend import LlamaCppBackend

        backend: Backend = LlamaCppBackend(art.path, **kwargs)  # type: ignore[arg-type]
        return backend
    if chosen == "onnx":
        if art.format != "onnx":
            raise FormatError(f"{path}: the onnx backend runs ONNX exports, this is {art.format}; "
                              "use --backend llama")
        from cdcca_edge.runtime.onnx_backend import OnnxBackend

        backend = OnnxBackend(art.path, **kwargs)  # type: ignore[arg-type]
        return backend
    raise UsageError(f"unknown backend {backend!r}; choose auto, onnx or llama")
