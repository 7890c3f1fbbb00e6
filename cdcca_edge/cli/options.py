"""Option types the commands share: closed choices as enums whose values are the
library's own (a new backend or score appears here by itself), and the ``--json`` flag.
Defaults are read from the library (its config dataclasses and constants), never restated."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any, Iterable, get_args

import typer

from cdcca_edge.cloud.akd import AdapterKind, KDLoss, TeacherWeighting
from cdcca_edge.converters.export import ExportFormat
from cdcca_edge.converters.gguf_export import QUANT_TYPES
from cdcca_edge.converters.onnx_export import ONNX_QUANTS
from cdcca_edge.runtime import BackendName
from cdcca_edge.runtime.uts import SCORES, Selector


def choices(name: str, values: Iterable[str]) -> Any:
    """A str enum of ``values`` for typer (shown as the option's choices)."""
    return enum.Enum(name, {v: v for v in values}, type=str)


Backend = choices("Backend", get_args(BackendName))
Format = choices("Format", get_args(ExportFormat))
Quant = choices("Quant", dict.fromkeys([*QUANT_TYPES, *ONNX_QUANTS]))
Score = choices("Score", SCORES)
SelectorChoice = choices("Selector", get_args(Selector))
Adapter = choices("Adapter", get_args(AdapterKind))
KD = choices("KDLoss", get_args(KDLoss))
TeacherWeight = choices("TeacherWeighting", get_args(TeacherWeighting))

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
BackendOpt = Annotated[Backend, typer.Option(help="Device runtime (auto: by the artefact's format).")]
SignKeyOpt = Annotated[Path | None, typer.Option(help="Ed25519 private key (PEM) to sign with.")]
OutputOpt = Annotated[Path, typer.Option("-o", "--output", help="File to write.")]


def value(choice: Any) -> Any:
    """An enum choice's library value (None stays None)."""
    return None if choice is None else choice.value
