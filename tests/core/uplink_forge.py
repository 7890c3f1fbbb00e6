"""Forging uplink bundles byte by byte, past the writer's checks: what a buggy or hostile
sender can send (docs/formats/uplink.md). Every forged bundle carries a valid digest, so
the reader has to refuse it on its structure, never on the checksum."""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from typing import Any

import numpy as np

from cdcca_edge.core import uplink_format as uf

MIB = 1 << 20
_ZERO_MIB = bytes(MIB)


def code_of(a: np.ndarray) -> str:
    return next(k for k, (code, _) in uf.DTYPES.items() if np.dtype(code) == a.dtype)


def block(sid: str, meta: dict[str, Any] | None = None, arrays: dict[str, np.ndarray] | None = None, *,
          listing: list[Any] | None = None, raw_meta: bytes | None = None, mlen: int | None = None,
          extra: bytes = b"") -> bytes:
    """A sample block: u32 M, metadata JSON, array bytes. ``listing`` replaces the array
    listing the arrays imply, ``raw_meta`` the whole metadata, ``mlen`` the length field."""
    arrays = arrays or {}
    if listing is None:
        listing = [{"name": k, "dtype": code_of(v), "shape": list(v.shape)} for k, v in arrays.items()]
    m = raw_meta if raw_meta is not None else json.dumps({**(meta or {}), "id": sid, "arrays": listing}).encode()
    data = b"".join(np.ascontiguousarray(v).tobytes() for v in arrays.values())
    return struct.pack("<I", len(m) if mlen is None else mlen) + m + data + extra


def good_arrays(rng: np.random.Generator, t_p: int = 6, t_a: int = 4, vocab: int = 300) -> dict[str, np.ndarray]:
    """The arrays of a text sample, as the device writes them (token ids below ``vocab``)."""
    return {
        "prompt_ids": rng.integers(0, vocab, t_p).astype(np.uint32),
        "answer_ids": rng.integers(0, vocab, t_a).astype(np.uint32),
        "token_entropy": rng.random(t_a).astype(np.float16),
        "token_flags": (rng.random(t_a) > 0.5).astype(np.uint8),
        "token_weights": np.where(rng.random(t_a) > 0.5, 1.0, 0.1).astype(np.float16),
        "sample_scores": rng.random(4).astype(np.float32),
    }


def bundle(samples: list[tuple[str, bytes]], *, index: list[Any] | None = None, header: dict[str, Any] | None = None,
           payload: bytes | None = None, raw_header: bytes | None = None) -> bytes:
    """A whole bundle with a valid digest. ``samples`` are (id, block) pairs; ``index``,
    ``header`` (merged over the defaults), ``payload`` and ``raw_header`` override what
    they imply."""
    if payload is None:
        payload = zlib.compress(b"".join(b for _, b in samples))
    if index is None:
        index = [{"id": sid, "length": len(b)} for sid, b in samples]
    h = {"format": "cdcca-uplink", "version": uf.FORMAT_VERSION, "artifact_identity": "a" * 64,
         "n_seen": len(samples), "selector": "uts", "payload_bytes": len(payload), "samples": index}
    h.update(header or {})
    hb = raw_header if raw_header is not None else json.dumps(h).encode()
    body = uf.PREAMBLE.pack(uf.MAGIC, uf.FORMAT_VERSION, 0, len(hb)) + hb + payload
    return body + hashlib.sha256(body).digest()


def zlib_stream(parts: list[bytes | int]) -> bytes:
    """A valid zlib stream of ``parts``: bytes as they are, an int ``n`` as n MiB of zeros.
    Cheap for gigabytes: after a full flush deflate output does not look back, so one
    compressed MiB of zeros is repeated, and the Adler-32 is computed alongside."""
    c = zlib.compressobj(9)
    out = [c.compress(b"") + c.flush(zlib.Z_FULL_FLUSH)]  # the 2-byte zlib header
    zero = c.compress(_ZERO_MIB) + c.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for p in parts:
        if isinstance(p, int):
            out.append(zero * p)
            for _ in range(p):
                adler = zlib.adler32(_ZERO_MIB, adler)
        else:
            out.append(c.compress(p) + c.flush(zlib.Z_FULL_FLUSH))
            adler = zlib.adler32(p, adler)
    end = c.flush()  # the final block, then the Adler-32 of what this compressor saw
    return b"".join(out) + end[:-4] + struct.pack(">I", adler)
