"""Sampling the running stack for `status`: each process's figures and each instance's Consul health.

Every STATS_INTERVAL seconds every process (infrastructure and instances) samples the
CPU and memory of its process tree, and the local Consul agent is asked once for the status of every check,
so that `status` answers from figures at most that old (it refreshes Consul's view itself
before it answers). The sampler reads the supervisor's live list of infrastructure
processes and its service groups; it never changes them.
"""

from __future__ import annotations

import asyncio

import aiohttp

from supervisor.config import ConsulSettings
from supervisor.infra import consul as consul_infra
from supervisor.instance import Instance
from supervisor.forkserver import OrphanReaper
from supervisor.process import Process, ProcessTable
from supervisor.service import ServiceGroup

STATS_INTERVAL = 2.0


class Sampler:
    def __init__(self, consul: ConsulSettings, infra: list[Process], groups: dict[str, ServiceGroup]) -> None:
        self.consul = consul
        self.infra = infra
        self.groups = groups
        self.orphans = OrphanReaper()  # the supervisor is a child subreaper (supervisor/forkserver.py)

    async def sample_forever(self) -> None:
        while True:
            table = ProcessTable.read()
            processes = self.all_processes()
            for proc in processes:
                proc.sample(table)
            self.orphans.reap(table.zombie_children(), {p.pid for p in processes if p.pid})
            await self.refresh_consul_health()
            await asyncio.sleep(STATS_INTERVAL)

    async def refresh_consul_health(self) -> None:
        """Each instance's check status as the local Consul agent sees it (for `status`)."""
        instances = [i for g in self.groups.values() for i in g.instances.values() if i.service_id]
        if not instances:
            return
        checks = await consul_infra.agent_checks(self.consul.address, self.consul.token)
        for instance in instances:
            if checks is None:
                instance.consul_health = "unknown"
            else:
                # Without a sidecar, registering is the app's own choice: not being in
                # Consul is only worth flagging for instances that have a sidecar.
                missing = "absent" if instance.service.sidecar else ""
                instance.consul_health = checks.get(instance.service_id, missing)

    async def refresh_mesh_problems(self) -> None:
        """What each sidecar reports wrong with its mesh side (its Connect identity kept
        from the last good fetch, the agent unable to authorize callers), asked of its
        admin listener when `status` is asked, not on every sample."""
        sidecars = [i for g in self.groups.values() for i in g.instances.values()
                    if i.service.sidecar and i.ports.admin]
        if not sidecars:
            return
        timeout = aiohttp.ClientTimeout(total=1)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(*(self._ask_problems(session, i) for i in sidecars))

    @staticmethod
    async def _ask_problems(session: aiohttp.ClientSession, instance: Instance) -> None:
        try:
            async with session.get(f"http://127.0.0.1:{instance.ports.admin}/status") as resp:
                instance.mesh_problems = list((await resp.json()).get("problems") or ())
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError):
            instance.mesh_problems = []  # not up (yet): its process state says so already

    def all_processes(self) -> list[Process]:
        procs = list(self.infra)
        for group in self.groups.values():
            for instance in group.instances.values():
                procs += instance.processes
        return procs
