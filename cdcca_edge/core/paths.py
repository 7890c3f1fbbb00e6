"""Where cdcca-edge keeps cached artefacts (models trained on first run, demo outputs)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$CDCCA_CACHE`` if set, else ``$XDG_CACHE_HOME/cdcca-edge`` (``~/.cache/cdcca-edge``)."""
    env = os.environ.get("CDCCA_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cdcca-edge"


def config_file() -> Path:
    """``$CDCCA_CONFIG`` if set, else ``$XDG_CONFIG_HOME/cdcca-edge/config.json``
    (``~/.config/cdcca-edge/config.json``)."""
    env = os.environ.get("CDCCA_CONFIG")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "cdcca-edge" / "config.json"
