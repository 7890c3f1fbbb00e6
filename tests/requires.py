"""Skips for tests that need an optional engine (only the calling test is skipped)."""

from __future__ import annotations

import pytest


def needs_llama() -> None:
    """Skip the calling test (only it: the ONNX-only tests still run) without llama.cpp."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        pytest.skip("llama-cpp-python is not installed (the 'llama' extra)")
