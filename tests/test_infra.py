"""The embedded Consul agent and PostgreSQL server, run by the supervisor on free ports."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import urllib.request

import asyncpg
import pytest

from supervisor.infra import postgres as postgres_infra
from supervisor.infra import InfraError
from supervisor.infra import prometheus as prometheus_infra
from tests.helpers import PROGRAMS, PY, ROOT, Project, alive, free_ports, free_range, wait_for

try:
    PROMETHEUS = prometheus_infra.find_binary(ROOT)
except InfraError:
    PROMETHEUS = None


@pytest.fixture
def stack():
    http, server, serf_lan, pg, prometheus = free_ports(5)
    low, high = free_range(20)
    p = Project(
        f"""\
        auth: {PY} {PROGRAMS / 'web.py'}
        shop: {PY} {PROGRAMS / 'web.py'}
        """,
        f"""\
        [supervisor]
        port_range = [{low}, {high}]

        [consul]
        address = "127.0.0.1:{http}"
        server_port = {server}
        serf_lan_port = {serf_lan}
        serf_wan_port = -1

        [postgres]
        port = {pg}

        [prometheus]
        mode = "{'embedded' if PROMETHEUS else 'off'}"
        address = "127.0.0.1:{prometheus}"
        scrape_interval = "1s"

        [services.auth]
        database = "auth"
        sidecar = false

        [services.shop]
        database = "shop"
        sidecar = false
        instances = 2
        """,
    )
    p.http, p.server, p.pg, p.prometheus = http, server, pg, prometheus
    yield p
    p.cleanup()


def consul_get(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return json.loads(resp.read())


def instance_env(pid: int) -> dict[str, str]:
    raw = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_embedded_consul_and_postgres(stack):
    p = stack
    p.start(timeout=120)
    rows = {r["process"]: r for r in p.rows()}
    assert rows["consul"]["state"] == "RUNNING" and rows["postgres"]["state"] == "RUNNING"

    # Consul: a single-node server with a leader, and its UI.
    assert consul_get(p.http, "/v1/status/leader") == f"127.0.0.1:{p.server}"
    with urllib.request.urlopen(f"http://127.0.0.1:{p.http}/ui/", timeout=5) as resp:
        assert resp.status == 200 and b"Consul" in resp.read()
    assert (p.state_dir / "consul").is_dir()

    # Prometheus reads the embedded agent's catalog with the anonymous token (no
    # agent:read): every discovery call succeeds.
    if PROMETHEUS:
        def discovery(what: str) -> float:
            query = urllib.parse.urlencode({"query": f"sum({what})"})
            result = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{p.prometheus}/api/v1/query?{query}",
                                                       timeout=5).read())["data"]["result"]
            return float(result[0]["value"][1]) if result else -1.0
        wait_for(lambda: discovery("prometheus_sd_consul_rpc_duration_seconds_count") >= 1
                 or discovery("prometheus_sd_consul_rpc_failures_total") > 0, 60,
                 what="Prometheus to ask Consul (and tell how it went)")
        assert discovery("prometheus_sd_consul_rpc_failures_total") == 0

    # PostgreSQL: each instance got a DATABASE_URL for its own database and role.
    env_auth = instance_env(rows["auth.1"]["pid"])
    env_shop = instance_env(rows["shop.2"]["pid"])
    assert env_auth["DATABASE_URL"].startswith("postgresql://auth:")
    assert f"@127.0.0.1:{p.pg}/auth?application_name=auth.1" in env_auth["DATABASE_URL"]
    assert "application_name=shop.2" in env_shop["DATABASE_URL"]
    assert env_auth["CONSUL_HTTP_ADDR"] == f"127.0.0.1:{p.http}"
    # With ACLs the password is derived from the management token (every host of a
    # cluster computes the same one); nothing is written beside it.
    token = (p.state_dir / "secrets" / "consul-management-token").read_text().strip()
    assert f"auth:{postgres_infra.derived_password(token, 'auth')}@" in env_auth["DATABASE_URL"]
    assert not (p.state_dir / "postgres" / "credentials.json").exists()

    async def check():
        conn = await asyncpg.connect(env_auth["DATABASE_URL"])
        assert await conn.fetchval("SELECT current_user") == "auth"
        await conn.execute("CREATE TABLE kept (v text)")
        await conn.execute("INSERT INTO kept VALUES ('survives a restart')")
        await conn.close()
        # The shop role may not connect to auth's database, nor log in with a wrong password.
        shop_on_auth = env_shop["DATABASE_URL"].replace("/shop?", "/auth?")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await asyncpg.connect(shop_on_auth)
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(f"postgresql://auth:wrong@127.0.0.1:{p.pg}/auth")

    asyncio.run(check())
    infra_pids = [rows["consul"]["pid"], rows["postgres"]["pid"]]
    p.cli("stop", check=True)
    assert not alive(infra_pids)

    # State survives stop/start: same data, same passwords, no second initdb.
    p.start(timeout=120)
    env_again = instance_env({r["process"]: r for r in p.rows()}["auth.1"]["pid"])
    assert env_again["DATABASE_URL"] == env_auth["DATABASE_URL"]

    async def still_there():
        conn = await asyncpg.connect(env_again["DATABASE_URL"])
        assert await conn.fetchval("SELECT v FROM kept") == "survives a restart"
        await conn.close()

    asyncio.run(still_there())
    assert p.log("postgres").count("initdb ") == 1


def test_external_postgres_is_one_dsn_away(consul_agent):
    """Project `b` uses the PostgreSQL server that project `a` runs, through an admin DSN
    (here over its Unix socket): the supervisor provisions b's role and database there."""
    pg = free_ports(1)[0]
    low, high = free_range(20)
    a = Project(f"a: {PY} {PROGRAMS / 'web.py'}\n", f"""
[supervisor]
port_range = [{low}, {high}]
[consul]
mode = "external"
address = "{consul_agent}"
[prometheus]
mode = "off"
[postgres]
port = {pg}
[services.a]
database = "a"
sidecar = false
""")
    b = None
    try:
        a.start(timeout=120)
        socket_dir = a.state_dir / "postgres" / "run"
        low2, high2 = free_range(20)
        b = Project(f"b: {PY} {PROGRAMS / 'web.py'}\n", f"""
[supervisor]
port_range = [{low2}, {high2}]
[consul]
mode = "external"
address = "{consul_agent}"
[prometheus]
mode = "off"
[postgres]
mode = "external"
dsn = "postgresql://postgres@/postgres?host={socket_dir}&port={pg}"
[services.b]
database = "b"
sidecar = false
""")
        b.start(timeout=60)
        assert "postgres" not in {r["process"] for r in b.rows()}, "no embedded server in external mode"
        url = instance_env(b.rows("b")[0]["pid"])["DATABASE_URL"]
        assert url.startswith("postgresql://b:") and f"host={socket_dir}".replace("/", "%2F") in url

        a_url = instance_env(a.rows("a")[0]["pid"])["DATABASE_URL"]

        async def check():
            conn = await asyncpg.connect(url)
            assert await conn.fetchval("SELECT current_user || '@' || current_database()") == "b@b"
            await conn.close()
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await asyncpg.connect(a_url.replace("/a?", "/b?"))

        asyncio.run(check())
    finally:
        if b is not None:
            b.cleanup()
        a.cleanup()
