"""Hand-built GGUF bytes for edge cases gguf-py's writer refuses to produce.

Layout per the GGUF spec (gguf-py/llama.cpp): magic, u32 version, u64 tensor count, u64 kv
count, kv pairs, tensor infos, padding to the alignment, tensor data.
"""

from __future__ import annotations

import struct

from gguf import GGUF_MAGIC, GGUFValueType


def gguf_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def build_gguf(
    kv: list[tuple[str, int, bytes]],
    tensors: list[tuple[str, tuple[int, ...], int, int]],
    data: bytes,
    version: int = 3,
    magic: int = GGUF_MAGIC,
    alignment: int = 32,
) -> bytes:
    """kv: (key, value type, encoded value); tensors: (name, ne, ggml type, rel offset)."""
    out = struct.pack("<IIQQ", magic, version, len(tensors), len(kv))
    for key, vtype, value in kv:
        out += gguf_string(key) + struct.pack("<I", vtype) + value
    for name, ne, gtype, rel in tensors:
        out += gguf_string(name) + struct.pack("<I", len(ne))
        out += b"".join(struct.pack("<Q", d) for d in ne)
        out += struct.pack("<IQ", gtype, rel)
    out += b"\0" * (-len(out) % alignment)
    return out + data


def u32(v: int) -> tuple[int, bytes]:
    return GGUFValueType.UINT32, struct.pack("<I", v)


def string(v: str) -> tuple[int, bytes]:
    return GGUFValueType.STRING, gguf_string(v)
