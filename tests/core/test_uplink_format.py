"""The uplink bundle format: exact round trips; malformed bundles raise its own errors."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cdcca_edge.core import uplink_format as uf
from cdcca_edge.core.errors import FormatError, IntegrityError
from tests.hostile import hostile


def _samples(n=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        out.append(uf.UplinkSample(f"s{i}", {"prompt": f"what is {i}?", "uncertainty": 0.5 + i}, {
            "prompt_ids": rng.integers(0, 50000, 7).astype(np.uint32),
            "token_weights": rng.random(5).astype(np.float16),
            "token_flags": (rng.random(5) > 0.5).astype(np.uint8),
            "visual_features": rng.integers(-128, 128, (4, 16)).astype(np.int8),
            "visual_scales": rng.random(4).astype(np.float16),
            "visual_positions": np.array([0, 3, 7, 9], np.uint16),
            "sample_scores": rng.random(4).astype(np.float32),
        }))
    return out


def test_round_trip(tmp_path):
    samples = _samples()
    full = uf.write_uplink(tmp_path / "b.cdcu", {"artifact_identity": "a" * 64, "n_seen": 10}, samples)
    b = uf.read_uplink(tmp_path / "b.cdcu")
    assert b.header["n_seen"] == 10 and len(b) == 3 and full["payload_bytes"] == b.header["payload_bytes"]
    for want, got in zip(samples, b.samples()):
        assert got.id == want.id and got.meta == want.meta
        assert set(got.arrays) == set(want.arrays)
        for k in want.arrays:
            assert got.arrays[k].dtype == want.arrays[k].dtype
            np.testing.assert_array_equal(got.arrays[k], want.arrays[k])
    # the digest covers everything: it is the file's SHA-256 minus the trailer
    raw = (tmp_path / "b.cdcu").read_bytes()
    assert hashlib.sha256(raw[:-32]).digest() == raw[-32:]


def test_empty_bundle(tmp_path):
    uf.write_uplink(tmp_path / "e.cdcu", {"artifact_identity": "a" * 64, "n_seen": 4}, [])
    assert list(uf.read_uplink(tmp_path / "e.cdcu").samples()) == []


def test_unsupported_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype"):
        uf.UplinkSample("x", {}, {"bad": np.zeros(3, np.float64)}).encode()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    p = tmp_path_factory.mktemp("up") / "b.cdcu"
    uf.write_uplink(p, {"artifact_identity": "a" * 64, "n_seen": 9}, _samples(4, seed=1))
    return p.read_bytes()


def _read_all(path):
    b = uf.read_uplink(path)
    return [s for s in b.samples()]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncated_or_flipped_bundle_raises_format_errors(good, tmp_path_factory, data):
    raw = bytearray(good)
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 3))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
    assume(bytes(raw) != good)
    hostile("uplink")
    p = tmp_path_factory.mktemp("fz") / "b.cdcu"
    p.write_bytes(bytes(raw))
    with pytest.raises((FormatError, IntegrityError)):
        _read_all(p)


def _forge(raw: bytes, header_edit=None, payload=None) -> bytes:
    """Rewrite header/payload and recompute a valid digest (a buggy or hostile sender)."""
    magic, version, flags, hlen = uf.PREAMBLE.unpack_from(raw)
    header = json.loads(raw[uf.PREAMBLE.size : uf.PREAMBLE.size + hlen])
    pay = raw[uf.PREAMBLE.size + hlen : -32] if payload is None else payload
    if header_edit:
        header_edit(header)
    header["payload_bytes"] = len(pay)
    hb = json.dumps(header).encode()
    body = uf.PREAMBLE.pack(magic, version, flags, len(hb)) + hb + pay
    return body + hashlib.sha256(body).digest()


@pytest.mark.parametrize("case", ["length short", "length long", "dup id", "id mismatch",
                                  "not zlib", "extra data", "array past block", "bad dtype"])
def test_hostile_bundles(good, tmp_path, case):
    import zlib

    hostile("uplink")

    def meta_edit(fn):
        # decompress the payload, edit the first sample's metadata, recompress
        magic, version, flags, hlen = uf.PREAMBLE.unpack_from(good)
        header = json.loads(good[uf.PREAMBLE.size : uf.PREAMBLE.size + hlen])
        blob = zlib.decompress(good[uf.PREAMBLE.size + hlen : -32])
        n = header["samples"][0]["length"]
        first = uf.decode_sample(blob[:n], "x")
        arrays = first.arrays
        meta = {**first.meta, "id": first.id}
        listing = [{"name": k, "dtype": next(d for d, (c, _) in uf.DTYPES.items() if np.dtype(c) == v.dtype),
                    "shape": list(v.shape)} for k, v in arrays.items()]
        meta["arrays"] = listing
        fn(meta)
        mb = json.dumps(meta).encode()
        block = uf._U32.pack(len(mb)) + mb + b"".join(v.tobytes() for v in arrays.values())
        new_blob = block + blob[n:]

        def edit(h):
            h["samples"][0]["length"] = len(block)
        return _forge(good, edit, zlib.compress(new_blob))

    if case == "length short":
        forged = _forge(good, lambda h: h["samples"][0].update(length=h["samples"][0]["length"] - 3))
    elif case == "length long":
        forged = _forge(good, lambda h: h["samples"][-1].update(length=h["samples"][-1]["length"] + 50))
    elif case == "dup id":
        forged = _forge(good, lambda h: h["samples"][1].update(id=h["samples"][0]["id"]))
    elif case == "id mismatch":
        forged = _forge(good, lambda h: h["samples"][0].update(id="zzz"))
    elif case == "not zlib":
        forged = _forge(good, payload=b"not zlib at all" * 10)
    elif case == "extra data":
        magic, version, flags, hlen = uf.PREAMBLE.unpack_from(good)
        blob = zlib.decompress(good[uf.PREAMBLE.size + hlen : -32])
        forged = _forge(good, payload=zlib.compress(blob + b"extra"))
    elif case == "array past block":
        forged = meta_edit(lambda m: m["arrays"][0].update(shape=[10_000]))
    else:
        forged = meta_edit(lambda m: m["arrays"][0].update(dtype="f64"))
    p = tmp_path / "forged.cdcu"
    p.write_bytes(forged)
    with pytest.raises(FormatError):
        _read_all(p)


def test_not_a_bundle(tmp_path):
    hostile("uplink")
    (tmp_path / "x").write_bytes(b"hello world, this is not a bundle at all")
    with pytest.raises(FormatError, match="not an uplink bundle"):
        uf.read_uplink(tmp_path / "x")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_json_constants_are_refused(good, tmp_path, constant):
    """Python's JSON parser accepts NaN and Infinity; JSON does not, and neither does the
    format: a header holding one is a FormatError."""
    raw = _forge(good, header_edit=lambda h: h.update(extra="__CONSTANT__"))
    magic, version, flags, hlen = uf.PREAMBLE.unpack_from(raw)
    header = raw[uf.PREAMBLE.size : uf.PREAMBLE.size + hlen].replace(b'"__CONSTANT__"', constant.encode())
    body = uf.PREAMBLE.pack(magic, version, flags, len(header)) + header + raw[uf.PREAMBLE.size + hlen : -32]
    p = tmp_path / "c.cdcu"
    p.write_bytes(body + hashlib.sha256(body).digest())
    hostile("uplink")
    with pytest.raises(FormatError, match="not a JSON number"):
        uf.read_uplink(p)



def test_the_writer_refuses_non_finite_metadata(tmp_path):
    bad = uf.UplinkSample("s", {uf.META_UNCERTAINTY: float("nan")}, {})
    with pytest.raises(FormatError, match="non-finite"):
        uf.write_uplink(tmp_path / "x.cdcu", {"artifact_identity": "a" * 64, "n_seen": 1}, [bad])
    assert not (tmp_path / "x.cdcu").exists()
