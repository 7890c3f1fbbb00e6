"""GGML/GGUF format facts, from gguf-py, without importing the gguf package.

``import gguf`` runs gguf-py's ``__init__``, which imports numpy and every gguf module
(about 80 ms and 18 MB here). The device's patch path needs only the constants (magic,
value types, quant types and their block sizes), which live in ``gguf/constants.py``, a
stdlib-only module. We load that file on its own, under its real name
``gguf.constants``, so that a later ``import gguf`` reuses the very same module object
(same enum classes) instead of loading a second copy. The facts are gguf-py's, never
restated here.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from cdcca_edge.core.errors import BackendUnavailableError


def _constants() -> ModuleType:
    name = "gguf.constants"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("gguf")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailableError("'gguf' is not installed; install it with `pip install cdcca-edge`")
    path = f"{list(spec.submodule_search_locations)[0]}/constants.py"
    sub = importlib.util.spec_from_file_location(name, path)
    assert sub is not None and sub.loader is not None
    module = importlib.util.module_from_spec(sub)
    sys.modules[name] = module
    try:
        sub.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


_c = _constants()
GGUF_MAGIC: int = _c.GGUF_MAGIC
GGUF_DEFAULT_ALIGNMENT: int = _c.GGUF_DEFAULT_ALIGNMENT
GGMLQuantizationType = _c.GGMLQuantizationType
GGUFValueType = _c.GGUFValueType
GGML_QUANT_SIZES: dict = _c.GGML_QUANT_SIZES


# ONNX element types with no GGML name: U8 holds MatMulNBits' packed int4 / int8 codes
# (onnxruntime's weight-only quantisation), one byte a unit.
EXTRA_LAYOUTS: dict[str, tuple[int, int]] = {"U8": (1, 1)}


def type_layout(type_name: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a GGML type name, e.g. ``"Q8_0"`` ->
    ``(32, 34)``, ``"F32"`` -> ``(1, 4)``. ONNX float types use the same names; ``"U8"``
    is one byte.

    Raises:
        KeyError: not a GGML type name.
    """
    if type_name in EXTRA_LAYOUTS:
        return EXTRA_LAYOUTS[type_name]
    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]


# Block types whose every block begins with its float16 scale ``d`` (ggml-common.h:
# block_q8_0 = {ggml_half d; int8_t qs[32]}, block_q4_0 = {ggml_half d; uint8_t qs[16]}).
SCALE_FIRST_TYPES = ("Q8_0", "Q4_0")


def block_scales(type_name: str, raw: object) -> "object":
    """The float16 scale of each block of ``raw`` (whole blocks of a SCALE_FIRST_TYPES
    type), as a (n_blocks,) float16 array (a copy)."""
    import numpy as np

    if type_name not in SCALE_FIRST_TYPES:
        raise KeyError(f"{type_name} blocks do not begin with one float16 scale")
    _, size = type_layout(type_name)
    return np.frombuffer(raw, np.uint8).reshape(-1, size)[:, :2].copy().view(np.float16).reshape(-1)


# Byte offsets of the float16 fields in each block of a quant type (ggml-common.h: e.g.
# block_q4_K = {half d; half dmin; uint8 scales[12]; uint8 qs[128]}, block_q6_K = {uint8
# ql[128]; uint8 qh[64]; int8 scales[16]; half d}). Every value of such a block is those
# fields times small integers (at most 2.6e8 in magnitude from finite fields), so a block
# decodes to finite values exactly when its float16 fields are finite.
HALF_FIELDS: dict[str, tuple[int, ...]] = {
    "Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}


def blocks_nonfinite(type_name: str, raw: object) -> "object":
    """Per block of ``raw`` (whole blocks of a HALF_FIELDS type): does it decode to a
    non-finite value? (n_blocks,) bool, from the float16 fields alone (no dequantising)."""
    import numpy as np

    _, size = type_layout(type_name)
    blocks = np.frombuffer(raw, np.uint8).reshape(-1, size)
    bad = np.zeros(blocks.shape[0], bool)
    for off in HALF_FIELDS[type_name]:
        half = np.ascontiguousarray(blocks[:, off:off + 2]).view("<u2").reshape(-1)
        bad |= (half & 0x7C00) == 0x7C00  # exponent all ones: inf or nan
    return bad
