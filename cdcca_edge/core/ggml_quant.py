"""llama.cpp's own quantiser, for the types gguf-py cannot write (the K-quants).

A K-quant file on a device was written by llama.cpp (``llama_model_quantize``). When a
delta rewrites values in one (``qadd``, ``lowrank``: dequantise, add, quantise again),
the new super-blocks must be the bytes llama.cpp itself would write for those values, on
the cloud's mirror and on the device alike, or the two part ways. So both call the same
function: ``ggml_quantize_chunk`` from the ``libggml-base`` that llama-cpp-python ships
(the llama backend's own library), through ctypes. Without an importance matrix it runs
the reference quantiser (``quantize_row_q4_K_ref`` and kin), which works block by block,
so quantising a run of super-blocks on its own gives the bytes the whole tensor would.

The library is located without importing ``llama_cpp`` (which would load libllama too).
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path
from typing import Any

from cdcca_edge.core.errors import BackendUnavailableError
from cdcca_edge.core.ggml import GGMLQuantizationType, type_layout

# What llama.cpp's K-quant exports contain: the K types, and the legacy types it falls
# back to for a tensor whose rows are not a multiple of 256 (llama-quant.cpp:
# Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; Q4_1 for completeness).
GGML_QUANTISED_TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q4_1", "Q5_0", "Q5_1")
# their code levels (ggml-common.h: 4-bit codes 0..15, 5-bit 0..31, Q6_K -32..31): a
# block's range over these is its coarsest quantisation step
QUANT_LEVELS = {"Q4_K": 15, "Q5_K": 31, "Q6_K": 63, "Q4_1": 15, "Q5_0": 31, "Q5_1": 31}

_lib: Any = None


def _library() -> Any:
    global _lib
    if _lib is not None:
        return _lib
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailableError(
            "rewriting values in a K-quant tensor needs llama.cpp's quantiser, from "
            "llama-cpp-python; install it with `pip install 'cdcca-edge[llama]'`")
    libdir = Path(list(spec.submodule_search_locations)[0]) / "lib"
    found = sorted(libdir.glob("libggml-base.*")) or sorted(libdir.glob("ggml-base.*"))
    if not found:
        raise BackendUnavailableError(f"no libggml-base in {libdir}: this llama-cpp-python build "
                                      "is unusual; reinstall llama-cpp-python")
    lib = ctypes.CDLL(str(found[0]))
    # size_t ggml_quantize_chunk(enum ggml_type type, const float * src, void * dst,
    #                            int64_t start, int64_t nrows, int64_t n_per_row, const float * imatrix)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    _lib = lib
    return lib


def ggml_quantize(type_name: str, values: Any) -> bytes:
    """float32 values (n,) -> ``type_name`` blocks, as llama.cpp's quantiser writes them
    (n a multiple of the type's block; one row, no importance matrix)."""
    import numpy as np

    if type_name not in GGML_QUANTISED_TYPES:
        raise KeyError(f"{type_name} is not quantised through ggml here")
    x = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    block, size = type_layout(type_name)
    if x.size % block:
        raise ValueError(f"{x.size} values are not whole {type_name} blocks of {block}")
    lib = _library()
    qtype = int(GGMLQuantizationType[type_name])
    assert not lib.ggml_quantize_requires_imatrix(qtype)
    out = np.empty(x.size // block * size, np.uint8)
    if x.size == 0:
        return b""
    wrote = lib.ggml_quantize_chunk(qtype, x.ctypes.data, out.ctypes.data, 0, 1, x.size, None)
    if wrote != out.size:  # the library and gguf-py disagree on the layout: never write it
        raise BackendUnavailableError(f"libggml wrote {wrote} bytes of {type_name} for {x.size} values, "
                                      f"gguf-py's layout says {out.size}: versions disagree; "
                                      "reinstall matching llama-cpp-python and gguf")
    return out.tobytes()
