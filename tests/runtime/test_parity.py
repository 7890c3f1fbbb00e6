"""Parity with the host: the greedy tokens the runtime generates here (aarch64 under qemu,
in the aarch64 lane) equal the host's answers recorded in the prebuilt fixtures
(tests/prebuilt.py), for text prompts and for image prompts to the tiny LLaVA's bundles
(ONNX vision part; GGUF or ONNX language part). Exact for f32 and f16; the quantised exports may differ where a
near-tie flips (a first differing position late in the answer), as the export tolerance
allows. Without prebuilt fixtures there is no host to compare with: skipped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PREBUILT = os.environ.get("CDCCA_PREBUILT")
pytestmark = pytest.mark.skipif(not PREBUILT, reason="needs the host's answers (CDCCA_PREBUILT, the aarch64 lane)")
EXACT = ("f32", "f16")
QUANT_MIN_AGREEMENT = 0.75  # of positions before the first difference, for q8_0 / q4_0


def _cases():
    if not PREBUILT:
        return []
    from tests.prebuilt import manifest

    return sorted(manifest(Path(PREBUILT))["answers"])


@pytest.mark.parametrize("key", _cases())
def test_tokens_equal_the_hosts(key):
    from cdcca_edge.runtime import load
    from tests.prebuilt import agreement, manifest, text_answers

    doc = manifest(Path(PREBUILT))  # type: ignore[arg-type]
    host = doc["answers"][key]
    quant = key.rsplit("/", 1)[1]
    with load(Path(PREBUILT) / doc["exports"][key]["path"]) as m:  # type: ignore[operator]
        here = text_answers(m)
    for prompt, want in host.items():
        got = here[prompt]
        if quant in EXACT:
            assert got == want, (key, prompt)
        else:
            assert agreement(got, want) >= QUANT_MIN_AGREEMENT, (key, prompt, got, want)


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_image_answers_equal_the_hosts(fmt):
    from cdcca_edge.runtime.multimodal import MultimodalModel
    from tests.prebuilt import image_answers, manifest, prebuilt_path

    want = manifest(Path(PREBUILT))["image_answers"][f"bundle-{fmt}"]  # type: ignore[arg-type]
    with MultimodalModel(prebuilt_path(Path(PREBUILT), f"bundle-{fmt}")) as mm:  # type: ignore[arg-type]
        assert image_answers(mm) == want


def test_llama_cpp_build_has_the_expected_features():
    """The llama.cpp library loaded here is the build the lane meant: the Pi 5 build was
    compiled with dot products and fp16 arithmetic, the generic one without (this
    llama.cpp reports its compile-time features; that the emulated CPU runs them is shown
    by the other tests passing on it)."""
    want = [f for f in os.environ.get("CDCCA_LLAMA_FEATURES", "").split(",") if f]
    off = [f for f in os.environ.get("CDCCA_LLAMA_FEATURES_OFF", "").split(",") if f]
    if not want:
        pytest.skip("the lane names no expected features (CDCCA_LLAMA_FEATURES)")
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    missing = [f for f in want if f"{f} = 1" not in info]
    assert not missing, f"llama.cpp reports {missing} off: {info}"
    extra = [f for f in off if f"{f} = 1" in info]
    assert not extra, f"llama.cpp reports {extra} on, which this build must not use: {info}"
