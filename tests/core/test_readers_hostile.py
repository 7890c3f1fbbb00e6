"""Hostile JSON in a delta header: FormatError (exit 3), never RecursionError or a bare
ValueError (docs/formats/delta.md). The header is parsed before the digest is checked, so
these inputs need no valid digest to reach the parser."""

from __future__ import annotations

import hashlib

import pytest

from cdcca_edge.cli import main
from cdcca_edge.core import delta_format as df
from cdcca_edge.core.errors import FormatError
from tests.hostile import hostile


def _delta_with_header(path, header: bytes):
    body = df.PREAMBLE.pack(df.MAGIC, df.FORMAT_VERSION, 0, len(header)) + header
    path.write_bytes(body + hashlib.sha256(body).digest() + bytes([df.SIG_NONE]))
    return path


HOSTILE_HEADERS = [
    ("deep-list", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ("deep-object", b'{"a":' * 100_000 + b"0" + b"}" * 100_000, "nested too deeply"),
    ("deep-records", b'{"records": [' + b"[" * 30_000 + b"]" * 30_000 + b"]}", "nested too deeply"),
    ("huge-int", b'{"payload_bytes": ' + b"9" * 5000 + b"}", "not valid JSON"),
    ("not-utf8", b'{"x": "\xff"}', "not valid JSON"),
]


@pytest.mark.parametrize("case,header,message", HOSTILE_HEADERS, ids=[c[0] for c in HOSTILE_HEADERS])
def test_hostile_delta_header(tmp_path, capsys, case, header, message):
    path = _delta_with_header(tmp_path / f"{case}.cdcd", header)
    hostile("delta")
    with pytest.raises(FormatError, match=message):
        df.read_delta(path)
    hostile("delta")
    assert main(["delta", "inspect", str(path)]) == 3
    assert "FormatError" in capsys.readouterr().err
