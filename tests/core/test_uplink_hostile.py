"""Hostile uplink bundles (docs/formats/uplink.md section 4): every forged bundle carries a
valid digest and must be refused with ``FormatError`` (CLI exit 3) naming the problem and
the fix, inflating no more than the sizes it declares, and leaving the file as it was.

Cases are generated (hypothesis) or tabled; each calls ``hostile("uplink")`` once.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdcca_edge.core import uplink_format as uf
from cdcca_edge.core.errors import FormatError
from tests.core.uplink_forge import MIB, block, bundle, good_arrays, zlib_stream
from tests.hostile import hostile

# what each refusal must tell the user to do
FIXES = ("collect it again", "Copy the bundle again", "upgrade cdcca-edge")


class _CountingInflater:
    """zlib.decompressobj that counts what it inflates."""

    total = 0

    def __init__(self) -> None:
        self._d = zlib.decompressobj()

    def decompress(self, data: bytes, max_length: int = 0) -> bytes:
        out = self._d.decompress(data, max_length)
        _CountingInflater.total += len(out)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._d, name)


@contextmanager
def counting() -> Iterator[type[_CountingInflater]]:
    shim = mock.Mock(decompressobj=_CountingInflater, error=zlib.error)
    _CountingInflater.total = 0
    with mock.patch.object(uf, "zlib", shim):
        yield _CountingInflater


def refuse(path: Path, raw: bytes, match: str | None = None) -> FormatError:
    """Write ``raw``, read it all, expect FormatError; the directory is left as it was."""
    path.write_bytes(raw)
    before = sorted(os.listdir(path.parent))
    declared = 0
    with counting() as c, pytest.raises(FormatError, match=match) as err:
        b = uf.read_uplink(path)
        declared = sum(e["length"] for e in b.index)
        for _ in b.samples():
            pass
    # a reader inflates what the index declares, plus one byte to see that nothing follows
    assert c.total <= declared + 1, (c.total, declared)
    assert any(f in str(err.value) for f in FIXES), str(err.value)
    assert path.read_bytes() == raw and sorted(os.listdir(path.parent)) == before
    return err.value


def read_all(path: Path) -> list[uf.UplinkSample]:
    b = uf.read_uplink(path)
    return list(b.samples())


@pytest.fixture(scope="module")
def spot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One file, rewritten for each generated case (a few ms each)."""
    return tmp_path_factory.mktemp("hostile-uplink") / "b.cdcu"


def good_samples(n: int = 2, seed: int = 0) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(seed)
    return [(f"s{i}", block(f"s{i}", {"prompt": f"p{i}", "answer": "a", "uncertainty": 0.5, "raw_bytes": 10},
                            good_arrays(rng))) for i in range(n)]


def test_forged_good_bundle_reads(spot):
    """The forger itself writes what the reader accepts (so refusals below are earned)."""
    spot.write_bytes(bundle(good_samples(3)))
    got = read_all(spot)
    assert [s.id for s in got] == ["s0", "s1", "s2"] and got[0].arrays["prompt_ids"].dtype == np.uint32


# --- generated JSON values ----------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                    st.text(max_size=8))
json_values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                        st.dictionaries(st.text(max_size=4), c, max_size=3)),
                           max_leaves=8)


def deep(depth: int, kind: str) -> str:
    """JSON nested ``depth`` deep: arrays, objects, or both."""
    if kind == "list":
        return "[" * depth + "]" * depth
    if kind == "dict":
        return '{"a":' * depth + "1" + "}" * depth
    return '[{"a":' * (depth // 2) + "1" + "}]" * (depth // 2)


deep_json = st.builds(deep, st.integers(uf.MAX_JSON_DEPTH + 1, 60_000), st.sampled_from(["list", "dict", "mix"]))
huge_int = st.integers(4301, 20_000).map(lambda n: "1" * n)  # past Python's int-from-str limit


# --- header -------------------------------------------------------------------------------

# what makes each header field wrong (any other payload_bytes or samples disagrees with the file)
INVALID = {
    "format": lambda v: v != "cdcca-uplink",
    "version": lambda v: type(v) is not int or v != uf.FORMAT_VERSION,
    "artifact_identity": lambda v: not (isinstance(v, str) and len(v) == 64
                                        and not v.strip("0123456789abcdef")),
    "payload_bytes": lambda v: True,
    "samples": lambda v: True,
    "n_seen": lambda v: type(v) is not int or v < 0,
}
HEADER_KEYS = sorted(INVALID)


@st.composite
def header_attacks(draw: st.DrawFn) -> tuple[str, bytes]:
    samples = good_samples(2)
    kind = draw(st.sampled_from(["replace", "delete", "deep-field", "deep-whole", "huge-int", "not-object",
                                 "garbage", "not-utf8"]))
    if kind == "replace":
        key = draw(st.sampled_from(HEADER_KEYS))
        value = draw(json_values.filter(INVALID[key]))
        return kind, bundle(samples, header={key: value})
    if kind == "delete":
        key = draw(st.sampled_from(HEADER_KEYS))
        raw = bundle(samples)
        h = json.loads(raw[24 : 24 + struct.unpack_from("<Q", raw, 16)[0]])
        del h[key]
        return kind, bundle(samples, raw_header=json.dumps(h).encode())
    if kind == "deep-field":
        raw = bundle(samples, header={"calibration": "@"})
        text = raw[24 : 24 + struct.unpack_from("<Q", raw, 16)[0]].decode()
        return kind, bundle(samples, raw_header=text.replace('"@"', draw(deep_json)).encode())
    if kind == "deep-whole":
        return kind, bundle(samples, raw_header=draw(deep_json).encode())
    if kind == "huge-int":
        key = draw(st.sampled_from(["payload_bytes", "n_seen", "version", "extra"]))
        raw = bundle(samples, header={key: "@"})
        text = raw[24 : 24 + struct.unpack_from("<Q", raw, 16)[0]].decode()
        return kind, bundle(samples, raw_header=text.replace('"@"', draw(huge_int)).encode())
    if kind == "not-object":
        value = draw(json_values.filter(lambda v: not isinstance(v, dict)))
        return kind, bundle(samples, raw_header=json.dumps(value).encode())
    if kind == "garbage":
        return kind, bundle(samples, raw_header=draw(st.binary(max_size=64)))
    return kind, bundle(samples, raw_header=b'{"format": "\xff\xfe"}')


@settings(max_examples=450)
@given(case=header_attacks())
def test_hostile_headers(spot, case):
    hostile("uplink")
    refuse(spot, case[1])


def test_deeply_nested_header_is_a_format_error(spot):
    """Regression: 100,000 nested arrays raised RecursionError (exit 1)."""
    hostile("uplink")
    refuse(spot, bundle(good_samples(1), raw_header=deep(100_000, "list").encode()), match="nested deeper")


# --- the sample index ---------------------------------------------------------------------

@st.composite
def index_attacks(draw: st.DrawFn) -> bytes:
    samples = good_samples(3)
    index = [{"id": sid, "length": len(b)} for sid, b in samples]
    i = draw(st.integers(0, 2))
    kind = draw(st.sampled_from(["entry", "length", "id", "dup", "shift", "drop", "add", "total"]))
    if kind == "entry":
        index[i] = draw(json_values.filter(lambda v: not (isinstance(v, dict) and "id" in v and "length" in v)))
    elif kind == "length":
        index[i]["length"] = draw(st.one_of(
            st.sampled_from([0, -1, True, 1.5, "7", None, uf.MAX_SAMPLE_BYTES + 1, 2**64, 2**200]),
            st.integers(-(2**40), 0), st.integers(uf.MAX_SAMPLE_BYTES + 1, 2**80)))
    elif kind == "id":
        index[i]["id"] = draw(st.one_of(st.text(max_size=5).filter(lambda s: s != samples[i][0]),
                                        st.integers(), st.none(), st.lists(st.text(), max_size=2)))
    elif kind == "dup":
        index[(i + 1) % 3]["id"] = index[i]["id"]
    elif kind == "shift":  # move bytes from one block to its neighbour: the total still adds up
        k = draw(st.integers(1, 12)) * draw(st.sampled_from([-1, 1]))
        j = (i + 1) % 3
        if index[i]["length"] + k <= 0:
            k = -k
        index[i]["length"] += k
        index[j]["length"] -= k
    elif kind == "drop":
        del index[i]
    elif kind == "add":
        index.insert(i, {"id": "extra", "length": draw(st.integers(1, 4096))})
    else:  # lengths adding up to more than the format's maximum payload
        n = uf.MAX_PAYLOAD_BYTES // uf.MAX_SAMPLE_BYTES + draw(st.integers(1, 3))
        index = [{"id": f"x{k}", "length": uf.MAX_SAMPLE_BYTES} for k in range(n)]
    return bundle(samples, index=index)


@settings(max_examples=300)
@given(raw=index_attacks())
def test_hostile_indexes(spot, raw):
    hostile("uplink")
    refuse(spot, raw)


# --- sample blocks ------------------------------------------------------------------------

listing_entries = st.one_of(
    json_values,
    st.fixed_dictionaries({"name": st.one_of(st.text(max_size=6), st.integers(), st.none()),
                           "dtype": st.one_of(st.sampled_from([*uf.DTYPES, "f64", "U8", "", "i64"]), st.integers()),
                           "shape": st.one_of(json_values, st.lists(st.integers(-3, 2**40), max_size=5))}),
    # many dimensions: numpy stops at 64, the format at MAX_ARRAY_DIMS
    st.integers(uf.MAX_ARRAY_DIMS + 1, 200).map(lambda n: {"name": "x", "dtype": "u8", "shape": [1] * n}),
    st.sampled_from([{"name": "x", "dtype": "u8", "shape": [s]} for s in (-1, 1.0, True, "1", None, 2**64)]),
)


@st.composite
def block_attacks(draw: st.DrawFn) -> bytes:
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    arrays = good_arrays(rng, draw(st.integers(1, 8)), draw(st.integers(0, 8)))
    meta = {"prompt": "p", "answer": "a", "uncertainty": 0.5}
    kind = draw(st.sampled_from(["mlen", "meta", "meta-deep", "meta-int", "meta-garbage", "listing",
                                 "listing-add", "dup-array", "stray", "short", "field", "tiny"]))
    sid = "t"
    if kind == "mlen":
        good = len(json.dumps({**meta, "id": sid, "arrays": [
            {"name": k, "dtype": "x", "shape": list(v.shape)} for k, v in arrays.items()]}))
        raw = block(sid, meta, arrays, mlen=draw(st.integers(0, 2**32 - 1).filter(lambda m: abs(m - good) > 40)))
    elif kind == "meta":
        value = draw(json_values.filter(lambda v: not (isinstance(v, dict) and isinstance(v.get("id"), str))))
        raw = block(sid, raw_meta=json.dumps(value).encode())
    elif kind == "meta-deep":
        raw = block(sid, raw_meta=draw(deep_json).encode())
    elif kind == "meta-int":
        raw = block(sid, raw_meta=b'{"id": "t", "uncertainty": ' + draw(huge_int).encode() + b"}")
    elif kind == "meta-garbage":
        raw = block(sid, raw_meta=draw(st.binary(max_size=40)))
    elif kind == "listing":
        listing = [{"name": k, "dtype": next(d for d, (c, _) in uf.DTYPES.items() if np.dtype(c) == v.dtype),
                    "shape": list(v.shape)} for k, v in arrays.items()]
        listing[draw(st.integers(0, len(listing) - 1))] = draw(listing_entries)
        raw = block(sid, meta, arrays, listing=listing)
    elif kind == "listing-add":  # an extra listed array with no bytes behind it
        entry = draw(st.fixed_dictionaries({"name": st.just("more"), "dtype": st.sampled_from(list(uf.DTYPES)),
                                            "shape": st.lists(st.integers(1, 2**20), min_size=1, max_size=4)}))
        raw = block(sid, meta, arrays, listing=None, extra=b"")
        listing = json.loads(raw[4 : 4 + struct.unpack_from("<I", raw)[0]])["arrays"] + [entry]
        raw = block(sid, meta, arrays, listing=listing)
    elif kind == "dup-array":
        listing = [{"name": "prompt_ids", "dtype": "u32", "shape": [len(arrays["prompt_ids"])]}] * 2
        raw = block(sid, meta, {"a": arrays["prompt_ids"], "b": arrays["prompt_ids"]}, listing=listing)
    elif kind == "stray":
        raw = block(sid, meta, arrays, extra=draw(st.binary(min_size=1, max_size=16)))
    elif kind == "short":
        full = block(sid, meta, arrays)
        raw = full[: draw(st.integers(0, len(full) - 1))]
        if not raw:
            raw = b"\0"
    elif kind == "field":  # a field section 3 defines, of the wrong type
        key = draw(st.sampled_from(sorted(uf.KNOWN_FIELDS)))
        value = draw(json_values.filter(lambda v: v is not None and (
            not isinstance(v, uf.KNOWN_FIELDS[key]) or isinstance(v, bool))))
        raw = block(sid, {**meta, key: value}, arrays)
    else:  # fewer than the 4 bytes of M
        raw = draw(st.binary(min_size=1, max_size=3))
    lead = good_samples(1, seed=3) if draw(st.booleans()) else []
    return bundle(lead + [(sid, raw)])


@settings(max_examples=800)
@given(raw=block_attacks())
def test_hostile_sample_blocks(spot, raw):
    hostile("uplink")
    refuse(spot, raw)


def test_65_dimensions_is_a_format_error(spot):
    """Regression: an array of 65 dimensions made numpy raise ValueError (exit 1)."""
    hostile("uplink")
    listing = [{"name": "x", "dtype": "u8", "shape": [1] * 65}]
    raw = block("t", {}, {"x": np.zeros(1, np.uint8)}, listing=listing)
    refuse(spot, bundle([("t", raw)]), match="dimensions")


# --- the arrays section 3 defines ---------------------------------------------------------

bad_floats = st.sampled_from([np.nan, np.inf, -np.inf, -1.0, -1e-3, -65504.0])


@st.composite
def array_attacks(draw: st.DrawFn) -> tuple[str, dict[str, np.ndarray], dict[str, Any]]:
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    t_a = draw(st.integers(1, 8))
    a = good_arrays(rng, draw(st.integers(1, 8)), t_a)
    meta: dict[str, Any] = {}
    kind = draw(st.sampled_from(["weights", "dtype", "ndim", "lengths", "empty-prompt", "scores",
                                 "visual-scales", "visual-len", "visual-order", "visual-range", "visual-nan",
                                 "visual-orphan", "raw-image"]))
    if kind == "weights":  # the regression: NaN, infinite, negative loss weights
        w = a["token_weights"].copy()
        for i in draw(st.lists(st.integers(0, t_a - 1), min_size=1, max_size=t_a, unique=True)):
            w[i] = draw(bad_floats)
        a["token_weights"] = w
    elif kind == "dtype":
        name = draw(st.sampled_from(sorted(a)))
        code = draw(st.sampled_from([c for c in uf.DTYPES if c not in uf.KNOWN_ARRAYS[name][0]]))
        a[name] = a[name].astype(uf.DTYPES[code][0])
    elif kind == "ndim":  # every known array here is 1-D: give it 0, 2 or 3 dimensions
        name = draw(st.sampled_from(sorted(a)))
        n = len(a[name])
        shapes = [(1, n), (n, 1), (1, 1, n)] + ([()] if n == 1 else [])
        a[name] = a[name].reshape(draw(st.sampled_from(shapes)))
    elif kind == "lengths":
        name = draw(st.sampled_from(list(uf.ANSWER_ARRAYS)))
        extra = draw(st.integers(1, 4))
        a[name] = np.concatenate([a[name], a[name][:1].repeat(extra)]) if draw(st.booleans()) else a[name][:-1]
        if len(a[name]) == t_a:
            a[name] = a[name][:0]
    elif kind == "empty-prompt":
        a["prompt_ids"] = a["prompt_ids"][:0]
    elif kind == "scores":
        a["sample_scores"] = rng.random(draw(st.sampled_from([0, 1, 3, 5, 8]))).astype(np.float32)
    else:
        k, d = draw(st.integers(1, 6)), draw(st.integers(1, 8))
        a["visual_features"] = rng.integers(-127, 128, (k, d)).astype(np.int8)
        a["visual_scales"] = rng.random(k).astype(np.float16)
        a["visual_positions"] = np.arange(k, dtype=np.uint16) * 2
        meta["n_visual_tokens"] = 2 * k
        if kind == "visual-scales":  # int8 without scales, or float16 with them
            if draw(st.booleans()):
                del a["visual_scales"]
            else:
                a["visual_features"] = a["visual_features"].astype(np.float16)
        elif kind == "visual-len":
            name = draw(st.sampled_from(["visual_scales", "visual_positions"]))
            a[name] = np.concatenate([a[name], a[name][:1]])
        elif kind == "visual-order":
            a["visual_positions"] = np.concatenate([a["visual_positions"], a["visual_positions"][-1:]])
            a["visual_features"] = np.concatenate([a["visual_features"], a["visual_features"][:1]])
            a["visual_scales"] = np.concatenate([a["visual_scales"], a["visual_scales"][:1]])
        elif kind == "visual-range":
            meta["n_visual_tokens"] = int(a["visual_positions"][-1]) - draw(st.integers(0, 1))
            if meta["n_visual_tokens"] < 1:
                meta["n_visual_tokens"] = 0
        elif kind == "visual-nan":
            s = a["visual_scales"].copy()
            s[draw(st.integers(0, k - 1))] = draw(st.sampled_from([np.nan, np.inf]))
            a["visual_scales"] = s
        elif kind == "visual-orphan":
            del a["visual_features"]
            del a[draw(st.sampled_from(["visual_scales", "visual_positions"]))]
        else:
            a["raw_image"] = rng.integers(0, 255, draw(st.sampled_from([(2, 2, 4), (2, 2), (1, 1, 1, 3)]))
                                          ).astype(np.uint8)
    return kind, a, meta


@settings(max_examples=500)
@given(case=array_attacks())
def test_hostile_known_arrays(spot, case):
    kind, arrays, meta = case
    hostile("uplink")
    refuse(spot, bundle([("t", block("t", meta, arrays))]))
    # the writer refuses to produce them too (a device cannot upload what the cloud refuses)
    with pytest.raises(FormatError):
        uf.UplinkSample("t", meta, arrays).encode()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, -0.5])
def test_bad_token_weights_are_named(spot, bad):
    """Regression: NaN / infinite / negative token weights went into training unchecked."""
    hostile("uplink")
    a = good_arrays(np.random.default_rng(0))
    a["token_weights"] = np.array([1.0, bad, 0.1, 1.0], np.float16)
    err = refuse(spot, bundle([("t", block("t", {}, a))]), match="token_weights")
    assert "finite and >= 0" in str(err)


# --- the payload: inflation bounded by the declared sizes ---------------------------------

@st.composite
def payload_attacks(draw: st.DrawFn) -> bytes:
    samples = good_samples(draw(st.integers(1, 3)), seed=draw(st.integers(0, 50)))
    blob = b"".join(b for _, b in samples)
    kind = draw(st.sampled_from(["more-zeros", "more-bytes", "less", "cut-stream", "trailing", "two-streams",
                                 "not-zlib", "random", "claims-1-byte", "bomb"]))
    index = None
    if kind == "more-zeros":  # inflates to far more than the index declares
        payload = zlib_stream([blob, draw(st.integers(1, 8))])
    elif kind == "more-bytes":
        payload = zlib.compress(blob + draw(st.binary(min_size=1, max_size=64)))
    elif kind == "less":
        payload = zlib.compress(blob[: draw(st.integers(0, len(blob) - 1))])
    elif kind == "cut-stream":
        full = zlib.compress(blob)
        payload = full[: draw(st.integers(0, len(full) - 1))]
    elif kind == "trailing":
        payload = zlib.compress(blob) + draw(st.binary(min_size=1, max_size=16))
    elif kind == "two-streams":
        cut = draw(st.integers(1, len(blob) - 1))
        payload = zlib.compress(blob[:cut]) + zlib.compress(blob[cut:])
    elif kind == "not-zlib":
        payload = draw(st.binary(min_size=1, max_size=256))
    elif kind == "random":  # a valid zlib stream of random bytes
        payload = zlib.compress(draw(st.binary(min_size=1, max_size=512)))
    elif kind == "claims-1-byte":  # the regression: 1 byte claimed, megabytes of zeros sent
        index = [{"id": "z", "length": draw(st.integers(1, 3))}]
        payload = zlib_stream([draw(st.integers(1, 16))])
    else:  # claims large samples of zeros: no metadata in them
        n = draw(st.integers(1, 8))
        index = [{"id": f"z{i}", "length": draw(st.integers(1, 8)) * MIB} for i in range(n)]
        payload = zlib_stream([sum(e["length"] for e in index) // MIB])
    return bundle(samples, index=index, payload=payload)


@settings(max_examples=350)
@given(raw=payload_attacks())
def test_hostile_payloads(spot, raw):
    hostile("uplink")
    refuse(spot, raw)


# --- valid input still reads --------------------------------------------------------------

@settings(max_examples=60)
@given(seed=st.integers(0, 2**16), n=st.integers(0, 4), t_p=st.integers(1, 40), t_a=st.integers(0, 20),
       visual=st.booleans())
def test_write_read_is_identity(spot, seed, n, t_p, t_a, visual):
    """The stricter reader accepts everything the writer writes."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        a = good_arrays(rng, t_p, t_a)
        meta: dict[str, Any] = {"prompt": "p", "uncertainty": float(rng.random()), "raw_bytes": 3}
        if visual:
            k = int(rng.integers(1, 5))
            a["visual_features"] = rng.integers(-127, 128, (k, 6)).astype(np.int8)
            a["visual_scales"] = rng.random(k).astype(np.float16)
            a["visual_positions"] = np.sort(rng.choice(20, k, replace=False)).astype(np.uint16)
            a["raw_image"] = rng.integers(0, 255, (3, 2, 3)).astype(np.uint8)
            meta["n_visual_tokens"] = 20
        samples.append(uf.UplinkSample(f"s{i}", meta, a))
    uf.write_uplink(spot, {"artifact_identity": "b" * 64, "n_seen": n}, samples)
    got = read_all(spot)
    assert [s.id for s in got] == [s.id for s in samples]
    for want, s in zip(samples, got):
        assert s.meta == want.meta and set(s.arrays) == set(want.arrays)
        for k, v in want.arrays.items():
            assert s.arrays[k].dtype == v.dtype
            np.testing.assert_array_equal(s.arrays[k], v)


# --- the command line: exit 3 and a message, never "unexpected error" ---------------------

@pytest.mark.parametrize("case", ["deep header", "deep metadata", "65 dimensions", "nan weights",
                                  "huge int", "shape Infinity"])
def test_cli_inspect_exits_3(spot, case, capsys):
    from cdcca_edge.cli import main

    hostile("uplink")
    a = good_arrays(np.random.default_rng(1))
    if case == "deep header":
        raw = bundle(good_samples(1), raw_header=deep(200_000, "mix").encode())
    elif case == "deep metadata":
        raw = bundle([("t", block("t", raw_meta=deep(200_000, "list").encode()))])
    elif case == "65 dimensions":
        raw = bundle([("t", block("t", {}, {"x": np.zeros(1, np.uint8)},
                                  listing=[{"name": "x", "dtype": "u8", "shape": [1] * 65}]))])
    elif case == "nan weights":
        a["token_weights"] = np.full(4, np.nan, np.float16)
        raw = bundle([("t", block("t", {}, a))])
    elif case == "huge int":
        raw = bundle([("t", block("t", raw_meta=b'{"id":"t","raw_bytes":' + b"9" * 10_000 + b"}"))])
    else:
        meta = b'{"id":"t","arrays":[{"name":"x","dtype":"u8","shape":[Infinity]}]}'
        raw = bundle([("t", block("t", raw_meta=meta))])
    spot.write_bytes(raw)
    assert main(["uplink", "inspect", str(spot)]) == 3
    err = capsys.readouterr().err
    assert "error (FormatError)" in err and "unexpected" not in err and "collect it again" in err
    assert spot.read_bytes() == raw


# --- memory: a small file cannot make the reader allocate what it only claims -------------

_PROBE = textwrap.dedent("""
    import resource, sys
    limit = 1 << 30  # 1 GiB of address space: the old reader died of MemoryError under it
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from cdcca_edge.cli import main
    rc = main(["uplink", "inspect", "--json", sys.argv[1]])
    # VmHWM: this program's peak RSS (ru_maxrss would include the parent's, from before exec)
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    sys.stderr.write("\\nMAXRSS_KB %d\\n" % int(hwm.split()[1]))
    sys.exit(rc)
""")


def _meta_block_prefix(sid: str, nbytes: int) -> bytes:
    """The metadata of a sample holding one u8 array of ``nbytes`` (its bytes follow)."""
    m = json.dumps({"id": sid, "arrays": [{"name": "blob", "dtype": "u8", "shape": [nbytes]}]}).encode()
    return struct.pack("<I", len(m)) + m


def _memory_case(case: str) -> tuple[bytes, int]:
    """(bundle, expected exit code)"""
    good = good_samples(1)
    if case == "1 byte claimed, 1 GiB sent":
        return bundle(good, index=[{"id": "s0", "length": 1}], payload=zlib_stream([1024])), 3
    if case == "valid sample, then 1 GiB more":
        return bundle(good, payload=zlib_stream([good[0][1], 1024])), 3
    if case == "eight 64 MiB samples of zeros":
        index = [{"id": f"z{i}", "length": 64 * MIB} for i in range(8)]
        return bundle(good, index=index, payload=zlib_stream([8 * 64])), 3
    # eight valid samples of 64 MiB (one u8 array of zeros each): 512 MiB in a 600 KB file
    parts: list[bytes | int] = []
    index = []
    for i in range(8):
        nbytes = 64 * MIB - len(_meta_block_prefix(f"v{i}", 64 * MIB))  # same digit count
        prefix = _meta_block_prefix(f"v{i}", nbytes)
        assert len(prefix) + nbytes == 64 * MIB
        parts += [prefix, nbytes // MIB, bytes(nbytes % MIB)]
        index.append({"id": f"v{i}", "length": 64 * MIB})
    return bundle(good, index=index, payload=zlib_stream(parts)), 0


@pytest.mark.parametrize("case", ["1 byte claimed, 1 GiB sent", "valid sample, then 1 GiB more",
                                  "eight 64 MiB samples of zeros", "eight valid 64 MiB samples"])
def test_inspect_memory_is_bounded(tmp_path, case):
    """Regressions: a 1 MB bundle claiming a 1-byte sample needed 2.1 GB to inspect; a 2 MB
    one with eight large samples 3.4 GB. Now: exit 3 (or 0 for a valid bundle) within
    1 GiB of address space, peak memory about one sample."""
    hostile("uplink")
    raw, want = _memory_case(case)
    assert len(raw) < 2 * MIB
    path = tmp_path / "b.cdcu"
    path.write_bytes(raw)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "CDCCA_DEBUG": ""}
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == want, proc.stderr[-2000:]
    peak = int(proc.stderr.rsplit("MAXRSS_KB", 1)[1]) * 1024
    # refused: nothing large allocated; valid: the sample being read and the one before it
    assert peak < (256 * MIB if want else 2 * uf.MAX_SAMPLE_BYTES + 256 * MIB), peak
    if want:
        assert "error (FormatError)" in proc.stderr and "unexpected" not in proc.stderr
    else:
        assert len(json.loads(proc.stdout)["samples"]) == 8
    assert path.read_bytes() == raw
