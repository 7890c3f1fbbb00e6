"""Building deltas: from explicit per-tensor changes (the API DWC builds on), or as the
exact difference of two artefacts with the same layout (``cdcca-edge delta diff``).

The builder computes each record's new bytes with the same plan code the device runs
(``encodings.make_plan``), so the pre/post digests and the target identity it writes are
exactly what a correct patch will produce.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from cdcca_edge import __version__
from cdcca_edge.core.artifact import (
    HASH_CHUNK,
    Artifact,
    TensorInfo,
    digest_from_chunks,
    identity_digest,
    iter_tensor_bytes,
    open_artifact,
    rehash_chunks,
    touched_chunks,
)
from cdcca_edge.core.delta_format import (
    ENC_LOWRANK,
    ENC_QADD,
    ENC_REPLACE,
    MAX_RECORD_PAYLOAD,
    DeltaHeader,
    Record,
    write_delta,
)
from cdcca_edge.core.encodings import (
    DATA_ZSUB,
    FACTOR_DTYPES,
    MAX_RUNS,
    MX_BITS,
    MX_GROUP,
    MX_MAX_GROUP,
    encode_factors,
    encode_mx_factors,
    QADD_BITS,
    encode_runs,
    group_layout,
    check_finite,
    Plan,
    make_plan,
    REQUANT_TYPES,
    pack_int4,
)
from cdcca_edge.core.errors import UsageError
from cdcca_edge.core.ggml import type_layout
from cdcca_edge.core.state import current_identity, load_leaves

_ZERO = "0" * 64


@dataclass
class DeltaSummary:
    path: Path
    digest: str
    bytes: int
    base_identity: str
    target_identity: str
    from_version: int
    to_version: int
    records: int
    records_by_encoding: dict[str, int]
    touched_bytes: int  # bytes of the artefact the delta rewrites
    signed: bool

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["path"] = str(self.path)
        return d


@dataclass
class _Pending:
    record: Record
    new_spans: list[tuple[int, bytes]] = field(default_factory=list)  # (abs offset, new bytes)
    unit_ranges: list[tuple[int, int]] = field(default_factory=list)  # (first unit, count)


@dataclass(frozen=True)
class BuiltRecord:
    """One record as a builder computed it: its header entry, payload, the new bytes of
    its spans and the units it changes. Another builder on the same base takes it as is
    (``add_built``) instead of computing it again (a DWC budget search)."""

    record: Record
    payload: bytes
    new_spans: list[tuple[int, bytes]]
    unit_ranges: list[tuple[int, int]]


class DeltaBuilder:
    """Collects changes to ``base`` and writes them as one delta.

    Each ``add_*``/``replace_*`` call appends records (a change bigger than the record limit
    is split). Changes to the same tensor must touch disjoint units. Offsets and shapes are
    in the artefact's own layout (GGUF permutations and ONNX transposes already applied).

    Args:
        base: the artefact (or its path) the delta applies to: the device's exact bytes.
        from_version, to_version: version numbers (default: the base's recorded version
            and the next one).
        created_by: free text stored in the header (``created.by``).
    """

    def __init__(
        self,
        base: str | Path | Artifact,
        from_version: int | None = None,
        to_version: int | None = None,
        created_by: str = "cdcca_edge.core.delta_build",
    ) -> None:
        self.base = base if isinstance(base, Artifact) else open_artifact(base)
        self.base_identity, state, _ = current_identity(self.base)
        assert state is not None
        self._state = state  # the base's per-tensor digests (and leaves, once loaded)
        self.from_version = from_version if from_version is not None else (state.version if state and state.version >= 0 else 0)
        self.to_version = to_version if to_version is not None else self.from_version + 1
        self.created_by = created_by
        self._payload = tempfile.SpooledTemporaryFile(max_size=64 << 20)
        self._pending: list[_Pending] = []
        self._touched: dict[str, list[tuple[int, int]]] = {}

    # --- changes ---------------------------------------------------------------------------
    def replace_units(self, tensor: str, starts: Sequence[int], lengths: Sequence[int],
                      data: bytes) -> None:
        """Replace runs of whole units (quant blocks, or elements of float tensors) with
        ``data``: the new bytes of all runs, in order."""
        t = self.base.tensor(tensor)
        _, unit = type_layout(t.type_name)
        n_units = t.nbytes // unit
        if any(s < 0 or n <= 0 or s + n > n_units for s, n in zip(starts, lengths)):
            raise UsageError(f"{tensor}: runs must be non-empty and lie within its {n_units} "
                             "units; a run reaches past the tensor")
        if len(data) != sum(lengths) * unit:
            raise UsageError(f"{tensor}: {len(data)} bytes of data for runs of "
                             f"{sum(lengths)} units of {unit} bytes")
        view = memoryview(data)
        runs: list[tuple[int, int]] = []
        pos = cut = size = 0
        for s, n in zip(starts, lengths):
            while n:  # split runs at the record limit (index: at most 8 bytes per run + 64)
                room = (MAX_RECORD_PAYLOAD - 64 - 8 * (len(runs) + 1)) // unit - size
                k = max(0, min(n, room))
                if k == 0 or len(runs) >= MAX_RUNS:
                    if not runs:
                        raise UsageError(f"{tensor}: a {unit}-byte unit does not fit a record")
                    self._add_replace(t, runs, view[cut:pos])
                    runs, cut, size = [], pos, 0
                    continue
                runs.append((s, k))
                s, n, pos, size = s + k, n - k, pos + k * unit, size + k
        if runs:
            self._add_replace(t, runs, view[cut:pos])

    def replace_tensor(self, tensor: str, new: bytes) -> int:
        """Replace ``tensor``'s bytes with ``new`` (same length), writing only the units
        that differ. Returns the number of units replaced."""
        import numpy as np

        t = self.base.tensor(tensor)
        if len(new) != t.nbytes:
            raise UsageError(f"{tensor}: {len(new)} new bytes for a {t.nbytes}-byte tensor")
        _, unit = type_layout(t.type_name)
        old = b"".join(bytes(p) for p in iter_tensor_bytes(t))
        a = np.frombuffer(old, np.uint8).reshape(-1, unit)
        b = np.frombuffer(new, np.uint8).reshape(-1, unit)
        starts, lengths = changed_runs(np.any(a != b, axis=1))
        if starts:
            data = b"".join(new[s * unit : (s + n) * unit] for s, n in zip(starts, lengths))
            self.replace_units(tensor, starts, lengths, data)
        return int(sum(lengths))

    def add_quantized(self, tensor: str, groups: Sequence[tuple[int, int]] | None,
                      scales: Any, values: Any, bits: int = 8, group: int | None = None) -> None:
        """Add ``scale[g] * values[g]`` to each touched group (dequantise -> add ->
        requantise, exact on both sides).

        Args:
            groups: runs (start, length) of groups, or ``None`` for every group (dense).
            scales: float16-representable scales, one per touched group.
            values: int8 (bits=8) or in [-8, 7] (bits=4), ``group`` per touched group.
            group: float tensors only: elements per group (default 32). Quantised tensors
                use their block.
        """
        import numpy as np

        t = self.base.tensor(tensor)
        _requant_usage(t, ENC_QADD)
        if bits not in QADD_BITS:
            raise UsageError(f"bits must be one of {QADD_BITS}, got {bits}")
        params: dict[str, Any] = {"bits": bits, "dense": groups is None}
        if group is not None:
            params["group"] = group
        g_elems, _ = group_layout(t.type_name, params)
        n_groups = t.n_elements // g_elems
        runs = [(0, n_groups)] if groups is None else list(groups)
        count = sum(n for _, n in runs)
        sc = np.asarray(scales, dtype=np.float16).reshape(-1)
        q = np.asarray(values).reshape(-1)
        if sc.size != count or q.size != count * g_elems:
            raise UsageError(f"{tensor}: {count} groups need {count} scales and "
                             f"{count * g_elems} values, got {sc.size} and {q.size}")
        lo, hi = (-128, 127) if bits == 8 else (-8, 7)
        if q.size and (q.min() < lo or q.max() > hi):
            raise UsageError(f"{tensor}: values outside [{lo}, {hi}] for {bits}-bit qadd")
        q = q.astype(np.int8)
        index = b"" if groups is None else encode_runs([r[0] for r in runs], [r[1] for r in runs])
        payload = index + sc.tobytes() + (q.tobytes() if bits == 8 else pack_int4(q))
        if len(payload) > MAX_RECORD_PAYLOAD:
            raise UsageError(f"{tensor}: qadd payload of {len(payload)} bytes exceeds the "
                             f"record limit {MAX_RECORD_PAYLOAD}; split the groups over calls")
        self._add(t, ENC_QADD, params, payload, _unit_ranges(runs, g_elems, t))

    def add_low_rank(self, tensor: str, a: Any, b: Any, scale: float,
                     factor_dtype: str = "f16", rounding: str = "nearest", seed: int = 0,
                     bits: Sequence[int] | None = None, group: int = MX_GROUP) -> None:
        """W += scale * B @ A with A (r, cols), B (rows, r), in the artefact's layout.
        ``rounding="stochastic"`` (Q8_0 only) keeps block scales and rounds the codes
        without bias (docs/formats/delta.md, section 5.4). ``factor_dtype="mx"``: component
        k (A's row k, B's column k) as ``bits[k]``-bit codes with a float16 scale per
        ``group`` values, deflated."""
        import numpy as np

        t = self.base.tensor(tensor)
        _requant_usage(t, ENC_LOWRANK)
        if factor_dtype not in FACTOR_DTYPES:
            raise UsageError(f"factor_dtype must be one of {tuple(FACTOR_DTYPES)}")
        a = np.asarray(a, dtype=np.float32)
        b = np.asarray(b, dtype=np.float32)
        cols = t.shape[-1]
        rows = t.n_elements // cols
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != cols or b.shape != (rows, a.shape[0]):
            raise UsageError(f"{tensor}: factors A {a.shape}, B {b.shape} do not fit a "
                             f"({rows}, {cols}) matrix (A: (r, {cols}), B: ({rows}, r))")
        params: dict[str, Any] = {"rank": int(a.shape[0]), "scale": float(scale), "factor_dtype": factor_dtype}
        if factor_dtype == "mx":
            bits = [int(x) for x in (bits if bits is not None else [8] * a.shape[0])]
            if len(bits) != a.shape[0] or any(x not in MX_BITS for x in bits) or not 1 <= group <= MX_MAX_GROUP:
                raise UsageError(f"{tensor}: mx factors need one bit width in [2, 8] per component "
                                 f"({a.shape[0]}) and a group in [1, {MX_MAX_GROUP}]")
            payload = encode_mx_factors(a, b, bits, group)
            params.update(bits=bits, group=int(group))
        else:
            payload = encode_factors(a, b, factor_dtype)
        if len(payload) > MAX_RECORD_PAYLOAD:
            raise UsageError(f"{tensor}: lowrank payload of {len(payload)} bytes exceeds the record "
                             f"limit {MAX_RECORD_PAYLOAD}; send fewer components or smaller factors")
        if rounding != "nearest":
            if rounding != "stochastic" or t.type_name != "Q8_0":
                raise UsageError(f"{tensor}: rounding must be 'nearest', or 'stochastic' for Q8_0 tensors")
            if not 0 <= seed < 2**32:
                raise UsageError("seed must be in [0, 2**32)")
            params.update(rounding=rounding, seed=int(seed))
        _, unit = type_layout(t.type_name)
        self._add(t, ENC_LOWRANK, params, payload, [(0, t.nbytes // unit)])

    @property
    def record_count(self) -> int:
        return len(self._pending)

    def built_since(self, first: int) -> list[BuiltRecord]:
        """The records added after the first ``first``, for :meth:`add_built`."""
        out = []
        for p in self._pending[first:]:
            pos = self._payload.tell()
            self._payload.seek(p.record.offset)
            payload = self._payload.read(p.record.length)
            self._payload.seek(pos)
            out.append(BuiltRecord(p.record, payload, p.new_spans, p.unit_ranges))
        return out

    def add_built(self, built: BuiltRecord) -> None:
        """Add a record another builder computed on the same base (same identity)."""
        t = self.base.tensor(built.record.tensor)
        self._claim(t, built.unit_ranges)
        rec = Record(**{**built.record.__dict__, "offset": self._payload.tell()})
        self._payload.write(built.payload)
        self._pending.append(_Pending(rec, built.new_spans, built.unit_ranges))

    def new_bytes(self) -> list[list[bytes]]:
        """Per record written, the new bytes of each of its spans (as ``apply_delta``'s
        ``computed``): what the builder computed for the post-image digests."""
        return [[b for _, b in p.new_spans] for p in self._pending]

    # --- output ----------------------------------------------------------------------------
    def write(self, path: str | Path, sign_key: Any | None = None,
              progress: Callable[[int, int], None] | None = None) -> DeltaSummary:
        """Write the delta (atomically). ``sign_key``: see ``delta_format.load_private_key``."""
        target = self.target_identity(progress)
        header = DeltaHeader(
            artifact_format=self.base.format,
            base_identity=self.base_identity,
            target_identity=target,
            from_version=self.from_version,
            to_version=self.to_version,
            payload_bytes=self._payload.tell(),
            records=[p.record for p in self._pending],
            created={"tool": f"cdcca-edge {__version__}", "by": self.created_by},
        )
        self._payload.seek(0)
        try:
            digest = write_delta(path, header, self._payload, sign_key=sign_key)
        finally:
            self._payload.close()  # a builder writes once
        by_enc: dict[str, int] = {}
        for p in self._pending:
            by_enc[p.record.encoding] = by_enc.get(p.record.encoding, 0) + 1
        return DeltaSummary(
            path=Path(path), digest=digest, bytes=Path(path).stat().st_size,
            base_identity=self.base_identity, target_identity=target,
            from_version=self.from_version, to_version=self.to_version,
            records=len(self._pending), records_by_encoding=by_enc,
            touched_bytes=sum(len(b) for p in self._pending for _, b in p.new_spans),
            signed=sign_key is not None,
        )

    def target_identity(self, progress: Callable[[int, int], None] | None = None) -> str:
        """The identity the base will have after this delta (hashes touched tensors)."""
        spans: dict[str, list[tuple[int, bytes]]] = {}
        for p in self._pending:
            spans.setdefault(p.record.tensor, []).extend(p.new_spans)
        # only the leaves the new spans fall in are read and re-hashed (artifact.md 2)
        state = self._state
        load_leaves(self.base, state, list(spans))
        entries = []
        for i, t in enumerate(self.base.tensors):
            if t.name in spans:
                sp = sorted(spans[t.name], key=lambda s: s[0])
                leaves = bytearray(state.leaves[t.name])  # the base's own stay as they are
                mask = touched_chunks(t, [o for o, _ in sp], [len(b) for _, b in sp])
                rehash_chunks(t, leaves, mask, splice=sp)
                digest = digest_from_chunks(t.nbytes, leaves)
            else:
                digest = state.tensor_digests[t.name]
            entries.append((t.name, t.type_name, t.shape, digest))
            if progress:
                progress(i + 1, len(self.base.tensors))
        return identity_digest(entries)

    # --- internals -------------------------------------------------------------------------
    def _add_replace(self, t: TensorInfo, runs: list[tuple[int, int]], data: memoryview) -> None:
        """Raw new bytes, or zlib(new - old) when that is at least 3% smaller: updated
        weights sit near the old ones, so most byte differences are small."""
        import numpy as np

        index = encode_runs([r[0] for r in runs], [r[1] for r in runs])
        _, unit = type_layout(t.type_name)
        old = bytearray()
        with open(t.file, "rb") as f:
            for s, n in runs:
                f.seek(t.offset + s * unit)
                old += f.read(n * unit)
        diff = (np.frombuffer(data, np.uint8) - np.frombuffer(bytes(old), np.uint8)).tobytes()
        coded = zlib.compress(diff, 6)
        if len(coded) < 0.97 * len(data):
            self._add(t, ENC_REPLACE, {"data": DATA_ZSUB}, index + coded, runs)
        else:
            self._add(t, ENC_REPLACE, {}, index + bytes(data), runs)

    def _claim(self, t: TensorInfo, unit_ranges: list[tuple[int, int]]) -> None:
        taken = self._touched.setdefault(t.name, [])
        for s, n in unit_ranges:
            for s2, e2 in taken:
                if s < e2 and s2 < s + n:
                    raise UsageError(f"{t.name}: units [{s}, {s + n}) already changed by an "
                                     "earlier record of this delta")
        taken.extend((s, s + n) for s, n in unit_ranges)

    def _add(self, t: TensorInfo, encoding: str, params: dict[str, Any], payload: bytes,
             unit_ranges: list[tuple[int, int]]) -> None:
        self._claim(t, unit_ranges)
        rec = Record(
            file=self.base.file_key(t.file), tensor=t.name, type=t.type_name, shape=t.shape,
            encoding=encoding, offset=self._payload.tell(), length=len(payload),
            params=params, pre_digest=_ZERO, post_digest=_ZERO,
        )
        import numpy as np

        plan = make_plan(rec, payload, t.offset, t.nbytes)
        pre, post = hashlib.sha256(), hashlib.sha256()
        new_spans = []
        with open(t.file, "rb") as f:
            for i, (off, n) in enumerate(zip(plan.offsets.tolist(), plan.lengths.tolist())):
                f.seek(off)
                old = f.read(n)
                new = np.asarray(plan.new_bytes(i, i + 1, np.frombuffer(old, np.uint8))).tobytes()
                check_finite(rec, old, new)  # never emit a record a patcher must refuse
                pre.update(old)
                post.update(new)
                new_spans.append((off, new))
        rec = Record(**{**rec.__dict__, "pre_digest": pre.hexdigest(), "post_digest": post.hexdigest()})
        self._payload.write(payload)
        self._pending.append(_Pending(rec, new_spans, list(unit_ranges)))


def _requant_usage(t: TensorInfo, encoding: str) -> None:
    if t.type_name not in REQUANT_TYPES:
        raise UsageError(f"{t.name}: {encoding} makes the device re-quantise {t.type_name}, which is defined "
                         f"only where every platform's quantiser writes the same bytes: "
                         f"{', '.join(REQUANT_TYPES)}. Quantise the new values here and send the "
                         "blocks: replace_units / replace_tensor (block replacement)")


def _unit_ranges(runs: list[tuple[int, int]], g_elems: int, t: TensorInfo) -> list[tuple[int, int]]:
    block, _ = type_layout(t.type_name)
    per = g_elems // block  # units per group
    return [(s * per, n * per) for s, n in runs]


def changed_runs(mask: Any) -> tuple[list[int], list[int]]:
    """Runs of True in a boolean vector: (starts, lengths)."""
    import numpy as np

    m = np.concatenate([[False], np.asarray(mask, dtype=bool), [False]])
    edges = np.flatnonzero(m[1:] != m[:-1])
    starts, ends = edges[0::2], edges[1::2]
    return starts.tolist(), (ends - starts).tolist()


def diff_artifacts(old: str | Path, new: str | Path, out: str | Path, sign_key: Any | None = None,
                   progress: Callable[[int, int], None] | None = None, from_version: int | None = None,
                   to_version: int | None = None) -> DeltaSummary:
    """An exact block-replacement delta turning ``old`` into ``new`` (versions: see
    :class:`DeltaBuilder`).

    Both must have the same tensors (names, types, shapes); only units whose bytes differ
    are sent. Memory stays bounded by HASH_CHUNK-sized comparisons per step.

    Raises:
        UsageError: the layouts differ.
    """
    import numpy as np

    a, b = open_artifact(old), open_artifact(new)
    if a.format != b.format:
        raise UsageError(f"{old} is {a.format}, {new} is {b.format}: diff needs one format")
    layout_a = {t.name: (t.type_name, t.shape) for t in a.tensors}
    layout_b = {t.name: (t.type_name, t.shape) for t in b.tensors}
    if layout_a != layout_b:
        diff = sorted(set(layout_a.items()) ^ set(layout_b.items()))[:3]
        raise UsageError(f"{old} and {new} have different tensor layouts (e.g. {diff}); "
                         "delta diff needs two exports of the same architecture and types")
    builder = DeltaBuilder(a, from_version, to_version, created_by="cdcca-edge delta diff")
    for i, ta in enumerate(a.tensors):
        tb = b.tensor(ta.name)
        _, unit = type_layout(ta.type_name)
        step = max(unit, HASH_CHUNK // unit * unit)
        starts: list[int] = []
        lengths: list[int] = []
        with open(ta.file, "rb") as fa, open(tb.file, "rb") as fb:
            for off in range(0, ta.nbytes, step):
                n = min(step, ta.nbytes - off)
                fa.seek(ta.offset + off)
                fb.seek(tb.offset + off)
                xa = np.frombuffer(fa.read(n), np.uint8).reshape(-1, unit)
                xb = np.frombuffer(fb.read(n), np.uint8).reshape(-1, unit)
                s, ln = changed_runs(np.any(xa != xb, axis=1))
                base_unit = off // unit
                for s0, l0 in zip(s, ln):
                    s0 += base_unit
                    if starts and starts[-1] + lengths[-1] == s0:  # run crosses a chunk edge
                        lengths[-1] += l0
                    else:
                        starts.append(s0)
                        lengths.append(l0)
            if starts:
                data = bytearray()
                for s0, l0 in zip(starts, lengths):
                    fb.seek(tb.offset + s0 * unit)
                    data += fb.read(l0 * unit)
                builder.replace_units(ta.name, starts, lengths, bytes(data))
        if progress:
            progress(i + 1, len(a.tensors))
    return builder.write(out, sign_key=sign_key)


UNDO_KIND = "undo"  # header["created"]["kind"] of the undo deltas a device writes itself


class UndoBuilder:
    """Collects the original bytes of every touched span into a replace delta that takes
    the patched model back to its base."""

    def __init__(self, header: DeltaHeader, digest: str) -> None:
        self.h = header
        self.payload = tempfile.SpooledTemporaryFile(max_size=32 << 20)
        self.records: list[Record] = []
        self._plan: Plan | None = None
        self._starts: list[int] = []
        self._lengths: list[int] = []
        self._data = io.BytesIO()
        # each undo record's own digests: a large record is split over several undo
        # records, and each must describe its own spans (pre: the patched bytes)
        self._pre, self._post = hashlib.sha256(), hashlib.sha256()

    def add(self, plan: Plan, i: int, j: int, old: bytes, new: bytes) -> None:
        """Spans ``i:j`` of ``plan``: their original bytes ``old`` and the bytes the
        patch writes there, ``new`` (both concatenated in span order)."""
        _, unit = type_layout(plan.record.type)
        pos = 0
        for off, n in zip(plan.offsets[i:j].tolist(), plan.lengths[i:j].tolist()):
            if self._plan is not plan or (
                self._data.tell() + n + 8 * (len(self._starts) + 1) + 64 > MAX_RECORD_PAYLOAD
            ):
                self._flush()
                self._plan = plan
            start = (off - plan.tensor_offset) // unit
            if self._starts and self._starts[-1] + self._lengths[-1] == start:
                self._lengths[-1] += n // unit
            else:
                self._starts.append(start)
                self._lengths.append(n // unit)
            self._data.write(old[pos : pos + n])
            self._post.update(old[pos : pos + n])
            self._pre.update(new[pos : pos + n])
            pos += n

    def _flush(self) -> None:
        if self._plan is None or not self._starts:
            return
        r = self._plan.record
        payload = encode_runs(self._starts, self._lengths) + self._data.getvalue()
        self.records.append(Record(
            file=r.file, tensor=r.tensor, type=r.type, shape=r.shape, encoding=ENC_REPLACE,
            offset=self.payload.tell(), length=len(payload), params={},
            pre_digest=self._pre.hexdigest(), post_digest=self._post.hexdigest(),
        ))
        self.payload.write(payload)
        self._plan, self._starts, self._lengths, self._data = None, [], [], io.BytesIO()
        self._pre, self._post = hashlib.sha256(), hashlib.sha256()

    def write(self, path: Path) -> None:
        self._flush()
        header = DeltaHeader(
            artifact_format=self.h.artifact_format, base_identity=self.h.target_identity,
            target_identity=self.h.base_identity, from_version=self.h.to_version,
            to_version=self.h.from_version, payload_bytes=self.payload.tell(),
            records=self.records, created={"by": "cdcca-edge patch --undo-out", "kind": UNDO_KIND},
        )
        self.payload.seek(0)
        try:
            write_delta(path, header, self.payload)
        finally:
            self.payload.close()
