"""Where cdcca-edge keeps cached artefacts (models trained on first run, demo outputs)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from cdcca_edge.core.fileio import replace_dir


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


def build_cached(target: Path, build: Callable[[Path], Any]) -> Path:
    """``target`` (a model directory), built by ``build(tmp_dir)`` on first use and moved
    into place whole, so an interrupted build never leaves a half-written cache entry."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, target, durable=False)  # a cache: rebuilt if lost
    return target
