"""A directory artefact (ONNX directory, multimodal bundle) as one file: what the cloud
service stores and serves as a whole-artefact update, and what a device unpacks.
Spec: docs/formats/sync.md, section 4.2.

The pack is a POSIX ustar archive, written deterministically (members sorted by path,
mtime 0, owner 0, modes 0644/0755), so the same directory always packs to the same
bytes and the same SHA-256. It holds the artefact's files only, never the device's own
state (sidecar, leaf cache, journal, trial undo): a device builds those itself.

Reading is hostile-input code: a pack comes over the network (signed, but signed bytes
can still be wrong), so every member must be a regular file or directory whose path
stays inside the destination, with no duplicates and no more than the limits below.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from cdcca_edge.core.errors import FormatError, UsageError
from cdcca_edge.core.fileio import fsync_dir, short_repr
from cdcca_edge.core.journal import JOURNAL_NAME

PACK_SUFFIX = ".tar"
# the device's own files inside a directory artefact (core.state, core.journal, cloud.dwc)
NOT_PACKED = frozenset({"cdcca-state.json", "cdcca-state.leaves", JOURNAL_NAME, "cdcca-trial-undo.cdcd"})
MAX_MEMBERS = 4096
MAX_DEPTH = 8
COPY_CHUNK = 1 << 20


def packed_files(root: Path) -> list[str]:
    """The relative paths (POSIX) a pack of ``root`` holds, sorted: every regular file,
    except the device's own state and hidden (temporary) files.

    Raises:
        FormatError: a symbolic link or special file inside (an artefact has none).
    """
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or (len(rel.parts) == 1 and rel.name in NOT_PACKED):
            continue
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            raise FormatError(f"{p}: a symbolic link or special file inside the artefact; an artefact "
                              "directory holds regular files only")
        if p.is_file():
            out.append(rel.as_posix())
    return sorted(out)


def pack_directory(root: str | Path, out: str | Path) -> int:
    """Write the pack of the directory artefact ``root`` to ``out`` (replaced whole).
    Returns its size in bytes."""
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory; only ONNX directories and bundles are packed")
    tmp = out.with_name(f".{out.name}.packing")
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            dirs: set[str] = set()
            for rel in packed_files(root):
                parent = PurePosixPath(rel).parent
                for d in reversed([parent, *parent.parents][:-1]):  # parents first, once each
                    if str(d) not in dirs:
                        dirs.add(str(d))
                        tar.addfile(_info(str(d), tarfile.DIRTYPE, 0, 0o755))
                with open(root / rel, "rb") as f:
                    tar.addfile(_info(rel, tarfile.REGTYPE, os.fstat(f.fileno()).st_size, 0o644), f)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out.stat().st_size


def _info(name: str, kind: bytes, size: int, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode, info.mtime = kind, size, mode, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def unpack_directory(pack: str | Path, dest: str | Path, durable: bool = True) -> None:
    """Unpack ``pack`` into the new directory ``dest`` (which must not exist), checking
    every member first (module docstring); ``durable``: fsync every file and directory.

    Raises:
        FormatError: not a pack, or a member that is not allowed (nothing is written).
        UsageError: ``dest`` exists.
    """
    pack, dest = Path(pack), Path(dest)
    if dest.exists():
        raise UsageError(f"{dest} exists; unpack into a new directory")
    try:
        tar = tarfile.open(pack, "r:")  # uncompressed only: no decompression bomb
    except (tarfile.TarError, OSError) as exc:
        raise FormatError(f"{pack}: not a directory-artefact pack ({exc}); fetch it again") from None
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, UnicodeError) as exc:
            raise FormatError(f"{pack}: a damaged pack ({exc}); fetch it again") from None
        _check_members(pack, members)
        dest.mkdir(parents=True)
        try:
            for m in members:
                target = dest / m.name
                if m.isdir():
                    target.mkdir(exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                assert src is not None
                with src, open(target, "xb") as f:
                    shutil.copyfileobj(src, f, COPY_CHUNK)
                    if f.tell() != m.size:
                        raise FormatError(f"{pack}: member {short_repr(m.name)} is cut short; fetch it again")
                    if durable:
                        os.fsync(f.fileno())
            if durable:
                for d in sorted((p for p in dest.rglob("*") if p.is_dir()), key=lambda q: -len(q.parts)):
                    fsync_dir(d)
                fsync_dir(dest)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise


def _check_members(pack: Path, members: list[tarfile.TarInfo]) -> None:
    if not members:
        raise FormatError(f"{pack}: an empty pack; fetch it again")
    if len(members) > MAX_MEMBERS:
        raise FormatError(f"{pack}: {len(members)} members, more than an artefact has ({MAX_MEMBERS})")
    seen: set[str] = set()
    for m in members:
        p = PurePosixPath(m.name)
        bad = (not m.name or p.is_absolute() or ".." in p.parts or "\\" in m.name or "\0" in m.name
               or len(p.parts) > MAX_DEPTH or any(part.startswith(".") for part in p.parts)
               or str(p) != m.name.rstrip("/"))
        if bad:
            raise FormatError(f"{pack}: member {short_repr(m.name)} is not a plain relative path inside "
                              "the artefact; refused, nothing written")
        if not (m.isfile() or m.isdir()) or m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE):
            raise FormatError(f"{pack}: member {short_repr(m.name)} is a link or special file; a pack "
                              "holds regular files and directories only")
        if str(p) in seen:
            raise FormatError(f"{pack}: member {short_repr(m.name)} appears twice")
        if len(p.parts) == 1 and p.name in NOT_PACKED:
            raise FormatError(f"{pack}: member {short_repr(m.name)} is device state, never packed")
        seen.add(str(p))
    dirs = {str(PurePosixPath(m.name)) for m in members if m.isdir()}
    for m in members:  # a file where a directory is needed (a/b as a file and a/b/c)
        for parent in PurePosixPath(m.name).parents:
            if str(parent) != "." and str(parent) in seen and str(parent) not in dirs:
                raise FormatError(f"{pack}: {short_repr(str(parent))} is both a file and a directory")


def staging_path(model: Path) -> Path:
    """Where a whole directory update is unpacked before it takes ``model``'s place."""
    return model.parent / f".{model.name}.installing"


def replaced_path(model: Path) -> Path:
    """Where the old directory waits while the new one takes its place."""
    return model.parent / f".{model.name}.replaced"


def finish_directory_install(model: str | Path) -> str | None:
    """Finish or undo a whole-directory update cut short (a crash between its renames):
    ``model`` missing with a complete staging directory -> the new one is put in place;
    missing with only the old one -> the old one comes back. Leftovers are removed.
    Returns what was done, or None.

    The install renames ``model`` away only once the staging directory is complete and
    durable, so a staging directory beside a missing model is always whole.
    """
    model = Path(model)
    staged, old = staging_path(model), replaced_path(model)
    done = None
    if not model.exists():
        if staged.is_dir():
            os.replace(staged, model)
            done = "the interrupted update was completed"
        elif old.is_dir():
            os.replace(old, model)
            done = "the interrupted update was undone"
        if done:
            fsync_dir(model.parent)
    for leftover in (staged, old):
        if leftover.exists():
            shutil.rmtree(leftover, ignore_errors=True)
    return done


def swap_in(staged: Path, model: Path, keep: Path | None = None) -> None:
    """Put the complete, durable directory ``staged`` (:func:`staging_path`) in place of
    ``model``: two renames, recoverable between them by :func:`finish_directory_install`.
    ``keep``: move the old directory there (a sibling) instead of deleting it."""
    old = replaced_path(model)
    shutil.rmtree(old, ignore_errors=True)
    os.replace(model, old)
    os.replace(staged, model)
    fsync_dir(model.parent)
    if keep is not None:
        shutil.rmtree(keep, ignore_errors=True)
        os.replace(old, keep)
    shutil.rmtree(old, ignore_errors=True)

