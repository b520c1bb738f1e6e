"""Test support for the Consul-facing modules: a dev agent a test may stop and restart,
and a stand-in app whose /health can be flipped between 200 and 500."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web

from shared.mesh.consul import make_client
from tests.helpers import ConsulDevAgent, free_port


class DevAgent(ConsulDevAgent):
    """The dev agent of tests.helpers with an async face: `start` only launches (the test
    times how long the agent takes to answer), waiting and stopping do not block the loop."""

    def start(self) -> None:
        self.launch()

    async def wait_http(self, timeout: float = 30.0) -> float:
        """Wait until the HTTP API answers; returns the monotonic time it did."""
        return await self._poll("/v1/agent/self", lambda body: bool(body), timeout)

    async def wait_leader(self, timeout: float = 30.0) -> float:
        return await self._poll("/v1/status/leader", lambda body: body.strip('"\n') != "", timeout)

    async def stop(self) -> None:
        await asyncio.to_thread(self.terminate)

    def cleanup(self) -> None:
        self.close()

    async def _poll(self, path: str, good, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
            while time.monotonic() < deadline:
                try:
                    async with session.get(f"http://{self.address}{path}") as response:
                        if response.status == 200 and good(await response.text()):
                            return time.monotonic()
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError(f"consul dev agent at {self.address}: {path} not ready after {timeout}s")


class HealthApp:
    """The "app" behind a registration: GET /health answers 200 or 500 as told."""

    def __init__(self) -> None:
        self.healthy = True
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/health"
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"healthy": self.healthy}, status=200 if self.healthy else 500)


@pytest.fixture
async def dev_agent():
    """A dev agent of this test only (free ports), up with a leader."""
    agent = DevAgent()
    agent.start()
    try:
        await agent.wait_leader()
        yield agent
    finally:
        agent.cleanup()  # a SIGKILL: nothing of a dev agent outlives it (ConsulDevAgent.close)


@pytest.fixture
async def health_app():
    app = HealthApp()
    await app.start()
    yield app
    await app.stop()


@pytest.fixture
async def client(consul_agent):
    """A client of the session's dev agent."""
    c = make_client(consul_agent)
    yield c
    await c.close()


async def eventually(predicate, timeout: float, interval: float = 0.02, what: str = "condition") -> float:
    """Wait until predicate() (sync or async) is true; returns the seconds it took."""
    start = time.monotonic()
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
