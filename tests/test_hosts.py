"""Three hosts in one Consul cluster (network namespaces on a bridge, tests/cluster.py):
the gateway on host 1 routes over every host's instances with mTLS; a host that dies or
stops under load costs no request; a stopped host comes back by itself; a client host
may start before the server; two bootstrapped servers are refused (split brain).

Every request goes to addresses of the namespaces these tests made.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import asyncpg
import pytest

from supervisor.infra.postgres import derived_password
from tests import netns
from tests.cluster import POSTGRES_PORT, Cluster
from tests.figures import figure
from tests.helpers import PROGRAMS, PY, wait_for
from tests.load import ITEMS, Load

pytestmark = pytest.mark.skipif(netns.available() is not None, reason=f"no network namespaces here: {netns.available()}")


def request(url: str, method: str = "GET", body=None, token: str = "") -> tuple[int, dict | None]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as err:
        raw = err.read()
        return err.code, json.loads(raw) if raw else None


def served(host, service: str, path: str) -> int:
    """Requests under `path` that `host`'s instances of `service` took in (their sidecars'
    inbound access-log lines)."""
    count = 0
    for log in sorted((host.state_dir / "logs").glob(f"{service}.*.sidecar.log")):
        for line in log.read_text(errors="replace").splitlines():
            if '"msg":"request"' in line:
                record = json.loads(line[line.index("{"):])
                count += record.get("listener") == "inbound" and record.get("path", "").startswith(path)
    return count


def gateway_instances(cluster: Cluster, prefix: str) -> int:
    status, health = request(cluster.gateway + "/health")
    return health["routes"].get(prefix, {}).get("instances", 0) if status == 200 else -1


@pytest.fixture(scope="module")
def cluster():
    with netns.Hosts(3) as hosts:
        c = Cluster(hosts)
        try:
            for h in c.hosts:
                h.start()
            yield c
        finally:
            c.cleanup()


@pytest.fixture(scope="module")
def token(cluster):
    status, _ = request(cluster.gateway + "/api/v1/auth/register", "POST",
                        {"email": "hosts@example.com", "password": "long password", "name": "Hosts"})
    assert status == 201
    status, pair = request(cluster.gateway + "/api/v1/auth/login", "POST",
                           {"email": "hosts@example.com", "password": "long password"})
    assert status == 200, pair
    return pair["access_token"]


def settled(cluster: Cluster) -> None:
    wait_for(lambda: cluster.passing_nodes("example") == ["host2", "host3"], 60, what="example passing on hosts 2, 3")
    wait_for(lambda: cluster.passing_nodes("auth") == ["host1", "host2", "host3"], 60, what="auth on every host")
    wait_for(lambda: gateway_instances(cluster, "/api/v1/example") == 2, 30, what="the gateway to route to both")


def test_1_routes_over_every_host(cluster, token):
    settled(cluster)
    nodes = cluster.consul_get("/v1/agent/members")
    assert sorted((m["Name"], m["Tags"]["role"]) for m in nodes) == [
        ("host1", "consul"), ("host2", "node"), ("host3", "node")]
    registered = {e["Node"]["Node"]: e["Service"]["Address"] for e in cluster.consul_get("/v1/health/connect/auth")}
    assert registered == {h.node: h.address for h in cluster.hosts}  # [supervisor] advertise

    before = {h.node: served(h, "example", ITEMS) for h in cluster.hosts}
    logins = {h.node: served(h, "auth", "/api/v1/auth/login") for h in cluster.hosts}
    for n in range(40):
        status, body = request(cluster.gateway + ITEMS, "POST", {"title": f"item {n}", "price_cents": 100}, token)
        assert status == 201, body
        status, _ = request(cluster.gateway + "/api/v1/auth/login", "POST",
                            {"email": "hosts@example.com", "password": "long password"})
        assert status == 200
    status, listed = request(cluster.gateway + ITEMS + "?limit=100", token=token)
    assert status == 200 and len(listed["items"]) >= 40
    items = {h.node: served(h, "example", ITEMS) - before[h.node] for h in cluster.hosts}
    login = {h.node: served(h, "auth", "/api/v1/auth/login") - logins[h.node] for h in cluster.hosts}
    assert items["host2"] > 0 and items["host3"] > 0, items
    assert all(login[h] > 0 for h in login), login
    figure(f"[hosts] 41 example requests through the gateway on host 1, served per host {items}; "
           f"40 logins, served per host {login}")

    # status --cluster on a client host shows all three hosts and every instance.
    shown = cluster.hosts[2].cli("status", "--cluster", check=True).stdout
    for h in cluster.hosts:
        assert h.node in shown
    # PostgreSQL on host 1's address: each service's role, with the password every host
    # derives from the management token, to its own database only; never the superuser.
    asyncio.run(postgres_from_the_network(cluster))


async def postgres_from_the_network(cluster: Cluster) -> None:
    address, port = cluster.hosts[0].address, POSTGRES_PORT
    password = derived_password(cluster.token, "auth")
    conn = await asyncpg.connect(host=address, port=port, user="auth", password=password, database="auth", timeout=5)
    assert await conn.fetchval("SELECT current_user") == "auth"
    await conn.close()
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):  # no pg_hba entry
        await asyncpg.connect(host=address, port=port, user="auth", password=password, database="example", timeout=5)
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await asyncpg.connect(host=address, port=port, user="postgres", password="x", database="postgres", timeout=5)
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(host=address, port=port, user="auth", password="wrong", database="auth", timeout=5)


def test_2_host3_killed_under_load(cluster, token):
    settled(cluster)
    h3 = cluster.hosts[2]
    with Load(cluster.gateway, token, workers=4, rate=60, max_seconds=90) as load:
        load.start()
        load.run_for(3)
        killed = time.monotonic()
        h3.host.kill_all()  # every process of host 3: its supervisor, agent, sidecars, apps
        wait_for(lambda: "host3" not in cluster.passing_nodes("example"), 20, interval=0.1,
                 what="host 3 to leave example's passing instances")
        left_after = time.monotonic() - killed
        wait_for(lambda: gateway_instances(cluster, "/api/v1/example") == 1, 10, what="the gateway's route to drop it")
        routed_after = time.monotonic() - killed
        load.run_for(3)
        result = load.stop()
    failed = result.failed()
    figure(f"[hosts] host 3 SIGKILLed under load: {result.summary()}, failed {len(failed)}, "
           f"left Consul's passing instances after {left_after:.1f}s, the gateway's routes after {routed_after:.1f}s")
    assert not failed, failed[:5]

    # It comes back by itself: `supervisor start` there, nothing by hand.
    h3.start()
    settled(cluster)


def test_3_host2_stopped_under_load_and_started_again(cluster, token):
    settled(cluster)
    h2 = cluster.hosts[1]
    with Load(cluster.gateway, token, workers=4, rate=60, max_seconds=120) as load:
        load.start()
        load.run_for(2)
        h2.stop()
        members = {m["Name"]: m["Status"] for m in cluster.consul_get("/v1/agent/members")}
        assert members["host2"] == 3, members  # left the cluster (serf: 3 = left)
        assert "host2" not in cluster.passing_nodes("auth")
        load.run_for(2)
        served_before = served(h2, "example", ITEMS)
        h2.start()
        settled(cluster)
        load.run_for(3)
        result = load.stop()
    gained = served(h2, "example", ITEMS) - served_before
    failed = result.failed()
    figure(f"[hosts] host 2 stopped under load and started again: {result.summary()}, failed {len(failed)}, "
           f"host 2 served {gained} requests after it came back")
    assert not failed, failed[:5]
    assert gained > 0


def web_services(index: int) -> str:
    return """
[services.web]
instances = 1
route = "/web"
drain_seconds = 0.5  # not what these tests are about: keeps the stops short
"""


def test_4_client_before_server_and_split_brain_refused():
    """A client host started first waits for the server and joins; a second server that
    bootstrapped alone and joins is refused."""
    with netns.Hosts(3) as hosts:
        c = Cluster(hosts, procfile=f"web: {PY} {PROGRAMS / 'web.py'}\n",
                    services={1: web_services(1), 2: web_services(2), 3: web_services(3)})
        try:
            client = c.hosts[1].start_background(wait=90)
            wait_for(lambda: "waiting" in c.hosts[1].log("supervisor"), 60, what="host 2 to say it waits")
            assert client.poll() is None  # still waiting for a server
            c.hosts[0].start()
            out, _ = client.communicate(timeout=100)
            assert client.returncode == 0, out
            wait_for(lambda: c.passing_nodes("web") == ["host1", "host2"], 30, what="web on hosts 1 and 2")

            # Host 3 as a server of its own (bootstrap_expect 1) that joins host 1: refused.
            third = c.hosts[2]
            text = third.config_path.read_text().replace('role = "client"', 'role = "server"\nbootstrap_expect = 1')
            third.config_path.write_text(text)
            done = third.cli("start", "--detach", "--wait", "60", timeout=120)
            assert done.returncode != 0
            assert "split brain" in third.log("supervisor"), third.log("supervisor")[-2000:]
            wait_for(lambda: not third.host.pids(), 20, what="host 3 to have nothing left running")
            figure(f"[hosts] split brain refused: {third.log('supervisor').splitlines()[-3][:160]}")
        finally:
            c.cleanup()
