"""All instances of one service: the desired count, scaling and rolling restarts.

Operations on one service are serialised by a lock; different services never wait on
each other.

The group holds the service's settings (`service`): every instance it makes from then on
(a scale, a rolling restart) is built from them, while a running instance keeps the
settings it was built with. New settings come in explicitly, from a reload: `adopt` when
only the count differs (nothing running changes), `reconfigure` otherwise (every
instance replaced, one at a time).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec

from supervisor.config import Service
from supervisor.instance import Instance


class ServiceGroup:
    def __init__(self, service: Service, make_instance: Callable[[Service, int, int], Instance],
                 release: Callable[[Instance], None]) -> None:
        self.service = service
        self.instances: dict[int, Instance] = {}
        self._make = make_instance
        self._release = release
        self._generations: dict[int, int] = {}
        self._lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return self.service.name

    @property
    def count(self) -> int:
        return len(self.instances)

    async def scale(self, count: int) -> list[str]:
        """Add instances (new indexes, started together) or remove the highest indexes."""
        async with self._lock:
            return await self._scale(count)

    async def restart(self, index: int | None = None) -> list[str]:
        """Replace instances one at a time: the new one is up before the old one stops."""
        async with self._lock:
            return await self._restart(index)

    def adopt(self, service: Service) -> None:
        """Settings that differ from the current ones in `instances` alone: the running
        instances are what they would be built as now, so they stay; scaling follows."""
        if msgspec.structs.replace(service, instances=self.service.instances) != self.service:
            raise ValueError(f"{self.name}: more than the instance count changed: reconfigure, not adopt")
        self.service = service

    async def reconfigure(self, service: Service, count: int) -> list[str]:
        """New settings (command, environment, ...): every running instance is replaced by
        one built from them, one at a time as in `restart`, then the group is scaled to
        `count` (scaled down first when that means fewer, so fewer are replaced).

        When a replacement fails, the group goes back to its old settings (what a scale
        makes next is what ran before); instances already replaced keep running with the
        new ones, the failed one's old instance keeps serving, and the problem says so.
        """
        async with self._lock:
            old = self.service
            self.service = service
            if count < self.count:
                await self._scale(count)
            problems = await self._restart(None)
            if problems:
                self.service = old
                return [f"{p}; {self.name} keeps its old settings for new instances" for p in problems]
            return await self._scale(count)

    async def _scale(self, count: int) -> list[str]:
        problems: list[str] = []
        current = sorted(self.instances)
        if count > len(current):
            fresh = []
            index = 1
            while len(current) + len(fresh) < count:
                if index not in self.instances:
                    instance = self._new(index)
                    self.instances[index] = instance
                    fresh.append(instance)
                index += 1
            results = await asyncio.gather(*(i.start(self.service.start_timeout) for i in fresh))
            problems += [p for p in results if p]
        elif count < len(current):
            doomed = [self.instances.pop(index) for index in current[count:]]
            await asyncio.gather(*(self._retire(i) for i in doomed))
        return problems

    async def _restart(self, index: int | None) -> list[str]:
        targets = [index] if index is not None else sorted(self.instances)
        for target in targets:
            old = self.instances.get(target)
            if old is None:
                return [f"{self.name}.{target} does not exist"]
            new = self._new(target)
            problem = await new.start(self.service.start_timeout)
            if problem:
                # Keep the old one serving; the replacement goes away.
                await self._retire(new)
                return [f"restart of {old.name} abandoned, the old instance keeps running: {problem}"]
            self.instances[target] = new
            await self._retire(old)
        return []

    def _new(self, index: int) -> Instance:
        generation = self._generations.get(index, 0) + 1
        self._generations[index] = generation
        return self._make(self.service, index, generation)

    async def stop_all(self) -> None:
        async with self._lock:
            doomed = list(self.instances.values())
            self.instances.clear()
            await asyncio.gather(*(self._retire(i) for i in doomed))

    def kill_now(self) -> None:
        for instance in self.instances.values():
            instance.kill_now()

    async def _retire(self, instance: Instance) -> None:
        await instance.stop()
        self._release(instance)

    def status(self) -> list[dict]:
        rows = []
        for index in sorted(self.instances):
            rows += self.instances[index].status()
        return rows
