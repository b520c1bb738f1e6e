"""The embedded Consul agent: a single-node server with the UI, data under the state dir.

What must not show in `ps` (the ACL management token) and what the command line cannot
say (ACLs, Connect, Raft timing) goes in a config file the supervisor writes into the
agent's data dir, mode 0600, read with -config-file.
"""

from __future__ import annotations

import asyncio
import json
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


def agent_settings(config: Config, management_token: str) -> dict:
    """The agent's config file: Connect always (the mesh's CA), ACLs when configured."""
    settings: dict = {
        "primary_datacenter": config.consul.datacenter,
        "connect": {"enabled": True},
        # One server elects itself: Raft's production timing (multiplier 5) only makes
        # it wait ~8 s for peers it does not have. 1 is Consul's own advice for servers
        # that are not starved of CPU.
        "performance": {"raft_multiplier": 1},
    }
    if config.consul.acl:
        settings["acl"] = {
            "enabled": True, "default_policy": "deny", "down_policy": "extend-cache",
            "enable_token_persistence": True, "tokens": {"master": management_token},
        }
    return settings


def write_agent_settings(path: Path, settings: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump(settings, file, indent=1)
    os.replace(tmp, path)


def spec(config: Config, env: dict[str, str], management_token: str = "") -> ProcessSpec:
    c = config.consul
    host, _, http_port = c.address.rpartition(":")
    data_dir = config.state_dir / "consul"
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    settings_file = data_dir / "meshvisor-agent.json"
    write_agent_settings(settings_file, agent_settings(config, management_token))
    argv = [
        find_binary(config.root), "agent", "-server", "-bootstrap-expect", "1", "-ui",
        "-data-dir", str(data_dir),
        "-config-file", str(settings_file),
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
        port=int(http_port), ready_check=lambda: ready(c.address, management_token),
    )


async def ready(address: str, management_token: str = "") -> bool:
    """A leader, and with ACLs the management token known (the leader makes it after
    its election: a moment later)."""
    if not await has_leader(address):
        return False
    if not management_token:
        return True
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2),
                                     headers={"X-Consul-Token": management_token}) as session:
        async with session.get(f"http://{address}/v1/acl/token/self") as resp:
            return resp.status == 200


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
