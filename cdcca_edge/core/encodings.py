"""Record encodings: what bytes a record touches and what it writes there.

Shared, byte for byte, by the cloud (building deltas, advancing its mirror) and the device
(applying them): the same functions compute a record's new bytes on both sides, so the
device's result can be checked against the post-image digest the cloud computed. All
arithmetic is deterministic numpy: elementwise IEEE operations in a fixed order, no BLAS,
no transcendental functions. Spec: docs/formats/delta.md, section 5.

Units. A tensor of GGML type T is a sequence of units of ``type_layout(T)`` = (elements,
bytes): quant blocks for quantised types, single elements for F32/F16/BF16.

Run index. Several encodings list the units (or groups) they touch as runs: ``n`` (u32),
then ``zlib(planes(u32 gaps[n] ++ u32 lengths[n]))`` where gap is the distance from the
previous run's end (the first from 0) and planes stores the 4 byte planes of the 2n
little-endian u32 one after the other (the high planes are mostly zero and compress away).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from cdcca_edge.core.delta_format import ENC_LOWRANK, ENC_QADD, ENC_REPLACE, Record
from cdcca_edge.core.errors import FormatError
from cdcca_edge.core.ggml import HALF_FIELDS, block_scales, blocks_nonfinite, type_layout
from cdcca_edge.core.ggml_quant import GGML_QUANTISED_TYPES, ggml_quantize

MAX_RUNS = 1 << 20  # per record; bounds the index a patcher holds
MAX_RECORD_REGION = 8 << 20  # bytes a coded (zsub) replace record may rewrite
DATA_RAW = "raw"  # replace data: the new bytes as they are
DATA_ZSUB = "zsub"  # replace data: zlib(new - old), bytewise modulo 256
FLOAT_TYPES = ("F32", "F16", "BF16")
# types qadd/lowrank can rewrite on the device: their quantisers (IEEE casts, gguf-py's
# numpy Q8_0/Q4_0) give the same bytes on every platform
REQUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0")
# types the cloud can quantise for block replacement: those, and the ones llama.cpp's
# quantiser writes (core/ggml_quant.py). Not on the device: llama.cpp's Q4_K and Q5_K
# quantisers give other bytes on aarch64 than on x86-64 (measured: docs/formats/delta.md
# 5.5), so a delta carries the bytes the cloud quantised, never values to requantise.
CLOUD_QUANT_TYPES = (*REQUANT_TYPES, *GGML_QUANTISED_TYPES)
QADD_BITS = (8, 4)
FACTOR_DTYPES = {"f16": 2, "f32": 4, "i8": 1, "mx": 1}  # i8: int8 rows with a float16 scale
# each; mx: per-component bits, a float16 scale per group, codes deflated (section 5.4)
MX_BITS = range(2, 9)  # bits of an mx component: codes in [-(2^(b-1) - 1), 2^(b-1) - 1]
MX_MAX_GROUP = 1 << 16
MX_GROUP = 64  # values per scale the writer uses (a float16 per 64 codes: 0.25 bit each)
MX_MAX_CODES = 1 << 26  # codes an mx record may inflate to: bounds what a patcher holds
MX_CLIPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)  # scale candidates (x max/lim) the writer tries
_U32 = struct.Struct("<I")


# --- run index -------------------------------------------------------------------------


def encode_runs(starts: Sequence[int], lengths: Sequence[int]) -> bytes:
    """Index bytes for ascending, disjoint, non-empty runs."""
    import numpy as np

    st = np.asarray(starts, dtype=np.int64)
    ln = np.asarray(lengths, dtype=np.int64)
    ends = st + ln
    gaps = st - np.concatenate([[0], ends[:-1]])
    if st.shape != ln.shape or (ln <= 0).any() or (gaps < 0).any():
        raise ValueError("runs must be ascending, disjoint and non-empty")
    if len(st) and max(int(gaps.max()), int(ln.max())) >= 2**32:
        raise ValueError("a run gap or length does not fit 32 bits")
    raw = np.concatenate([gaps, ln]).astype("<u4").view(np.uint8).reshape(-1, 4)
    return _U32.pack(len(st)) + zlib.compress(raw.T.tobytes(), 9)  # byte planes, then zlib


def decode_runs(buf: bytes | memoryview, limit: int, what: str) -> tuple[Any, Any, int]:
    """(starts, lengths, bytes consumed) from an index at the start of ``buf``, as int64
    arrays; every run must end within ``limit`` units.

    Raises:
        FormatError: malformed, unordered, overlapping or out-of-range runs.
    """
    import numpy as np

    if len(buf) < _U32.size:
        raise FormatError(f"{what}: run index truncated")
    (n,) = _U32.unpack_from(buf, 0)
    if n > MAX_RUNS:
        raise FormatError(f"{what}: {n} runs exceed the per-record limit of {MAX_RUNS}")
    d = zlib.decompressobj()
    try:
        planes = d.decompress(bytes(buf[_U32.size :]), 8 * n + 1)
    except zlib.error as exc:
        raise FormatError(f"{what}: run index is not valid zlib data ({exc})") from exc
    if len(planes) != 8 * n or not d.eof:
        raise FormatError(f"{what}: run index does not hold {n} runs")
    used = len(buf) - _U32.size - len(d.unused_data)
    vals = np.frombuffer(planes, np.uint8).reshape(4, 2 * n).T.copy().view("<u4").reshape(-1)
    gaps, lengths = vals[:n].astype(np.int64), vals[n:].astype(np.int64)
    if (lengths == 0).any():
        raise FormatError(f"{what}: empty run")
    ends = np.cumsum(gaps + lengths)
    starts = ends - lengths
    if n and ends[-1] > limit:
        raise FormatError(f"{what}: runs reach unit {int(ends[-1])}, past the tensor's {limit} units")
    return starts, lengths, _U32.size + used


# --- numeric helpers (numpy, deterministic) ----------------------------------------------


def dequantize(type_name: str, raw: Any) -> Any:
    """Raw bytes of whole units -> float32 values (n,)."""
    import numpy as np

    buf = np.frombuffer(raw, dtype=np.uint8)
    if type_name == "F32":
        return buf.view(np.float32).copy()
    if type_name == "F16":
        return buf.view(np.float16).astype(np.float32)
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[type_name]
    return quants.dequantize(buf, qtype).astype(np.float32, copy=False).reshape(-1)


def quantize(type_name: str, values: Any) -> bytes:
    """float32 values (n,) -> raw bytes in ``type_name`` (n a multiple of its block)."""
    import numpy as np

    x = np.ascontiguousarray(values, dtype=np.float32)
    if type_name == "F32":
        return x.tobytes()
    if type_name == "F16":
        with np.errstate(over="ignore"):  # overflow to inf is refused by check_finite
            return x.astype(np.float16).tobytes()
    if type_name in GGML_QUANTISED_TYPES:
        return ggml_quantize(type_name, x)
    from gguf import GGMLQuantizationType, quants

    block, _ = type_layout(type_name)
    # one row: gguf-py quantises block by block either way (same bytes), but loops in
    # Python over groups of 16 rows, so rows of one block each cost a call per 16 blocks
    rows = x.reshape(-1, block).reshape(1, -1)
    return quants.quantize(rows, GGMLQuantizationType[type_name]).tobytes()


def requant_check(type_name: str, encoding: str) -> None:
    if type_name not in REQUANT_TYPES:
        raise FormatError(f"encoding {encoding!r} would make this patcher re-quantise {type_name}, which is "
                          f"defined only where every platform writes the same bytes: "
                          f"{', '.join(REQUANT_TYPES)}; the sender must send {type_name} blocks "
                          "(replace records): rebuild the delta with cdcca-edge delta make")


def group_layout(type_name: str, params: dict[str, Any]) -> tuple[int, int]:
    """(elements, bytes) of one qadd group: a quant block, or ``params["group"]`` float
    elements."""
    block, size = type_layout(type_name)
    if type_name in FLOAT_TYPES:
        g = params.get("group", 32)
        if not isinstance(g, int) or g <= 0:
            raise FormatError(f"qadd group {g!r} is not a positive int")
        return g, g * size
    return block, size


def unpack_int4(packed: Any, n: int) -> Any:
    """Two's complement 4-bit values, low nibble first: (ceil(n/2),) uint8 -> (n,) int8."""
    import numpy as np

    p = np.frombuffer(packed, dtype=np.uint8)
    out = np.empty(p.size * 2, dtype=np.int8)
    out[0::2] = (p & 0x0F).astype(np.int8)
    out[1::2] = (p >> 4).astype(np.int8)
    out = np.where(out > 7, out - 16, out).astype(np.int8)
    return out[:n]


def pack_int4(q: Any) -> bytes:
    import numpy as np

    q = np.asarray(q, dtype=np.int8)
    if q.size % 2:
        q = np.concatenate([q, np.zeros(1, np.int8)])
    u = (q.astype(np.int16) & 0x0F).astype(np.uint8)
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8).tobytes()


# --- plans -----------------------------------------------------------------------------


@dataclass
class Plan:
    """What one record does to the file: the spans it touches (absolute, ascending,
    disjoint; each at most ``piece`` bytes, split at unit boundaries) and how to compute
    their new bytes from their old bytes.

    ``new_bytes(i, j, old)`` returns the new bytes (uint8 array) of spans ``i..j-1`` given
    their old bytes, concatenated.
    """

    record: Record
    tensor_offset: int  # absolute offset of the tensor's first byte
    offsets: Any  # (S,) int64 absolute file offsets
    lengths: Any  # (S,) int64 bytes
    new_bytes: Callable[[int, int, Any], Any]
    needs_old: bool  # False when new bytes do not depend on the old ones (raw replace)

    @property
    def region_bytes(self) -> int:
        return int(self.lengths.sum())


def make_plan(rec: Record, payload: bytes, tensor_offset: int, tensor_nbytes: int,
              piece: int = 1 << 20) -> Plan:
    """Decode ``rec``'s payload against its tensor's place in the file.

    Raises:
        FormatError: the payload does not fit the record or the tensor.
    """
    what = f"record for {rec.tensor!r}"
    try:
        block, unit = type_layout(rec.type)
    except KeyError:
        raise FormatError(f"{what}: unknown tensor type {rec.type!r}") from None
    n_elems = 1
    for d in rec.shape:
        n_elems *= d
    if n_elems % block or n_elems // block * unit != tensor_nbytes:
        raise FormatError(f"{what}: shape {rec.shape} of type {rec.type} does not match the "
                          f"tensor's {tensor_nbytes} bytes")
    if rec.encoding == ENC_REPLACE:
        return _plan_replace(rec, payload, tensor_offset, unit, tensor_nbytes // unit, piece, what)
    if rec.encoding == ENC_QADD:
        requant_check(rec.type, rec.encoding)
        return _plan_qadd(rec, payload, tensor_offset, n_elems, piece, what)
    if rec.encoding == ENC_LOWRANK:
        requant_check(rec.type, rec.encoding)
        return _plan_lowrank(rec, payload, tensor_offset, piece, what)
    raise FormatError(f"{what}: unknown encoding {rec.encoding!r}")


def _split(starts: Any, lengths: Any, unit: int, base: int, piece_units: int) -> tuple[Any, Any, Any]:
    """Runs of units -> byte spans of at most ``piece_units`` units, and each span's first
    unit. (R,), (R,) -> (S,), (S,), (S,)"""
    import numpy as np

    k = -(-lengths // piece_units)  # pieces per run
    first = np.repeat(starts, k) + piece_units * (np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k))
    ends = np.repeat(starts + lengths, k)
    n = np.minimum(piece_units, ends - first)
    return base + first * unit, n * unit, first


def _cum(lengths: Any) -> Any:
    import numpy as np

    return np.concatenate([[0], np.cumsum(lengths)])


def _plan_replace(rec: Record, payload: bytes, base: int, unit: int, n_units: int,
                  piece: int, what: str) -> Plan:
    import numpy as np

    starts, lengths, used = decode_runs(payload, n_units, what)
    total = int(lengths.sum()) * unit
    coding = rec.params.get("data", DATA_RAW)
    if coding == DATA_RAW:
        data = np.frombuffer(payload, np.uint8, offset=used)
    elif coding == DATA_ZSUB:
        if total > MAX_RECORD_REGION:
            raise FormatError(f"{what}: {total} bytes of region exceed the {MAX_RECORD_REGION}-byte "
                              "limit for coded replacement data")
        d = zlib.decompressobj()
        try:
            raw = d.decompress(payload[used:], total + 1)
        except zlib.error as exc:
            raise FormatError(f"{what}: replacement data is not valid zlib data ({exc})") from exc
        if not d.eof or d.unused_data:
            raise FormatError(f"{what}: replacement data has trailing or missing bytes")
        data = np.frombuffer(raw, np.uint8)
    else:
        raise FormatError(f"{what}: unknown replacement data coding {coding!r}; known: "
                          f"{DATA_RAW}, {DATA_ZSUB}")
    if data.size != total:
        raise FormatError(f"{what}: replacement data is {data.size} bytes, the runs need {total}")
    offs, lens, _ = _split(starts, lengths, unit, base, max(1, piece // unit))
    cum = _cum(lens)

    if coding == DATA_RAW:
        def new_bytes(i: int, j: int, old: Any) -> Any:
            return data[cum[i] : cum[j]]
    else:
        def new_bytes(i: int, j: int, old: Any) -> Any:
            return old + data[cum[i] : cum[j]]  # bytewise, modulo 256 (uint8 wraps)

    return Plan(rec, base, offs, lens, new_bytes, needs_old=coding != DATA_RAW)


def _plan_qadd(rec: Record, payload: bytes, base: int, n_elems: int, piece: int, what: str) -> Plan:
    import numpy as np

    g_elems, g_bytes = group_layout(rec.type, rec.params)
    bits = rec.params.get("bits")
    if bits not in QADD_BITS:
        raise FormatError(f"{what}: qadd bits {bits!r} not in {QADD_BITS}")
    if n_elems % g_elems:
        raise FormatError(f"{what}: group of {g_elems} does not divide {n_elems} elements")
    n_groups_t = n_elems // g_elems
    if rec.params.get("dense"):
        starts, lengths, used = np.array([0]), np.array([n_groups_t]), 0
    else:
        starts, lengths, used = decode_runs(payload, n_groups_t, what)
    n_groups = int(lengths.sum())
    n_vals = n_groups * g_elems
    v_bytes = n_vals if bits == 8 else (n_vals + 1) // 2
    if len(payload) - used != 2 * n_groups + v_bytes:
        raise FormatError(f"{what}: qadd payload is {len(payload) - used} bytes, {n_groups} "
                          f"groups of {g_elems} at {bits} bits need {2 * n_groups + v_bytes}")
    scales = np.frombuffer(payload, dtype=np.float16, count=n_groups, offset=used).astype(np.float32)
    raw_q = memoryview(payload)[used + 2 * n_groups :]
    if not np.all(np.isfinite(scales)):
        raise FormatError(f"{what}: qadd scales are not all finite")
    offs, lens, _ = _split(starts, lengths, g_bytes, base, max(1, piece // g_bytes))
    gpos = _cum(lens // g_bytes)  # each span's first group, in payload order
    type_name = rec.type

    def values(v0: int, v1: int) -> Any:
        """The update's quantised values v0..v1-1, decoded only now: memory follows the
        window, not the record."""
        if bits == 8:
            return np.frombuffer(raw_q, dtype=np.int8, count=v1 - v0, offset=v0)
        b0, b1 = v0 // 2, (v1 + 1) // 2
        return unpack_int4(raw_q[b0:b1], 2 * (b1 - b0))[v0 - 2 * b0 : v0 - 2 * b0 + v1 - v0]

    def new_bytes(i: int, j: int, old: Any) -> Any:
        g0, g1 = int(gpos[i]), int(gpos[j])
        q = values(g0 * g_elems, g1 * g_elems).reshape(g1 - g0, g_elems).astype(np.float32)
        seg = (q * scales[g0:g1, None]).reshape(-1)  # (groups * g_elems,)
        return np.frombuffer(quantize(type_name, dequantize(type_name, old) + seg), np.uint8)

    return Plan(rec, base, offs, lens, new_bytes, needs_old=True)


ROUNDINGS = ("nearest", "stochastic")
_SPLITMIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def uniform_at(seed: int, index: Any) -> Any:
    """A uniform number in [0, 1) for each element index (uint64): splitmix64 of
    ``(seed * 2**40 + index) mod 2**64``, top 53 bits. Counter-based, so any partition of a tensor
    draws the same numbers (docs/formats/delta.md, section 5.4)."""
    import numpy as np

    with np.errstate(over="ignore"):
        z = np.asarray(index, dtype=np.uint64) + np.uint64((seed << 40) % 2**64) + np.uint64(_SPLITMIX[0])
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_SPLITMIX[1])
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_SPLITMIX[2])
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def q8_stochastic_add(old: Any, add: Any, first_index: int, seed: int) -> Any:
    """Q8_0 blocks plus ``add`` (float32, the blocks' elements in order), keeping each
    block's scale and rounding the codes stochastically: unbiased, so an update far
    smaller than the quantisation step still arrives on average, where requantising
    ``dequantise(old) + add`` would round most of it away (the device does not know the
    float weights the cloud quantised from). Blocks with scale 0 are requantised."""
    import numpy as np

    block, size = type_layout("Q8_0")  # 32 codes after a 2-byte float16 scale
    blocks = np.frombuffer(old, dtype=np.uint8).reshape(-1, size).copy()
    d = block_scales("Q8_0", blocks).astype(np.float32)  # (G,)
    q = blocks[:, size - block :].view(np.int8).astype(np.float64)  # (G, 32)
    x = np.asarray(add, dtype=np.float32).reshape(-1, block)  # (G, 32)
    safe = np.where(d > 0, d, np.float32(1.0))
    steps = (x / safe[:, None]).astype(np.float64)  # float32 division, then exact widening
    u = uniform_at(seed, np.arange(first_index, first_index + q.size, dtype=np.uint64)).reshape(q.shape)
    codes = np.clip(np.floor(q + steps + u), -127, 127).astype(np.int8)
    blocks[:, size - block :] = codes.view(np.uint8)
    zero = d == 0
    if zero.any():
        w = dequantize("Q8_0", blocks[zero].tobytes()) + x[zero].reshape(-1)
        blocks[zero] = np.frombuffer(quantize("Q8_0", w), np.uint8).reshape(-1, size)
    return blocks.reshape(-1)


def _nonfinite(type_name: str, raw: Any) -> Any:
    """Per unit (element or quant block): does it decode to a non-finite value? (n_units,)
    bool, or None for a type this module cannot decode (nothing is refused for it)."""
    import numpy as np

    buf = np.frombuffer(raw, dtype=np.uint8)
    if type_name == "F32":
        return ~np.isfinite(buf.view(np.float32))
    if type_name == "F16":
        return ~np.isfinite(buf.view(np.float16))
    if type_name == "BF16":
        return (buf.view("<u2") & 0x7F80) == 0x7F80  # exponent all ones: inf or nan
    block, size = type_layout(type_name)
    if type_name in HALF_FIELDS:  # from the blocks' float16 fields: no dequantising
        return blocks_nonfinite(type_name, buf)
    try:
        vals = dequantize(type_name, raw)
    except (NotImplementedError, KeyError, ValueError):
        return None
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(vals.reshape(-1, block)).all(axis=1)


def check_finite(rec: Record, old: Any, new: Any) -> None:
    """Refuse new bytes that turn a finite value non-finite (peft's safe merge: compute,
    check, then commit). A unit that was already non-finite may stay so (a mask constant).

    Raises:
        FormatError: naming the tensor and how many units the record would break.
    """
    bad_new = _nonfinite(rec.type, new)
    if bad_new is None or not bad_new.any():
        return
    bad = bad_new & ~_nonfinite(rec.type, old)
    if bad.any():
        raise FormatError(f"record for {rec.tensor!r} ({rec.encoding}) would write non-finite "
                          f"values into {int(bad.sum())} finite {rec.type} unit(s); the update "
                          "overflows the tensor's type or is corrupt. Nothing was written; ask "
                          "the sender for a delta built from finite weights")


def factor_bytes(fdt: str, rank: int, rows: int, cols: int) -> int:
    """Payload size of low-rank factors A (rank, cols), B (rows, rank) (not for ``mx``,
    whose codes are deflated)."""
    n = rank * cols + rows * rank
    return n + 2 * (rank + rows) if fdt == "i8" else n * FACTOR_DTYPES[fdt]


def mx_quantize(v: Any, bits: int, group: int) -> tuple[Any, Any]:
    """One factor vector (n,) -> int8 codes (n,) in [-lim, lim], ``lim = 2^(bits-1) - 1``,
    and a float16 scale per ``group`` consecutive values (ceil(n / group),), ``v ~= code *
    scale``. Each group's scale is the one of ``MX_CLIPS`` x max|v| / lim with the least
    squared error: at 2-4 bits clipping the largest values beats resolving them. Writer
    side only: a reader needs just the codes and scales."""
    import numpy as np

    v = np.asarray(v, dtype=np.float32).reshape(-1)
    n = v.size
    g = -(-n // group)
    lim = np.float32(2 ** (bits - 1) - 1)
    x = np.zeros(g * group, np.float32)
    x[:n] = v
    x = x.reshape(g, group)  # (G, group), the tail padded with zeros
    top = np.abs(x).max(1)  # (G,)
    best_q = np.zeros(x.shape, np.int8)
    best_s = np.zeros(g, np.float16)
    best_err = np.full(g, np.inf)
    for clip in MX_CLIPS:
        s = (top * np.float32(clip) / lim).astype(np.float16)  # (G,)
        s32 = s.astype(np.float32)
        div = np.where(s32 > 0, s32, np.float32(1.0))
        q = np.clip(np.rint(x / div[:, None]), -lim, lim)
        err = ((q * s32[:, None] - x).astype(np.float64) ** 2).sum(1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_q[better] = q[better].astype(np.int8)
        best_s[better] = s[better]
    return best_q.reshape(-1)[:n], best_s


def mx_dequantize(codes: Any, scales: Any, group: int) -> Any:
    """Inverse of :func:`mx_quantize`: float32 values (n,) = code * scale of its group."""
    import numpy as np

    idx = np.arange(codes.size) // group
    return codes.astype(np.float32) * scales.astype(np.float32)[idx]


def _mx_layout(bits: Sequence[int], group: int, rows: int, cols: int) -> tuple[int, int]:
    """(codes, scales) an mx payload holds for factors of a (rows, cols) matrix."""
    rank = len(bits)
    return rank * (rows + cols), rank * (-(-cols // group) + -(-rows // group))


def encode_mx_factors(a: Any, b: Any, bits: Sequence[int], group: int) -> bytes:
    """A (r, cols), B (rows, r) -> ``zlib(codes) ++ scales``: per component k, the codes of
    ``A[k, :]`` then of ``B[:, k]`` at ``bits[k]`` bits, one int8 each (deflate then codes
    them near their entropy); then, in the same order, their float16 group scales."""
    import numpy as np

    codes, scales = [], []
    for k, nb in enumerate(bits):
        for v in (a[k, :], b[:, k]):
            q, s = mx_quantize(v, nb, group)
            codes.append(q)
            scales.append(s)
    return (zlib.compress(np.concatenate(codes).tobytes(), 9)
            + np.concatenate(scales).astype("<f2").tobytes())


def decode_mx_factors(payload: bytes, bits: Sequence[int], group: int, rows: int, cols: int,
                      what: str) -> tuple[Any, Any]:
    """Inverse of :func:`encode_mx_factors`: float32 A (r, cols), B (rows, r).

    Raises:
        FormatError: not valid zlib data, codes or scales of the wrong count, trailing
            bytes, or a code outside its component's range.
    """
    import numpy as np

    rank = len(bits)
    n_codes, n_scales = _mx_layout(bits, group, rows, cols)
    if n_codes > MX_MAX_CODES:
        raise FormatError(f"{what}: mx factors of rank {rank} for ({rows}, {cols}) are {n_codes} "
                          f"codes, over the limit of {MX_MAX_CODES}")
    d = zlib.decompressobj()
    try:
        raw = d.decompress(bytes(payload), n_codes + 1)
    except zlib.error as exc:
        raise FormatError(f"{what}: mx codes are not valid zlib data ({exc})") from exc
    if len(raw) != n_codes or not d.eof or len(d.unused_data) != 2 * n_scales:
        raise FormatError(f"{what}: mx payload does not hold {n_codes} codes and {n_scales} "
                          "float16 scales")
    codes = np.frombuffer(raw, np.int8)
    scales = np.frombuffer(d.unused_data, "<f2")
    per = rows + cols
    a = np.empty((rank, cols), np.float32)
    b = np.empty((rows, rank), np.float32)
    ga, gb = -(-cols // group), -(-rows // group)
    for k in range(rank):
        c0, s0 = k * per, k * (ga + gb)
        part = codes[c0 : c0 + per]
        # one component at a time: no widened copy of every code (a record may hold 2^26)
        if int(part.max()) > (1 << (bits[k] - 1)) - 1 or int(part.min()) < -((1 << (bits[k] - 1)) - 1):
            raise FormatError(f"{what}: an mx code of component {k} lies outside its {bits[k]}-bit range")
        a[k] = mx_dequantize(part[:cols], scales[s0 : s0 + ga], group)
        b[:, k] = mx_dequantize(part[cols:], scales[s0 + ga : s0 + ga + gb], group)
    return a, b


def symmetric_quantize(m: Any, lim: int = 127) -> tuple[Any, Any]:
    """Rows (k, n) float -> int codes (k, n) in [-lim, lim] and one float16 scale per row,
    ``m ~= q * scale`` (round half to even; a zero row gets scale 0 and codes 0). The one
    symmetric quantiser of low-rank factors, qadd residuals and uplink visual tokens."""
    import numpy as np

    m = np.asarray(m, dtype=np.float32)
    scale = (np.abs(m).max(-1) / np.float32(lim)).astype(np.float16)  # (k,)
    s32 = scale.astype(np.float32)
    div = np.where(s32 > 0, s32, np.float32(1.0))
    q = np.clip(np.rint(m / div[:, None]), -lim, lim).astype(np.int8)
    return q, scale


def encode_factors(a: Any, b: Any, fdt: str) -> bytes:
    """A (r, cols) then B (rows, r): as float16/float32, or int8 rows with float16 scales
    (A_q, A_scale (r,), B_q, B_scale (rows,))."""
    import numpy as np

    if fdt != "i8":
        dt = np.float16 if fdt == "f16" else np.float32
        return a.astype(dt).tobytes() + b.astype(dt).tobytes()
    out = b""
    for m in (a, b):
        q, scale = symmetric_quantize(m)
        out += q.tobytes() + scale.tobytes()
    return out


def decode_factors(payload: bytes, fdt: str, rank: int, rows: int, cols: int, what: str) -> tuple[Any, Any]:
    """Inverse of :func:`encode_factors`: float32 A (rank, cols), B (rows, rank)."""
    import numpy as np

    need = factor_bytes(fdt, rank, rows, cols)
    if len(payload) != need:
        raise FormatError(f"{what}: lowrank payload is {len(payload)} bytes, rank {rank} "
                          f"{fdt} factors for ({rows}, {cols}) need {need}")
    if fdt != "i8":
        dt = np.float16 if fdt == "f16" else np.float32
        es = FACTOR_DTYPES[fdt]
        a = np.frombuffer(payload, dtype=dt, count=rank * cols).astype(np.float32).reshape(rank, cols)
        b = np.frombuffer(payload, dtype=dt, offset=rank * cols * es).astype(np.float32).reshape(rows, rank)
        return a, b
    pos = 0
    mats = []
    for r, c in ((rank, cols), (rows, rank)):
        q = np.frombuffer(payload, dtype=np.int8, count=r * c, offset=pos).astype(np.float32).reshape(r, c)
        pos += r * c
        scale = np.frombuffer(payload, dtype=np.float16, count=r, offset=pos).astype(np.float32)
        pos += 2 * r
        mats.append(q * scale[:, None])
    return mats[0], mats[1]


def _plan_lowrank(rec: Record, payload: bytes, base: int, piece: int, what: str) -> Plan:
    import numpy as np

    p = rec.params
    rank, scale, fdt = p.get("rank"), p.get("scale"), p.get("factor_dtype", "f16")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0 or fdt not in FACTOR_DTYPES:
        raise FormatError(f"{what}: bad lowrank params {p!r}")
    bits, group = p.get("bits"), p.get("group")
    if fdt == "mx" and not (
            isinstance(bits, list) and len(bits) == rank
            and all(isinstance(x, int) and not isinstance(x, bool) and x in MX_BITS for x in bits)
            and isinstance(group, int) and not isinstance(group, bool) and 1 <= group <= MX_MAX_GROUP):
        raise FormatError(f"{what}: mx factors need 'bits', {rank} integers in [2, 8], and 'group' "
                          f"in [1, {MX_MAX_GROUP}]; got bits {bits!r}, group {group!r}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not np.isfinite(scale):
        raise FormatError(f"{what}: lowrank scale {scale!r} is not a finite number")
    cols = rec.shape[-1]
    rows = 1
    for d in rec.shape[:-1]:
        rows *= d
    block, unit = type_layout(rec.type)
    if cols % block:
        raise FormatError(f"{what}: row length {cols} is not a multiple of {rec.type} blocks")
    if fdt == "mx":
        a, b = decode_mx_factors(payload, bits, group, rows, cols, what)
    else:
        a, b = decode_factors(payload, fdt, rank, rows, cols, what)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise FormatError(f"{what}: lowrank factors are not all finite")
    rounding, seed = p.get("rounding", "nearest"), p.get("seed", 0)
    if rounding not in ROUNDINGS or not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise FormatError(f"{what}: bad lowrank rounding {rounding!r} / seed {seed!r}")
    if rounding == "stochastic" and rec.type != "Q8_0":
        raise FormatError(f"{what}: stochastic rounding is defined for Q8_0 only, not {rec.type}")
    row_bytes = cols // block * unit
    # piece bounds the float32 rows held at once
    offs, lens, first = _split(np.array([0]), np.array([rows]), row_bytes, base,
                               max(1, piece // (cols * 4)))
    s = np.float32(scale)
    type_name = rec.type

    def new_bytes(i: int, j: int, old: Any) -> Any:
        r0 = int(first[i])
        r1 = int(first[j - 1]) + int(lens[j - 1]) // row_bytes
        acc = np.zeros((r1 - r0, cols), dtype=np.float32)  # (rows, C)
        for k in range(rank):  # fixed order: bit-reproducible, unlike a BLAS matmul
            acc += b[r0:r1, k : k + 1] * a[k : k + 1, :]
        if rounding == "stochastic":
            return q8_stochastic_add(old, acc * s, r0 * cols, seed)
        w = dequantize(type_name, old).reshape(r1 - r0, cols)
        with np.errstate(over="ignore"):  # an overflow to inf is refused by check_finite
            return np.frombuffer(quantize(type_name, (w + acc * s).reshape(-1)), np.uint8)

    return Plan(rec, base, offs, lens, new_bytes, needs_old=True)
