"""One instance of a service: a small group of processes started in order, stopped in reverse.

Today the group is the app alone; the sidecar joins it as a second member. Each member
restarts on its own when it crashes; the instance as a whole is started, stopped and
replaced together.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp

from supervisor.config import Service
from supervisor.process import Process, ProcessSpec, State


class Instance:
    def __init__(self, service: Service, index: int, port: int, processes: list[Process]) -> None:
        self.service = service
        self.index = index
        self.port = port
        self.processes = processes

    @property
    def name(self) -> str:
        return f"{self.service.name}.{self.index}"

    async def start(self, timeout: float) -> str | None:
        """Start members in order, each ready before the next. Returns a problem or None."""
        for proc in self.processes:
            proc.start()
            if not await proc.wait_settled(timeout):
                if proc.state == State.FATAL:
                    return f"{proc.name} is FATAL: {proc.reason}"
                return f"{proc.name} was not ready within {timeout:g}s (state {proc.state.value})"
        return None

    async def stop(self) -> None:
        for proc in reversed(self.processes):
            await proc.stop()

    def kill_now(self) -> None:
        for proc in self.processes:
            proc.kill_now()

    @property
    def state(self) -> State:
        states = {p.state for p in self.processes}
        for worst in (State.FATAL, State.BACKOFF, State.STOPPING, State.STARTING, State.STOPPED):
            if worst in states:
                return worst
        return State.RUNNING

    def status(self) -> list[dict]:
        return [
            {"service": self.service.name, "instance": self.index, **proc.status()}
            for proc in self.processes
        ]


def http_ready(port: int, path: str) -> Callable[[], asyncio.Future]:
    """Ready when GET http://127.0.0.1:<port><path> answers 2xx."""
    url = f"http://127.0.0.1:{port}{path}"

    async def check() -> bool:
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(url) as resp:
                return 200 <= resp.status < 300

    return check


def tcp_ready(port: int) -> Callable[[], asyncio.Future]:
    async def check() -> bool:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
        writer.close()
        return True

    return check


def app_spec(service: Service, index: int, port: int, env: dict[str, str], cwd: str) -> ProcessSpec:
    ready = {
        "http": lambda: http_ready(port, service.health),
        "tcp": lambda: tcp_ready(port),
        "process": lambda: None,
    }[service.ready]()
    return ProcessSpec(
        name=f"{service.name}.{index}",
        # exec: the shell becomes the app, so signals and the parent-death signal reach it.
        argv=["/bin/sh", "-c", f"exec {service.command}"],
        env=env,
        cwd=cwd,
        restart=service.restart,
        stop_timeout=service.stop_timeout,
        port=port,
        ready_check=ready,
        tags={"service": service.name, "instance": str(index)},
    )
