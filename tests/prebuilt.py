"""Artefacts built on the host for the aarch64 lane (tools/arm64_lane.py), which runs the
device-side tests under qemu where torch is absent: the tiny models and their exports, a
PEFT LoRA adapter and the exports merged with it (patch tests), the tiny LLaVA's bundles,
and the host's greedy answers (text and image prompts) that the parity test compares with.

    python -m tests.prebuilt OUT    # on the host: build everything into OUT

Under qemu, ``CDCCA_PREBUILT=OUT`` makes the ``tiny_models`` and ``exports`` fixtures
(tests/conftest.py) read from OUT instead of building.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "prebuilt.json"
EXPORTS = [("llama", "gguf", q) for q in ("f32", "f16", "q8_0", "q4_0")] + [
    ("qwen2", "gguf", q) for q in ("f32", "q8_0")] + [("llama", "onnx", "f32"), ("qwen2", "onnx", "f32")]
PARITY_PROMPTS = ("the red circle is", "a small blue square", "the", "where is the green triangle")
PARITY_TOKENS = 12
PAIRS = (("gguf", "q8_0"), ("gguf", "f32"), ("onnx", "f32"))  # LoRA-merged targets (test_patch_runtime)
BUNDLES = ("gguf", "onnx")  # the tiny LLaVA's bundles, by language format
PARITY_IMAGES = 3  # scenes (demo.scenes.dataset, seed 7) asked about on each bundle


def _key(arch: str, fmt: str, quant: str) -> str:
    return f"{arch}/{fmt}/{quant}"


def build(out: Path) -> dict:
    """The tiny models, every export the device-side tests ask for, and the host's greedy
    tokens for the parity prompts on each export."""
    from cdcca_edge.converters.export import export
    from cdcca_edge.demo.tiny import build_tiny_model
    from cdcca_edge.demo.tiny_llava import TinyLlavaSpec, build_tiny_llava
    from cdcca_edge.runtime import load
    from cdcca_edge.runtime.multimodal import MultimodalModel
    from tests.conftest import LLAVA_SPEC, SPECS, build_lora_adapter

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    doc: dict = {"tiny_models": {}, "exports": {}, "answers": {}, "paths": {}, "image_answers": {}}
    for arch, spec in SPECS.items():
        build_tiny_model(out / "tiny" / arch, spec)
        doc["tiny_models"][arch] = f"tiny/{arch}"
    for arch, fmt, quant in EXPORTS:
        name = f"{arch}-{quant}.gguf" if fmt == "gguf" else f"{arch}-onnx"
        res = export(out / "tiny" / arch, out / "exports" / name, fmt, quant=quant)  # type: ignore[arg-type]
        d = res.as_dict()
        d["path"] = str(Path(d["path"]).relative_to(out))
        doc["exports"][_key(arch, fmt, quant)] = d
        with load(res.path) as m:
            doc["answers"][_key(arch, fmt, quant)] = text_answers(m)
    adapter = build_lora_adapter(out / "tiny" / "llama", out / "lora")
    doc["paths"]["lora"] = "lora"
    for fmt, quant in PAIRS:
        name = f"llama-lora-{quant}.gguf" if fmt == "gguf" else "llama-lora-onnx"
        export(out / "tiny" / "llama", out / "exports" / name, fmt, quant=quant, adapter=adapter)  # type: ignore[arg-type]
        doc["paths"][_pair_key(fmt, quant)] = f"exports/{name}"
    llava = build_tiny_llava(out / "tiny" / "llava", TinyLlavaSpec(**LLAVA_SPEC))
    for fmt in BUNDLES:
        path = export(llava, out / "exports" / f"bundle-{fmt}", fmt, quant="f32").path  # type: ignore[arg-type]
        doc["paths"][f"bundle-{fmt}"] = f"exports/bundle-{fmt}"
        with MultimodalModel(path) as mm:
            doc["image_answers"][f"bundle-{fmt}"] = image_answers(mm)
    (out / MANIFEST).write_text(json.dumps(doc, indent=1))
    return doc


def text_answers(model) -> dict[str, list[int]]:
    """The greedy tokens of a text model (a runtime Backend) for each parity prompt."""
    from cdcca_edge.runtime.base import GenerationConfig

    return {p: model.generate(p, GenerationConfig(max_tokens=PARITY_TOKENS)).tokens for p in PARITY_PROMPTS}


def image_answers(mm) -> list[list[int]]:
    """A bundle's (MultimodalModel) greedy tokens for each parity image and question; not
    stopped at EOS, so that a tiny model's early EOS leaves tokens to compare."""
    from cdcca_edge.demo.scenes import DOMAINS, dataset
    from cdcca_edge.runtime.base import GenerationConfig

    cfg = GenerationConfig(max_tokens=PARITY_TOKENS, stop_at_eos=False)
    return [mm.generate(mm.prompt(ex.question.text), cfg, image=ex.image).tokens
            for ex in dataset(PARITY_IMAGES, seed=7, domains=DOMAINS)]


def agreement(got: list[int], want: list[int]) -> float:
    """The share of the host's answer ``want`` that ``got`` reproduces before its first
    difference (1.0: identical)."""
    same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return same / max(1, len(want))


def _pair_key(fmt: str, quant: str) -> str:
    return f"lora-target/{fmt}/{quant}"


def manifest(root: Path) -> dict:
    return json.loads((root / MANIFEST).read_text())


def prebuilt_path(root: Path, name: str) -> Path:
    """A prebuilt artefact by name: "lora" (the adapter), "bundle-gguf", "bundle-onnx"."""
    return root / manifest(root)["paths"][name]


def prebuilt_pair(root: Path, fmt: str, quant: str) -> Path:
    """The export of the tiny Llama merged with the LoRA adapter (the patch tests' target)."""
    return prebuilt_path(root, _pair_key(fmt, quant))


def prebuilt_models(root: Path) -> dict[str, Path]:
    return {arch: root / rel for arch, rel in manifest(root)["tiny_models"].items()}


@dataclass(frozen=True)
class PrebuiltExport:
    """What the tests read of an ExportResult (cdcca_edge.converters imports torch-side
    modules, so the class itself is not used here)."""

    path: Path
    format: str
    quant: str
    arch: str
    identity: str


def prebuilt_export(root: Path, arch: str, fmt: str, quant: str = "f32") -> PrebuiltExport:
    import pytest

    d = manifest(root)["exports"].get(_key(arch, fmt, quant))
    if d is None:
        pytest.skip(f"{arch} {fmt} {quant} is not among the prebuilt exports (tests/prebuilt.py EXPORTS)")
    return PrebuiltExport(root / d["path"], d["format"], d["quant"], d["arch"], d["identity"])


if __name__ == "__main__":
    build(Path(sys.argv[1]))
    print(f"prebuilt fixtures in {sys.argv[1]}", file=sys.stderr)
