"""Directory-artefact packs (core.pack): deterministic, round trip, hostile packs refused
with nothing written, and a whole-directory install cut short finished or undone."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdcca_edge.core.errors import FormatError
from cdcca_edge.core.pack import (
    finish_directory_install,
    pack_directory,
    packed_files,
    replaced_path,
    staging_path,
    swap_in,
    unpack_directory,
)


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _read(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


names = st.from_regex(r"[a-z0-9_]{1,8}(\.[a-z]{1,4})?", fullmatch=True)


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(st.lists(names, min_size=1, max_size=3).map("/".join), st.binary(max_size=3000),
                       min_size=1, max_size=6))
def test_round_trip_and_deterministic(tmp_path_factory, files):
    root = tmp_path_factory.mktemp("a")
    files = {k: v for k, v in files.items() if not any(k.startswith(o + "/") for o in files)}  # file vs dir
    _tree(root / "src", files)
    a, b = root / "a.tar", root / "b.tar"
    pack_directory(root / "src", a)
    os.utime(root / "src" / next(iter(files)), (1, 1))  # mtimes are not packed
    pack_directory(root / "src", b)
    assert a.read_bytes() == b.read_bytes()
    unpack_directory(a, root / "out")
    assert _read(root / "out") == files


def test_device_state_and_hidden_files_are_not_packed(tmp_path):
    src = _tree(tmp_path / "m", {"model.onnx": b"x", "cdcca-state.json": b"{}", "cdcca-state.leaves": b"l",
                                 "cdcca-journal": b"j", ".model.onnx.tmp": b"t", "cdcca-artifact.json": b"{}",
                                 "vision/model.onnx": b"v"})
    assert packed_files(src) == ["cdcca-artifact.json", "model.onnx", "vision/model.onnx"]


def _hostile(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    out = tmp_path / "bad.tar"
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return out


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type, m.linkname = kind, link
    return m


@pytest.mark.parametrize("members,problem", [
    ([(_member("../evil"), b"x")], "not a plain relative path"),
    ([(_member("/etc/evil"), b"x")], "not a plain relative path"),
    ([(_member("a/../../evil"), b"x")], "not a plain relative path"),
    ([(_member(".hidden"), b"x")], "not a plain relative path"),
    ([(_member("link", tarfile.SYMTYPE, "/etc/passwd"), b"")], "link or special file"),
    ([(_member("hard", tarfile.LNKTYPE, "model.onnx"), b"")], "link or special file"),
    ([(_member("fifo", tarfile.FIFOTYPE), b"")], "link or special file"),
    ([(_member("dev", tarfile.CHRTYPE), b"")], "link or special file"),
    ([(_member("a"), b"1"), (_member("a"), b"2")], "appears twice"),
    ([(_member("cdcca-journal"), b"j")], "device state"),
    ([(_member("a"), b"1"), (_member("a/b"), b"2")], "both a file and a directory"),
    ([], "empty pack"),
])
def test_hostile_packs_are_refused_and_nothing_is_written(tmp_path, members, problem):
    bad = _hostile(tmp_path, members)
    with pytest.raises(FormatError, match=problem):
        unpack_directory(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path.parent / "evil").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "gzip"])
def test_damaged_packs_are_refused(tmp_path, damage):
    src = _tree(tmp_path / "m", {"model.onnx": os.urandom(5000), "tok.json": b"{}"})
    pack = tmp_path / "p.tar"
    pack_directory(src, pack)
    data = pack.read_bytes()
    if damage == "truncate":
        pack.write_bytes(data[:1500])
    elif damage == "garbage":
        pack.write_bytes(os.urandom(len(data)))
    else:  # compressed: refused rather than decompressed (no bomb)
        import gzip

        pack.write_bytes(gzip.compress(data))
    with pytest.raises(FormatError):
        unpack_directory(pack, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cut", ["staged", "renamed_away"])
def test_an_install_cut_between_renames_is_finished_or_undone(tmp_path, cut):
    model = _tree(tmp_path / "model", {"model.onnx": b"old"})
    staged = _tree(staging_path(model), {"model.onnx": b"new"})
    if cut == "staged":  # crash before the first rename: the old model stays, the staging goes
        assert finish_directory_install(model) is None
        assert (model / "model.onnx").read_bytes() == b"old"
    else:  # crash between the renames: the complete new one is put in place
        os.replace(model, replaced_path(model))
        assert finish_directory_install(model) == "the interrupted update was completed"
        assert (model / "model.onnx").read_bytes() == b"new"
    assert not staged.exists() and not replaced_path(model).exists()


def test_an_install_with_only_the_old_directory_left_is_undone(tmp_path):
    model = _tree(tmp_path / "model", {"model.onnx": b"old"})
    os.replace(model, replaced_path(model))
    assert finish_directory_install(model) == "the interrupted update was undone"
    assert (model / "model.onnx").read_bytes() == b"old"


def test_swap_in(tmp_path):
    model = _tree(tmp_path / "model", {"model.onnx": b"old", "gone.txt": b"x"})
    staged = _tree(staging_path(model), {"model.onnx": b"new"})
    swap_in(staged, model)
    assert _read(model) == {"model.onnx": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
