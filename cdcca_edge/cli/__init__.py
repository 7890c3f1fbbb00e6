"""The ``cdcca-edge`` command line.

Commands are thin: each parses options, calls one library function and prints its result
(stdout) or progress (stderr). Heavy imports happen inside the commands that need them,
so ``run``, ``inspect`` and ``patch`` never load torch.
"""

from __future__ import annotations

import os
import sys
import traceback

from cdcca_edge.cli.app import app
from cdcca_edge.core.errors import (
    BackendUnavailableError,
    CdccaError,
    FormatError,
    IntegrityError,
    MissingTensorError,
    StorageError,
    UsageError,
    ValidationError,
)

EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_INVALID, EXIT_BACKEND = 0, 1, 2, 3, 4

__all__ = ["app", "exit_code_for", "main"]


def exit_code_for(exc: BaseException) -> int:
    """Exit code for an exception (docs/cli.md): 2 usage or environment, 3 bad data, 4
    missing backend, 1 anything else (a bug).

    Every ``OSError`` is an environment problem (missing file, permission denied, read-only
    file system, file too large, ...): its message names the file and the cause, and no
    traceback would help the user more.
    """
    if isinstance(exc, BackendUnavailableError):
        return EXIT_BACKEND
    if isinstance(exc, (FormatError, IntegrityError, ValidationError, MissingTensorError)):
        return EXIT_INVALID
    if isinstance(exc, (UsageError, StorageError, OSError)):
        return EXIT_USAGE
    return EXIT_UNEXPECTED


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    debug = os.environ.get("CDCCA_DEBUG", "") not in ("", "0")
    try:
        app(args=argv, prog_name="cdcca-edge")
    except SystemExit as exc:  # typer/click always end this way in standalone mode
        code = exc.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_UNEXPECTED)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (CdccaError, OSError) as exc:
        if debug:
            traceback.print_exc()
        kind = type(exc).__name__
        print(f"error ({kind}): {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except Exception as exc:  # noqa: BLE001 - the one place that turns bugs into exit 1
        if debug:
            traceback.print_exc()
        else:
            print(f"unexpected error: {type(exc).__name__}: {exc} "
                  "(set CDCCA_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_UNEXPECTED
    return EXIT_OK
