"""A real PostgreSQL server for tests: `postgres_server`, one per session.

Import it where needed: `from tests.pg import postgres_server  # noqa: F401`.

The server listens on 127.0.0.1 at a free port, keeps its data in a fresh folder under
/tmp and its Unix socket in a private folder beside it. As root it runs as the `postgres`
user (PostgreSQL refuses root), using the same initdb as the supervisor's embedded server
(supervisor.infra.postgres), so tests exercise the cluster setup the services really get.
`stop()`/`start()` restart it on the same port and data, for reconnection tests.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from supervisor.infra.postgres import SUPERUSER, Layout, _find_bin_dir, _first_unreachable, initdb
from tests.helpers import free_port

_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class _LogFile:
    """initdb's `log` argument: a writer of byte lines."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, line: bytes) -> None:
        with self.path.open("ab") as f:
            f.write(line.rstrip(b"\n") + b"\n")


class PostgresServer:
    def __init__(self) -> None:
        self.port = free_port()
        # mkdtemp makes a 0700 root folder; the postgres user must traverse it to reach
        # its own data and socket folders (which initdb creates 0700 and owned by it).
        self.base = Path(tempfile.mkdtemp(prefix="meshvisor-pg-"))
        os.chmod(self.base, 0o755)
        uid = gid = None
        if os.geteuid() == 0:
            import pwd

            user = pwd.getpwnam("postgres")
            uid, gid = user.pw_uid, user.pw_gid
            blocked = _first_unreachable(self.base, uid, gid)
            if blocked:
                raise RuntimeError(f"the postgres user cannot enter {blocked}")
        self.layout = Layout(
            bin_dir=_find_bin_dir(), data_dir=self.base / "data", socket_dir=self.base / "run", uid=uid, gid=gid
        )
        self.log_path = self.base / "postgres.log"
        self._log = _LogFile(self.log_path)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def admin_dsn(self) -> str:
        """Superuser over the Unix socket (trust auth: the socket folder is private)."""
        return f"postgresql://{SUPERUSER}@/postgres?host={quote(str(self.layout.socket_dir), safe='')}&port={self.port}"

    def setup(self) -> None:
        # initdb is a coroutine in the supervisor; no event loop runs during fixture setup.
        asyncio.run(initdb(self.layout, self._log))
        self.start()

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and return once it accepts connections (blocking)."""
        if self._proc is not None and self._proc.poll() is None:
            return
        lay = self.layout
        argv = [
            str(lay.bin_dir / "postgres"),
            "-D", str(lay.data_dir),
            "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1",
            "-c", f"unix_socket_directories={lay.socket_dir}",
            "-c", "logging_collector=off",
            "-c", "password_encryption=scram-sha-256",
            "-c", "fsync=off",  # test data: speed over durability
        ]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(lay.data_dir),
                user=lay.uid,
                group=lay.gid,
                extra_groups=[] if lay.uid is not None else None,
                start_new_session=True,  # a Ctrl-C in the terminal is for pytest, not for it
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self._proc.returncode}:\n{self._tail()}")
            ready = subprocess.run(
                [str(lay.bin_dir / "pg_isready"), "-q", "-h", str(lay.socket_dir), "-p", str(self.port)],
                capture_output=True,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"postgres not ready after {timeout}s:\n{self._tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT: clients are disconnected, then a checkpoint); blocking."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run `sql` as the superuser; raises with psql's message on error."""
        out = subprocess.run(
            [
                str(self.layout.bin_dir / "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
                "-h", str(self.layout.socket_dir), "-p", str(self.port), "-U", SUPERUSER, "-d", database,
                "-c", sql,
            ],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            raise RuntimeError(f"psql failed: {out.stderr.strip()}")
        return out.stdout

    def create_database(self, name: str) -> str:
        """A fresh, empty database `name` owned by a login role `name` with a random
        password; returns that role's TCP DSN. An existing one of that name is replaced.

        Synchronous (through psql) so that sync and async tests alike can call it.
        """
        if not _NAME.match(name):
            raise ValueError(f"{name!r}: use a lowercase SQL identifier")
        password = secrets.token_urlsafe(18)  # URL-safe: no quoting trouble in SQL or DSN
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.psql(
            f"""DO $$ BEGIN
                  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{name}') THEN
                    ALTER ROLE "{name}" LOGIN PASSWORD '{password}';
                  ELSE
                    CREATE ROLE "{name}" LOGIN PASSWORD '{password}';
                  END IF;
                END $$"""
        )
        self.psql(f'CREATE DATABASE "{name}" OWNER "{name}"')
        return f"postgresql://{name}:{password}@127.0.0.1:{self.port}/{name}"

    def _tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    # Backstop for an interpreter that exits without running fixture teardown.
    atexit.register(server.close)
    try:
        server.setup()
        yield server
    finally:
        server.close()
        atexit.unregister(server.close)
