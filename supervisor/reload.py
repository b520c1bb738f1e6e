"""`supervisor reload` (and SIGHUP): read the Procfile and the config again, apply what changed.

What a reload does, in order (supervisorctl's `reread` + `update`):

1. Load and validate both files as a whole (config.load). Any error, or a change to a
   setting that only a full restart can apply, and nothing changes: the answer names the
   key. Reloadable are the services (the Procfile and the [services.*] tables) and what
   is resolved into every service ([restart], [supervisor] start_timeout/stop_timeout);
   every other key of every other table needs `supervisor stop` + `start` (a table added
   later is refused until someone makes it reloadable here).
2. Compare the old and new `Service` of each name (msgspec Structs compare by value):
   added, removed, equal (untouched: same pids), only `instances` different (a scale), or
   anything else different (a rolling restart with the new settings, then its count).
3. For added or changed services, the mesh first: their Consul tokens and the intentions
   the new config implies (supervisor/infra/connect.py), their databases
   (supervisor/infra/postgres.py); a failure there changes no service.
4. Removed services are stopped (each instance deregistered, drained, then stopped) and
   forgotten (remembered count, stopped mark); added ones start; changed ones are
   replaced one instance at a time and, with the scaled ones, brought to their count.

Counts: a service whose `instances` changed in the file runs that many, and a count
remembered by `supervisor scale` is dropped (the file wins, as it does at start); with
`instances` unchanged, the remembered count stays. A service stopped with `supervisor
stop NAME` is left stopped (its new settings are taken for when it starts).

The reload holds the verbs' gate alone (supervisor/verbs.py): it waits for a scale or
restart in progress, and the next one waits for it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import msgspec

from supervisor import config as config_mod
from supervisor import verbs
from supervisor.infra import InfraError, acl
from supervisor.ports import PortsExhausted

if TYPE_CHECKING:
    from supervisor.config import Config, Service
    from supervisor.service import ServiceGroup

# Keys of the settings tables that a reload applies: they are resolved into each service.
RELOADABLE = {"supervisor.start_timeout", "supervisor.stop_timeout"}
# Config fields that are not settings tables compared key by key.
_NOT_COMPARED = {"root", "config_path", "services"}


class Reloadable(verbs.Stack, Protocol):
    """What a reload needs beyond the verbs' Stack: groups for new services, and the
    mesh's and databases' preparation for a config (the daemon's own start-up steps)."""

    def new_group(self, service: Service) -> ServiceGroup: ...

    async def prepare_mesh(self, config: Config) -> None: ...

    async def provision_databases(self, config: Config) -> None: ...


@dataclass
class Plan:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: dict[str, list[str]] = field(default_factory=dict)  # name -> changed keys: a rolling restart
    rescaled: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (old, new) instances
    unchanged: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # keys that need a full restart

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.rescaled)


def plan(old: Config, new: Config) -> Plan:
    """What reloading `new` over the running `old` means (pure: reads no file)."""
    result = Plan()
    for name in old.__struct_fields__:
        if name in _NOT_COMPARED:
            continue
        before, after = getattr(old, name), getattr(new, name)
        if name == "state_dir":  # where it resolved to ($MESHVISOR_STATE_DIR may set it)
            if before != after:
                result.refused.append("supervisor.state_dir")
            continue
        if isinstance(before, msgspec.Struct) and type(before) is type(after):
            keys = changed_keys(before, after, name)
        else:
            keys = [name] if before != after else []
        result.refused += [key for key in keys if key not in RELOADABLE and key != "supervisor.state_dir"]
    for name, service in new.services.items():
        before = old.services.get(name)
        if before is None:
            result.added.append(name)
        elif before == service:
            result.unchanged.append(name)
        else:
            keys = changed_keys(before, service, f"services.{name}")
            if keys == [f"services.{name}.instances"]:
                result.rescaled[name] = (before.instances, service.instances)
            else:
                result.changed[name] = keys
    result.removed = [name for name in old.services if name not in new.services]
    return result


def changed_keys(before: msgspec.Struct, after: msgspec.Struct, prefix: str) -> list[str]:
    """The dotted keys that differ: `services.web.env.GREETING`, `consul.address`; a
    table (env, sidecar_env) by its keys, never its values (they may be secrets)."""
    keys = []
    for name in before.__struct_fields__:
        a, b = getattr(before, name), getattr(after, name)
        if a == b:
            continue
        if isinstance(a, msgspec.Struct):
            keys += changed_keys(a, b, f"{prefix}.{name}")
        elif isinstance(a, dict) and isinstance(b, dict):
            keys += [f"{prefix}.{name}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            keys.append(f"{prefix}.{name}")
    return keys


class Report(msgspec.Struct):
    changes: list[str] = []
    problems: list[str] = []


async def reload(stack: Reloadable, say) -> Report:
    """Reads the files again and applies what changed (see the module doc); every line
    of the answer is also said in the supervisor's log."""
    say(f"reload: reading the Procfile and {stack.config.config_path.name} again")
    async with stack.gate.exclusive():
        report = await _reload(stack)
    for line in report.changes:
        say(f"reload: {line}")
    for problem in report.problems:
        say(f"reload: {problem}")
    return report


async def _reload(stack: Reloadable) -> Report:
    if problems := verbs.not_running(stack):
        return Report(problems=problems)
    old = stack.config
    try:
        new = config_mod.load(old.config_path)
    except config_mod.ConfigError as exc:
        return Report(problems=[f"configuration error: {exc}; nothing was changed"])
    _resolve_own_token(new)
    todo = plan(old, new)
    if todo.refused:
        return Report(problems=[f"{key}: changed, and it needs `supervisor stop` + `supervisor start`; "
                                "nothing was changed" for key in todo.refused])
    if todo.empty:
        return Report(changes=["nothing changed"])
    candidate = msgspec.structs.replace(old, services=new.services)
    if todo.added or todo.changed:
        try:
            await stack.prepare_mesh(candidate)
            await stack.provision_databases(candidate)
        except InfraError as exc:
            return Report(problems=[f"{exc}; no service was changed"])
    report = Report()
    stopped = stack.stopped.names()

    if todo.removed:
        await asyncio.gather(*(stack.groups[name].stop_all() for name in todo.removed))
        for name in todo.removed:
            stack.groups.pop(name)
            stack.scale_memory.forget(name)
            stack.stopped.clear(name)
            report.changes.append(f"removed {name}: its instances deregistered, drained and stopped")

    for name in [*todo.changed, *todo.rescaled]:
        if old.services[name].instances != new.services[name].instances:
            stack.scale_memory.forget(name)  # the file's new count wins over `supervisor scale`'s

    def target(name: str) -> int:
        return 0 if name in stopped else stack.scale_memory.count(name, new.services[name].instances)

    for name in todo.added:
        stack.groups[name] = stack.new_group(new.services[name])
    report.problems += await verbs.scale_groups(stack.groups, {name: target(name) for name in todo.added})
    report.changes += [f"added {name}: {_count_text(name, target(name), stopped)}" for name in todo.added]

    for name in todo.rescaled:
        stack.groups[name].adopt(new.services[name])

    async def reconfigure(name: str) -> list[str]:
        try:
            return await stack.groups[name].reconfigure(new.services[name], target(name))
        except PortsExhausted as exc:
            return [f"{name}: {exc}"]

    results = await asyncio.gather(
        verbs.scale_groups(stack.groups, {name: target(name) for name in todo.rescaled}),
        *(reconfigure(name) for name in todo.changed))
    report.problems += [p for problems in results for p in problems]
    for name, keys in todo.changed.items():
        shown = ", ".join(k.removeprefix(f"services.{name}.") for k in keys)
        if name in stopped:
            report.changes.append(f"{name} ({shown} changed): {_count_text(name, 0, stopped)} with the new settings")
        elif stack.groups[name].service == new.services[name]:  # else a problem says why not
            report.changes.append(f"restarted {name} ({shown} changed): "
                                  f"{_count_text(name, stack.groups[name].count, stopped)}, one at a time")
    for name, (before, after) in todo.rescaled.items():
        report.changes.append(f"scaled {name}: instances {before} -> {after} in the file; "
                              f"{_count_text(name, target(name), stopped)}")
    if todo.unchanged:
        report.changes.append("unchanged: " + ", ".join(todo.unchanged))

    # The running config takes the services as they now run (a service whose restart
    # failed keeps its old settings, so that the next reload tries again).
    old.services = {name: stack.groups[name].service for name in new.services}
    for key in RELOADABLE:
        table, _, name = key.partition(".")
        setattr(getattr(old, table), name, getattr(getattr(new, table), name))
    return report


def _count_text(name: str, count: int, stopped: set[str]) -> str:
    if name in stopped:
        return f"left stopped (`supervisor start {name}` starts it)"
    return f"{count} instance{'' if count == 1 else 's'}"


def _resolve_own_token(config: Config) -> None:
    """[consul] token as the daemon resolves it at start (daemon._bring_up): empty with
    embedded ACLs means the management token kept in the state dir."""
    consul = config.consul
    if consul.mode == "embedded" and consul.acl and not consul.token:
        secrets = acl.Secrets(config.state_dir)
        if secrets.has_management_token():
            consul.token = secrets.management_token()
