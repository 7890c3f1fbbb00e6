"""A cohort's update metadata as a TUF repository (python-tuf's Metadata API), so that a
device's ``ngclient`` refuses rollback, freeze, mix-and-match and endless-data attacks
(docs/formats/sync.md section 4). The Ed25519 signature inside each delta stays as the
second layer.

One repository per cohort, in ``DATA/tuf/NAME/``, consistent snapshots:
``N.root.json`` (every version kept: clients walk the chain), ``N.targets.json``,
``N.snapshot.json``, ``timestamp.json``. Keys are PEM files given by path: the **root
key** signs root only and is needed at creation and rotation (keep it offline); the
cohort's **online key** (its ``--sign-key``, which also signs deltas) signs targets,
snapshot and timestamp. Writers of one repository take turns (a lock file); timestamp is
written last, by rename, so a reader sees the old set or the new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from cdcca_edge.core.errors import UsageError
from cdcca_edge.core.fileio import atomic_file

ROOT_LIFETIME = timedelta(days=365)
TARGETS_LIFETIME = timedelta(days=30)
SNAPSHOT_LIFETIME = timedelta(days=30)
TIMESTAMP_LIFETIME = timedelta(days=1)
# an online role is re-signed (version + 1) once less than this share of its life is left
REFRESH_SHARE = 0.5
METADATA_NAME = re.compile(r"^(?:[1-9][0-9]{0,9}\.)?(root|targets|snapshot|timestamp)\.json$")


def artifact_target(version: int, fmt: str = "gguf") -> str:
    """The target path of a version's whole artefact: a GGUF file, or a directory
    format's pack (``core.pack``)."""
    return f"artifacts/v{version}.gguf" if fmt == "gguf" else f"artifacts/v{version}.{fmt}.tar"


def delta_target(from_version: int, to_version: int) -> str:
    """The target path of the delta between two versions."""
    return f"deltas/v{from_version}-v{to_version}.cdcd"


@dataclass(frozen=True)
class Target:
    path: str
    sha256: str
    length: int
    custom: dict[str, Any]


def signer_from_pem(path: str | Path) -> Any:
    """A securesystemslib signer for an Ed25519 private key file (PKCS#8 PEM, as
    `cdcca-edge delta keygen` writes it)."""
    from securesystemslib.signer import CryptoSigner

    from cdcca_edge.core.delta_format import load_private_key

    return CryptoSigner(load_private_key(path))


def check_keys(root_key: str | Path, online_key: str | Path) -> tuple[Any, Any]:
    """Signers for a cohort's two keys.

    Raises:
        UsageError: either file is no Ed25519 private key, or the two are one key.
    """
    root_signer, online_signer = signer_from_pem(root_key), signer_from_pem(online_key)
    if root_signer.public_key.keyid == online_signer.public_key.keyid:
        raise UsageError("--root-key and --sign-key are the same key; give the root role its own key "
                         "(kept offline) so that a stolen online key can be rotated out")
    return root_signer, online_signer


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


class CohortRepository:
    """The TUF repository of one cohort."""

    def __init__(self, data_dir: str | Path, cohort: str) -> None:
        self.dir = Path(data_dir) / "tuf" / cohort

    # --- reading --------------------------------------------------------------------------

    def exists(self) -> bool:
        return (self.dir / "timestamp.json").is_file()

    def metadata_file(self, name: str) -> Path:
        """The file a client asked for (``N.root.json``, ``timestamp.json``, ...).

        Raises:
            UsageError: not a metadata file name of this protocol.
        """
        if not METADATA_NAME.fullmatch(name):
            raise UsageError(f"{name[:80]!r} is not a TUF metadata file name")
        return self.dir / name

    def root_version(self) -> int:
        return max((int(p.name.split(".")[0]) for p in self.dir.glob("*.root.json")), default=0)

    def root_bytes(self) -> bytes:
        """The newest root metadata (what an enrolling device is given as its trust anchor)."""
        return (self.dir / f"{self.root_version()}.root.json").read_bytes()

    def _load(self, role: str) -> Any:
        from tuf.api.metadata import Metadata

        if role == "root":
            return Metadata.from_file(str(self.dir / f"{self.root_version()}.root.json"))
        ts = Metadata.from_file(str(self.dir / "timestamp.json"))
        if role == "timestamp":
            return ts
        snap = Metadata.from_file(str(self.dir / f"{ts.signed.snapshot_meta.version}.snapshot.json"))
        if role == "snapshot":
            return snap
        return Metadata.from_file(str(self.dir / f"{snap.signed.meta['targets.json'].version}.targets.json"))

    def role_keyids(self, role: str) -> list[str]:
        """The key ids the current root names for ``role``."""
        return list(self._load("root").signed.roles[role].keyids)

    def versions(self) -> dict[str, int]:
        return {role: self._load(role).signed.version for role in ("root", "targets", "snapshot", "timestamp")}

    # --- writing --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            yield

    def _write(self, md: Any, name: str) -> None:
        from tuf.api.serialization.json import JSONSerializer

        data = md.to_bytes(JSONSerializer(compact=False))
        with atomic_file(self.dir / name) as f:
            f.write(data)

    def create(self, root_key: str | Path, online_key: str | Path, targets: list[Target]) -> None:
        """Root v1 (root role: the root key; targets, snapshot, timestamp: the online
        key), and the first targets, snapshot and timestamp.

        Raises:
            UsageError: the cohort has a repository already, or the two keys are one.
        """
        from tuf.api.metadata import Metadata, Root

        root_signer, online_signer = check_keys(root_key, online_key)
        with self._locked():
            if self.exists():
                raise UsageError(f"{self.dir} holds a TUF repository already")
            root = Root(expires=_now() + ROOT_LIFETIME, consistent_snapshot=True)
            root.add_key(root_signer.public_key, "root")
            for role in ("targets", "snapshot", "timestamp"):
                root.add_key(online_signer.public_key, role)
            md = Metadata(root)
            md.sign(root_signer)
            self._write(md, "1.root.json")
            self._publish(online_signer, targets, first=True)

    def targets(self) -> dict[str, Target]:
        """The targets of the current metadata, by path."""
        return {p: Target(p, f.hashes["sha256"], f.length, f.custom)
                for p, f in self._load("targets").signed.targets.items()}

    def _online_signer(self, online_key: str | Path) -> Any:
        """A signer for ``online_key``, refused unless the current root names it for the
        online roles (a half-finished rotation must not produce metadata devices refuse)."""
        signer = signer_from_pem(online_key)
        if signer.public_key.keyid not in self.role_keyids("targets"):
            raise UsageError(f"{online_key} is not the online key the root metadata names; finish the key "
                             "rotation with `cdcca-edge cloud rotate-key`")
        return signer

    def set_targets(self, online_key: str | Path, targets: Callable[[], list[Target]]) -> bool:
        """Publish ``targets()`` (the cohort's whole list, read under the repository's lock
        so that a slower writer never publishes an older list) as the next targets
        version, with a new snapshot and timestamp. Returns False, writing nothing, when
        the list is the current one."""
        with self._locked():
            want = targets()
            if {t.path: t for t in want} == self.targets():
                return False
            self._publish(self._online_signer(online_key), want, first=False)
            return True

    def _publish(self, signer: Any, targets: list[Target], first: bool) -> None:
        from tuf.api.metadata import MetaFile, Metadata, Snapshot, TargetFile, Targets

        now = _now()
        if first:
            t_ver, s_ver, ts_ver = 1, 1, 1
        else:
            v = self.versions()
            t_ver, s_ver, ts_ver = v["targets"] + 1, v["snapshot"] + 1, v["timestamp"] + 1
        files = {t.path: TargetFile(length=t.length, hashes={"sha256": t.sha256}, path=t.path,
                                    unrecognized_fields={"custom": t.custom}) for t in targets}
        tmd = Metadata(Targets(version=t_ver, expires=now + TARGETS_LIFETIME, targets=files))
        tmd.sign(signer)
        self._write(tmd, f"{t_ver}.targets.json")
        smd = Metadata(Snapshot(version=s_ver, expires=now + SNAPSHOT_LIFETIME,
                                meta={"targets.json": MetaFile(version=t_ver)}))
        smd.sign(signer)
        self._write(smd, f"{s_ver}.snapshot.json")
        self._write_timestamp(signer, ts_ver, s_ver, now + TIMESTAMP_LIFETIME)

    def _write_timestamp(self, signer: Any, version: int, snapshot_version: int, expires: datetime) -> None:
        from tuf.api.metadata import MetaFile, Metadata, Timestamp

        md = Metadata(Timestamp(version=version, expires=expires, snapshot_meta=MetaFile(version=snapshot_version)))
        md.sign(signer)
        self._write(md, "timestamp.json")

    def refresh(self, online_key: str | Path, force: bool = False) -> list[str]:
        """Re-sign every online role with less than half of its life left (all with
        ``force``), so that devices never see expired metadata while the service runs.
        Returns the roles re-signed."""
        now = _now()
        with self._locked():
            stale = []
            for role, life in (("targets", TARGETS_LIFETIME), ("snapshot", SNAPSHOT_LIFETIME),
                               ("timestamp", TIMESTAMP_LIFETIME)):
                left = self._load(role).signed.expires - now
                if force or left < life * REFRESH_SHARE:
                    stale.append(role)
            if not stale:
                return []
            signer = self._online_signer(online_key)
            if "targets" in stale or "snapshot" in stale:  # a new version of each, chained
                self._publish(signer, list(self.targets().values()), first=False)
                return ["targets", "snapshot", "timestamp"]
            ts = self._load("timestamp").signed
            self._write_timestamp(signer, ts.version + 1, ts.snapshot_meta.version, now + TIMESTAMP_LIFETIME)
            return ["timestamp"]

    def sign_timestamp(self, online_key: str | Path, expires: datetime) -> None:
        """A new timestamp version expiring at ``expires`` (operators: to shorten a
        lifetime; tests: to produce an expired one)."""
        with self._locked():
            ts = self._load("timestamp").signed
            self._write_timestamp(signer_from_pem(online_key), ts.version + 1, ts.snapshot_meta.version, expires)

    def rotate(self, root_key: str | Path, new_online_key: str | Path | None = None,
               new_root_key: str | Path | None = None, targets: Callable[[], list[Target]] | None = None) -> int:
        """Root version n+1 that replaces the online key and/or the root key, signed by
        the current root key and (when it changes) the new one, so that a device holding
        root n verifies n+1 and trusts the new keys from then on; the online roles are then
        re-signed with the new online key, listing ``targets()``. Re-running it after a
        crash finishes the job (a root that names the new online key already is kept).
        Returns the root version.

        Raises:
            UsageError: ``root_key`` is not the cohort's root key, or nothing changes.
        """
        from tuf.api.metadata import Metadata

        if new_online_key is None and new_root_key is None:
            raise UsageError("give --new-sign-key and/or --new-root-key")
        old_root = signer_from_pem(root_key)
        with self._locked():
            md = self._load("root")
            root = md.signed
            if old_root.public_key.keyid not in root.roles["root"].keyids:
                raise UsageError("--root-key is not this cohort's root key; rotation needs the current root key")
            new_root = signer_from_pem(new_root_key) if new_root_key else None
            new_online = signer_from_pem(new_online_key) if new_online_key else None
            if new_online is not None and new_online.public_key.keyid in root.roles["root"].keyids:
                raise UsageError("the new online key is the root key; give the root role its own key")
            done = (new_root is None and new_online is not None
                    and root.roles["targets"].keyids == [new_online.public_key.keyid])
            if not done:
                if new_root is not None:
                    root.revoke_key(old_root.public_key.keyid, "root")
                    root.add_key(new_root.public_key, "root")
                if new_online is not None:
                    for role in ("targets", "snapshot", "timestamp"):
                        for kid in list(root.roles[role].keyids):
                            root.revoke_key(kid, role)
                        root.add_key(new_online.public_key, role)
                root.version += 1
                root.expires = _now() + ROOT_LIFETIME
                md = Metadata(root)
                md.sign(old_root)
                if new_root is not None:
                    md.sign(new_root, append=True)  # the new root must meet its own threshold
                self._write(md, f"{root.version}.root.json")
            if new_online is not None:
                self._publish(new_online, targets() if targets else list(self.targets().values()), first=False)
            return root.version
