"""The control API's verbs: status, cluster, scale, restart, and stop/start of one service.

A verb is given the running supervisor through the small `Stack` Protocol below and
never imports `supervisor/daemon.py` (circus passes its arbiter into its commands the
same way), so the verbs are read apart from the run lifecycle. The verbs that act
answer with a list of problems, empty when all went well, and refuse unless the
supervisor is running (not while it starts or stops).

Verbs that act on one service's instances (scale, restart) share the stack's `Gate`, so
different services never wait on each other; those that change which services run
(stop NAME, start NAME, a reload: supervisor/reload.py) and the shutdown take it alone,
after the verbs in progress, and hold off new ones until they are done.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

from supervisor import cluster as cluster_view
from supervisor.logs import timestamp
from supervisor.ports import PortsExhausted

if TYPE_CHECKING:
    from supervisor.config import Config
    from supervisor.process import Process
    from supervisor.service import ServiceGroup
    from supervisor.state import ScaleMemory, StoppedServices


class Gate:
    """A readers-writer lock for the verbs: many `shared` holders or one `exclusive`
    one; an exclusive holder waiting keeps new shared ones out (no starving a reload)."""

    def __init__(self) -> None:
        self._shared = 0
        self._exclusive = False
        self._waiting = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._exclusive and not self._waiting)
            self._shared += 1
        try:
            yield
        finally:
            async with self._changed:
                self._shared -= 1
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._changed:
            self._waiting += 1
            try:
                await self._changed.wait_for(lambda: not self._exclusive and not self._shared)
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            async with self._changed:
                self._exclusive = False
                self._changed.notify_all()


class Stack(Protocol):
    """What the verbs read and act on: the supervisor's phase, infrastructure and service groups."""

    config: Config
    phase: str  # "starting", "running", "failed" or "stopping"
    started_at: float
    startup_problems: list[str]
    infra: list[Process]
    groups: dict[str, ServiceGroup]
    scale_memory: ScaleMemory
    stopped: StoppedServices
    gate: Gate


def status(stack: Stack) -> dict:
    rows = [{"service": p.name, "instance": None, **p.status()} for p in stack.infra]
    stopped = stack.stopped.names()
    for name in sorted(stack.groups):
        # A stopped service has no instance left: one row says so.
        rows += stack.groups[name].status() or ([_stopped_row(name)] if name in stopped else [])
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


def _stopped_row(name: str) -> dict:
    return {"service": name, "instance": None, "process": name, "pid": None, "state": "STOPPED", "uptime": None,
            "restarts": 0, "cpu_percent": 0.0, "memory": 0, "port": None, "role": "", "reason": "",
            "consul": "", "mesh_problems": []}


async def cluster(stack: Stack) -> cluster_view.Picture:
    """Every node and instance of the Consul cluster, read from Consul with the
    supervisor's own token (the management token when Consul is embedded), so the CLI
    needs none; `cluster_view.Unreachable` when the local agent does not answer."""
    consul = stack.config.consul
    return await cluster_view.read(consul.address, consul.token)


def not_running(stack: Stack) -> list[str]:
    return [] if stack.phase == "running" else [f"the supervisor is {stack.phase}, not running"]


async def scale(stack: Stack, counts: dict[str, int]) -> list[str]:
    """Sets instance counts, remembered across restarts of the supervisor (state.ScaleMemory)."""
    async with stack.gate.shared():
        if problems := not_running(stack):
            return problems
        stopped = stack.stopped.names()
        for name, count in counts.items():
            if name not in stack.groups:
                problems.append(f"no service named '{name}'")
            elif count < 0:
                problems.append(f"{name}: the count must not be negative")
            elif name in stopped:
                problems.append(f"{name} is stopped: `supervisor start {name}` first")
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
    async with stack.gate.shared():
        if problems := not_running(stack):
            return problems
        name, _, index_text = target.partition(".")
        group = stack.groups.get(name)
        if group is None:
            return [f"no service named '{name}'"]
        if name in stack.stopped:
            return [f"{name} is stopped: `supervisor start {name}` starts it"]
        if index_text and not index_text.isdigit():
            return [f"'{target}' is not NAME or NAME.INDEX"]
        index = int(index_text) if index_text else None
        if index is not None and index not in group.instances:
            return [f"{target} is not running (instances: {', '.join(map(str, sorted(group.instances))) or 'none'})"]
        try:
            return await group.restart(index)
        except PortsExhausted as exc:
            return [str(exc)]


def _running_group(stack: Stack, name: str) -> tuple[ServiceGroup | None, list[str]]:
    """Service `name`'s group, or None and why: the stack is not running, or has no such service."""
    if problems := not_running(stack):
        return None, problems
    group = stack.groups.get(name)
    return group, [] if group is not None else [f"no service named '{name}'"]


async def stop_service(stack: Stack, name: str) -> list[str]:
    """Stops every instance of one service the way a scale-down does (the sidecar
    deregisters and drains, then the app stops) and marks it stopped, so that neither
    `supervisor start` of the stack nor a reload starts it again. Stopping a stopped
    service is not an error."""
    async with stack.gate.exclusive():
        group, problems = _running_group(stack, name)
        if group is None:
            return problems
        stack.stopped.mark(name)
        return await group.scale(0)


async def start_service(stack: Stack, name: str) -> list[str]:
    """Clears a service's stopped mark and runs it with its count (the one remembered by
    `supervisor scale`, else the file's); a running service is brought to that count."""
    async with stack.gate.exclusive():
        group, problems = _running_group(stack, name)
        if group is None:
            return problems
        stack.stopped.clear(name)
        return await scale_groups(stack.groups, {name: stack.scale_memory.count(name, group.service.instances)})
