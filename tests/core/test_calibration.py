"""Calibration files (docs/formats/uplink.md, section 4): a file the cloud may ship to a
device is hostile until checked. Each bad field is refused with FormatError naming it."""

from __future__ import annotations

import json
import math

import pytest

from cdcca_edge.core.calibration import Calibration, VisualStats
from cdcca_edge.core.errors import FormatError
from tests.hostile import hostile


def _good(tmp_path):
    cal = Calibration("a" * 64, "surprise", 0.1, 1.5, 0.2, 2.0, 16, 50, 400, quantiles={"q50": 0.3},
                      visual=VisualStats([0.0, 1.0], [1.0, 2.0], 0.5))
    cal.save(tmp_path / "c.json")
    return cal, json.loads((tmp_path / "c.json").read_text())


BAD = {
    "identity short": ("artifact_identity", "ab"),
    "identity upper": ("artifact_identity", "A" * 64),
    "unknown score": ("score", "vibes"),
    "rate 0": ("rate", 0),
    "rate 1": ("rate", 1.0),
    "rate a string": ("rate", "0.1"),
    "rate a bool": ("rate", True),
    "threshold nan": ("threshold", math.nan),
    "threshold a 400-digit integer": ("threshold", 10**400),
    "threshold inf": ("token_threshold", math.inf),
    "threshold missing": ("threshold", None),
    "max_tokens negative": ("max_tokens", -1),
    "max_tokens a float": ("max_tokens", 16.0),
    "n_samples a string": ("n_samples", "50"),
    "quantiles a list": ("quantiles", [0.1]),
    "quantile nan": ("quantiles", {"q50": math.nan}),
    "visual a list": ("visual", [1, 2]),
    "visual lengths differ": ("visual", {"mean": [0.0], "var": [1.0, 2.0], "keep": 0.5}),
    "visual empty": ("visual", {"mean": [], "var": [], "keep": 0.5}),
    "visual zero var": ("visual", {"mean": [0.0], "var": [0.0], "keep": 0.5}),
    "visual nan mean": ("visual", {"mean": [math.nan], "var": [1.0], "keep": 0.5}),
    "visual keep 0": ("visual", {"mean": [0.0], "var": [1.0], "keep": 0}),
    "visual keep 2": ("visual", {"mean": [0.0], "var": [1.0], "keep": 2}),
}

_IMG = {"mean": [0.0], "var": [1.0], "keep": 0.5, "images": [[0.0, 1.0], [0.5, 1.2], [0.2, 0.9]],
        "image_var": [0.1, 0.2], "image_scale": 1.3, "image_weight": 2.0}
BAD.update({
    f"visual images: {name}": ("visual", {**_IMG, **change}) for name, change in {
        "one image": {"images": [[0.0, 1.0]]},
        "wrong width": {"images": [[0.0], [1.0]]},
        "not a list": {"images": "x"},
        "a nan": {"images": [[0.0, math.nan], [0.5, 1.2]]},
        "a row not a list": {"images": [[0.0, 1.0], 3]},
        "too many": {"images": [[0.0, 1.0]] * 4097},
        "no image_var": {"image_var": None},
        "image_var zero": {"image_var": [0.1, 0.0]},
        "image_var short": {"image_var": [0.1]},
        "scale 0": {"image_scale": 0},
        "scale inf": {"image_scale": math.inf},
        "weight negative": {"image_weight": -1.0},
        "weight a bool": {"image_weight": True},
    }.items()
})


def test_round_trip_with_image_descriptors(tmp_path):
    cal, doc = _good(tmp_path)
    doc["visual"] = _IMG
    (tmp_path / "i.json").write_text(json.dumps(doc))
    got = Calibration.load(tmp_path / "i.json").visual
    assert got.images == _IMG["images"] and got.image_var == _IMG["image_var"]
    assert (got.image_scale, got.image_weight) == (1.3, 2.0)
    got_path = tmp_path / "again.json"
    Calibration.load(tmp_path / "i.json").save(got_path)
    assert Calibration.load(got_path).visual == got


def test_round_trip(tmp_path):
    cal, _ = _good(tmp_path)
    assert Calibration.load(tmp_path / "c.json") == cal


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_field_is_refused_naming_it(tmp_path, case):
    _, doc = _good(tmp_path)
    key, value = BAD[case]
    if value is None:
        del doc[key]
    else:
        doc[key] = value
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    hostile("calibration")
    with pytest.raises(FormatError, match=key):
        Calibration.load(tmp_path / "bad.json")


@pytest.mark.parametrize("raw", [b"", b"\xff\xfe", b"[" * 100000, b'{"format": "cdcca-calibration"}',
                                 b'{"format": "cdcca-calibration", "version": 2}', b"null"])
def test_not_a_calibration_file(tmp_path, raw):
    (tmp_path / "bad.json").write_bytes(raw)
    hostile("calibration")
    with pytest.raises(FormatError):
        Calibration.load(tmp_path / "bad.json")


def test_a_fifo_is_refused_without_blocking(tmp_path):
    import os

    os.mkfifo(tmp_path / "fifo.json")
    hostile("calibration")
    with pytest.raises(FormatError, match="not a regular file"):
        Calibration.load(tmp_path / "fifo.json")
