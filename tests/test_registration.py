"""shared.mesh.registration and shared.mesh.consul against a real Consul agent."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from aiohttp import web

from shared.mesh.consul import (
    agent_version,
    call,
    http_check,
    make_client,
    parse_address,
    parse_version,
    registration_payload,
)
from shared.mesh.registration import Registration
from tests.consul_testing import client, dev_agent, eventually, health_app  # noqa: F401 (fixtures)
from tests.helpers import free_port


def make_registration(client, app, **overrides) -> Registration:
    name = overrides.pop("name", f"reg-{uuid.uuid4().hex[:8]}")
    settings = dict(
        service_id=f"{name}-test-1", name=name, address="127.0.0.1", port=20001,
        meta={"route": f"/api/v1/{name}", "version": "0.1.0"}, check_url=app.url,
        check_interval="1s", check_timeout="500ms", tags=["mesh"],
    )
    settings.update(overrides)
    return Registration(client, **settings)


async def agent_service(client, service_id: str):
    reply = await call(client, "GET", f"/v1/agent/service/{service_id}")
    return reply.json() if reply.status == 200 else None


async def agent_checks(client, service_id: str) -> dict:
    checks = (await call(client, "GET", "/v1/agent/checks")).raise_for_status().json()
    return {cid: c for cid, c in checks.items() if c["ServiceID"] == service_id}


# -- pure parts


def test_parse_address():
    assert parse_address("127.0.0.1:8500") == ("127.0.0.1", 8500)
    assert parse_address("http://consul.local:8501/") == ("consul.local", 8501)
    assert parse_address("[::1]:8500") == ("::1", 8500)
    assert parse_address("localhost") == ("localhost", 8500)
    with pytest.raises(ValueError):
        parse_address("127.0.0.1:port")


def test_parse_version():
    assert parse_version("1.8.7") == (1, 8, 7)
    assert parse_version("1.10.0-beta1") == (1, 10, 0)
    assert parse_version("v1.9") == (1, 9, 0)
    with pytest.raises(ValueError):
        parse_version("dev")


def test_payload_omits_check_fields_the_agent_does_not_know():
    check = http_check(
        "http://127.0.0.1:9/health", check_id="a-1:http", name="a health", interval="2s", timeout="1s",
        deregister_after="1m", status="passing",
        options={"FailuresBeforeCritical": 2, "FailuresBeforeWarning": 1},
    )

    def payload(version):
        return registration_payload(service_id="a-1", name="a", address="127.0.0.1", port=9,
                                    meta={"route": "/a"}, tags=["x"], check=check, version=version)

    newest = payload((1, 11, 0))
    assert newest["Check"]["FailuresBeforeWarning"] == 1 and newest["Check"]["FailuresBeforeCritical"] == 2
    on_187 = payload((1, 8, 7))
    assert "FailuresBeforeWarning" not in on_187["Check"]  # 1.11: an 1.8 agent would answer 400
    assert on_187["Check"]["FailuresBeforeCritical"] == 2
    on_16 = payload((1, 6, 0))
    assert "FailuresBeforeCritical" not in on_16["Check"] and "FailuresBeforeWarning" not in on_16["Check"]
    assert on_16 == {
        "ID": "a-1", "Name": "a", "Address": "127.0.0.1", "Port": 9, "Meta": {"route": "/a"}, "Tags": ["x"],
        "Check": {"CheckID": "a-1:http", "Name": "a health", "HTTP": "http://127.0.0.1:9/health",
                  "Interval": "2s", "Timeout": "1s", "DeregisterCriticalServiceAfter": "1m", "Status": "passing"},
    }


async def test_client_sends_token_in_header_and_version_is_cached(monkeypatch):
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-env")
    seen: list[tuple[str | None, str]] = []

    async def members(request: web.Request) -> web.Response:
        seen.append((request.headers.get("X-Consul-Token"), request.query_string))
        return web.json_response([{"Name": "a", "Tags": {"build": "1.9.1:abc"}},
                                  {"Name": "b", "Tags": {"build": "1.8.7:def"}}])

    app = web.Application()
    app.router.add_get("/v1/agent/members", members)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    client = make_client(f"127.0.0.1:{port}", token="s3cret")
    try:
        assert await agent_version(client) == (1, 8, 7)  # the oldest member's
        assert await agent_version(client) == (1, 8, 7)
        assert seen == [("s3cret", "")]  # header, never ?token=; asked once
        env_client = make_client(f"127.0.0.1:{port}")
        assert env_client.prepare_headers() == {"X-Consul-Token": "from-env"}
        await env_client.close()
    finally:
        await client.close()
        await runner.cleanup()


async def test_agent_version_of_the_real_agent(client):
    assert await agent_version(client) >= (1, 8, 0)


# -- against a real agent


async def test_register_mark_critical_and_deregister(client, health_app):
    reg = make_registration(client, health_app)
    await reg.register("passing")
    assert reg.registered and reg.wanted
    assert await reg.health() == "passing"  # at once: no wait for the first check run
    service = await agent_service(client, reg.service_id)
    assert service["Service"] == reg.name and service["Port"] == 20001 and service["Address"] == "127.0.0.1"
    assert service["Meta"] == {"route": f"/api/v1/{reg.name}", "version": "0.1.0"} and service["Tags"] == ["mesh"]
    checks = await agent_checks(client, reg.service_id)
    assert list(checks) == [reg.check_id]
    assert checks[reg.check_id]["Type"] == "http"

    # The app died: critical immediately, although the last check run passed.
    await reg.mark_critical()
    assert await reg.health() == "critical"
    assert list(await agent_checks(client, reg.service_id)) == [reg.check_id]  # one check, not two
    # The HTTP check keeps running and brings the instance back once the app answers.
    assert await reg.wait_passing(3)

    await reg.deregister()
    assert not reg.registered and not reg.wanted
    assert await agent_service(client, reg.service_id) is None
    assert await reg.health() is None
    await reg.mark_critical()  # not registered: nothing to do
    assert await agent_service(client, reg.service_id) is None


async def test_registered_critical_turns_passing_when_the_app_is_healthy(client, health_app):
    reg = make_registration(client, health_app)
    await reg.register("critical")
    try:
        assert await reg.health() == "critical"
        took = time.monotonic()
        assert await reg.wait_passing(3)
        print(f"\ncritical -> passing {time.monotonic() - took:.2f} s after registration (check interval 1s)")
    finally:
        await reg.deregister()


async def test_check_follows_the_apps_health(client, health_app):
    reg = make_registration(client, health_app)
    await reg.register("passing")
    try:
        health_app.healthy = False
        await eventually(lambda: _is(reg.health(), "critical"), 3, what="the check to fail")
        assert not await reg.wait_passing(0.3)
        health_app.healthy = True
        assert await reg.wait_passing(3)
    finally:
        await reg.deregister()


async def _is(coro, value) -> bool:
    return await coro == value


async def test_deregister_and_mark_critical_tolerate_an_agent_that_is_down(health_app):
    client = make_client(f"127.0.0.1:{free_port()}")  # nothing listens there
    messages: list[str] = []
    reg = make_registration(client, health_app, log=messages.append)
    try:
        with pytest.raises(Exception):
            await reg.register("passing")
        await reg.mark_critical()
        await reg.deregister()
        assert not reg.wanted
        assert any("could not deregister" in m for m in messages), messages
        assert not await reg.wait_passing(0.2)
    finally:
        await client.close()


async def test_anti_entropy_restores_a_registration_removed_behind_its_back(client, health_app):
    reg = make_registration(client, health_app)
    await reg.register("passing")
    task = asyncio.create_task(reg.run_anti_entropy())
    try:
        await asyncio.sleep(0.3)  # let it settle into its blocking query
        (await call(client, "PUT", f"/v1/agent/service/deregister/{reg.service_id}")).raise_for_status()
        took = await eventually(lambda: agent_service(client, reg.service_id), 3, what="re-registration")
        print(f"\nre-registered {took * 1000:.0f} ms after an outside deregistration")
        assert await reg.wait_passing(3)

        # Our own deregistration is not undone.
        await reg.deregister()
        await asyncio.sleep(0.5)
        assert await agent_service(client, reg.service_id) is None
        # And a later register() is watched again.
        await reg.register("passing")
        await asyncio.sleep(0.2)
        (await call(client, "PUT", f"/v1/agent/service/deregister/{reg.service_id}")).raise_for_status()
        await eventually(lambda: agent_service(client, reg.service_id), 3, what="re-registration after register()")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await reg.deregister()


async def test_anti_entropy_registers_again_after_the_agent_restarts(dev_agent, health_app):
    client = make_client(dev_agent.address)
    messages: list[str] = []
    reg = make_registration(client, health_app, log=messages.append)
    task = None
    try:
        await reg.register("passing")
        task = asyncio.create_task(reg.run_anti_entropy())
        await asyncio.sleep(0.3)

        await dev_agent.stop()
        await asyncio.sleep(1.0)
        dev_agent.start()  # same ports; a dev agent remembers nothing
        up = await dev_agent.wait_http()
        # Only the anti-entropy task touches the agent from here.
        await eventually(lambda: agent_service(client, reg.service_id), 10, interval=0.05, what="re-registration")
        back = time.monotonic() - up
        assert await reg.wait_passing(10)
        passing = time.monotonic() - up
        print(f"\nagent restart: registered again {back:.2f} s and passing {passing:.2f} s after the agent answered")
        assert back < 3
        assert reg.registered
        assert len([m for m in messages if "unavailable" in m]) == 1, messages
        assert len([m for m in messages if "reachable again" in m]) == 1, messages
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await client.close()
