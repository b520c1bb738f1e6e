"""The embedded Consul agent: a server (alone, or one of a few) or a client of a
cluster, with the UI, its data under the state dir.

Its settings (role, addresses, ports, the ACL management token, the gossip key) go in a
config file the supervisor writes into the agent's data dir, mode 0600, read with
-config-file: nothing secret shows in `ps`, and the command line stays one line.

After the agent is up, `cluster_problem` checks that this host sees one cluster: two
servers that each bootstrapped alone and were then joined keep two Raft groups (two
leaders, two catalogs) while gossip shows them as one; the supervisor refuses to run so.
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
from supervisor.infra import InfraError, fetched_binary, server_spec
from supervisor.process import ProcessSpec




def find_binary(root: Path) -> str:
    """$MESHVISOR_CONSUL, else consul on PATH, else the one `make setup` fetched."""
    override = os.environ.get("MESHVISOR_CONSUL")
    if override:
        return override
    found = shutil.which("consul")
    if found:
        return found
    fetched = fetched_binary(root, "consul")
    if fetched:
        return fetched
    raise InfraError("no consul binary: run `make setup` (fetches Consul into .tools/) or put consul on PATH")


HTTP_MAX_CONNS_PER_CLIENT = 4096


def agent_settings(config: Config, management_token: str) -> dict:
    """The agent's whole config file: its role in the cluster, addresses and ports,
    Connect always (the mesh's CA), ACLs when configured, the gossip key if given."""
    c = config.consul
    host, _, http_port = c.address.rpartition(":")
    settings: dict = {
        "node_name": node_name(c.node_name),
        "datacenter": c.datacenter,
        "primary_datacenter": c.datacenter,
        "data_dir": str(config.state_dir / "consul"),
        "bind_addr": c.bind,
        # The HTTP API (and UI) where [consul] address says: 127.0.0.1 unless told.
        "client_addr": host.strip("[]"),
        "ports": {"http": int(http_port), "dns": c.dns_port, "server": c.server_port,
                  "serf_lan": c.serf_lan_port, "serf_wan": c.serf_wan_port},
        "ui": True,
        "log_level": "warn",
        "connect": {"enabled": True},
        "retry_join": list(c.join),
        # A host that booted before the servers tries again every 5 s (Consul's default
        # is 30 s): it joins within 5 s of a server coming up. A failed try costs one
        # refused connection.
        "retry_interval": "5s",
        # A client leaves the cluster when stopped (its services go at once); a server
        # stays a Raft peer through a restart, as Consul advises.
        "leave_on_terminate": c.role == "client",
        # The agent counts connections per client IP, and every process of this host comes
        # from 127.0.0.1: each sidecar holds 4 blocking queries (its registration, leaf
        # certificate, CA roots, intentions). At the default, 200, the ~48th instance's
        # sidecar was refused and restarted in a loop (bench/scale.py).
        "limits": {"http_max_conns_per_client": HTTP_MAX_CONNS_PER_CLIENT},
    }
    if c.advertise:
        settings["advertise_addr"] = c.advertise
    if c.encrypt:
        settings["encrypt"] = c.encrypt
    if c.role == "server":
        settings.update(server=True, bootstrap_expect=c.bootstrap_expect)
        # Raft's production timing (multiplier 5) makes a lone server wait ~8 s for
        # peers it does not have; 1 is Consul's own advice for servers not starved of CPU.
        settings["performance"] = {"raft_multiplier": 1}
    if c.acl:
        settings["acl"] = {
            "enabled": True, "default_policy": "deny", "down_policy": "extend-cache",
            "enable_token_persistence": True,
        }
        if c.role == "server":
            settings["acl"]["tokens"] = {"master": management_token}
    return settings


def write_agent_settings(path: Path, settings: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump(settings, file, indent=1)
    os.replace(tmp, path)


def spec(config: Config, env: dict[str, str], management_token: str = "") -> ProcessSpec:
    c = config.consul
    data_dir = config.state_dir / "consul"
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    settings_file = data_dir / "meshvisor-agent.json"
    write_agent_settings(settings_file, agent_settings(config, management_token))
    argv = [find_binary(config.root), "agent", "-config-file", str(settings_file)]
    return server_spec(
        "consul", argv, env, str(config.state_dir), stop_timeout=15.0, stop_signal=signal.SIGTERM,
        port=int(c.address.rpartition(":")[2]), ready_check=lambda: ready(c.address, management_token),
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


async def _get(address: str, token: str, path: str):
    headers = {"X-Consul-Token": token} if token else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3), headers=headers) as session:
        async with session.get(f"http://{address}{path}") as resp:
            resp.raise_for_status()
            return await resp.json(content_type=None)


async def split_brain(address: str, token: str) -> str | None:
    """Why this agent's cluster is two, or None: more servers alive in gossip than peers
    in its Raft (DESIGN: never join two bootstrapped servers)."""
    members = await _get(address, token, "/v1/agent/members")
    peers = await _get(address, token, "/v1/status/peers") or []
    servers = sorted(m["Name"] for m in members
                     if (m.get("Tags") or {}).get("role") == "consul" and m.get("Status") == 1)
    if len(servers) <= len(peers):
        return None
    return (f"split brain: {len(servers)} Consul servers are in this cluster's gossip ({', '.join(servers)}) "
            f"but its Raft has {len(peers)} peer(s) ({', '.join(peers) or 'none'}): servers that each "
            "bootstrapped alone (bootstrap_expect = 1) were joined, and they never merge. Give one server "
            "bootstrap_expect = 1 and make the other hosts clients (role = \"client\"), or give every server "
            "the same bootstrap_expect and start them with empty data dirs")


async def check_one_cluster(address: str, token: str, joining: bool, settle: float = 10.0) -> None:
    """Raise InfraError on a split brain. With `join`, wait (up to `settle` s) for the join
    to show in the members first, and only believe a mismatch that lasts 3 s (servers
    that are forming a cluster together agree within a moment)."""
    deadline = time.monotonic() + settle
    if joining:
        while time.monotonic() < deadline:
            if len(await _get(address, token, "/v1/agent/members")) > 1:
                break
            await asyncio.sleep(0.5)
    problem = await split_brain(address, token)
    lasting = time.monotonic() + 3.0
    while problem and time.monotonic() < lasting:
        await asyncio.sleep(0.5)
        problem = await split_brain(address, token)
    if problem:
        raise InfraError(problem)
