"""Small artefacts of every tensor type, and tools to forge deltas, for the delta tests."""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter

from cdcca_edge.core import delta_format as df

GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K")
REQUANT = ("F32", "F16", "BF16", "Q8_0", "Q4_0")


def random_units(type_name: str, n_units: int, rng: np.random.Generator) -> bytes:
    """``n_units`` units (elements or quant blocks) of random but finite values: a patcher
    refuses bytes that make a finite weight non-finite (docs/formats/delta.md, 6.5)."""
    qt = T[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qt]
    x = rng.standard_normal(n_units * block).astype(np.float32)
    if type_name == "F32":
        return x.tobytes()
    if type_name == "F16":
        return x.astype(np.float16).tobytes()
    if type_name == "BF16":
        return (x.view(np.uint32) >> 16).astype("<u2").tobytes()
    if type_name == "Q4_K":
        raw = rng.integers(0, 256, (n_units, size), dtype=np.uint8)
        raw[:, :4] = np.frombuffer(np.array([0.01, 0.001], np.float16).tobytes(), np.uint8)
        return raw.tobytes()
    return gguf.quants.quantize(x.reshape(-1, block), qt).tobytes()


def make_gguf(path: Path, seed: int = 0, rows: int = 16, cols: int = 256) -> Path:
    """One (rows, cols) matrix per type, named after it ("Q8_0.w"), plus a 1-D norm."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "llama")
    w.add_string("general.name", "delta-test")
    for name in GGUF_TYPES:
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        qt = T[name]
        if name == "F32":
            w.add_tensor(f"{name}.w", x)
        elif name == "F16":
            w.add_tensor(f"{name}.w", x.astype(np.float16))
        elif name == "Q4_K":  # gguf-py cannot quantise Q4_K: any block bytes will do here
            block, size = gguf.GGML_QUANT_SIZES[qt]
            raw = rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
            raw.reshape(rows, -1, size)[:, :, :4] = np.frombuffer(
                np.array([0.01, 0.001], np.float16).tobytes(), np.uint8)  # sane d, dmin
            w.add_tensor(f"{name}.w", raw, raw_dtype=qt)
        else:
            w.add_tensor(f"{name}.w", gguf.quants.quantize(x, qt), raw_dtype=qt)
    w.add_tensor("norm", rng.standard_normal(cols).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_onnx(d: Path, seed: int = 0, rows: int = 8, cols: int = 64) -> Path:
    """An ONNX model with F32 and F16 initializers in one external data file."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    w32 = rng.standard_normal((rows, cols)).astype(np.float32)
    w16 = rng.standard_normal((rows, cols)).astype(np.float16)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])
    nodes = [
        helper.make_node("Cast", ["w16"], ["w16f"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["w32", "w16f"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=[
        numpy_helper.from_array(w32, "w32"), numpy_helper.from_array(w16, "w16")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(d / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=0)
    return d


def file_digest(path: Path) -> str:
    """SHA-256 over every file of an artefact (a GGUF file, or an ONNX directory's files
    except cdcca's own state/journal)."""
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
        return h.hexdigest()
    for f in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("cdcca-")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def reseal(src: Path, dst: Path, mutate: Callable[[dict[str, Any], bytearray], None]) -> Path:
    """Forge a delta: edit its header JSON and payload, recompute a valid digest (no
    signature): what an attacker without the key, or a buggy sender, can produce."""
    raw = src.read_bytes()
    magic, version, flags, hlen = df.PREAMBLE.unpack_from(raw)
    text = raw[df.PREAMBLE.size : df.PREAMBLE.size + hlen]
    if flags & df.FLAG_HEADER_ZLIB:
        text = zlib.decompress(text)
    header = json.loads(text)
    flags = 0  # the forged header is written uncompressed
    p0 = df.PREAMBLE.size + hlen
    payload = bytearray(raw[p0 : p0 + header["payload_bytes"]])
    mutate(header, payload)
    header["payload_bytes"] = len(payload)
    hb = json.dumps(header).encode()
    body = df.PREAMBLE.pack(magic, version, flags, len(hb)) + hb + bytes(payload)
    dst.write_bytes(body + hashlib.sha256(body).digest() + bytes([df.SIG_NONE]))
    return dst


def u32(x: int) -> bytes:
    return struct.pack("<I", x)
