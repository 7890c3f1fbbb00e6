"""A throwaway PostgreSQL server for the scale-out tests: Debian's `postgresql` binaries,
a cluster in a temporary directory, run as an unprivileged user (the `postgres` account
when the tests run as root), listening on 127.0.0.1 only. Skipped, with the reason, only
when the binaries are absent."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class Postgres:
    def __init__(self) -> None:
        bindir = _bin_dir()
        if bindir is None:
            pytest.skip("PostgreSQL is not installed (Debian: apt install postgresql); the scale-out "
                        "tests need its initdb and pg_ctl")
        self.bin = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="cdcca-pg-"))
        self.run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.run_as:
            shutil.chown(self.dir, "postgres", "postgres")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._pg("initdb", "-D", str(self.dir / "data"), "-U", "cdcca", "--auth=trust", "-E", "UTF8", "--no-sync")
        # fsync stays on: the tests kill service processes, never the database, but the
        # figures of bench/fleet.py must be for a durable database
        self._pg("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "-o",
                 f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c max_connections=300", "start")

    def _pg(self, tool: str, *args: str) -> None:
        proc = subprocess.run([*self.run_as, str(self.bin / tool), *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} failed: {proc.stderr[-2000:]}")

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = "t" + uuid.uuid4().hex[:12]
        with psycopg.connect(f"postgresql://cdcca@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://cdcca@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._pg("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
