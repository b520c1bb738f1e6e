"""shared.mesh.discovery against a real Consul agent (and a scripted fake for the loop's rules)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import pytest
from consul.base import Response

from shared.mesh.consul import make_client
from shared.mesh.discovery import (CatalogWatch, Endpoint, ServiceWatch, endpoints_from_health, honours_idempotency_key,
                              next_index)
from shared.mesh.registration import Registration
from tests.consul_testing import client, dev_agent, eventually, health_app  # noqa: F401 (fixtures)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def registration(client, name: str, app, number: int = 1, **overrides) -> Registration:
    settings = dict(
        service_id=f"{name}-test-{number}", name=name, address="127.0.0.1", port=20000 + number,
        meta={"route": f"/api/v1/{name}", "instance": str(number)}, check_url=app.url,
        check_interval="1s", check_timeout="500ms",
    )
    settings.update(overrides)
    return Registration(client, **settings)


# -- pure parts


def test_endpoints_from_health_uses_node_address_when_service_has_none():
    entries = [
        {"Node": {"Address": "10.0.0.2"}, "Service": {"ID": "b-2", "Service": "b", "Address": "", "Port": 2, "Meta": None}},
        {"Node": {"Address": "10.0.0.1"}, "Service": {"ID": "b-1", "Service": "b", "Address": "127.0.0.1", "Port": 1,
                                                     "Meta": {"route": "/b"}}},
    ]
    assert endpoints_from_health(entries) == (
        Endpoint(id="b-1", service="b", address="127.0.0.1", port=1, meta={"route": "/b"}),
        Endpoint(id="b-2", service="b", address="10.0.0.2", port=2, meta={}),
    )


def test_idempotency_key_is_honoured_only_when_every_instance_says_so():
    def endpoint(n: int, **meta: str) -> Endpoint:
        return Endpoint(id=f"e-{n}", service="e", address="127.0.0.1", port=n, meta=meta)

    assert honours_idempotency_key((endpoint(1, idempotency_key="true"), endpoint(2, idempotency_key="true")))
    # A retry may land on any instance: one old-version instance without the flag is enough to say no.
    assert not honours_idempotency_key((endpoint(1, idempotency_key="true"), endpoint(2)))
    assert not honours_idempotency_key(())


def test_next_index_follows_consuls_rules():
    assert next_index(0, 42) == 42
    assert next_index(42, 42) == 42  # the wait ran out without a change
    assert next_index(42, 50) == 50
    assert next_index(42, 7) == 0  # backwards: start over without blocking
    assert next_index(42, 0) == 0
    assert next_index(0, 0) == 1  # a zero index would mean busy polling: clamp to 1


FAIL = -1  # in a script: this query fails as if the agent were down


class ScriptedHTTP:
    """Stands in for py-consul's HTTP adapter: answers from a script, records queries."""

    def __init__(self, indexes, then_grow: bool = False):
        self.indexes = list(indexes)
        self.then_grow = then_grow  # after the script: a new index on every answer, else the last one
        self.queries: list[dict[str, str]] = []
        self.times: list[float] = []

    async def get(self, callback, path, params=None, headers=None, connections_timeout=None):
        self.queries.append(dict(params or []))
        self.times.append(time.monotonic())
        if len(self.indexes) > 1:
            index = self.indexes.pop(0)
        else:
            index = self.indexes[0] + (len(self.queries) if self.then_grow else 0)
        if index == FAIL:
            raise ConnectionRefusedError("scripted failure")
        return callback(Response(200, {"X-Consul-Index": str(index)}, "[]"))


class ScriptedClient:
    def __init__(self, http):
        self.http = http

    def prepare_headers(self, token=None):
        return {}


async def test_watch_blocks_with_the_last_index_and_restarts_when_it_goes_backwards():
    http = ScriptedHTTP([10, 12, 3, 5])
    watch = ServiceWatch(ScriptedClient(http), "svc", wait=7)
    await watch.start()
    await eventually(lambda: len(http.queries) >= 5, 5, what="five queries")
    await watch.stop()
    first, second, third, fourth, fifth = http.queries[:5]
    assert "index" not in first and "wait" not in first  # never block on index 0
    assert first["passing"] == "true" and "stale" in first
    assert second["index"] == "10" and second["wait"] == "7000ms"
    assert third["index"] == "12"
    assert "index" not in fourth  # 3 < 12: the index went backwards, ask afresh
    assert fifth["index"] == "5"


@pytest.mark.parametrize("script, restart", [
    ([10, FAIL, 12, 12], False),  # one failed query: a hiccup, removals apply at once
    ([10, FAIL, FAIL, 12, 12], True),  # failing for a while: the agent restarted
    ([10, FAIL, 3, 3], True),  # back with a lower index: a new agent process
])
async def test_rebuild_grace_follows_an_agent_restart_not_a_single_failed_query(script, restart):
    http = ScriptedHTTP(script)
    watch = ServiceWatch(ScriptedClient(http), "svc", wait=7, log=lambda message: None)
    await watch.start()
    try:
        await eventually(lambda: len(http.queries) >= len(script), 5, what="the script to be played")
        assert watch.rebuilding is restart
    finally:
        await watch.stop()


async def test_watch_rate_limits_an_index_that_changes_all_the_time():
    http = ScriptedHTTP([1], then_grow=True)  # every answer carries a new index
    watch = ServiceWatch(ScriptedClient(http), "svc")
    await watch.start()
    await asyncio.sleep(0.5)
    await watch.stop()
    gaps = [b - a for a, b in zip(http.times, http.times[1:])]
    assert 5 <= len(http.queries) <= 12
    assert min(gaps) >= 0.045


# -- against a real agent


async def test_service_watch_sees_instances_come_go_and_fail(client, health_app):
    name = unique("svc")
    changes: list[tuple[Endpoint, ...]] = []
    watch = ServiceWatch(client, name, on_change=changes.append)
    await watch.start()
    try:
        assert await watch.wait_ready(5)
        assert watch.endpoints == () and changes == []

        first = registration(client, name, health_app, 1)
        await first.register("passing")
        took = await eventually(lambda: len(watch.endpoints) == 1, 2, what="the new instance")
        print(f"\nnew passing instance seen by the watch after {took * 1000:.0f} ms")
        (endpoint,) = watch.endpoints
        assert endpoint == Endpoint(id=f"{name}-test-1", service=name, address="127.0.0.1", port=20001,
                                    meta={"route": f"/api/v1/{name}", "instance": "1"})

        second = registration(client, name, health_app, 2)
        await second.register("passing")
        await eventually(lambda: len(watch.endpoints) == 2, 2, what="the second instance")
        assert [e.id for e in watch.endpoints] == [f"{name}-test-1", f"{name}-test-2"]

        # The app fails its health check: the instances drop out within a check interval.
        health_app.healthy = False
        took = await eventually(lambda: watch.endpoints == (), 5, what="failing instances to vanish")
        print(f"instances gone {took * 1000:.0f} ms after their app turned unhealthy (check interval 1s)")

        health_app.healthy = True
        await eventually(lambda: len(watch.endpoints) == 2, 3, what="instances to pass again")

        await second.deregister()
        took = await eventually(lambda: len(watch.endpoints) == 1, 2, what="the deregistered instance to vanish")
        print(f"deregistered instance gone after {took * 1000:.0f} ms")
        await first.mark_critical()
        await eventually(lambda: watch.endpoints == (), 1, what="the instance marked critical to vanish")
        await first.deregister()

        # on_change saw each change once, never the same set twice in a row.
        assert all(a != b for a, b in zip(changes, changes[1:]))
        assert changes[-1] == ()
    finally:
        await watch.stop()


async def test_service_watch_blocks_instead_of_polling(client, health_app):
    name = unique("quiet")
    reg = registration(client, name, health_app)
    await reg.register("passing")
    watch = ServiceWatch(client, name, wait=30)
    await watch.start()
    try:
        assert await watch.wait_ready(5)
        await eventually(lambda: len(watch.endpoints) == 1, 2)
        before = watch.queries
        await asyncio.sleep(1.5)
        # Nothing changed: the one blocking query is still open.
        assert watch.queries - before <= 2  # polling at 50 ms would make ~30
        assert watch.index > 0
    finally:
        await watch.stop()
        await reg.deregister()


async def test_catalog_watch_sees_services_added_and_removed(client, health_app):
    name = unique("cat")
    seen: list[dict[str, list[str]]] = []
    watch = CatalogWatch(client, on_change=seen.append)
    await watch.start()
    try:
        assert await watch.wait_ready(5)
        assert "consul" in watch.services
        reg = registration(client, name, health_app, tags=["edge", "v1"])
        await reg.register("passing")
        await eventually(lambda: name in watch.services, 2, what="the new service in the catalog")
        assert sorted(watch.services[name]) == ["edge", "v1"]
        await reg.deregister()
        await eventually(lambda: name not in watch.services, 2, what="the service to leave the catalog")
        assert any(name in s for s in seen) and name not in seen[-1]
    finally:
        await watch.stop()


async def test_watch_keeps_last_set_while_agent_is_down_and_resumes(dev_agent, health_app):
    client = make_client(dev_agent.address)
    messages: list[str] = []
    name = unique("outage")
    watch = ServiceWatch(client, name, wait=30, log=messages.append)
    watch.rebuild_grace = 3.0
    try:
        reg = registration(client, name, health_app)
        await reg.register("passing")
        await watch.start()
        await eventually(lambda: len(watch.endpoints) == 1, 3, what="the instance")
        known = watch.endpoints

        await dev_agent.stop()
        await asyncio.sleep(2.5)  # several retries (0.2, 0.4, 0.8, 1.6 s)
        assert watch.endpoints == known  # the last known set keeps serving
        unreachable = [m for m in messages if "unavailable" in m]
        assert len(unreachable) == 1, messages  # said once, not per retry
        assert "keeping 1 known instance" in unreachable[0]

        # The agent comes back empty (dev mode): its indexes restarted low, so a watch
        # still blocking on the old index would hang for the whole 30 s wait.
        dev_agent.start()
        up = await dev_agent.wait_http()
        again = registration(client, name, health_app, 2)
        await eventually(lambda: _try(again.register("passing")), 10, interval=0.1, what="registration on the new agent")
        # While the restarted agent rebuilds its catalog, the instance it no longer knows
        # is kept and the new one added at once; when the grace ends, only what it knows.
        both = [f"{name}-test-1", f"{name}-test-2"]
        await eventually(lambda: [e.id for e in watch.endpoints] == both, 5, what="the new instance, the old kept")
        await eventually(lambda: [e.id for e in watch.endpoints] == [f"{name}-test-2"], 10, what="the grace to end")
        print(f"\nwatch current again {time.monotonic() - up:.2f} s after the restarted agent answered "
              f"(rebuild grace {watch.rebuild_grace:g} s)")
        assert len([m for m in messages if "reachable again" in m]) == 1, messages
        assert len([m for m in messages if "unavailable" in m]) == 1, messages
    finally:
        await watch.stop()
        await client.close()


async def _try(coro) -> bool:
    try:
        await coro
        return True
    except Exception:
        return False


async def test_watch_logs_to_a_logger_by_default(caplog):
    client = make_client("127.0.0.1:1")  # nothing listens there
    watch = ServiceWatch(client, "nowhere", wait=1)
    with caplog.at_level(logging.WARNING, logger="meshvisor.discovery"):
        await watch.start()
        assert not await watch.wait_ready(0.7)
        await watch.stop()
    await client.close()
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1
    assert watch.endpoints == ()


@pytest.mark.parametrize("wait", [0, 1000])
def test_wait_is_kept_within_consuls_bounds(wait):
    watch = ServiceWatch(ScriptedClient(ScriptedHTTP([1])), "svc", wait=wait)
    assert 0 < watch.wait <= 600
