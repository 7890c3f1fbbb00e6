"""`cdcca-edge run`: answer a prompt on the device runtime, with per-token uncertainty."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from cdcca_edge.cli._output import err, out, print_json, report_recovery
from cdcca_edge.cli.options import Backend, BackendOpt, JsonOpt, value
from cdcca_edge.runtime.base import GenerationConfig

if TYPE_CHECKING:
    from cdcca_edge.runtime import Generation, StreamEvent

_GEN = GenerationConfig()


def run(
    artifact: Annotated[Path, typer.Argument(help=".gguf file, ONNX export directory or multimodal bundle.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt text (with --image: the question).")],
    image: Annotated[
        Optional[Path], typer.Option(help="An image (PNG/JPEG/.npy) for a multimodal bundle to look at.")
    ] = None,
    mmproj: Annotated[
        Optional[Path], typer.Option(help="llama.cpp's mmproj GGUF for --image with a language GGUF (mtmd).")
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="New tokens at most.")] = _GEN.max_tokens,
    backend: BackendOpt = Backend.auto,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = _GEN.temperature,
    top_k: Annotated[int, typer.Option(help="Sample from the k most likely tokens (0 = all).")] = _GEN.top_k,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = _GEN.top_p,
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed.")] = _GEN.seed,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: all cores).")] = None,
    score_prompt: Annotated[
        bool, typer.Option("--score-prompt", help="Also score every prompt token.")
    ] = False,
    show_scores: Annotated[
        bool, typer.Option("--show-scores", help="Print a per-token uncertainty table.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Answer a prompt on the device runtime, with per-token uncertainty."""
    from cdcca_edge.runtime import answer

    config = GenerationConfig(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, score_prompt=score_prompt)
    on_token = None if json_out or image is not None else _stream
    got = answer(artifact, prompt, config, image=image, backend=value(backend), n_threads=threads,
                 on_token=on_token, mmproj=mmproj)
    report_recovery(artifact, got.recovered)
    result = got.generation
    if json_out:
        doc = {"backend": got.backend, "artifact": str(artifact)}
        if got.multimodal:
            doc["image"] = str(image) if image else None
        print_json({**doc, **result.as_dict()})
        return
    if on_token is None:
        out.file.write(result.text)
    out.file.write("\n")
    if show_scores:
        print_score_table(result)
    s = result.sample
    rate = result.as_dict()["timings"]["decode_tokens_per_second"]
    err.print(f"[dim]{got.backend}: {len(result.tokens)} tokens ({result.finish_reason}), {rate or 0:.1f} tok/s, "
              f"confidence {s.confidence:.3f}, mean entropy {s.mean_entropy:.3f} nats[/dim]", highlight=False)


def _stream(event: "StreamEvent") -> None:
    out.file.write(event.text)
    out.file.flush()


def print_score_table(result: "Generation") -> None:
    from rich.table import Table

    table = Table("token", "id", "entropy", "top-1 p", "margin", title="per-token uncertainty",
                  title_justify="left")
    for text, s in zip(result.token_texts, result.scores):
        table.add_row(repr(text), str(s.token), f"{s.entropy:.3f}", f"{s.top1_prob:.3f}",
                      f"{s.margin:.3f}")
    out.print(table)
