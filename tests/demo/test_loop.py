"""The embedded benchmark (`cdcca-edge demo --quick`): two rounds of the whole loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from cdcca_edge.cli import main  # noqa: E402
from tests.requires import needs_llama  # noqa: E402


def test_demo_quick(tmp_path, monkeypatch, capsys):
    needs_llama()  # the demo's device runs the language part on llama.cpp
    monkeypatch.setenv("CDCCA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--rounds", "2", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    from cdcca_edge.core.artifact import compute_identity, open_artifact

    device = Path(report["device_artifact"])
    for r in report["rounds"]:
        for key in ("target_accuracy", "source_accuracy", "teacher_accuracy"):
            assert 0.0 <= r[key] <= 1.0
        assert 0 < r["uplink_bytes"] < r["raw_input_bytes"]
        assert r["anchor_bytes"] <= r["uplink_bytes"]
        assert 0 < r["downlink_bytes"] < r["artifact_bytes"]
        assert r["patch_seconds"] > 0 and len(r["identity"]) == 64
    # the demo raises when the mirror and the device part ways; the last identity is the device's
    assert report["rounds"][-1]["identity"] == compute_identity(open_artifact(device)).digest
    assert report["rounds"][0]["identity"] != report["rounds"][1]["identity"]
    assert set(report["ablations"]["variants"]) == {"akd", "akd_random_selection", "pseudo_label_only",
                                                   "logit_kd_only", "akd_teacher_weighted"}
    # the anchor set carries every visual token, an upload half of them
    from cdcca_edge.core import uplink_format as U
    from cdcca_edge.core.uplink_format import read_uplink

    work = out / "work"
    for bundle, frac in (("uplink-anchor.cdcu", 1.0), ("uplink-1.cdcu", 0.5)):
        for smp in read_uplink(work / bundle).samples():
            n = int(smp.meta[U.N_VISUAL_TOKENS])
            assert len(smp.arrays[U.VISUAL_POSITIONS]) == round(n * frac)
    for name in ("report.md", "report.json", "accuracy.png", "bytes.png"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "report.json").read_text())["rounds"] == report["rounds"]
