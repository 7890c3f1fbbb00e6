"""Which delta signers a patcher trusts: one explicit policy, decided in one place.

Callers say what they mean: :meth:`Trust.none` (digest checks only: the cloud advancing
its own mirror with a delta it just made), :meth:`Trust.keys` (these PEM files), or
:meth:`Trust.configured` (``$CDCCA_TRUSTED_KEYS``, else the config file's
``trusted_keys``). A configuration that cannot be read, or that says something this
version does not understand, is an error, never "trust nothing": failing open would let
unsigned deltas apply on a device whose owner meant to require signatures.
Spec: docs/formats/delta.md, section 7.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cdcca_edge.core.errors import FormatError, UsageError

CONFIG_KEYS = frozenset({"trusted_keys"})  # every key the config file may hold
ENV_KEYS = "CDCCA_TRUSTED_KEYS"
MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class Trust:
    """A trust policy: the raw Ed25519 public keys accepted, and where they came from.

    With no keys, deltas are checked by digest only; with any, a delta must carry a valid
    signature by one of them.
    """

    public_keys: tuple[bytes, ...]
    source: str  # for messages: "none", "--pubkey", "$CDCCA_TRUSTED_KEYS", the config path

    @property
    def requires_signature(self) -> bool:
        return bool(self.public_keys)

    @classmethod
    def none(cls) -> "Trust":
        """Accept any delta whose digest checks (for deltas this process made itself)."""
        return cls((), "none")

    @classmethod
    def keys(cls, paths: Iterable[str | Path], source: str = "--pubkey") -> "Trust":
        """Trust exactly these PEM public key files (at least one).

        Raises:
            UsageError: no path given. FormatError: a file is not an Ed25519 PEM key.
        """
        from cdcca_edge.core.delta_format import load_public_key

        paths = list(paths)
        if not paths:
            raise UsageError("Trust.keys() needs at least one public key file; use "
                             "Trust.none() to check digests only")
        for p in paths:
            if not Path(p).is_file():
                raise UsageError(f"{p}: no such public key file (from {source})")
        return cls(tuple(load_public_key(p) for p in paths), source)

    @classmethod
    def configured(cls) -> "Trust":
        """``$CDCCA_TRUSTED_KEYS`` (paths joined by os.pathsep), else ``trusted_keys`` in
        the config file (``$CDCCA_CONFIG``, default ``~/.config/cdcca-edge/config.json``;
        a missing default file means no keys).

        Raises:
            UsageError: ``$CDCCA_CONFIG`` names something that is not a readable file.
            FormatError: the config is not a JSON object of known keys with a list of
                key paths.
        """
        from cdcca_edge.core.paths import config_file

        env = os.environ.get(ENV_KEYS)
        if env is not None and env.strip():
            return cls.keys([p for p in env.split(os.pathsep) if p], f"${ENV_KEYS}")
        cfg = config_file()
        explicit = bool(os.environ.get("CDCCA_CONFIG"))
        try:
            st = os.stat(cfg)
        except FileNotFoundError:
            if explicit:
                raise UsageError(f"$CDCCA_CONFIG={cfg}: no such file; point it at a JSON "
                                 "config file or unset it") from None
            return cls.none()
        except OSError as exc:
            raise UsageError(f"{cfg}: cannot read the config ({exc.strerror})") from exc
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{cfg}: the config path is not a regular file; point "
                             "$CDCCA_CONFIG at a JSON file")
        if st.st_size > MAX_CONFIG_BYTES:
            raise FormatError(f"{cfg}: {st.st_size} bytes is too large for a config file")
        try:
            doc = json.loads(cfg.read_text(encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"{cfg}: cannot read the config ({exc.strerror})") from exc
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise FormatError(f"{cfg}: not valid JSON ({exc}); fix or remove it") from exc
        if not isinstance(doc, dict):
            raise FormatError(f"{cfg}: the config must be a JSON object like "
                              '{"trusted_keys": ["/etc/cdcca/cloud.key.pub"]}')
        unknown = sorted(set(doc) - CONFIG_KEYS)
        if unknown:
            raise FormatError(f"{cfg}: unknown config key(s) {unknown}; known: "
                              f"{sorted(CONFIG_KEYS)} (a typo here would silently trust nothing)")
        paths = doc.get("trusted_keys", [])
        if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
            raise FormatError(f"{cfg}: 'trusted_keys' must be a list of public key paths, "
                              f"got {type(paths).__name__}")
        if not paths:
            return cls.none()
        base = cfg.parent
        return cls.keys([base / p for p in paths], str(cfg))
