"""Shared fixtures: tiny HF models built offline, and their exported artefacts.

Everything expensive is session-scoped and built once: two tiny models (Llama with
untied embeddings, Qwen2 with tied embeddings and q/k/v biases) trained for a few hundred
steps so their next-token distributions are peaked like a real model's.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from cdcca_edge.demo.tiny import TinySpec, build_tiny_model
from tests.hostile import COUNTS, SUMMARY

# The aarch64 lane (tools/arm64_lane.py) runs the device-side tests under qemu without
# torch: the artefacts are built on the host (tests/prebuilt.py) and read from here.
PREBUILT = os.environ.get("CDCCA_PREBUILT")

# A fixed seed profile: CI runs the same generated cases every time (a failure found once
# is found again), and no example database is written into the checkout.
settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile("ci")

ARCHS = ("llama", "qwen2")
GGUF_QUANTS = ("f32", "f16", "q8_0", "q4_0")
SPECS = {
    "llama": TinySpec(arch="llama", tie_word_embeddings=False, seed=0),
    "qwen2": TinySpec(arch="qwen2", tie_word_embeddings=True, seed=1),
}
# Rows a multiple of 256, so llama.cpp's K-quant mixes write K types (narrower rows fall
# back to Q5_0/Q5_1/Q8_0): the K-quant tests use these.
WIDE_SPECS = {arch: TinySpec(arch=s.arch, tie_word_embeddings=s.tie_word_embeddings, seed=s.seed,
                             hidden_size=256, intermediate_size=512) for arch, s in SPECS.items()}


@pytest.fixture(scope="session")
def wide_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if PREBUILT:
        pytest.skip("the wide tiny models are built with torch on the host")
    root = tmp_path_factory.mktemp("wide")
    return {arch: build_tiny_model(root / arch, spec) for arch, spec in WIDE_SPECS.items()}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if PREBUILT:
        from tests.prebuilt import prebuilt_models

        return prebuilt_models(Path(PREBUILT))
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(root / arch, spec) for arch, spec in SPECS.items()}


@pytest.fixture(scope="session")
def exports(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """Lazily exported, validated artefacts keyed by (arch, format, quant)."""
    from cdcca_edge.converters.export import export

    root = tmp_path_factory.mktemp("exports")
    cache: dict[tuple[str, str, str], object] = {}

    def get(arch: str, fmt: str, quant: str = "f32"):
        key = (arch, fmt, quant)
        if PREBUILT:
            from tests.prebuilt import prebuilt_export

            return prebuilt_export(Path(PREBUILT), arch, fmt, quant)
        if key not in cache:
            out = root / (f"{arch}-{quant}.gguf" if fmt == "gguf" else f"{arch}-onnx")
            cache[key] = export(tiny_models[arch], out, fmt, quant=quant)  # type: ignore[arg-type]
        return cache[key]

    return get


def build_lora_adapter(tiny_llama: Path, out: Path) -> Path:
    """A PEFT LoRA adapter on the tiny Llama with random (non-zero) B: merging it really
    changes q/k/v and down projections."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                     init_lora_weights=False)
    get_peft_model(base, cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def lora_adapter(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    if PREBUILT:
        from tests.prebuilt import prebuilt_path

        return prebuilt_path(Path(PREBUILT), "lora")
    pytest.importorskip("torch")
    return build_lora_adapter(tiny_models["llama"], tmp_path_factory.mktemp("adapter") / "lora")


# The smallest LLaVA the device-side tests use (crash trials, aarch64 parity): its bundle
# has an ONNX vision part and a GGUF or ONNX language part.
LLAVA_SPEC = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, vision_hidden=32, vision_layers=1, train_steps=60,
                  vision_pretrain_steps=5, batch_size=8)


@pytest.fixture(scope="session")
def llava_bundles(tmp_path_factory: pytest.TempPathFactory):
    """Lazily exported f32 bundles of a tiny LLaVA, keyed by the language part's format."""
    cache: dict[str, Path] = {}

    def get(fmt: str) -> Path:
        if PREBUILT:
            from tests.prebuilt import prebuilt_path

            return prebuilt_path(Path(PREBUILT), f"bundle-{fmt}")
        if fmt not in cache:
            pytest.importorskip("torch")
            from cdcca_edge.converters.export import export
            from cdcca_edge.demo.tiny_llava import TinyLlavaSpec, build_tiny_llava

            root = tmp_path_factory.getbasetemp() / "llava"
            model = root / "model"
            if not (model / "config.json").exists():
                build_tiny_llava(model, TinyLlavaSpec(**LLAVA_SPEC))
            cache[fmt] = export(model, root / f"bundle-{fmt}", fmt, quant="f32").path  # type: ignore[arg-type]
        return cache[fmt]

    return get


def pytest_sessionfinish(session) -> None:
    """Under pytest-xdist (the aarch64 lane), a worker hands its counts to the controller."""
    out = getattr(session.config, "workeroutput", None)
    if out is not None:
        out["hostile_counts"] = dict(COUNTS)
        out["summary_lines"] = list(SUMMARY)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:  # noqa: ARG001 - pytest-xdist's controller
    out = getattr(node, "workeroutput", None) or {}  # absent when the worker crashed
    COUNTS.update(out.get("hostile_counts", {}))
    SUMMARY.extend(out.get("summary_lines", []))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001
    """Print how many hostile cases this run fed the readers (tests/hostile.py)."""
    for line in SUMMARY:
        terminalreporter.write_line(line)
    if COUNTS:
        by = ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items()))
        terminalreporter.write_line(f"hostile cases: {sum(COUNTS.values())} ({by})")


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL server for the session (tests take a fresh database each)."""
    pytest.importorskip("psycopg")
    from tests.postgres import Postgres

    pg = Postgres()
    yield pg
    pg.stop()
