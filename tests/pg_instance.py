"""A private PostgreSQL cluster for tests that kill and restart the database.

The machine's shared server (127.0.0.1:5432) is never touched: this one lives in a temp dir, on a
free loopback port, with trust auth and fsync off. As root (initdb refuses to run as root), the
binaries run as the `postgres` user, which owns the data dir.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mock_upstream import free_port

BIN_DIRS = ("/usr/lib/postgresql/15/bin",)


def bin_dir() -> Path | None:
    """Where initdb and pg_ctl are: PG_BIN, the Debian PostgreSQL 15 dir, or the PATH."""
    candidates = [os.environ.get("PG_BIN", ""), *BIN_DIRS]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    return None


class PgInstance:
    """initdb + pg_ctl in a temp dir. start(), stop(mode), restart(), dsn, cleanup()."""

    def __init__(self, bin_path: Path | None = None) -> None:
        found = bin_path or bin_dir()
        if found is None:
            pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) not found: set PG_BIN or install "
                        "postgresql-15 (the kill-and-restart tests need a private cluster)", pytrace=False)
        self.bin = found
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="llmrelay-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.as_root = os.geteuid() == 0
        if self.as_root:
            # the postgres user must reach and own everything under base
            self.base.chmod(0o755)
            shutil.chown(self.base, "postgres", "postgres")
        try:
            self._initdb()
        except BaseException:
            shutil.rmtree(self.base, ignore_errors=True)
            raise

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.base)
        if check and result.returncode != 0:
            server_log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n"
                               f"{server_log[-2000:]}")
        return result

    def _initdb(self) -> None:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                  "--locale=C.UTF-8", "--no-sync")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                       f"unix_socket_directories = '{self.base}'\nfsync = off\nfull_page_writes = off\n"
                       "max_connections = 50\nshared_buffers = 32MB\n")
            # not synchronous_commit = off: a kill would then lose commits the client saw succeed

    def start(self) -> PgInstance:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "immediate") -> None:
        """`immediate` is a kill: no checkpoint, client connections cut; the next start recovers."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "immediate") -> PgInstance:
        self.stop(mode)
        return self.start()

    @property
    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._run("pg_isready", "-h", "127.0.0.1", "-p", str(self.port), check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"private PostgreSQL on port {self.port} is not ready after {timeout}s")

    def cleanup(self) -> None:
        try:
            if self.data.exists() and self.running:
                self.stop("immediate")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


def pg_instance() -> Iterator[PgInstance]:
    """For a fixture: `yield from pg_instance()` runs a started private cluster, removed afterwards."""
    instance = PgInstance()
    try:
        instance.start()
        yield instance
    finally:
        instance.cleanup()
