"""Counting hostile cases: every test that feeds a reader a forged, truncated, oversized
or otherwise hostile input calls :func:`hostile` once per case it ran. The session's
total (by reader) is printed at the end of the run (``tests/conftest.py``), so the count
in the issue's evidence comes from the run itself, not from a tally by hand.

A wrong outcome is a failed test: each case asserts its exit code / error class and that
nothing was written.
"""

from __future__ import annotations

from collections import Counter

COUNTS: Counter[str] = Counter()
SUMMARY: list[str] = []  # lines for the end of the run (the crash trials' counts per entry point)


def hostile(reader: str, n: int = 1) -> None:
    """Record ``n`` hostile cases run against ``reader`` (e.g. "delta", "journal")."""
    COUNTS[reader] += n
