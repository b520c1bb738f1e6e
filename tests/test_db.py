"""shared.kit.db against a real PostgreSQL: migrations (order, checksums, concurrency,
failure) and the pool's behaviour across a server restart."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import asyncpg.exceptions as pgerr
import pytest

from shared.kit.db import (
    DatabaseUnavailable,
    MigrationError,
    acquire,
    create_pool,
    fetch_with_retry,
    is_unavailable,
    lock_key,
    migrate,
)
from tests.pg import postgres_server  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def dsn(postgres_server) -> str:  # noqa: F811
    return postgres_server.create_database(f"t_{uuid.uuid4().hex[:12]}")


def write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(exist_ok=True)
    for name, sql in files.items():
        (folder / name).write_text(sql)
    return folder


BASIC = {
    "0001_items.sql": "CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL);",
    "0002_seed.sql": "INSERT INTO items (name) VALUES ('first');",
    "0003_price.sql": "ALTER TABLE items ADD COLUMN price int NOT NULL DEFAULT 0;",
}


async def table_state(conn: asyncpg.Connection) -> list[tuple]:
    return [tuple(r) for r in await conn.fetch("SELECT id, name, price FROM items ORDER BY id")]


# --- classification ------------------------------------------------------------------


def test_is_unavailable_tells_connection_failures_from_query_errors():
    assert is_unavailable(ConnectionRefusedError())
    assert is_unavailable(TimeoutError())
    assert is_unavailable(pgerr.ConnectionDoesNotExistError("gone"))
    assert is_unavailable(pgerr.AdminShutdownError("terminating"))
    assert is_unavailable(pgerr.CannotConnectNowError("starting up"))
    assert is_unavailable(asyncpg.InterfaceError("cannot perform operation: connection is closed"))
    assert is_unavailable(DatabaseUnavailable("x"))
    assert is_unavailable(asyncpg.InternalClientError("cannot switch to state 15; another operation (2) is in progress"))
    assert not is_unavailable(pgerr.UniqueViolationError("dup"))
    assert not is_unavailable(pgerr.QueryCanceledError("statement timeout"))
    assert not is_unavailable(pgerr.UndefinedTableError("no such table"))
    assert not is_unavailable(asyncpg.InterfaceError("another operation is in progress"))
    assert not is_unavailable(ValueError())


def test_lock_key_is_stable_signed_64_bit():
    assert lock_key("auth") == lock_key("auth") != lock_key("example")
    assert -(2**63) <= lock_key("auth") < 2**63
    # Pinned: another process (or Python version) must compute the same key.
    assert lock_key("auth") == int.from_bytes(hashlib.sha256(b"meshvisor.migrate:auth").digest()[:8], "big", signed=True)


# --- migrations ------------------------------------------------------------------------


async def test_migrations_apply_in_order_with_checksums_then_nothing(dsn, tmp_path):
    folder = write(tmp_path / "m", BASIC)
    (folder / "README.txt").write_text("not a migration")
    pool = await create_pool(dsn)
    try:
        assert await migrate(pool, folder, service="svc") == ["0001_items", "0002_seed", "0003_price"]
        async with acquire(pool) as conn:
            rows = await conn.fetch("SELECT version, sha256, applied_at FROM schema_migrations ORDER BY applied_at")
            assert [r["version"] for r in rows] == ["0001_items", "0002_seed", "0003_price"]
            for r in rows:
                expected = hashlib.sha256((folder / f"{r['version']}.sql").read_bytes()).hexdigest()
                assert r["sha256"] == expected
            assert await table_state(conn) == [(1, "first", 0)]
        assert await migrate(pool, folder, service="svc") == []
        assert await migrate(dsn, folder, service="svc") == [], "a DSN works as well as a pool"
        write(folder, {"0004_more.sql": "INSERT INTO items (name, price) VALUES ('second', 5);"})
        assert await migrate(dsn, folder, service="svc") == ["0004_more"]
    finally:
        await pool.close()


async def test_changed_applied_migration_is_refused(dsn, tmp_path):
    folder = write(tmp_path / "m", BASIC)
    await migrate(dsn, folder, service="svc")
    (folder / "0002_seed.sql").write_text("INSERT INTO items (name) VALUES ('edited');")
    write(folder, {"0004_more.sql": "INSERT INTO items (name) VALUES ('never');"})
    with pytest.raises(MigrationError, match=r"0002_seed .* was changed after it was applied"):
        await migrate(dsn, folder, service="svc")
    conn = await asyncpg.connect(dsn)
    try:
        assert await table_state(conn) == [(1, "first", 0)], "nothing applied after the refusal"
    finally:
        await conn.close()


async def test_badly_named_migration_is_an_error(dsn, tmp_path):
    folder = write(tmp_path / "m", {"0001_a.sql": "SELECT 1;", "2_b.sql": "SELECT 1;"})
    with pytest.raises(MigrationError, match="NNNN_name.sql"):
        await migrate(dsn, folder, service="svc")


async def test_failing_migration_rolls_back_that_file_only(dsn, tmp_path):
    folder = write(
        tmp_path / "m",
        {
            "0001_items.sql": BASIC["0001_items.sql"],
            # The first statement succeeds and must be rolled back with the failing one.
            "0002_bad.sql": "CREATE TABLE half (id int); INSERT INTO no_such_table VALUES (1);",
            "0003_after.sql": "CREATE TABLE after_bad (id int);",
        },
    )
    with pytest.raises(MigrationError, match=r"0002_bad .* failed: UndefinedTableError"):
        await migrate(dsn, folder, service="svc")
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT to_regclass('items') IS NOT NULL")
        assert not await conn.fetchval("SELECT to_regclass('half') IS NOT NULL")
        assert not await conn.fetchval("SELECT to_regclass('after_bad') IS NOT NULL")
        assert [r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")] == ["0001_items"]
        # Fixing the unapplied file is allowed (no checksum recorded for it) and resumes.
        (folder / "0002_bad.sql").write_text("CREATE TABLE half (id int);")
        assert await migrate(dsn, folder, service="svc") == ["0002_bad", "0003_after"]
    finally:
        await conn.close()


def slow_migrations(folder: Path) -> Path:
    # pg_sleep holds the first file open long enough for the other migrator to arrive
    # while it runs: without the lock both would try to create the table.
    return write(
        folder,
        {
            "0001_items.sql": "SELECT pg_sleep(0.5);" + BASIC["0001_items.sql"],
            "0002_seed.sql": BASIC["0002_seed.sql"],
            "0003_price.sql": BASIC["0003_price.sql"],
        },
    )


async def test_two_pools_migrating_at_once_apply_each_file_once(dsn, tmp_path):
    folder = slow_migrations(tmp_path / "m")
    pools = [await create_pool(dsn), await create_pool(dsn)]
    try:
        results = await asyncio.gather(*(migrate(p, folder, service="svc") for p in pools))
        assert sorted(results, key=len) == [[], ["0001_items", "0002_seed", "0003_price"]]
        states = []
        for p in pools:
            async with acquire(p) as conn:
                states.append(await table_state(conn))
                assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == 3
        assert states[0] == states[1] == [(1, "first", 0)], "the seed row was inserted once"
    finally:
        for p in pools:
            await p.close()


MIGRATE_SCRIPT = """
import asyncio, json, os, sys
from pathlib import Path
from shared.kit.db import migrate
print(json.dumps(asyncio.run(migrate(os.environ["DATABASE_URL"], Path(sys.argv[1]), service="svc"))))
"""


async def test_two_processes_migrating_at_once_apply_each_file_once(dsn, tmp_path):
    folder = slow_migrations(tmp_path / "m")
    env = {**os.environ, "DATABASE_URL": dsn, "PYTHONPATH": str(ROOT)}  # the DSN stays off argv
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", MIGRATE_SCRIPT, str(folder),
            env=env, cwd=str(ROOT), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 60)
    for p, (_out, err) in zip(procs, outputs):
        assert p.returncode == 0, err.decode()
    results = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outputs]
    assert sorted(results, key=len) == [[], ["0001_items", "0002_seed", "0003_price"]]
    conn = await asyncpg.connect(dsn)
    try:
        assert await table_state(conn) == [(1, "first", 0)]
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == 3
    finally:
        await conn.close()


# --- pool behaviour --------------------------------------------------------------------


async def test_statement_timeout_cancels_slow_queries_as_query_errors(dsn):
    pool = await create_pool(dsn, command_timeout=1.0)
    try:
        started = time.monotonic()
        with pytest.raises(pgerr.QueryCanceledError) as caught:
            await fetch_with_retry(pool, "SELECT pg_sleep(5)")
        assert time.monotonic() - started < 1.5
        assert not is_unavailable(caught.value)
        assert (await fetch_with_retry(pool, "SELECT 1 AS one"))[0]["one"] == 1, "the pool still serves"
    finally:
        await pool.close()


async def test_pool_connections_bound_idle_transactions(dsn):
    """A stuck process cannot hold locks forever: the server ends a session idle in a transaction."""
    pool = await create_pool(dsn)
    try:
        async with pool.acquire() as conn:
            assert await conn.fetchval("SHOW idle_in_transaction_session_timeout") == "30s"
    finally:
        await pool.close()


async def test_unreachable_server_is_database_unavailable_without_the_password(postgres_server, caplog):  # noqa: F811
    caplog.set_level(logging.DEBUG)
    secret = "s3cret-Pa55word"
    bad = f"postgresql://nobody:{secret}@127.0.0.1:{postgres_server.port + 1}/none"
    with pytest.raises(DatabaseUnavailable) as caught:
        await create_pool(bad, command_timeout=1.0)
    assert secret not in str(caught.value) and secret not in caplog.text


async def test_pool_survives_a_server_restart(postgres_server, dsn, caplog):  # noqa: F811
    caplog.set_level(logging.DEBUG)
    pool = await create_pool(dsn, min_size=2, command_timeout=2.0)
    try:
        assert (await fetch_with_retry(pool, "SELECT 1 AS one"))[0]["one"] == 1
        await asyncio.to_thread(postgres_server.stop)
        try:
            # While it is down: a prompt DatabaseUnavailable, never a hang.
            waits = []
            for _ in range(3):
                started = time.monotonic()
                with pytest.raises(DatabaseUnavailable):
                    await fetch_with_retry(pool, "SELECT 1")
                waits.append(time.monotonic() - started)
            assert max(waits) < 2.0 + 1.0
            print(f"DatabaseUnavailable while down after at most {max(waits) * 1000:.0f} ms")
            with pytest.raises(DatabaseUnavailable):
                async with acquire(pool) as conn:
                    await conn.fetchval("SELECT 1")
        finally:
            await asyncio.to_thread(postgres_server.start)
        # Back up: the pool created before the restart serves the very next request.
        started = time.monotonic()
        assert (await fetch_with_retry(pool, "SELECT 2 AS two"))[0]["two"] == 2
        recovery = time.monotonic() - started
        assert recovery < 3.0
        # And plain acquire works too, on fresh connections.
        for _ in range(4):
            async with acquire(pool) as conn:
                assert await conn.fetchval("SELECT 3") == 3
        print(f"recovery after restart: {recovery * 1000:.0f} ms")
        assert dsn.split(":")[2].split("@")[0] not in caplog.text, "the password is never logged"
    finally:
        await pool.close()


async def test_pool_recovers_for_requests_arriving_after_a_quiet_restart(postgres_server, dsn):  # noqa: F811
    """No request while the server was down: the first ones after the restart succeed."""
    pool = await create_pool(dsn, min_size=3, max_size=3, command_timeout=2.0)
    try:
        await asyncio.gather(*(fetch_with_retry(pool, "SELECT pg_sleep(0.05)") for _ in range(3)))
        await asyncio.to_thread(postgres_server.stop)
        await asyncio.to_thread(postgres_server.start)
        started = time.monotonic()
        results = await asyncio.gather(*(fetch_with_retry(pool, "SELECT 7 AS n") for _ in range(3)))
        assert [r[0]["n"] for r in results] == [7, 7, 7]
        print(f"first requests after restart: {(time.monotonic() - started) * 1000:.0f} ms")
    finally:
        await pool.close()


async def test_query_cut_off_by_the_server_is_retried_on_a_fresh_connection(postgres_server, dsn, caplog):  # noqa: F811
    caplog.set_level(logging.WARNING, logger="meshvisor.db")
    role = dsn.rsplit("/", 1)[1]
    pool = await create_pool(dsn, min_size=1, max_size=2, command_timeout=5.0)
    try:

        def kill_backends() -> None:
            time.sleep(0.3)
            postgres_server.psql(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
            )

        killer = asyncio.create_task(asyncio.to_thread(kill_backends))
        started = time.monotonic()
        # The first attempt dies mid-query; the retry runs it again on a new connection.
        rows = await fetch_with_retry(pool, "SELECT pg_sleep(0.6), 9 AS n")
        await killer
        assert rows[0]["n"] == 9
        assert time.monotonic() - started > 0.85, "the query ran twice"
        assert "reconnecting" in caplog.text
        # Without retry the failure surfaces as DatabaseUnavailable, not a raw asyncpg error.
        killer = asyncio.create_task(asyncio.to_thread(kill_backends))
        with pytest.raises(DatabaseUnavailable):
            async with acquire(pool) as conn:
                await conn.fetchval("SELECT pg_sleep(0.6)")
        await killer
    finally:
        await pool.close()
