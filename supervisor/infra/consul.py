"""The embedded Consul agent: a single-node server with the UI, data under the state dir."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from pathlib import Path

import aiohttp

from shared.mesh.naming import node_name
from supervisor.config import Config
from supervisor.infra import InfraError, server_spec
from supervisor.process import ProcessSpec


# Where `make setup` puts the Consul it fetches: .tools/ of this checkout.
_CHECKOUT = Path(__file__).resolve().parents[2]


def find_binary(root: Path) -> str:
    """$MESHVISOR_CONSUL, else consul on PATH, else the one `make setup` fetched."""
    override = os.environ.get("MESHVISOR_CONSUL")
    if override:
        return override
    found = shutil.which("consul")
    if found:
        return found
    for base in (root, _CHECKOUT):
        local = base / ".tools" / "consul" / "usr" / "bin" / "consul"
        if local.exists():
            return str(local)
    raise InfraError("no consul binary: run `make setup` (fetches Consul into .tools/) or put consul on PATH")


def spec(config: Config, env: dict[str, str]) -> ProcessSpec:
    c = config.consul
    host, _, http_port = c.address.rpartition(":")
    data_dir = config.state_dir / "consul"
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        find_binary(config.root), "agent", "-server", "-bootstrap-expect", "1", "-ui",
        "-data-dir", str(data_dir),
        "-node", node_name(c.node_name),
        "-datacenter", c.datacenter,
        "-bind", c.bind,
        "-client", host.strip("[]"),
        "-http-port", http_port,
        "-dns-port", str(c.dns_port),
        "-server-port", str(c.server_port),
        "-serf-lan-port", str(c.serf_lan_port),
        "-serf-wan-port", str(c.serf_wan_port),
        "-log-level", "warn",
    ]
    for address in c.join:
        argv += ["-retry-join", address]
    return server_spec(
        "consul", argv, env, str(config.state_dir), stop_timeout=15.0, stop_signal=signal.SIGTERM,
        port=int(http_port), ready_check=lambda: has_leader(c.address, c.token),
    )


async def has_leader(address: str, token: str = "") -> bool:
    headers = {"X-Consul-Token": token} if token else {}
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
        async with session.get(f"http://{address}/v1/status/leader") as resp:
            if resp.status != 200:
                return False
            leader = await resp.json(content_type=None)
            return bool(leader)


async def wait_for_external(address: str, token: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            if await has_leader(address, token):
                return
            last = "no leader yet"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            last = str(exc) or type(exc).__name__
        await asyncio.sleep(0.5)
    raise InfraError(f"the Consul agent at {address} did not answer with a leader within {timeout:g}s ({last})")


async def agent_checks(address: str, token: str = "") -> dict[str, str] | None:
    """{service ID: worst check status} from the local agent, or None if it is unreachable."""
    headers = {"X-Consul-Token": token} if token else {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2), headers=headers) as session:
            async with session.get(f"http://{address}/v1/agent/checks") as resp:
                if resp.status != 200:
                    return None
                checks = await resp.json()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return None
    order = {"passing": 0, "warning": 1, "critical": 2}
    worst: dict[str, str] = {}
    for check in checks.values():
        sid, status = check.get("ServiceID"), check.get("Status", "critical")
        if sid and order.get(status, 2) >= order.get(worst.get(sid, "passing"), 0):
            worst[sid] = status
    return worst
