"""``cdcca-edge export``: HF model (+ PEFT adapter) -> validated device artefact.

The artefact is written beside its destination, validated against torch, and only then
moved into place: a failed export leaves no file behind and never clobbers a good one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from cdcca_edge.converters.gguf_export import QUANT_TYPES, write_gguf
from cdcca_edge.converters.hf import load_for_export
from cdcca_edge.converters.onnx_export import NBITS_ACCURACY, NBITS_BLOCK, ONNX_QUANTS, write_onnx
from cdcca_edge.converters.validate import ValidationReport, validate_export
from cdcca_edge.converters.llava_export import is_llava
from cdcca_edge.core.artifact import ONNX_MODEL_NAME, open_artifact
from cdcca_edge.core.bundle import LANGUAGE_PART, MANIFEST_NAME
from cdcca_edge.core.state import record_export
from cdcca_edge.core.errors import UsageError
from cdcca_edge.core.fileio import commit_file, replace_dir

ExportFormat = Literal["gguf", "onnx"]


@dataclass
class ExportResult:
    path: Path
    format: str
    quant: str
    arch: str
    identity: str
    source_digest: str
    adapter: str | None
    bytes: int
    seconds: float
    validation: ValidationReport | None
    extra: dict[str, Any] | None = None  # multimodal bundles: per-part validation

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "quant": self.quant,
            "arch": self.arch,
            "identity": self.identity,
            "source_digest": self.source_digest,
            "adapter": self.adapter,
            "bytes": self.bytes,
            "seconds": self.seconds,
            "validation": None if self.validation is None else self.validation.as_dict(),
            "bundle_validation": self.extra,
        }


def export(
    model_dir: str | Path,
    out: str | Path,
    fmt: ExportFormat,
    quant: str | None = None,
    adapter: str | Path | None = None,
    validate: bool = True,
    tolerance: float | None = None,
    on_stage: Callable[[str], None] | None = None,
    block_size: int = NBITS_BLOCK,
    accuracy_level: int = NBITS_ACCURACY,
    mmproj: str | Path | None = None,
    mmproj_dtype: str = "f32",
) -> ExportResult:
    """Export ``model_dir`` to ``out`` as GGUF (a file) or ONNX (a directory).

    Args:
        quant: GGUF: f32, f16, q8_0 (default), q4_0, or llama.cpp's q4_k_s, q4_k_m,
            q5_k_m, q6_k. ONNX: f32 (default), or int4 / int8 weight-only MatMulNBits.
        block_size, accuracy_level: ONNX int4/int8: weights per scale, and MatMulNBits'
            accuracy level (4: int8 activations).
        mmproj: a LLaVA model exported as a GGUF bundle: also write its vision side as
            llama.cpp's mmproj GGUF here (``mmproj_dtype`` f32 or f16), validated with the
            bundle's language GGUF on llama.cpp's mtmd (converters/mmproj.py).
        adapter: a PEFT adapter directory merged into the model before export.
        validate: compare with torch and refuse the export beyond tolerance.
        tolerance: override the format's tolerance (docs/export.md).
        on_stage: called with a short description as each stage starts (progress).

    Raises:
        UsageError, FormatError, ValidationError, BackendUnavailableError.
    """
    stage = on_stage or (lambda _msg: None)
    out = Path(out)
    if mmproj is not None and not is_llava(Path(model_dir)):
        raise UsageError("--mmproj writes a LLaVA model's vision side; this is not a LLaVA model")
    if fmt == "gguf":
        quant = quant or "q8_0"
        if quant not in QUANT_TYPES:
            raise UsageError(f"--quant {quant!r} is not a GGUF export type; choose one of "
                             f"{', '.join(QUANT_TYPES)}")
        if out.is_dir() and not is_llava(Path(model_dir)):
            raise UsageError(f"{out} is a directory; GGUF export writes a file, e.g. -o model.gguf")
    elif fmt == "onnx":
        quant = quant or "f32"
        if quant not in ONNX_QUANTS:
            raise UsageError(f"--quant {quant!r} is not available for ONNX export; choose one of "
                             f"{', '.join(ONNX_QUANTS)} (or --format gguf for the GGUF types)")
        if out.exists() and not out.is_dir():
            raise UsageError(f"{out} is a file; ONNX export writes a directory")
        if (out.is_dir() and any(out.iterdir()) and not (out / ONNX_MODEL_NAME).is_file()
                and not (out / MANIFEST_NAME).is_file()):
            raise UsageError(f"{out} exists and is not an ONNX export; it would be replaced "
                             "whole: remove it or pick another -o")
    else:
        raise UsageError(f"unknown format {fmt!r}; choose gguf or onnx")

    t0 = time.perf_counter()
    stage(f"loading {model_dir}" + (f" + adapter {adapter}" if adapter else ""))
    loaded = load_for_export(model_dir, adapter)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = None
    if loaded.arch == "llava":
        # a multimodal model becomes a bundle directory: vision part + language part
        from cdcca_edge.converters.llava_export import export_llava

        if out.exists() and not out.is_dir():
            raise UsageError(f"{out} is a file; a multimodal export writes a bundle directory")
        if fmt == "onnx" and quant != "f32":
            raise UsageError(f"--quant {quant}: a bundle's ONNX language part is f32 only; use "
                             "--format gguf for a quantised language part")
        if mmproj is not None:
            from cdcca_edge.converters.mmproj import MMPROJ_DTYPES, mmproj_plan

            if fmt != "gguf":
                raise UsageError("--mmproj goes with a GGUF language part: use --format gguf")
            if mmproj_dtype not in MMPROJ_DTYPES:
                raise UsageError(f"--mmproj-dtype {mmproj_dtype!r}: f32 or f16")
            mmproj_plan(loaded.model.config)  # refuse before the bundle is written
        identity, mm_report = export_llava(loaded, out, fmt, quant, validate, tolerance, stage)
        if mmproj is not None:
            from cdcca_edge.converters.mmproj import export_mmproj

            stage(f"writing the vision side as llama.cpp's mmproj ({mmproj_dtype}), validating on mtmd")
            mm_report = {**(mm_report or {}), "mmproj": export_mmproj(
                loaded, out / f"{LANGUAGE_PART}.gguf", Path(mmproj), mmproj_dtype, validate)}  # type: ignore[arg-type]
        return ExportResult(
            path=out, format=f"bundle/{fmt}", quant=quant, arch="llava", identity=identity,
            source_digest=loaded.source_digest, adapter=str(adapter) if adapter else None,
            bytes=sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
            seconds=time.perf_counter() - t0, validation=None, extra=mm_report,
        )
    if fmt == "gguf":
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            stage(f"writing GGUF ({quant})")
            identity = write_gguf(loaded, tmp, quant)
            if validate:
                stage("validating against torch on llama.cpp")
                report = validate_export(tmp, loaded, "gguf", quant, tolerance=tolerance)
            commit_file(tmp, out)
            record_export(open_artifact(out), identity)
        finally:
            tmp.unlink(missing_ok=True)
        size = out.stat().st_size
    else:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            identity = write_onnx(loaded, tmp_dir, progress=stage, quant=quant, block_size=block_size,
                                  accuracy_level=accuracy_level)
            if validate:
                stage("validating against torch on onnxruntime")
                report = validate_export(tmp_dir, loaded, "onnx", quant, tolerance=tolerance)
            record_export(open_artifact(tmp_dir), identity)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        replace_dir(tmp_dir, out)
        size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return ExportResult(
        path=out,
        format=fmt,
        quant=quant,
        arch=loaded.arch,
        identity=identity,
        source_digest=loaded.source_digest,
        adapter=str(adapter) if adapter else None,
        bytes=size,
        seconds=time.perf_counter() - t0,
        validation=report,
    )


def export_lora_gguf(
    model_dir: str | Path,
    adapter: str | Path,
    base_gguf: str | Path,
    out: str | Path,
    validate: bool = True,
    tolerance: float | None = None,
    dtype: str = "f16",
    on_stage: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``adapter`` (PEFT LoRA on ``model_dir``) as llama.cpp's LoRA GGUF for ``base_gguf``
    (an export of ``model_dir``), validated: llama.cpp running the base with the adapter
    beside it must agree with torch running the merged model within the base's tolerance.

    Raises:
        UsageError, FormatError, ValidationError, MissingTensorError.
    """
    from cdcca_edge.converters.lora_gguf import write_lora_gguf

    stage = on_stage or (lambda _msg: None)
    out, base = Path(out), open_artifact(base_gguf)
    if base.format != "gguf":
        raise UsageError(f"--lora-gguf {base_gguf}: not a GGUF file; give the device's base GGUF")
    quant = base.metadata.get("cdcca.quant")
    if quant is None or quant not in QUANT_TYPES:
        raise UsageError(f"{base_gguf} was not written by cdcca-edge export (no cdcca.quant): export "
                         "the base with cdcca-edge first")
    t0 = time.perf_counter()
    stage(f"writing {adapter} as a LoRA GGUF for {base_gguf}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        summary = write_lora_gguf(adapter, base_gguf, model_dir, tmp, dtype=dtype)  # type: ignore[arg-type]
        report = None
        if validate:
            stage("validating base + LoRA on llama.cpp against torch (merged)")
            report = validate_export(base_gguf, load_for_export(model_dir, adapter), "gguf", quant,
                                     tolerance=tolerance, lora=tmp)
        commit_file(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {**summary, "path": str(out), "base": str(base_gguf), "base_quant": quant,
            "seconds": time.perf_counter() - t0, "validation": None if report is None else report.as_dict()}

