"""shared.mesh.endpoint without Consul: serving until stopped, and the way down."""

from __future__ import annotations

import asyncio
import logging

import pytest

from shared.mesh.balancing import Balancer
from shared.mesh.endpoint import MeshEndpoint
from shared.mesh.relay import Relay, RelaySettings, Route
from shared.mesh.telemetry import RelayMetrics

NO_AGENT = "127.0.0.1:1"  # never asked: nothing is announced here


async def test_a_stop_before_the_first_step_ends_cancels_it_and_closes_everything():
    endpoint = MeshEndpoint(NO_AGENT, "", drain_seconds=5.0, log=logging.getLogger("test"))
    stop, cancelled, closed = asyncio.Event(), asyncio.Event(), []

    async def wait_for_an_app_that_never_answers() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def close(what: str) -> None:
        closed.append(what)

    route = Route("r", Balancer("r"))
    relay = Relay(RelaySettings("test"), lambda method, target: route, RelayMetrics("test"), None)
    started = asyncio.get_running_loop().time()
    async with endpoint:
        server = await endpoint.listen(relay, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        endpoint.at_close(lambda: close("first added"))
        endpoint.at_close(lambda: close("last added"))
        asyncio.get_running_loop().call_later(0.05, stop.set)
        await endpoint.serve_until(stop, first=wait_for_an_app_that_never_answers())
    assert cancelled.is_set()
    assert closed == ["last added", "first added"]
    # Never registered: no drain period.
    assert asyncio.get_running_loop().time() - started < 2.0
    assert not server.is_serving()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_the_first_step_done_it_serves_until_stopped():
    endpoint = MeshEndpoint(NO_AGENT, "", drain_seconds=0.0, log=logging.getLogger("test"))
    stop, done = asyncio.Event(), []

    async def first() -> None:
        done.append("first")

    async with endpoint:
        serving = asyncio.ensure_future(endpoint.serve_until(stop, first=first()))
        await asyncio.sleep(0.05)
        assert done == ["first"] and not serving.done()
        stop.set()
        await serving
