"""One error hierarchy for the whole project.

Every message names the value that was wrong, what was expected, and the fix. The CLI maps
these classes to exit codes (see ``cdcca_edge.cli``); library code only raises them.
"""

from __future__ import annotations


class CdccaError(Exception):
    """Root of every error cdcca-edge raises on purpose."""


class UsageError(CdccaError, ValueError):
    """An argument or option combination that cannot work (exit code 2)."""


class FormatError(CdccaError, ValueError):
    """A file is not in the format it claims to be, or is truncated or malformed (exit 3)."""


class IntegrityError(CdccaError):
    """Bytes do not match the digest, identity or signature they must match (exit 3)."""


class ValidationError(CdccaError):
    """A produced artefact disagrees with its reference beyond tolerance (exit 3)."""


class StorageError(CdccaError, OSError):
    """The file system refused an operation: a read-only model, a full disk (exit 2)."""


class MissingTensorError(CdccaError, KeyError):
    """An artefact lacks a tensor that an operation names (exit 3)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class BackendUnavailableError(CdccaError, ImportError):
    """An optional dependency (runtime backend, torch, ...) is not installed (exit 4)."""


def require(module: str, extra: str) -> object:
    """Import ``module`` or raise :class:`BackendUnavailableError` naming the extra to install.

    Args:
        module: dotted module name, e.g. ``"llama_cpp"``.
        extra: the cdcca-edge extra that provides it, e.g. ``"llama"``.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise BackendUnavailableError(
            f"{module!r} is not installed ({exc}); install it with "
            f"`pip install 'cdcca-edge[{extra}]'`"
        ) from exc
