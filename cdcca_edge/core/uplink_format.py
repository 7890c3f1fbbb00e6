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
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from cdcca_edge.core.errors import FormatError, IntegrityError

MAGIC = b"CDCUPLNK"
FORMAT_VERSION = 1
PREAMBLE = struct.Struct("<8sIIQ")
DIGEST_SIZE = 32
MAX_HEADER_BYTES = 64 << 20
MAX_SAMPLE_BYTES = 256 << 20  # one decompressed sample block (a raw camera frame fits)
COMPRESS_LEVEL = 6
DTYPES = {"u8": ("<u1", 1), "i8": ("<i1", 1), "u16": ("<u2", 2), "u32": ("<u4", 4),
          "f16": ("<f2", 2), "f32": ("<f4", 4)}
_U32 = struct.Struct("<I")


@dataclass
class UplinkSample:
    """One uploaded sample: its metadata (JSON-able) and named numpy arrays."""

    id: str
    meta: dict[str, Any]
    arrays: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        """The uncompressed block."""
        import numpy as np

        listing = []
        blobs = []
        for name, arr in self.arrays.items():
            a = np.asarray(arr)
            dt = next((k for k, (code, _) in DTYPES.items() if np.dtype(code) == a.dtype), None)
            if dt is None:
                raise ValueError(f"array {name!r}: dtype {a.dtype} is not one of {list(DTYPES)}")
            listing.append({"name": name, "dtype": dt, "shape": list(a.shape)})
            blobs.append(np.ascontiguousarray(a, dtype=DTYPES[dt][0]).tobytes())
        meta = json.dumps({**self.meta, "id": self.id, "arrays": listing}, separators=(",", ":")).encode()
        return _U32.pack(len(meta)) + meta + b"".join(blobs)


def decode_sample(raw: bytes, where: str) -> UplinkSample:
    """Parse one sample block.

    Raises:
        FormatError: truncated, or arrays that do not match their listing.
    """
    import numpy as np

    if len(raw) < _U32.size:
        raise FormatError(f"{where}: sample block too short")
    (mlen,) = _U32.unpack_from(raw)
    if _U32.size + mlen > len(raw):
        raise FormatError(f"{where}: sample metadata runs past the block")
    try:
        meta = json.loads(raw[_U32.size : _U32.size + mlen].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{where}: sample metadata is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("id"), str):
        raise FormatError(f"{where}: sample metadata lacks a string 'id'")
    listing = meta.pop("arrays", [])
    if not isinstance(listing, list):
        raise FormatError(f"{where}: 'arrays' is not a list")
    pos = _U32.size + mlen
    arrays = {}
    for item in listing:
        try:
            name, dt, shape = str(item["name"]), item["dtype"], [int(s) for s in item["shape"]]
            code, size = DTYPES[dt]
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{where}: bad array listing {item!r}") from None
        if any(s < 0 for s in shape) or name in arrays:
            raise FormatError(f"{where}: bad or duplicate array {name!r}")
        n = 1
        for s in shape:
            n *= s
        if pos + n * size > len(raw):
            raise FormatError(f"{where}: array {name!r} runs past the block")
        arrays[name] = np.frombuffer(raw, dtype=code, count=n, offset=pos).reshape(shape)
        pos += n * size
    if pos != len(raw):
        raise FormatError(f"{where}: {len(raw) - pos} stray bytes after the arrays")
    return UplinkSample(id=meta.pop("id"), meta=meta, arrays=arrays)


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
        """Decode the samples in order, streaming the payload (memory: one sample)."""
        d = zlib.decompressobj()
        pending = b""
        with open(self.path, "rb") as f:
            f.seek(self.payload_start)
            left = self.header["payload_bytes"]

            def more() -> bytes:
                nonlocal left
                while left:
                    chunk = f.read(min(1 << 20, left))
                    if not chunk:
                        raise IntegrityError(f"{self.path}: file changed while reading it")
                    left -= len(chunk)
                    try:
                        out = d.decompress(chunk)
                    except zlib.error as exc:
                        raise FormatError(f"{self.path}: payload is not valid zlib data ({exc})") from exc
                    if out:
                        return out
                return b""

            for i, entry in enumerate(self.index):
                n = entry["length"]
                while len(pending) < n:
                    got = more()
                    if not got:
                        raise FormatError(f"{self.path}: payload ends inside sample {i}")
                    pending += got
                block, pending = pending[:n], pending[n:]
                s = decode_sample(block, f"{self.path} sample {i}")
                if s.id != entry["id"]:
                    raise FormatError(f"{self.path}: sample {i} is {s.id!r}, the index says {entry['id']!r}")
                yield s
            if pending or more() or not d.eof or d.unused_data:
                raise FormatError(f"{self.path}: payload holds more than its samples")


def read_uplink(path: str | Path) -> UplinkBundle:
    """Open a bundle: check its layout, header and digest (streamed).

    Raises:
        FormatError: not a bundle, unsupported version, malformed header or index.
        IntegrityError: digest mismatch (corrupt or altered).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        pre = f.read(PREAMBLE.size)
        if len(pre) < PREAMBLE.size:
            raise FormatError(f"{path}: {size} bytes is too short to be an uplink bundle")
        magic, version, flags, hlen = PREAMBLE.unpack(pre)
        if magic != MAGIC:
            raise FormatError(f"{path}: bad magic {magic!r}, expected {MAGIC!r}: not an uplink bundle")
        if version != FORMAT_VERSION:
            raise FormatError(f"{path}: uplink format version {version} is not supported "
                              f"(expected {FORMAT_VERSION}); upgrade cdcca-edge")
        if flags:
            raise FormatError(f"{path}: unknown flags {flags:#x}")
        if hlen > MAX_HEADER_BYTES or PREAMBLE.size + hlen + DIGEST_SIZE > size:
            raise FormatError(f"{path}: header length {hlen} does not fit the file; truncated?")
        raw = f.read(hlen)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"{path}: header is not valid JSON ({exc})") from exc
        _check_header(header, path)
        start = PREAMBLE.size + hlen
        if start + header["payload_bytes"] + DIGEST_SIZE != size:
            raise FormatError(f"{path}: file is {size} bytes, the header implies "
                              f"{start + header['payload_bytes'] + DIGEST_SIZE}; truncated or padded")
        h = hashlib.sha256(pre)
        h.update(raw)
        left = header["payload_bytes"]
        while left:
            chunk = f.read(min(1 << 20, left))
            h.update(chunk)
            left -= len(chunk)
        if f.read(DIGEST_SIZE) != h.digest():
            raise IntegrityError(f"{path}: digest mismatch: the bundle is corrupt or was altered")
    return UplinkBundle(path, header, start, h.hexdigest(), size)


def _check_header(h: Any, path: Path) -> None:
    if not isinstance(h, dict) or h.get("format") != "cdcca-uplink" or h.get("version") != FORMAT_VERSION:
        raise FormatError(f"{path}: header does not describe a version-{FORMAT_VERSION} uplink bundle")
    for key, kind in (("artifact_identity", str), ("payload_bytes", int), ("samples", list),
                      ("n_seen", int)):
        if not isinstance(h.get(key), kind) or isinstance(h.get(key), bool):
            raise FormatError(f"{path}: header field {key!r} is missing or has the wrong type")
    ids = set()
    for i, e in enumerate(h["samples"]):
        if not (isinstance(e, dict) and isinstance(e.get("id"), str)
                and isinstance(e.get("length"), int) and not isinstance(e.get("length"), bool)):
            raise FormatError(f"{path}: sample index entry {i} is malformed")
        if not 0 < e["length"] <= MAX_SAMPLE_BYTES:
            raise FormatError(f"{path}: sample {i} length {e['length']} is out of range")
        if e["id"] in ids:
            raise FormatError(f"{path}: duplicate sample id {e['id']!r}")
        ids.add(e["id"])


def write_uplink(path: str | Path, header: dict[str, Any], samples: list[UplinkSample]) -> dict[str, Any]:
    """Write a bundle atomically. ``header`` holds the bundle-level fields; the sample
    index, sizes and creation time are filled in. Returns the full header written."""
    path = Path(path)
    z = zlib.compressobj(COMPRESS_LEVEL)
    index, parts = [], []
    for s in samples:
        block = s.encode()
        index.append({"id": s.id, "length": len(block)})
        parts.append(z.compress(block))
    parts.append(z.flush())
    payload = b"".join(parts)
    full = {"format": "cdcca-uplink", "version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **header, "payload_bytes": len(payload), "samples": index}
    raw = json.dumps(full, separators=(",", ":"), sort_keys=True).encode()
    body = PREAMBLE.pack(MAGIC, FORMAT_VERSION, 0, len(raw)) + raw
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(body)
            out.write(payload)
            out.write(hashlib.sha256(body + payload).digest())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return full
