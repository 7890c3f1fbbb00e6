"""The delta file format (``.cdcd``): constants, header model, reading and writing.

Layout (docs/formats/delta.md, normative), little-endian::

    0       8  magic b"CDCDELTA"
    8       4  u32 format version (1)
    12      4  u32 flags: bit 0 = header is zlib-compressed; other bits 0
    16      8  u64 H = header length (as stored)
    24      H  header: UTF-8 JSON object (section 3 of the spec), zlib-compressed with flag 1
    24+H    P  payload: the records' payloads, P = header["payload_bytes"]
    24+H+P 32  digest: SHA-256 of every byte before it
    +32     1  signature scheme: 0 none, 1 Ed25519
    +33    96  (Ed25519 only) 32-byte raw public key, 64-byte signature of the digest

The file ends exactly there. Everything a patch needs to check before writing a byte is in
the header (identities, per-record pre/post digests) and covered by the digest, which the
signature covers in turn.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable

from cdcca_edge.core.errors import FormatError, IntegrityError, UsageError, require
from cdcca_edge.core.fileio import open_regular
from cdcca_edge.core.framed import (
    DIGEST_SIZE,
    PREAMBLE,
    READ_CHUNK,
    check_digest,
    digest_payload,
    read_preamble,
    write_framed,
)

MAGIC = b"CDCDELTA"
FORMAT_VERSION = 2  # 2: identities are of scheme cdcca-id-v2 (artifact.md, section 2)
FLAG_HEADER_ZLIB = 1  # per-record digests and names are most of a small delta
SIG_NONE, SIG_ED25519 = 0, 1
ED25519_PUBLIC_SIZE, ED25519_SIG_SIZE = 32, 64
ARTIFACT_FORMATS = ("gguf", "onnx", "bundle")
MAX_HEADER_BYTES = 64 << 20
MAX_RECORD_PAYLOAD = 8 << 20  # writers split bigger changes; bounds a patcher's memory
MAX_RECORDS = 1 << 16  # records per delta: bounds the parsed header (a model has far fewer tensors)

ENC_REPLACE = "replace"  # new raw bytes for whole units (quant blocks / elements)
ENC_QADD = "qadd"  # quantised additive update: dequantise -> add -> requantise
ENC_LOWRANK = "lowrank"  # W += scale * B @ A, row chunks, requantised
ENCODINGS = (ENC_REPLACE, ENC_QADD, ENC_LOWRANK)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Record:
    """One change to one tensor (spec section 4)."""

    file: str  # artefact file key: "" for a GGUF file, relative path in an ONNX directory
    tensor: str
    type: str  # the tensor's type in the artefact (GGML name)
    shape: tuple[int, ...]  # C order, as in docs/formats/artifact.md
    encoding: str
    offset: int  # of the payload, relative to the payload section
    length: int  # payload bytes
    params: dict[str, Any]
    pre_digest: str  # SHA-256 of the touched region's bytes before
    post_digest: str  # ... and after

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclass
class DeltaHeader:
    artifact_format: str  # "gguf" | "onnx" | "bundle"
    base_identity: str
    target_identity: str
    from_version: int
    to_version: int
    payload_bytes: int
    records: list[Record]
    created: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "cdcca-delta",
            "version": FORMAT_VERSION,
            "artifact_format": self.artifact_format,
            "base_identity": self.base_identity,
            "target_identity": self.target_identity,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "created": self.created,
            "payload_bytes": self.payload_bytes,
            "records": [r.to_json() for r in self.records],
        }


@dataclass
class Signature:
    public_key: bytes  # raw Ed25519 public key (32 bytes)
    signature: bytes  # over the digest (64 bytes)

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)


@dataclass
class DeltaFile:
    """A parsed delta whose digest has been checked (signature: see :func:`check_trust`)."""

    path: Path
    header: DeltaHeader
    payload_start: int
    digest: str
    signature: Signature | None
    size: int

    def read_payload(self, record: Record) -> bytes:
        """The record's payload bytes (at most MAX_RECORD_PAYLOAD)."""
        with open(self.path, "rb") as f:
            f.seek(self.payload_start + record.offset)
            data = f.read(record.length)
        if len(data) != record.length:
            raise IntegrityError(f"{self.path}: file changed while reading it")
        return data


def key_id(public_key: bytes) -> str:
    """Short fingerprint of a raw public key: first 16 hex digits of its SHA-256."""
    return hashlib.sha256(public_key).hexdigest()[:16]


# --- reading ---------------------------------------------------------------------------


def read_delta(path: str | Path) -> DeltaFile:
    """Parse ``path`` and check its digest (streamed: memory does not grow with size).

    Raises:
        FormatError: not a delta, unsupported version, malformed header or layout.
        IntegrityError: the digest does not match the content.
    """
    path = Path(path)
    with open_regular(path, "a cdcca delta") as f:  # a FIFO would block, a directory is no file
        size = os.fstat(f.fileno()).st_size
        pre, version, flags, hlen = read_preamble(f, path, size, MAGIC, "a cdcca delta")
        if version < FORMAT_VERSION:
            raise FormatError(f"{path}: a version-{version} delta, made by an older cdcca-edge whose "
                              "model identities this one no longer computes; make the delta "
                              "again with this version (`cdcca-edge delta make` or `delta diff`)")
        if version != FORMAT_VERSION:
            raise FormatError(f"{path}: delta format version {version} is not supported (this "
                              f"cdcca-edge reads version {FORMAT_VERSION}); upgrade cdcca-edge")
        if flags & ~FLAG_HEADER_ZLIB:
            raise FormatError(f"{path}: unknown flags {flags:#x}")
        if hlen > MAX_HEADER_BYTES or PREAMBLE.size + hlen > size:
            raise FormatError(f"{path}: header length {hlen} runs past the end of the file; "
                              "the file is truncated or corrupt")
        raw = f.read(hlen)
        text = raw
        if flags & FLAG_HEADER_ZLIB:
            d = zlib.decompressobj()
            try:
                text = d.decompress(raw, MAX_HEADER_BYTES + 1)
            except zlib.error as exc:
                raise FormatError(f"{path}: compressed header is not valid zlib data ({exc})") from exc
            if not d.eof or d.unused_data or len(text) > MAX_HEADER_BYTES:
                raise FormatError(f"{path}: compressed header is truncated, padded or too large")
        try:
            doc = json.loads(text.decode("utf-8"))
        except RecursionError as exc:
            raise FormatError(f"{path}: header is not valid JSON (nested too deeply)") from exc
        except (UnicodeDecodeError, ValueError) as exc:  # ValueError: JSONDecodeError, huge ints
            raise FormatError(f"{path}: header is not valid JSON ({exc})") from exc
        header = parse_header(doc, path)
        payload_start = PREAMBLE.size + hlen
        digest_at = payload_start + header.payload_bytes
        if digest_at + DIGEST_SIZE + 1 > size:
            raise FormatError(f"{path}: file is truncated (payload of {header.payload_bytes} bytes "
                              f"and trailer do not fit in {size} bytes)")
        h = hashlib.sha256(pre)
        h.update(raw)
        digest_payload(f, h, header.payload_bytes,
                       lambda: FormatError(f"{path}: file is truncated inside the payload"))
        check_digest(f, h, path, "the delta is corrupt or was altered after it was made; fetch it again")
        scheme_b = f.read(1)
        if len(scheme_b) != 1:
            raise FormatError(f"{path}: file is truncated in its trailer")
        scheme = scheme_b[0]
        signature = None
        if scheme == SIG_ED25519:
            body = f.read(ED25519_PUBLIC_SIZE + ED25519_SIG_SIZE)
            if len(body) != ED25519_PUBLIC_SIZE + ED25519_SIG_SIZE:
                raise FormatError(f"{path}: file is truncated in its signature")
            signature = Signature(body[:ED25519_PUBLIC_SIZE], body[ED25519_PUBLIC_SIZE:])
        elif scheme != SIG_NONE:
            raise FormatError(f"{path}: unknown signature scheme {scheme}")
        if f.read(1):
            raise FormatError(f"{path}: trailing bytes after the delta's end")
    return DeltaFile(path, header, payload_start, h.hexdigest(), signature, size)


def parse_header(doc: Any, path: Path | str = "<delta>") -> DeltaHeader:
    """Validate a header JSON document strictly (spec section 3)."""
    def need(obj: Any, key: str, kind: type | tuple[type, ...], where: str = "header") -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise FormatError(f"{path}: {where} lacks {key!r}")
        val = obj[key]
        if not isinstance(val, kind) or (kind is int and isinstance(val, bool)):
            raise FormatError(f"{path}: {where} field {key!r} has the wrong type")
        return val

    if need(doc, "format", str) != "cdcca-delta" or need(doc, "version", int) != FORMAT_VERSION:
        raise FormatError(f"{path}: header does not describe a version-{FORMAT_VERSION} cdcca delta")
    fmt = need(doc, "artifact_format", str)
    if fmt not in ARTIFACT_FORMATS:
        raise FormatError(f"{path}: artifact_format {fmt!r} is not one of {ARTIFACT_FORMATS}")
    ids = {k: need(doc, k, str) for k in ("base_identity", "target_identity")}
    for k, v in ids.items():
        if not _HEX64.match(v):
            raise FormatError(f"{path}: {k} is not a SHA-256 hex digest")
    payload_bytes = need(doc, "payload_bytes", int)
    if payload_bytes < 0:
        raise FormatError(f"{path}: negative payload_bytes")
    records = []
    spans = []
    raw_records = need(doc, "records", list)
    if len(raw_records) > MAX_RECORDS:
        raise FormatError(f"{path}: {len(raw_records)} records exceed the limit of {MAX_RECORDS}; "
                          "merge changes to one tensor into fewer records")
    for i, r in enumerate(raw_records):
        where = f"record {i}"
        enc = need(r, "encoding", str, where)
        if enc not in ENCODINGS:
            raise FormatError(f"{path}: {where} has unknown encoding {enc!r}; known: {ENCODINGS}")
        shape = need(r, "shape", list, where)
        if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise FormatError(f"{path}: {where} has a bad shape {shape!r}")
        rec = Record(
            file=need(r, "file", str, where),
            tensor=need(r, "tensor", str, where),
            type=need(r, "type", str, where),
            shape=tuple(shape),
            encoding=enc,
            offset=need(r, "offset", int, where),
            length=need(r, "length", int, where),
            params=need(r, "params", dict, where),
            pre_digest=need(r, "pre_digest", str, where),
            post_digest=need(r, "post_digest", str, where),
        )
        if not (_HEX64.match(rec.pre_digest) and _HEX64.match(rec.post_digest)):
            raise FormatError(f"{path}: {where} digests are not SHA-256 hex digests")
        if rec.offset < 0 or rec.length < 0 or rec.offset + rec.length > payload_bytes:
            raise FormatError(f"{path}: {where} payload [{rec.offset}, +{rec.length}) lies "
                              f"outside the payload of {payload_bytes} bytes")
        if rec.length > MAX_RECORD_PAYLOAD:
            raise FormatError(f"{path}: {where} payload of {rec.length} bytes exceeds the "
                              f"{MAX_RECORD_PAYLOAD}-byte record limit")
        spans.append((rec.offset, rec.offset + rec.length, i))
        records.append(rec)
    spans.sort()
    for (_, e0, i0), (s1, _, i1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise FormatError(f"{path}: records {i0} and {i1} share payload bytes")
    created = doc.get("created", {})
    return DeltaHeader(
        artifact_format=fmt,
        base_identity=ids["base_identity"],
        target_identity=ids["target_identity"],
        from_version=need(doc, "from_version", int),
        to_version=need(doc, "to_version", int),
        payload_bytes=payload_bytes,
        records=records,
        created=created if isinstance(created, dict) else {},
    )


# --- trust -----------------------------------------------------------------------------


def load_public_key(path: str | Path) -> bytes:
    """Raw 32-byte Ed25519 public key from a PEM (SubjectPublicKeyInfo) file."""
    serialization = require("cryptography.hazmat.primitives.serialization", "device")
    ed25519 = require("cryptography.hazmat.primitives.asymmetric.ed25519", "device")
    data = Path(path).read_bytes()
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise FormatError(f"{path}: not a PEM public key ({exc})") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise FormatError(f"{path}: not an Ed25519 public key; make one with `cdcca-edge delta keygen`")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def check_trust(delta: DeltaFile, trusted: list[bytes] | None) -> None:
    """With trusted keys configured, require a valid signature by one of them.

    Raises:
        IntegrityError: unsigned, signed by an untrusted key, or a bad signature.
    """
    if not trusted:
        return
    sig = delta.signature
    if sig is None:
        raise IntegrityError(f"{delta.path}: the delta is unsigned, and a trusted public key is "
                             "configured; ask the sender to sign it (--sign-key)")
    if sig.public_key not in trusted:
        raise IntegrityError(f"{delta.path}: signed by key {sig.key_id}, which is not trusted "
                             f"(trusted: {', '.join(key_id(k) for k in trusted)})")
    ed25519 = require("cryptography.hazmat.primitives.asymmetric.ed25519", "device")
    exceptions = require("cryptography.exceptions", "device")
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(sig.public_key).verify(
            sig.signature, bytes.fromhex(delta.digest)
        )
    except exceptions.InvalidSignature:
        raise IntegrityError(f"{delta.path}: bad signature: the delta was altered or signed "
                             "with another key") from None


# --- writing ---------------------------------------------------------------------------


def write_delta(
    path: str | Path,
    header: DeltaHeader,
    payload: IO[bytes],
    sign_key: Any | None = None,
) -> str:
    """Write a delta atomically; ``payload`` is a readable file positioned at the start of
    ``header.payload_bytes`` payload bytes. ``sign_key`` is an Ed25519 private key object
    (:func:`load_private_key`). Returns the digest (hex)."""
    path = Path(path)
    header.created.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    raw = json.dumps(header.to_json(), separators=(",", ":"), sort_keys=True).encode()
    packed = zlib.compress(raw, 9)
    flags = 0
    if len(packed) < len(raw):
        raw, flags = packed, FLAG_HEADER_ZLIB

    def chunks() -> Iterable[bytes]:
        left = header.payload_bytes
        while left:
            chunk = payload.read(min(READ_CHUNK, left))
            if not chunk:
                raise ValueError("payload shorter than header.payload_bytes")
            yield chunk
            left -= len(chunk)

    def signature(digest: bytes) -> bytes:
        if sign_key is None:
            return bytes([SIG_NONE])
        serialization = require("cryptography.hazmat.primitives.serialization", "device")
        pub = sign_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return bytes([SIG_ED25519]) + pub + sign_key.sign(digest)

    return write_framed(path, MAGIC, FORMAT_VERSION, flags, raw, chunks(), signature).hex()


def load_private_key(path: str | Path) -> Any:
    """An Ed25519 private key from a PEM (PKCS#8, unencrypted) file."""
    serialization = require("cryptography.hazmat.primitives.serialization", "device")
    ed25519 = require("cryptography.hazmat.primitives.asymmetric.ed25519", "device")
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise FormatError(f"{path}: not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise FormatError(f"{path}: not an Ed25519 private key; make one with `cdcca-edge delta keygen`")
    return key


def generate_keypair(private_path: str | Path, public_path: str | Path) -> str:
    """Write a new Ed25519 key pair as PEM files (private 0600). Returns the key id.

    Raises:
        UsageError: either file exists (a key is never overwritten).
    """
    for p in (private_path, public_path):
        if os.path.lexists(p):
            raise UsageError(f"{p} exists; not overwriting a key (choose another -o)")
    serialization = require("cryptography.hazmat.primitives.serialization", "device")
    ed25519 = require("cryptography.hazmat.primitives.asymmetric.ed25519", "device")
    key = ed25519.Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv)
    Path(public_path).write_bytes(pub)
    return key_id(key.public_key().public_bytes(serialization.Encoding.Raw,
                                                serialization.PublicFormat.Raw))


def describe_delta(delta: DeltaFile) -> dict[str, Any]:
    """What ``cdcca-edge delta inspect --json`` prints: size, digest, signer, the header."""
    return {
        "path": str(delta.path), "bytes": delta.size, "digest": delta.digest,
        "signed_by": delta.signature.key_id if delta.signature else None,
        **{k: v for k, v in delta.header.to_json().items() if k != "records"},
        "records": [r.to_json() for r in delta.header.records],
    }


def resign_delta(src: str | Path, dst: str | Path, private_key: Any) -> str:
    """Write ``src`` to ``dst`` with its signature replaced by one of ``private_key``
    (after a key rotation); the records, payload and digest are unchanged. Returns the new
    signer's key id.

    Raises:
        FormatError / IntegrityError: ``src`` is not an intact delta.
    """
    from cdcca_edge.core.fileio import atomic_file

    delta = read_delta(src)  # checks the digest
    trailer = 1 + (ED25519_PUBLIC_SIZE + ED25519_SIG_SIZE if delta.signature is not None else 0)
    public = private_key.public_key().public_bytes_raw()
    with open(src, "rb") as f, atomic_file(dst) as out:
        left = delta.size - trailer
        while left > 0:
            chunk = f.read(min(1 << 20, left))
            if not chunk:
                raise FormatError(f"{src}: changed while re-signing")
            out.write(chunk)
            left -= len(chunk)
        out.write(bytes([SIG_ED25519]) + public + private_key.sign(bytes.fromhex(delta.digest)))
    return key_id(public)
