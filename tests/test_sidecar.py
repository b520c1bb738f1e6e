"""Sidecars started by the supervisor, against a real Consul agent."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time

import aiohttp
import psutil
import pytest

from tests.helpers import Project, alive, mesh_project, wait_for


@pytest.fixture
def make_mesh(agent):
    made = []

    def make(services: dict[str, str]) -> Project:
        """services: name -> extra TOML lines; every service runs tests/programs/web.py."""
        p = mesh_project(agent.address, services, drain_seconds=1.0)
        made.append(p)
        return p

    yield make
    for p in made:
        p.cleanup()


def rows_by_process(p: Project) -> dict[str, dict]:
    return {r["process"]: r for r in p.rows()}


def environ(pid: int) -> dict[str, str]:
    raw = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_registration_lifecycle(make_mesh, agent):
    p = make_mesh({"api": 'instances = 2\nroute = "/api/v1/api"\nopenapi = "/openapi.json"\nidempotency_key = true'})
    started = time.monotonic()
    p.start()
    # start --detach returns only once Consul reports every instance passing.
    passing = agent.passing("api")
    print(f"2 instances registered and passing {time.monotonic() - started:.1f}s after start")
    assert sorted(s["Meta"]["instance"] for s in passing) == ["1", "2"]
    rows = rows_by_process(p)
    for s in passing:
        index = s["Meta"]["instance"]
        assert s["Port"] == rows[f"api.{index}.sidecar"]["port"], "Consul has the sidecar's public port"
        assert s["Meta"]["route"] == "/api/v1/api" and s["Meta"]["openapi"] == "/openapi.json"
        assert s["Meta"]["idempotency_key"] == "true"
        assert s["Meta"]["version"] == "1" and s["ID"].startswith("api-") and s["ID"].endswith(f"-{index}")
    assert rows["api.1"]["consul"] in ("passing", "")  # filled in by the next status sample
    wait_for(lambda: rows_by_process(p)["api.1"]["consul"] == "passing", 5, what="status shows Consul health")
    assert "CONSUL" in p.cli("status", check=True).stdout

    # The app is reached through the sidecar; the app itself listens on 127.0.0.1 only.
    app_port = rows["api.1"]["port"]
    assert any(c.laddr.port == app_port and c.laddr.ip == "127.0.0.1"
               for c in psutil.Process(rows["api.1"]["pid"]).net_connections() if c.status == "LISTEN")

    # App killed: critical at once (the supervisor tells the sidecar), passing after restart.
    killed = time.monotonic()
    os.kill(rows["api.1"]["pid"], signal.SIGKILL)
    sid = next(s["ID"] for s in passing if s["Meta"]["instance"] == "1")
    wait_for(lambda: agent.checks("api").get(sid) == "critical", 5, interval=0.05, what="check critical")
    critical_after = time.monotonic() - killed
    wait_for(lambda: agent.checks("api").get(sid) == "passing", 15, interval=0.1, what="check passing again")
    print(f"check critical {critical_after:.2f}s after kill -9 of the app, passing again "
          f"{time.monotonic() - killed:.1f}s after")
    assert critical_after < 2
    assert rows_by_process(p)["api.1.sidecar"]["pid"] == rows["api.1.sidecar"]["pid"], "the sidecar stayed"

    # Scale down: the instance disappears from Consul; stop: everything does.
    p.cli("scale", "api=1", check=True)
    assert [s["Meta"]["instance"] for s in agent.passing("api")] == ["1"]
    assert len(agent.checks("api")) == 1, "deregistered, not merely critical"
    p.cli("stop", check=True)
    assert agent.checks("api") == {}


def test_agent_restart_loses_state_and_sidecars_register_again(plain_agent):
    # A dev agent (no ACLs, state in memory): a restart is an agent that lost everything.
    agent = plain_agent
    p = mesh_project(agent.address, {"api": "instances = 2"}, drain_seconds=1.0)
    try:
        p.start()
        before = {r["process"]: r["pid"] for r in p.rows()}
        assert len(agent.passing("api")) == 2
        agent.stop()
        time.sleep(1)
        agent.start()
        back = time.monotonic()
        assert agent.checks("api") == {}, "a dev agent forgets every registration"
        wait_for(lambda: len(agent.passing("api")) == 2, 10, interval=0.1, what="registrations back")
        print(f"both registrations back and passing {time.monotonic() - back:.1f}s after the agent restart")
        assert {r["process"]: r["pid"] for r in p.rows()} == before, "no instance was touched"
    finally:
        p.cleanup()


async def _burst(url: str, total: int, concurrency: int, during=None):
    """`total` GETs with `concurrency` workers; returns (statuses, pids served)."""
    statuses, pids = [], []
    queue = asyncio.Queue()
    for n in range(total):
        queue.put_nowait(n)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        async def worker():
            while not queue.empty():
                n = queue.get_nowait()
                if during is not None and n == total // 3:
                    during()
                try:
                    async with session.get(f"{url}/item/{n}") as resp:
                        body = await resp.json(content_type=None)
                        statuses.append(resp.status)
                        pids.append(body.get("pid"))
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    statuses.append(repr(exc))
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses, pids


def test_upstream_balances_and_survives_sigkill_mid_burst(make_mesh, agent):
    p = make_mesh({"backend": "instances = 3", "client": 'upstreams = ["backend"]'})
    p.start()
    rows = rows_by_process(p)
    url = environ(rows["client.1"]["pid"])["UPSTREAM_BACKEND_URL"]
    apps = {rows[f"backend.{i}"]["pid"] for i in (1, 2, 3)}

    statuses, pids = asyncio.run(_burst(url, 300, 10))
    assert statuses == [200] * 300
    shares = {pid: pids.count(pid) for pid in apps}
    print(f"300 requests over 3 instances: {sorted(shares.values())}")
    assert all(count >= 30 for count in shares.values()), shares

    victim = rows["backend.2"]["pid"]
    statuses, pids = asyncio.run(_burst(url, 900, 10, during=lambda: os.kill(victim, signal.SIGKILL)))
    failed = [s for s in statuses if s != 200]
    print(f"900 requests, backend.2 app killed with SIGKILL after 300: {len(failed)} failed")
    assert not failed, failed[:5]
    assert not alive([victim])
    metrics = asyncio.run(_get_text(f"http://127.0.0.1:{_admin_port(p, agent, 'client.1')}/metrics"))
    assert "sidecar_retries_total" in metrics


def _admin_port(p: Project, agent, instance: str) -> int:
    """From its registration (its metrics are served there): a forked sidecar's
    /proc/PID/environ is the fork server's, not the environment it was given."""
    service_id = rows_by_process(p)[f"{instance}.sidecar"]["service_id"]
    return int(agent.get(f"/v1/agent/service/{service_id}", token=agent.token)["Meta"]["metrics_port"])


async def _get_text(url: str) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as resp:
            return await resp.text()


def test_50mb_bodies_stream_through_inbound_and_upstream(make_mesh, agent):
    p = make_mesh({"backend": "instances = 1", "client": 'upstreams = ["backend"]'})
    p.start()
    rows = rows_by_process(p)
    # The public listener takes mTLS only: asked as the client service (allowed: it has
    # backend among its upstreams).
    inbound = f"https://127.0.0.1:{rows['backend.1.sidecar']['port']}"
    as_client = agent.identity("client")
    upstream = environ(rows["client.1"]["pid"])["UPSTREAM_BACKEND_URL"]
    size = 50 * 1024 * 1024
    body = os.urandom(1 << 20) * 50
    expected = hashlib.sha256(body).hexdigest()
    sidecars = [psutil.Process(rows["backend.1.sidecar"]["pid"]), psutil.Process(rows["client.1.sidecar"]["pid"])]
    rss_before = [s.memory_info().rss for s in sidecars]
    peak = [0, 0]

    async def transfer(url: str):
        tls = as_client if url.startswith("https") else None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            async with session.post(f"{url}/upload", data=body, ssl=tls) as resp:
                assert resp.status == 200, (resp.status, await resp.text())
                got = await resp.json()
                assert got["length"] == size and got["sha256"] == expected
            digest, length = hashlib.sha256(), 0
            async with session.get(f"{url}/bytes/{size}", ssl=tls) as resp:
                assert resp.status == 200, (resp.status, await resp.text())
                async for chunk in resp.content.iter_chunked(1 << 20):
                    digest.update(chunk)
                    length += len(chunk)
                    for i, s in enumerate(sidecars):
                        peak[i] = max(peak[i], s.memory_info().rss)
            assert length == size
            return digest.hexdigest()

    started = time.monotonic()
    down_in = asyncio.run(transfer(inbound))
    down_up = asyncio.run(transfer(upstream))
    print(f"2 x (50 MB up + 50 MB down) in {time.monotonic() - started:.1f}s; sidecar RSS growth "
          f"{[(pk - b) // 1024 // 1024 for pk, b in zip(peak, rss_before)]} MB")
    assert down_in == down_up == hashlib.sha256((bytes(range(256)) * 4096) * 50).hexdigest()
    for pk, before in zip(peak, rss_before):
        assert pk - before < 25 * 1024 * 1024, "a sidecar buffered the body instead of streaming it"


def test_rolling_restart_and_scale_under_load_lose_nothing(make_mesh, agent):
    import threading

    p = make_mesh({"backend": "instances = 2", "client": 'upstreams = ["backend"]'})
    p.start()
    url = environ(rows_by_process(p)["client.1"]["pid"])["UPSTREAM_BACKEND_URL"]
    old_apps = {r["pid"] for r in p.rows("backend") if r["role"] == "app"}

    def operate():
        time.sleep(0.5)
        p.cli("restart", "backend", check=True)
        p.cli("scale", "backend=3", check=True)

    operator = threading.Thread(target=operate)
    results: dict = {}

    async def load():
        # Bounded: at most 4000 requests or until the operations are done.
        statuses, pids = [], []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            async def worker():
                while operator.is_alive() and len(statuses) < 4000:
                    try:
                        async with session.get(f"{url}/x") as resp:
                            statuses.append(resp.status)
                            pids.append((await resp.json(content_type=None)).get("pid"))
                    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                        statuses.append(repr(exc))
            await asyncio.gather(*(worker() for _ in range(8)))
        results.update(statuses=statuses, pids=pids)

    started = time.monotonic()
    operator.start()
    asyncio.run(load())
    operator.join()
    statuses = results["statuses"]
    failed = [s for s in statuses if s != 200]
    new_apps = {r["pid"] for r in p.rows("backend") if r["role"] == "app"}
    served_by_new = {pid for pid in results["pids"] if pid in new_apps}
    print(f"rolling restart of 2 + scale to 3 under load: {len(statuses)} requests in "
          f"{time.monotonic() - started:.1f}s, {len(failed)} failed")
    assert not failed, failed[:5]
    assert not old_apps & new_apps and len(new_apps) == 3
    assert served_by_new, "the new instances received traffic"
    assert len(agent.passing("backend")) == 3
