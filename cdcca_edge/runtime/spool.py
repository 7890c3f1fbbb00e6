"""The device agent's UTS spool: uncertain answers kept on disk until the cloud has them.

Layout (one directory, every file written durably before it counts):
- ``entries/NNNNNNNNNNNN.cdcu``: one sample each, as a one-sample uplink bundle (the
  format's own writer: digest-checked when read back); its header carries the artefact
  identity the answer came from.
- ``outbox/NNNNNNNNNNNN.cdcu`` + ``.json``: a sealed bundle of entries of one identity and
  the names of the entries it holds. It is kept byte for byte until the service
  acknowledged its SHA-256, so a retry after a crash sends the same file (the service
  answers "already"), never the samples again as a new bundle.

The spool is capped (``max_bytes``): the oldest unsealed entries go first, and are counted.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

from cdcca_edge.core.errors import CdccaError
from cdcca_edge.core.fileio import atomic_file

MAX_BUNDLE_SAMPLES = 256


class Spool:
    def __init__(self, root: str | Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.entries = self.root / "entries"
        self.outbox = self.root / "outbox"
        for d in (self.entries, self.outbox):
            d.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.dropped = 0
        self.lock = threading.Lock()
        names = [int(p.stem) for p in self.entries.glob("*.cdcu")] + [int(p.stem) for p in self.outbox.glob("*.cdcu")]
        self.next_seq = max(names, default=0) + 1
        for tmp in list(self.entries.glob(".*")) + list(self.outbox.glob(".*")):  # a write cut short
            tmp.unlink(missing_ok=True)
        for m in self.outbox.glob("*.json"):  # sealed, but the bundle was never written: unseal
            if not m.with_suffix(".cdcu").exists():
                m.unlink()

    def _sealed_names(self) -> set[str]:
        out: set[str] = set()
        for m in self.outbox.glob("*.json"):
            try:
                out.update(json.loads(m.read_text())["entries"])
            except (ValueError, KeyError, OSError):
                continue
        return out

    def add(self, header: dict[str, Any], sample: Any) -> Path:
        """Keep ``sample`` (an UplinkSample) collected on ``header["artifact_identity"]``."""
        from cdcca_edge.core.uplink_format import write_uplink

        with self.lock:
            path = self.entries / f"{self.next_seq:012d}.cdcu"
            self.next_seq += 1
            write_uplink(path, {**header, "n_seen": 1, "selector": "uts"}, [sample])
            self._cap()
            return path

    def _cap(self) -> None:
        sealed = self._sealed_names()
        files = sorted(self.entries.glob("*.cdcu"))
        total = sum(p.stat().st_size for p in files) + sum(p.stat().st_size for p in self.outbox.glob("*.cdcu"))
        for p in files:
            if total <= self.max_bytes:
                break
            if p.name in sealed:
                continue
            total -= p.stat().st_size
            p.unlink()
            self.dropped += 1

    def size(self) -> tuple[int, int]:
        """(entries waiting, bytes on disk)."""
        files = list(self.entries.glob("*.cdcu")) + list(self.outbox.glob("*.cdcu"))
        return len(list(self.entries.glob("*.cdcu"))), sum(p.stat().st_size for p in files)

    def seal(self) -> list[Path]:
        """Bundle the unsealed entries (one bundle per artefact identity, oldest first) into
        the outbox; returns every bundle waiting there, sealed now or before."""
        from cdcca_edge.core.uplink_format import read_uplink, write_uplink

        with self.lock:
            sealed = self._sealed_names()
            groups: dict[str, list[tuple[Path, Any, Any]]] = {}
            for p in sorted(self.entries.glob("*.cdcu")):
                if p.name in sealed:
                    continue
                try:
                    b = read_uplink(p)
                    sample = next(iter(b.samples()))
                except (CdccaError, ValueError, StopIteration, OSError):
                    p.unlink(missing_ok=True)  # damaged (a disk error): nothing to send
                    continue
                groups.setdefault(b.header["artifact_identity"], []).append((p, b.header, sample))
            for identity, items in groups.items():
                for i in range(0, len(items), MAX_BUNDLE_SAMPLES):
                    part = items[i:i + MAX_BUNDLE_SAMPLES]
                    seq = self.next_seq
                    self.next_seq += 1
                    out = self.outbox / f"{seq:012d}.cdcu"
                    header = {k: v for k, v in part[0][1].items() if k not in ("n_seen",)}
                    # the manifest first: entries it names are never sealed twice (a manifest
                    # whose bundle a crash prevented is removed at the next start)
                    with atomic_file(out.with_suffix(".json")) as f:
                        f.write(json.dumps({"entries": [p.name for p, _, _ in part]}).encode())
                    write_uplink(out, {**header, "artifact_identity": identity, "n_seen": len(part)},
                                 [s for _, _, s in part])
            return sorted(p for p in self.outbox.glob("*.cdcu") if p.with_suffix(".json").exists())

    def discard(self, bundle: Path) -> None:
        """Drop a sealed bundle the service refused for good (409/422), with its entries."""
        with self.lock:
            try:
                names = json.loads(bundle.with_suffix(".json").read_text())["entries"]
            except (ValueError, KeyError, OSError):
                names = []
            for n in names:
                (self.entries / n).unlink(missing_ok=True)
                self.dropped += 1
            bundle.unlink(missing_ok=True)
            bundle.with_suffix(".json").unlink(missing_ok=True)

    def acknowledged(self, bundle: Path, sha256: str) -> bool:
        """The service stored ``bundle`` (its SHA-256 ``sha256``): forget its entries, then
        it. Returns False, keeping everything, when the digest is not this file's."""
        with self.lock:
            if hashlib.sha256(bundle.read_bytes()).hexdigest() != sha256:
                return False
            manifest = bundle.with_suffix(".json")
            try:
                names = json.loads(manifest.read_text())["entries"]
            except (ValueError, KeyError, OSError):
                names = []
            for n in names:
                (self.entries / n).unlink(missing_ok=True)
            bundle.unlink(missing_ok=True)
            manifest.unlink(missing_ok=True)
            return True
