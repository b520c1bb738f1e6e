"""The control API's verbs: status, cluster, scale and restart, each one function acting on the stack.

A verb is given the running supervisor through the small `Stack` Protocol below and
never imports `supervisor/daemon.py` (circus passes its arbiter into its commands the
same way), so the verbs are read apart from the run lifecycle. Scale and restart answer
with a list of problems, empty when all went well; both refuse unless the supervisor is
running (not while it starts or stops).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Protocol

from supervisor import cluster as cluster_view
from supervisor.logs import timestamp
from supervisor.ports import PortsExhausted

if TYPE_CHECKING:
    from supervisor.config import Config
    from supervisor.process import Process
    from supervisor.service import ServiceGroup
    from supervisor.state import ScaleMemory


class Stack(Protocol):
    """What the verbs read and act on: the supervisor's phase, infrastructure and service groups."""

    config: Config
    phase: str  # "starting", "running", "failed" or "stopping"
    started_at: float
    startup_problems: list[str]
    infra: list[Process]
    groups: dict[str, ServiceGroup]
    scale_memory: ScaleMemory


def status(stack: Stack) -> dict:
    rows = [{"service": p.name, "instance": None, **p.status()} for p in stack.infra]
    for name in sorted(stack.groups):
        rows += stack.groups[name].status()
    return {
        "supervisor": {
            "pid": os.getpid(),
            "phase": stack.phase,
            "uptime": time.time() - stack.started_at,
            "state_dir": str(stack.config.state_dir),
            "consul": stack.config.consul.address,
            "problems": stack.startup_problems,
            "time": timestamp(),
        },
        "processes": rows,
    }


async def cluster(stack: Stack) -> cluster_view.Picture:
    """Every node and instance of the Consul cluster, read from Consul with the
    supervisor's own token (the management token when Consul is embedded), so the CLI
    needs none; `cluster_view.Unreachable` when the local agent does not answer."""
    consul = stack.config.consul
    return await cluster_view.read(consul.address, consul.token)


async def scale(stack: Stack, counts: dict[str, int]) -> list[str]:
    """Sets instance counts, remembered across restarts of the supervisor (state.ScaleMemory)."""
    if stack.phase != "running":
        return [f"the supervisor is {stack.phase}, not running"]
    problems = []
    for name, count in counts.items():
        if name not in stack.groups:
            problems.append(f"no service named '{name}'")
        elif count < 0:
            problems.append(f"{name}: the count must not be negative")
    if problems:
        return problems
    for name, count in counts.items():
        stack.scale_memory.remember(name, count, stack.groups[name].service.instances)
    return await scale_groups(stack.groups, counts)


async def scale_groups(groups: dict[str, ServiceGroup], counts: dict[str, int]) -> list[str]:
    """Scales the groups together; a group short of ports is a problem, not a failure of
    the others. Also how the supervisor brings its services up."""

    async def scale_one(group: ServiceGroup, count: int) -> list[str]:
        try:
            return await group.scale(count)
        except PortsExhausted as exc:
            return [f"{group.name}: {exc}"]

    results = await asyncio.gather(*(scale_one(groups[n], c) for n, c in counts.items()))
    return [p for problems in results for p in problems]


async def restart(stack: Stack, target: str) -> list[str]:
    """A rolling restart of every instance of a service ("auth") or of one ("auth.2")."""
    if stack.phase != "running":
        return [f"the supervisor is {stack.phase}, not running"]
    name, _, index_text = target.partition(".")
    group = stack.groups.get(name)
    if group is None:
        return [f"no service named '{name}'"]
    if index_text and not index_text.isdigit():
        return [f"'{target}' is not NAME or NAME.INDEX"]
    index = int(index_text) if index_text else None
    if index is not None and index not in group.instances:
        return [f"{target} is not running (instances: {', '.join(map(str, sorted(group.instances))) or 'none'})"]
    try:
        return await group.restart(index)
    except PortsExhausted as exc:
        return [str(exc)]
