"""All instances of one service: the desired count, scaling and rolling restarts.

Operations on one service are serialised by a lock; different services never wait on
each other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

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

    async def restart(self, index: int | None = None) -> list[str]:
        """Replace instances one at a time: the new one is up before the old one stops."""
        async with self._lock:
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
