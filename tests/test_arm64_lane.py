"""tools/arm64_lane.py refuses to run where it cannot, naming what is missing (CI must
fail there, never pass without having run the aarch64 tests)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import arm64_lane  # noqa: E402


def test_without_root_it_fails_naming_root(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("CDCCA_CACHE", str(tmp_path))
    monkeypatch.setattr(arm64_lane.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(sys, "argv", ["arm64_lane.py"])
    assert arm64_lane.main() == 2
    err = capsys.readouterr().err
    assert "cannot run here" in err and "needs root" in err and "sudo make test-arm64" in err


def test_without_the_tools_and_no_apt_it_fails_naming_them(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("CDCCA_CACHE", str(tmp_path))
    monkeypatch.setattr(arm64_lane.os, "geteuid", lambda: 0)
    monkeypatch.setattr(arm64_lane.shutil, "which", lambda exe: None)
    monkeypatch.setattr(sys, "argv", ["arm64_lane.py"])
    assert arm64_lane.main() == 2
    err = capsys.readouterr().err
    for name in arm64_lane.APT:
        assert name in err


def test_wheels_without_a_cross_compiler_fail_naming_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("CDCCA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(arm64_lane.shutil, "which", lambda exe: None)
    monkeypatch.setattr(sys, "argv", ["arm64_lane.py", "--wheels", str(tmp_path)])
    assert arm64_lane.main() == 2
    assert "aarch64-linux-gnu-g++ is missing" in capsys.readouterr().err
    assert not (tmp_path / "generic").exists() and not (tmp_path / "pi5").exists()
