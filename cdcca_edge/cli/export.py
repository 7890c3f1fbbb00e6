"""`cdcca-edge export`: HF model (+ adapter) -> validated GGUF, ONNX or bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cdcca_edge.cli._output import out, print_json, stage_status
from cdcca_edge.cli.options import Format, JsonOpt, Quant, value


def export(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face model directory (Llama/Qwen2, or LLaVA).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="OUT.gguf, or the ONNX output directory.")],
    fmt: Annotated[Format, typer.Option("--format", "-f", help="Artefact format.")] = Format.gguf,
    quant: Annotated[
        Optional[Quant], typer.Option(help="GGUF: f32, f16, q8_0 (default), q4_0, or llama.cpp's "
                                           "q4_k_s, q4_k_m, q5_k_m, q6_k. ONNX: f32 (default), int4, int8.")
    ] = None,
    adapter: Annotated[
        Optional[Path], typer.Option(help="PEFT adapter directory to merge before export.")
    ] = None,
    validate: Annotated[
        bool, typer.Option("--validate/--no-validate", help="Check logits against torch (default on).")
    ] = True,
    tolerance: Annotated[
        Optional[float], typer.Option(help="Override the format's validation tolerance (docs/export.md).")
    ] = None,
    block_size: Annotated[
        int, typer.Option(help="ONNX int4/int8: weights per scale along the input dimension (16-256).")
    ] = 32,
    accuracy_level: Annotated[
        int, typer.Option(help="ONNX int4/int8: MatMulNBits accuracy level (4: int8 activations, fastest on CPU).")
    ] = 4,
    mmproj: Annotated[
        Optional[Path], typer.Option(help="LLaVA: also write the vision side as llama.cpp's mmproj GGUF here "
                                          "(run the pair with llama-mtmd-cli, or cdcca-edge run --mmproj).")
    ] = None,
    mmproj_dtype: Annotated[str, typer.Option(help="The mmproj's matrices: f32 or f16.")] = "f32",
    lora_gguf: Annotated[
        Optional[Path], typer.Option(help="Write --adapter as llama.cpp's LoRA GGUF (-o) for this base GGUF "
                                          "(an export of MODEL_DIR) instead of merging it.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Export a HF causal LM (+ LoRA adapter) to a validated GGUF file or ONNX directory; a
    LLaVA model to a bundle directory (vision ONNX + language GGUF/ONNX); or, with
    --lora-gguf, the adapter alone as llama.cpp's LoRA GGUF."""
    from cdcca_edge.converters.export import export as do_export

    if lora_gguf is not None:
        from cdcca_edge.converters.export import export_lora_gguf
        from cdcca_edge.core.errors import UsageError

        if adapter is None:
            raise UsageError("--lora-gguf converts an adapter: give it with --adapter PEFT_DIR")
        with stage_status(not json_out) as on_stage:
            doc = export_lora_gguf(model_dir, adapter, lora_gguf, output, validate=validate,
                                   tolerance=tolerance, on_stage=on_stage)
        if json_out:
            print_json(doc)
            return
        v = doc["validation"]
        out.print(f"{doc['path']}  LoRA GGUF (rank {doc['rank']}, {doc['dtype']}) for {doc['base']}  "
                  f"{doc['bytes'] / 1e6:.2f} MB", highlight=False)
        out.print("  " + (f"validated base + LoRA on llama: {v['normalized_diff']:.3g} x std (tolerance "
                          f"{v['tolerance']}), top-1 agreement {v['top1_agreement']:.0%}" if v else
                          "not validated (--no-validate)") + f"  [{doc['seconds']:.1f} s]", highlight=False)
        return

    with stage_status(not json_out) as on_stage:
        result = do_export(model_dir, output, value(fmt), quant=value(quant), adapter=adapter,
                           validate=validate, tolerance=tolerance, on_stage=on_stage,
                           block_size=block_size, accuracy_level=accuracy_level, mmproj=mmproj,
                           mmproj_dtype=mmproj_dtype)
    if json_out:
        print_json(result.as_dict())
        return
    out.print(f"{result.path}  {result.format}/{result.quant}  {result.bytes / 1e6:.1f} MB  "
              f"identity {result.identity[:16]}", highlight=False)
    out.print(f"  {_validation_line(result)}  [{result.seconds:.1f} s]", highlight=False)


def _validation_line(result: Any) -> str:
    v, mm = result.validation, result.extra
    if mm:  # a multimodal bundle: each part, then whole image questions (and the mmproj)
        line = "not validated (--no-validate)"
        if "language" in mm:
            lang = mm["language"]
            line = (f"validated: vision {mm['vision']['normalized_diff']:.2g} x std; language "
                    f"{lang['normalized_diff']:.3g} x std (tolerance {lang['tolerance']}); image questions "
                    f"answered as torch: {mm['answers_equal_torch']:.0%} of {mm['answers_checked']}")
        mv = (mm.get("mmproj") or {}).get("validation")
        if mv:
            line += (f"\n  mmproj {mm['mmproj']['path']} on mtmd: {mv['normalized_diff']:.2g} x std in clip.cpp's "
                     f"token order (tolerance {mv['tolerance']}); answers as torch: "
                     f"{mv['answers_equal_torch']:.0%} of {mv['answers_checked']}")
        return line
    if v:
        return (f"validated on {v.backend}: max |Δlogit| {v.max_abs_diff:.3g} "
                f"({v.normalized_diff:.3g} x std, tolerance {v.tolerance}), top-1 agreement "
                f"{v.top1_agreement:.0%}")
    return "not validated (--no-validate)"
