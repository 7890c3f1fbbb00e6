"""The uplink bundle format (``.cdcu``): what a device sends the cloud.

Layout (docs/formats/uplink.md, normative), little-endian::

    0       8  magic b"CDCUPLNK"
    8       4  u32 format version (1)
    12      4  u32 flags (0)
    16      8  u64 H = header length
    24      H  header: UTF-8 JSON (device identity, calibration, selection, sample index)
    24+H    P  payload: one zlib stream, P = header["payload_bytes"]
    24+H+P 32  SHA-256 of every byte before it

The payload decompresses to the samples' blocks, one after the other, with the lengths
the header's sample index gives (one stream: small text samples compress together). A
block: u32 M, M bytes of JSON metadata, then the arrays the metadata lists, in order, each
``prod(shape) * itemsize`` raw little-endian bytes.

A bundle is hostile until read: the reader inflates no more than the index declares, never
past the ``MAX_*`` limits (spec section 4), and refuses anything else with ``FormatError``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from cdcca_edge.core.fileio import open_regular
from cdcca_edge.core.framed import DIGEST_SIZE, PREAMBLE, check_digest, digest_payload, read_preamble, write_framed
from cdcca_edge.core.errors import FormatError, IntegrityError

MAGIC = b"CDCUPLNK"
FORMAT_VERSION = 1
COMPRESS_LEVEL = 6
DTYPES = {"u8": ("<u1", 1), "i8": ("<i1", 1), "u16": ("<u2", 2), "u32": ("<u4", 4),
          "f16": ("<f2", 2), "f32": ("<f4", 4)}
_U32 = struct.Struct("<I")

# Limits (docs/formats/uplink.md section 4): a reader allocates nothing a hostile file
# merely claims beyond these, and never more than the sizes the file declares.
MAX_HEADER_BYTES = 16 << 20  # the header JSON (about 400,000 index entries)
MAX_METADATA_BYTES = 4 << 20  # one sample's metadata JSON
MAX_SAMPLE_BYTES = 64 << 20  # one decompressed sample block (a raw 4K RGB frame fits)
MAX_PAYLOAD_BYTES = 1 << 30  # all sample blocks of a bundle, decompressed
MAX_JSON_DEPTH = 32  # nesting of arrays and objects in the header and the metadata
MAX_ARRAY_DIMS = 8  # dimensions of one array
_CHUNK = 1 << 20  # file bytes read, and bytes inflated, per step
_FIX = "the bundle is damaged or was not written by cdcca-edge: collect it again (`cdcca-edge uplink collect`)"

# The sample arrays section 3 defines (writers and readers use these names, never literals)
PROMPT_IDS = "prompt_ids"  # (T_p,) u32: the prompt's tokens (multimodal: one image token)
ANSWER_IDS = "answer_ids"  # (T_a,) u32: the device's answer
TOKEN_ENTROPY = "token_entropy"  # (T_a,) f16: entropy of each answer position
TOKEN_FLAGS = "token_flags"  # (T_a,) u8: 1 where the device was unsure
TOKEN_WEIGHTS = "token_weights"  # (T_a,) f16: loss weight of each answer token, finite, >= 0
SAMPLE_SCORES = "sample_scores"  # (4,) f32: confidence, ref_confidence, mean/max entropy
PROMPT_LOGPROB = "prompt_logprob"  # (T_p - 1,) f16
VISUAL_FEATURES = "visual_features"  # (k, D) i8 (with visual_scales) or f16: the tokens kept
VISUAL_SCALES = "visual_scales"  # (k,) f16: one scale per int8 token
VISUAL_POSITIONS = "visual_positions"  # (k,) u16: ascending, < n_visual_tokens
MAX_VISUAL_TOKENS = 1 << 16  # positions are u16: an image of more tokens cannot be described
RAW_IMAGE = "raw_image"  # u8: the image file's bytes, or (H, W, 3) pixels
N_VISUAL_TOKENS = "n_visual_tokens"  # metadata field: positions the image takes
META_PROMPT = "prompt"  # metadata field: the prompt's text
META_ANSWER = "answer"  # metadata field: the device's answer, as text
META_UNCERTAINTY = "uncertainty"  # metadata field: the calibrated score that selected it
META_RAW_BYTES = "raw_bytes"  # metadata field: bytes of the raw input (prompt, image file)
# allowed dtypes and dimensions of each; other arrays are ignored
KNOWN_ARRAYS: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
    PROMPT_IDS: (("u32",), (1,)),
    ANSWER_IDS: (("u32",), (1,)),
    TOKEN_ENTROPY: (("f16",), (1,)),
    TOKEN_FLAGS: (("u8",), (1,)),
    TOKEN_WEIGHTS: (("f16",), (1,)),
    SAMPLE_SCORES: (("f32",), (1,)),
    PROMPT_LOGPROB: (("f16",), (1,)),
    VISUAL_FEATURES: (("f16", "i8"), (2,)),
    VISUAL_SCALES: (("f16",), (1,)),
    VISUAL_POSITIONS: (("u16",), (1,)),
    RAW_IMAGE: (("u8",), (1, 3)),
}
ANSWER_ARRAYS = (ANSWER_IDS, TOKEN_ENTROPY, TOKEN_FLAGS, TOKEN_WEIGHTS)  # one value per answer token
# sample metadata fields section 3 defines, and their JSON types
KNOWN_FIELDS: dict[str, tuple[type, ...]] = {
    META_PROMPT: (str,), META_ANSWER: (str,), META_UNCERTAINTY: (int, float), META_RAW_BYTES: (int,),
    N_VISUAL_TOKENS: (int,),
}


def _bad(where: object, problem: str, fix: str = _FIX) -> FormatError:
    return FormatError(f"{where}: {problem}; {fix}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_json(raw: bytes, where: str) -> Any:
    """Strict JSON for headers and metadata: UTF-8, at most :data:`MAX_JSON_DEPTH` deep.

    Raises:
        FormatError: not UTF-8, not JSON, too deeply nested, ``NaN``/``Infinity`` (which
            Python's parser accepts, JSON does not), or an integer too long to convert
            (Python's own JSON parser raises RecursionError and ValueError there).
    """
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number (the format allows finite numbers only)")

    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=no_constants)
    except RecursionError:
        raise _bad(where, f"JSON nested deeper than the format's maximum of {MAX_JSON_DEPTH}") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, and too-long integers
        raise _bad(where, f"not valid JSON ({exc})") from None
    # iterative, so that the check itself cannot exhaust the stack
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise _bad(where, f"JSON nested deeper than the format's maximum of {MAX_JSON_DEPTH}")
            stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node))
    return doc


@dataclass
class UplinkSample:
    """One uploaded sample: its metadata (JSON-able) and named numpy arrays."""

    id: str
    meta: dict[str, Any]
    arrays: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        """The uncompressed block.

        Raises:
            ValueError: an array of a dtype the format lacks. FormatError: a sample the
                format's limits (section 4) do not allow; a reader would refuse it.
        """
        import numpy as np

        listing = []
        blobs = []
        arrays = {name: np.asarray(arr) for name, arr in self.arrays.items()}
        for name, a in arrays.items():
            dt = next((k for k, (code, _) in DTYPES.items() if np.dtype(code) == a.dtype), None)
            if dt is None:
                raise ValueError(f"array {name!r}: dtype {a.dtype} is not one of {list(DTYPES)}")
            if a.ndim > MAX_ARRAY_DIMS:
                raise FormatError(f"array {name!r} has {a.ndim} dimensions, more than the uplink "
                                  f"format's maximum of {MAX_ARRAY_DIMS}; reshape it")
            listing.append({"name": name, "dtype": dt, "shape": list(a.shape)})
            blobs.append(np.ascontiguousarray(a, dtype=DTYPES[dt][0]).tobytes())
        check_arrays(UplinkSample(self.id, self.meta, arrays), f"sample {self.id!r}",
                     "fix the sample before uploading it")
        try:  # NaN or Infinity would be written, and then refused by every reader
            meta = json.dumps({**self.meta, "id": self.id, "arrays": listing}, separators=(",", ":"),
                              allow_nan=False).encode()
        except ValueError as exc:
            raise FormatError(f"sample {self.id!r}: its metadata holds a non-finite number ({exc}); "
                              "fix the sample before uploading it") from None
        if len(meta) > MAX_METADATA_BYTES:
            raise FormatError(f"sample {self.id!r}: metadata of {len(meta):,} bytes is more than the uplink "
                              f"format's maximum of {MAX_METADATA_BYTES:,}; shorten its prompt or answer")
        block = _U32.pack(len(meta)) + meta + b"".join(blobs)
        if len(block) > MAX_SAMPLE_BYTES:
            raise FormatError(f"sample {self.id!r} is {len(block):,} bytes, more than the uplink format's "
                              f"maximum of {MAX_SAMPLE_BYTES:,}; upload a smaller image or prompt")
        return block


class _Source:
    """Exactly-sized reads of one sample block from memory (``decode_sample``)."""

    def __init__(self, raw: bytes, where: str) -> None:
        self.raw, self.pos, self.where = raw, 0, where

    def read(self, n: int) -> bytes:
        if self.pos + n > len(self.raw):
            raise _bad(self.where, "sample block ends early")
        out = self.raw[self.pos : self.pos + n]
        self.pos += n
        return bytes(out)

    def read_array(self, n: int) -> Any:
        import numpy as np

        out = np.frombuffer(self.read(n), dtype=np.uint8)
        return out


class _Inflater:
    """The payload's zlib stream, inflated on demand: each read returns exactly the bytes
    asked for and inflates no more than that (memory: the request, plus a chunk)."""

    def __init__(self, f: Any, size: int, path: Path) -> None:
        self.f, self.left, self.path = f, size, path
        self.d = zlib.decompressobj()
        self.where = str(path)

    def _more(self, limit: int) -> bytes:
        """Up to ``limit`` (> 0) inflated bytes; b"" when the stream has no more."""
        while not self.d.eof:
            if self.d.unconsumed_tail:  # input held back by an earlier output limit
                data = self.d.unconsumed_tail
            elif self.left:
                data = self.f.read(min(_CHUNK, self.left))
                if not data:
                    raise IntegrityError(f"{self.path}: file changed while reading it")
                self.left -= len(data)
            else:
                data = b""
            try:
                out = self.d.decompress(data, min(limit, _CHUNK))
            except zlib.error as exc:
                raise _bad(self.path, f"payload is not valid zlib data ({exc})") from None
            if out:
                return out
            if not data:
                return b""
        return b""

    def read_into(self, buf: memoryview) -> None:
        got = 0
        while got < len(buf):
            out = self._more(len(buf) - got)
            if not out:
                raise _bad(self.where, "payload ends inside a sample (shorter than the index says)")
            buf[got : got + len(out)] = out
            got += len(out)

    def read(self, n: int) -> bytes:
        buf = bytearray(n)
        self.read_into(memoryview(buf))
        return bytes(buf)

    def read_array(self, n: int) -> Any:
        import numpy as np

        # np.empty: pages are only touched (resident) as inflated bytes arrive
        out = np.empty(n, dtype=np.uint8)
        self.read_into(memoryview(out).cast("B"))
        return out

    def finish(self) -> None:
        """The stream must end exactly after the last block, and the file with it."""
        if self._more(1):
            raise _bad(self.path, "payload holds more than its samples (longer than the index says)")
        if not self.d.eof:
            raise _bad(self.path, "payload's zlib stream is truncated")
        if self.left or self.d.unused_data:
            raise _bad(self.path, "bytes follow the payload's zlib stream")


def decode_sample(raw: bytes, where: str) -> UplinkSample:
    """Parse one sample block.

    Raises:
        FormatError: truncated, or arrays that do not match their listing.
    """
    return _decode_block(_Source(raw, where), len(raw), where)


def _decode_block(src: Any, length: int, where: str) -> UplinkSample:
    """Read one block of ``length`` bytes from ``src``: metadata first, so that arrays are
    only allocated once the listing is known to fill the block exactly."""
    import numpy as np

    if length < _U32.size:
        raise _bad(where, f"sample block of {length} bytes is too short")
    (mlen,) = _U32.unpack(src.read(_U32.size))
    if mlen > length - _U32.size:
        raise _bad(where, f"sample metadata ({mlen:,} bytes) runs past the block ({length:,} bytes)")
    if mlen > MAX_METADATA_BYTES:
        raise _bad(where, f"sample metadata of {mlen:,} bytes is more than the format's maximum "
                          f"of {MAX_METADATA_BYTES:,}")
    meta = parse_json(src.read(mlen), f"{where} metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("id"), str):
        raise _bad(where, "sample metadata is not an object with a string 'id'")
    for key, kinds in KNOWN_FIELDS.items():
        v = meta.get(key)
        if v is not None and (not isinstance(v, kinds) or isinstance(v, bool)):
            raise _bad(where, f"sample field {key!r} is {type(v).__name__}, expected "
                              f"{' or '.join(k.__name__ for k in kinds)}")
    if meta.get(META_RAW_BYTES, 0) < 0 or meta.get(N_VISUAL_TOKENS, 1) < 1:
        raise _bad(where, "sample field 'raw_bytes' is negative or 'n_visual_tokens' is not positive")
    listing = meta.pop("arrays", [])
    if not isinstance(listing, list):
        raise _bad(where, "'arrays' is not a list")
    plan = []
    left = length - _U32.size - mlen
    for item in listing:
        if not isinstance(item, dict):
            raise _bad(where, f"array listing entry {item!r} is not an object")
        name, dt, shape = item.get("name"), item.get("dtype"), item.get("shape")
        if not isinstance(name, str) or dt not in DTYPES or not isinstance(shape, list):
            raise _bad(where, f"bad array listing {item!r}: needs a string 'name', a 'dtype' "
                              f"of {list(DTYPES)} and a list 'shape'")
        if any(n == name for n, *_ in plan):
            raise _bad(where, f"duplicate array {name!r}")
        if len(shape) > MAX_ARRAY_DIMS:
            raise _bad(where, f"array {name!r} has {len(shape)} dimensions, more than the format's "
                              f"maximum of {MAX_ARRAY_DIMS}")
        if not all(_is_int(s) and s >= 0 for s in shape):
            raise _bad(where, f"array {name!r} has shape {shape!r}; dimensions must be integers >= 0")
        nbytes = DTYPES[dt][1]
        for s in shape:
            nbytes *= s
        if nbytes > left:
            raise _bad(where, f"array {name!r} ({nbytes:,} bytes) runs past the block")
        left -= nbytes
        plan.append((name, dt, shape, nbytes))
    if left:
        raise _bad(where, f"{left} stray bytes after the arrays")
    arrays = {}
    for name, dt, shape, nbytes in plan:
        arrays[name] = src.read_array(nbytes).view(np.dtype(DTYPES[dt][0])).reshape(shape)
    sample = UplinkSample(id=meta.pop("id"), meta=meta, arrays=arrays)
    check_arrays(sample, where)
    return sample


def check_arrays(sample: UplinkSample, where: str, fix: str = _FIX) -> None:
    """The arrays section 3 defines: dtypes, shapes, lengths that must agree, and values
    that must be finite. The reader and the writer both check them.

    Raises:
        FormatError: naming the array and what the format expects.
    """
    import numpy as np

    def bad(problem: str) -> FormatError:
        return FormatError(f"{where}: {problem}; {fix}")

    a = sample.arrays
    for name, (dtypes, ndims) in KNOWN_ARRAYS.items():
        if name not in a:
            continue
        dt = next(k for k, (code, _) in DTYPES.items() if np.dtype(code) == a[name].dtype)
        if dt not in dtypes or a[name].ndim not in ndims:
            raise bad(f"array {name!r} is {dt} {list(a[name].shape)}; the format defines it as "
                              f"{' or '.join(dtypes)} with {' or '.join(map(str, ndims))} dimension(s)")
    if "prompt_ids" in a and not len(a["prompt_ids"]):
        raise bad("'prompt_ids' is empty; a prompt has at least one token")
    if "sample_scores" in a and a["sample_scores"].shape != (4,):
        raise bad(f"'sample_scores' has shape {list(a['sample_scores'].shape)}, expected [4]")
    if "raw_image" in a and a["raw_image"].ndim == 3 and a["raw_image"].shape[2] != 3:
        raise bad(f"'raw_image' pixels have shape {list(a['raw_image'].shape)}, expected [H, W, 3]")
    lengths = {n: len(a[n]) for n in ANSWER_ARRAYS if n in a}
    if len(set(lengths.values())) > 1:
        raise bad(f"the per-answer-token arrays disagree in length: {lengths}")
    if "token_weights" in a:
        w = a["token_weights"]
        if not np.isfinite(w).all() or (w < 0).any():
            raise bad("'token_weights' holds NaN, infinite or negative weights; "
                              "loss weights must be finite and >= 0")
    if "visual_features" in a:
        k = len(a["visual_features"])
        int8 = a["visual_features"].dtype == np.int8
        if int8 != ("visual_scales" in a):
            raise bad("'visual_scales' must accompany int8 'visual_features', and only them")
        for name in ("visual_scales", "visual_positions"):
            if name in a and len(a[name]) != k:
                raise bad(f"{name!r} has {len(a[name])} entries for {k} visual tokens")
        for name in ("visual_features", "visual_scales"):
            if name in a and a[name].dtype == np.float16 and not np.isfinite(a[name]).all():
                raise bad(f"{name!r} holds NaN or infinite values")
        pos = a.get("visual_positions")
        if pos is not None and len(pos) > 1 and not (np.diff(pos.astype(np.int64)) > 0).all():
            raise bad("'visual_positions' are not strictly ascending")
        n = sample.meta.get("n_visual_tokens")
        if pos is not None and n is not None and len(pos) and int(pos[-1]) >= n:
            raise bad(f"visual position {int(pos[-1])} is not below n_visual_tokens {n}")
    elif "visual_scales" in a or "visual_positions" in a:
        raise bad("'visual_scales' or 'visual_positions' without 'visual_features'")


@dataclass
class UplinkBundle:
    """A read bundle: its header, and its samples decoded on demand."""

    path: Path
    header: dict[str, Any]
    payload_start: int
    digest: str
    size: int

    @property
    def index(self) -> list[dict[str, Any]]:
        return self.header["samples"]

    def __len__(self) -> int:
        return len(self.index)

    def samples(self) -> Iterator[UplinkSample]:
        """Decode the samples in order, streaming the payload (memory: one sample, at most
        its declared length, which is at most :data:`MAX_SAMPLE_BYTES`).

        Raises:
            FormatError: the payload disagrees with the index, or a block is malformed.
        """
        with open(self.path, "rb") as f:
            f.seek(self.payload_start)
            src = _Inflater(f, self.header["payload_bytes"], self.path)
            for i, entry in enumerate(self.index):
                where = f"{self.path} sample {i}"
                src.where = where
                s = _decode_block(src, entry["length"], where)
                if s.id != entry["id"]:
                    raise _bad(self.path, f"sample {i} is {s.id!r}, the index says {entry['id']!r}")
                yield s
                del s  # let the consumer's reference be the last one
            src.where = str(self.path)
            src.finish()


def read_uplink(path: str | Path) -> UplinkBundle:
    """Open a bundle: check its layout, header and digest (streamed).

    Raises:
        FormatError: not a bundle, unsupported version, malformed header or index.
        IntegrityError: digest mismatch (corrupt or altered).
    """
    path = Path(path)
    with open_regular(path, "an uplink bundle") as f:  # a FIFO would block, a directory is no file
        size = os.fstat(f.fileno()).st_size
        pre, version, flags, hlen = read_preamble(f, path, size, MAGIC, "an uplink bundle")
        if version != FORMAT_VERSION:
            raise FormatError(f"{path}: uplink format version {version} is not supported "
                              f"(expected {FORMAT_VERSION}); upgrade cdcca-edge")
        if flags:
            raise _bad(path, f"unknown flags {flags:#x}")
        if hlen > MAX_HEADER_BYTES:
            raise _bad(path, f"header length {hlen:,} is more than the format's maximum of {MAX_HEADER_BYTES:,}")
        if PREAMBLE.size + hlen + DIGEST_SIZE > size:
            raise FormatError(f"{path}: header length {hlen:,} does not fit the file of {size:,} bytes; "
                              "truncated? Copy the bundle again")
        raw = f.read(hlen)
        header = parse_json(raw, f"{path} header")
        _check_header(header, path)
        start = PREAMBLE.size + hlen
        if start + header["payload_bytes"] + DIGEST_SIZE != size:
            raise FormatError(f"{path}: file is {size} bytes, the header implies "
                              f"{start + header['payload_bytes'] + DIGEST_SIZE}; truncated or padded? "
                              "Copy the bundle again")
        h = hashlib.sha256(pre)
        h.update(raw)
        digest_payload(f, h, header["payload_bytes"],
                       lambda: IntegrityError(f"{path}: file changed while reading it"))
        check_digest(f, h, path, "the bundle is corrupt or was altered; copy or collect it again")
    return UplinkBundle(path, header, start, h.hexdigest(), size)


def _check_header(h: Any, path: Path) -> None:
    if (not isinstance(h, dict) or h.get("format") != "cdcca-uplink" or not _is_int(h.get("version"))
            or h["version"] != FORMAT_VERSION):
        raise _bad(path, f"header does not describe a version-{FORMAT_VERSION} uplink bundle")
    for key, kind in (("artifact_identity", str), ("payload_bytes", int), ("samples", list),
                      ("n_seen", int)):
        if not isinstance(h.get(key), kind) or isinstance(h.get(key), bool):
            raise _bad(path, f"header field {key!r} is missing or has the wrong type")
    if h["payload_bytes"] < 0 or h["n_seen"] < 0:
        raise _bad(path, "header field 'payload_bytes' or 'n_seen' is negative")
    ident = h["artifact_identity"]
    if len(ident) != 64 or ident.strip("0123456789abcdef"):
        raise _bad(path, f"header field 'artifact_identity' is {ident[:80]!r}, not 64 lowercase hex digits")
    ids = set()
    total = 0
    for i, e in enumerate(h["samples"]):
        if not (isinstance(e, dict) and isinstance(e.get("id"), str) and _is_int(e.get("length"))):
            raise _bad(path, f"sample index entry {i} is not an object with a string 'id' and an integer 'length'")
        if not 0 < e["length"] <= MAX_SAMPLE_BYTES:
            raise _bad(path, f"sample {i} length {e['length']:,} is out of range: the format allows "
                             f"1 to {MAX_SAMPLE_BYTES:,} bytes")
        if e["id"] in ids:
            raise _bad(path, f"duplicate sample id {e['id']!r}")
        ids.add(e["id"])
        total += e["length"]
        if total > MAX_PAYLOAD_BYTES:
            raise _bad(path, f"samples add up to more than the format's maximum of {MAX_PAYLOAD_BYTES:,} "
                             "decompressed bytes; split the upload into several bundles")


def write_uplink(path: str | Path, header: dict[str, Any], samples: list[UplinkSample]) -> dict[str, Any]:
    """Write a bundle atomically. ``header`` holds the bundle-level fields; the sample
    index, sizes and creation time are filled in. Returns the full header written."""
    path = Path(path)
    z = zlib.compressobj(COMPRESS_LEVEL)
    index, parts = [], []
    total = 0
    for s in samples:
        block = s.encode()
        index.append({"id": s.id, "length": len(block)})
        parts.append(z.compress(block))
        total += len(block)
        if total > MAX_PAYLOAD_BYTES:
            raise FormatError(f"{path}: samples add up to more than the uplink format's maximum of "
                              f"{MAX_PAYLOAD_BYTES:,} bytes; write several smaller bundles")
    parts.append(z.flush())
    payload = b"".join(parts)
    full = {"format": "cdcca-uplink", "version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **header, "payload_bytes": len(payload), "samples": index}
    try:
        raw = json.dumps(full, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    except ValueError as exc:
        raise FormatError(f"{path}: the header holds a non-finite number ({exc})") from None
    if len(raw) > MAX_HEADER_BYTES:
        raise FormatError(f"{path}: a header of {len(raw):,} bytes is more than the uplink format's "
                          f"maximum of {MAX_HEADER_BYTES:,}; write several smaller bundles")
    write_framed(path, MAGIC, FORMAT_VERSION, 0, raw, [payload])  # durable: the device may drop what it sent
    return full


def describe_uplink(bundle: "UplinkBundle") -> dict[str, Any]:
    """What ``cdcca-edge uplink inspect --json`` prints: size, digest, the header and each
    sample's id, uncertainty, answer and array shapes."""
    samples = [{"id": s.id, **{k: v for k, v in s.meta.items() if k in (META_UNCERTAINTY, META_ANSWER)},
                "arrays": {k: list(v.shape) for k, v in s.arrays.items()}} for s in bundle.samples()]
    return {"path": str(bundle.path), "bytes": bundle.size, "digest": bundle.digest,
            **{k: v for k, v in bundle.header.items() if k != "samples"}, "samples": samples}


def quantize_tokens(x: Any) -> tuple[Any, Any]:
    """Visual tokens (k, D) float -> int8 (k, D) and a float16 scale per token (section 3):
    symmetric, x ~= q * scale (error <= scale / 2 per value)."""
    from cdcca_edge.core.encodings import symmetric_quantize

    return symmetric_quantize(x)


def dequantize_tokens(q: Any, scale: Any) -> Any:
    """int8 tokens (k, D) and their scales (k,) -> float32 (k, D)."""
    import numpy as np

    return q.astype(np.float32) * scale.astype(np.float32)[:, None]
