"""The services' database access: an asyncpg pool, SQL migrations, surviving a restart.

- `create_pool` opens the pool from DATABASE_URL with bounded waits everywhere (connect,
  acquire, each statement), so a missing server turns into an error, never a hang.
- `migrate` applies `NNNN_name.sql` files once, even when several instances of a service
  start together: they queue on a PostgreSQL advisory lock keyed by the service name.
- After a PostgreSQL restart the pool still holds sockets to the old server. `acquire`
  and `run` notice the failure, expire the pool's connections so the next attempt opens
  fresh ones, and raise `DatabaseUnavailable` (mapped to a 503 by shared/kit/errors.py).

The DSN holds a password: nothing here logs it or puts it into an error message.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import asyncpg.exceptions as pgerr

from shared.kit.errors import ApiError

log = logging.getLogger("meshvisor.db")

T = TypeVar("T")

_MIGRATION_FILE = re.compile(r"^(\d{4})_[A-Za-z0-9][A-Za-z0-9_\-]*\.sql$")


class DatabaseUnavailable(ApiError):
    """PostgreSQL cannot be reached (down, restarting, refusing connections, pool exhausted).

    Unlike a query error this says nothing about the request: the client gets a 503 and
    may retry later. `str()` has the detail, for the log; the client sees none of it.
    """

    log_as_warning = True

    def __init__(self, detail: str) -> None:
        super().__init__(503, "database unavailable", headers={"Retry-After": "1"})
        self.args = (detail,)


class MigrationError(Exception):
    """A migration cannot be applied: it failed, or an applied file was edited."""


# Server-side errors that mean "the server is going away or not accepting us yet", as
# opposed to errors about the query. QueryCanceledError shares their parent class
# (operator intervention) but is a statement timeout: a real query error.
_UNAVAILABLE_SERVER_ERRORS: tuple[type[BaseException], ...] = (
    pgerr.PostgresConnectionError,  # SQLSTATE class 08 and ConnectionDoesNotExistError
    pgerr.AdminShutdownError,  # 57P01: server shutting down, our session was ended
    pgerr.CrashShutdownError,  # 57P02
    pgerr.CannotConnectNowError,  # 57P03: starting up or shutting down
    pgerr.TooManyConnectionsError,  # 53300: transient, the client should come back later
)


def is_unavailable(exc: BaseException) -> bool:
    """True when `exc` means the database could not be reached, False for query errors.

    OSError covers refused/reset sockets and, since Python 3.11, TimeoutError: a client-side
    timeout means the server did not answer at all, because the pool's server-side
    statement_timeout fires first for a query that is merely slow (QueryCanceledError).
    """
    if isinstance(exc, (DatabaseUnavailable, OSError, *_UNAVAILABLE_SERVER_ERRORS)):
        return True
    if isinstance(exc, asyncio.TimeoutError):
        return True
    # Using a connection the server already closed; other InterfaceErrors are our bugs.
    if isinstance(exc, asyncpg.InterfaceError) and "connection is closed" in str(exc):
        return True
    # The server ended the session while the connection sat idle in the pool: asyncpg is
    # still waiting for a ReadyForQuery that never comes, and refuses the next query
    # with "cannot switch to state ..." (seen when PostgreSQL shuts down under load).
    if isinstance(exc, asyncpg.InternalClientError) and "cannot switch to state" in str(exc):
        return True
    return False


# A transaction left open without a query for this long belongs to a stuck process (stopped,
# or awaiting something it never should inside a transaction): the server ends the session,
# releasing its locks, e.g. an Idempotency-Key that would otherwise turn every repeat away.
IDLE_IN_TRANSACTION_MS = 30_000


async def create_pool(
    dsn: str, *, min_size: int = 1, max_size: int = 10, command_timeout: float = 5.0
) -> asyncpg.Pool:
    """A pool for `dsn` (DATABASE_URL) whose every wait is bounded by `command_timeout`.

    Each connection starts with a server-side statement_timeout slightly below the client's
    command_timeout, so a slow query is cancelled by the server (a query error, the
    connection stays usable) before the client gives up on the socket, and with
    idle_in_transaction_session_timeout (IDLE_IN_TRANSACTION_MS).
    Raises DatabaseUnavailable when the server cannot be reached.
    """
    statement_ms = max(1, int(command_timeout * 1000 * 0.9))
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            command_timeout=command_timeout,
            timeout=command_timeout,  # connect timeout; asyncpg's default is 60 s
            server_settings={"statement_timeout": str(statement_ms),
                             "idle_in_transaction_session_timeout": str(IDLE_IN_TRANSACTION_MS)},
        )
    except Exception as exc:
        if is_unavailable(exc):
            raise DatabaseUnavailable(f"database unreachable: {_describe(exc)}") from exc
        raise
    log.info("database pool ready", extra={"min_size": min_size, "max_size": max_size})
    return pool


def _describe(exc: BaseException) -> str:
    """The kind of failure for a message: the exception's name and text, never the DSN
    (asyncpg's connection errors name host and user, not the password)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _expire(pool: asyncpg.Pool, exc: BaseException) -> None:
    """Forget every pooled connection: after a failure one of them showed, the others
    likely point at the same dead server; each is reopened on its next acquire."""
    log.warning("database connection failed, reconnecting", extra={"error": type(exc).__name__})
    await pool.expire_connections()


@asynccontextmanager
async def acquire(pool: asyncpg.Pool, *, timeout: float = 5.0) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection; connection failures inside become DatabaseUnavailable.

    `timeout` bounds the wait for a free connection (asyncpg's pool waits forever by
    default, which under load looks like a hang). No retry: the body may have written
    before the failure. Use `run` for idempotent work.
    """
    try:
        async with pool.acquire(timeout=timeout) as conn:
            yield conn
    except Exception as exc:
        if not is_unavailable(exc) or isinstance(exc, DatabaseUnavailable):
            raise
        await _expire(pool, exc)
        raise DatabaseUnavailable(f"database unavailable: {_describe(exc)}") from exc


async def run(
    pool: asyncpg.Pool,
    op: Callable[[asyncpg.Connection], Awaitable[T]],
    *,
    attempts: int = 2,
    timeout: float = 5.0,
) -> T:
    """`op(connection)`, retried on a fresh connection when the first one turns out dead.

    The first query after a PostgreSQL restart typically fails on a stale pooled socket;
    the retry then connects to the new server, so callers see no error at all. Only for
    idempotent `op`s (reads, upserts): a write may have committed before the socket died.
    """
    for attempt in range(1, attempts + 1):
        try:
            async with acquire(pool, timeout=timeout) as conn:
                return await op(conn)
        except DatabaseUnavailable:
            if attempt == attempts:
                raise
            await asyncio.sleep(0.05 * attempt)  # let a restarting server finish its start
    raise AssertionError("unreachable")  # attempts < 1


async def fetch_with_retry(pool: asyncpg.Pool, query: str, *args: Any, attempts: int = 2) -> list[asyncpg.Record]:
    """`pool.fetch(query, *args)` through `run`: read-only queries survive a restart."""
    return await run(pool, lambda conn: conn.fetch(query, *args), attempts=attempts)


# --- migrations -------------------------------------------------------------------------


def lock_key(service: str) -> int:
    """The advisory lock key of `service`: a signed 64-bit int, stable across processes
    and Python versions (hash() is salted per process, so it cannot be used)."""
    digest = hashlib.sha256(f"meshvisor.migrate:{service}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def migration_files(folder: Path) -> list[tuple[str, Path]]:
    """(version, path) of each migration in order; version is the file name without .sql.

    A .sql file that does not follow NNNN_name.sql, or two files with one number, is an
    error rather than silently skipped or applied in an arbitrary order.
    """
    found: dict[str, tuple[str, Path]] = {}
    for path in sorted(folder.glob("*.sql")):
        match = _MIGRATION_FILE.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migration files are named NNNN_name.sql")
        number = match.group(1)
        if number in found:
            raise MigrationError(f"{path.name} and {found[number][1].name} share the number {number}")
        found[number] = (path.stem, path)
    return [found[number] for number in sorted(found)]


async def migrate(
    pool_or_dsn: asyncpg.Pool | str, folder: Path, *, service: str, timeout: float = 600.0
) -> list[str]:
    """Apply the pending migrations in `folder`, each in its own transaction; returns the
    versions applied by this call (empty when another instance already did them).

    Instances starting together serialise on the service's advisory lock: the first applies,
    the others wait, then find every version recorded. `timeout` bounds the wait for the
    lock and each file (migrations may legitimately run longer than ordinary queries).
    """
    files = migration_files(folder)
    try:
        if isinstance(pool_or_dsn, str):
            conn = await asyncpg.connect(pool_or_dsn, timeout=30)
            try:
                return await _migrate_locked(conn, files, service, timeout)
            finally:
                await conn.close()
        async with acquire(pool_or_dsn, timeout=timeout) as conn:
            return await _migrate_locked(conn, files, service, timeout)
    except Exception as exc:
        if is_unavailable(exc) and not isinstance(exc, DatabaseUnavailable):
            raise DatabaseUnavailable(f"database unavailable while migrating: {_describe(exc)}") from exc
        raise


async def _migrate_locked(
    conn: asyncpg.Connection, files: list[tuple[str, Path]], service: str, timeout: float
) -> list[str]:
    key = lock_key(service)
    # The pool's statement_timeout would cancel a long wait for the lock or a long file.
    await conn.execute("SET statement_timeout = 0")
    await conn.execute("SELECT pg_advisory_lock($1)", key, timeout=timeout)
    try:
        return await _apply(conn, files, service, timeout)
    finally:
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", key)
            await conn.execute("RESET statement_timeout")  # back to the connection's default


async def _apply(conn: asyncpg.Connection, files: list[tuple[str, Path]], service: str, timeout: float) -> list[str]:
    await conn.execute(
        """CREATE TABLE IF NOT EXISTS schema_migrations (
               version text PRIMARY KEY,
               sha256 text NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT now()
           )"""
    )
    applied = {r["version"]: r["sha256"] for r in await conn.fetch("SELECT version, sha256 FROM schema_migrations")}
    contents = {version: path.read_bytes() for version, path in files}
    # Check every applied file before applying anything: an edited migration means the
    # database and the code disagree about the schema, and running on would hide that.
    for version, _path in files:
        if version in applied:
            now = hashlib.sha256(contents[version]).hexdigest()
            if now != applied[version]:
                raise MigrationError(
                    f"migration {version} of service {service!r} was changed after it was applied "
                    f"(recorded sha256 {applied[version][:12]}…, file now {now[:12]}…); "
                    "restore the file and put the change in a new migration"
                )
    missing = sorted(set(applied) - set(contents))
    if missing:
        # An older release starting against a newer schema: worth saying, not fatal.
        log.warning("applied migrations have no file", extra={"service": service, "versions": missing})
    done: list[str] = []
    for version, _path in files:
        if version in applied:
            continue
        sql = contents[version].decode()
        started = time.monotonic()
        try:
            async with conn.transaction():
                await conn.execute(sql, timeout=timeout)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, sha256) VALUES ($1, $2)",
                    version,
                    hashlib.sha256(contents[version]).hexdigest(),
                )
        except Exception as exc:
            if is_unavailable(exc):
                raise
            raise MigrationError(f"migration {version} of service {service!r} failed: {_describe(exc)}") from exc
        log.info(
            "migration applied",
            extra={"service": service, "version": version, "seconds": round(time.monotonic() - started, 3)},
        )
        done.append(version)
    return done
