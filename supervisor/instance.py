"""One instance of a service: a small group of processes started in order, stopped in reverse.

The group is the app and, unless the service opts out, its sidecar. The app starts
first and must answer its health path; then the sidecar starts, registers the instance
in Consul and is ready once Consul reports the check passing. Stopping goes the other
way: the sidecar deregisters and drains, then the app stops. Each member restarts on its
own when it crashes; when the app dies, the sidecar is told at once (SIGUSR1) so Consul
marks the instance critical without waiting for its next check.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from sidecar.settings import SidecarSettings
from supervisor.config import Service
from supervisor.process import Process, ProcessSpec, State


@dataclass
class InstancePorts:
    public: int  # what clients and Consul use: the sidecar's listener, or the app without one
    app: int
    # The sidecar's admin listener; for an app sharing a fixed port (SO_REUSEPORT), a
    # private port of its own where each instance answers its health path.
    admin: int | None = None
    upstreams: dict[str, int] = field(default_factory=dict)
    taken: list[int] = field(default_factory=list)  # drawn from the range: given back on stop


class Instance:
    def __init__(self, service: Service, index: int, ports: InstancePorts, processes: list[Process],
                 service_id: str = "") -> None:
        self.service = service
        self.index = index
        self.ports = ports
        self.processes = processes
        self.service_id = service_id
        self.consul_health = ""
        self.mesh_problems: list[str] = []  # what its sidecar reports (identity, authorization)
        if len(processes) == 2:
            app, sidecar = processes
            app.exit_listeners.append(lambda _: sidecar.send_signal(signal.SIGUSR1))

    @property
    def name(self) -> str:
        return f"{self.service.name}.{self.index}"

    @property
    def port(self) -> int:
        return self.ports.public

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

    def status(self) -> list[dict]:
        return [
            {"service": self.service.name, "instance": self.index, "service_id": self.service_id,
             "consul": self.consul_health, "mesh_problems": self.mesh_problems if proc is self.processes[-1] else [],
             **proc.status()}
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


def app_spec(service: Service, index: int, port: int, env: dict[str, str], cwd: str,
             ready_port: int | None = None) -> ProcessSpec:
    checked = ready_port or port
    ready = {
        "http": lambda: http_ready(checked, service.health),
        "tcp": lambda: tcp_ready(checked),
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
        tags={"service": service.name, "instance": str(index), "role": "app"},
    )


def sidecar_spec(service: Service, index: int, ports: InstancePorts, service_id: str,
                 env: dict[str, str], cwd: str, app_socket: str = "", host: str = "127.0.0.1") -> ProcessSpec:
    assert ports.admin is not None
    settings = SidecarSettings(
        service=service.name, index=index, service_id=service_id, host=host,
        port=ports.public, app_port=ports.app, admin_port=ports.admin, upstreams=ports.upstreams,
        app_socket=app_socket,  # "": the app listens on APP_PORT only
        health=service.health, route=service.route, openapi=service.openapi, version=service.version,
        idempotency_key=service.idempotency_key, drain_seconds=service.drain_seconds,
        reuse_port=bool(service.port),
        # [consul] and [mesh], in every process's env
        **SidecarSettings.read(env, "consul_address", "consul_token", "mtls"),
    )
    # to_env() writes what the supervisor sets, over sidecar_env (config.py refuses those
    # names there); the rest of the sidecar's settings are sidecar_env's or their defaults.
    env = {**env, **service.sidecar_env, **settings.to_env()}
    return ProcessSpec(
        name=f"{service.name}.{index}.sidecar",
        argv=[sys.executable, "-m", "sidecar"],
        env=env,
        cwd=cwd,
        restart=service.restart,
        # Deregister, drain, then up to 10 s for in-flight requests: give it that long.
        stop_timeout=service.drain_seconds + 15.0,
        port=ports.public,
        ready_check=http_ready(ports.admin, "/ready"),
        tags={"service": service.name, "instance": str(index), "role": "sidecar"},
    )
