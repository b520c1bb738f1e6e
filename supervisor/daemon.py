"""The running supervisor: brings the stack up in order, serves the control API, takes it down.

Order up: Consul (until it has a leader), PostgreSQL (until it accepts logins, then one
database and role per service), then every instance of every service. Down: services
first, infrastructure last.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

from supervisor import state
from supervisor.config import Config, Service
from supervisor.control import ControlServer
from supervisor.infra import InfraError
from supervisor.infra import consul as consul_infra
from supervisor.infra import postgres as postgres_infra
from supervisor.instance import Instance, InstancePorts, app_spec, sidecar_spec
from supervisor.logs import Printer, ProcessLog, RotatingFile, timestamp
from supervisor.ports import PortAllocator, PortsExhausted, ephemeral_overlap, ephemeral_range
from supervisor.process import Process, ProcessSpec
from supervisor.service import ServiceGroup
from supervisor.watchdog import Watchdog

STATS_INTERVAL = 2.0
# The longest Unix socket path Linux accepts (sun_path: 108 bytes with the final NUL).
MAX_SOCKET_PATH = 107


class Daemon:
    def __init__(self, config: Config, foreground: bool = True) -> None:
        self.config = config
        self.printer = Printer() if foreground else None
        self.state_dir = config.state_dir
        self.phase = "starting"
        self.started_at = time.time()
        self.startup_problems: list[str] = []
        self.infra: list[Process] = []
        self.groups: dict[str, ServiceGroup] = {}
        self.database_urls: dict[str, str] = {}
        self._files: dict[str, RotatingFile] = {}
        self._stop = asyncio.Event()
        self._stop_reason = ""
        self._signals = 0
        sup = config.supervisor
        self.ports = PortAllocator(sup.host, *sup.port_range)
        self.scale_memory = state.ScaleMemory(self.state_dir)
        self.pids = state.PidRecord(self.state_dir)
        self.node = config.consul.node_name or socket.gethostname()
        self._own_log = ProcessLog("supervisor", self._file("supervisor"), self.printer)

    # -- plumbing ------------------------------------------------------------------

    def say(self, message: str) -> None:
        self._own_log.write(message.encode())

    def _file(self, name: str) -> RotatingFile:
        if name not in self._files:
            sup = self.config.supervisor
            self._files[name] = RotatingFile(self.state_dir / "logs" / f"{name}.log", sup.log_max_bytes, sup.log_backups)
        return self._files[name]

    def make_process(self, spec: ProcessSpec) -> Process:
        return Process(
            spec,
            ProcessLog(spec.name, self._file(spec.name), self.printer),
            on_spawn=lambda p: self.pids.add(p.pid, p.name),
            on_exit=lambda p: self.pids.remove(p.pid),
        )

    def base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "/usr/bin:/bin")
        env["PYTHONUNBUFFERED"] = "1"
        env["CONSUL_HTTP_ADDR"] = self.config.consul.address
        if self.config.consul.token:
            env["CONSUL_HTTP_TOKEN"] = self.config.consul.token
        return env

    def instance_env(self, service: Service, index: int, port: int) -> dict[str, str]:
        env = self.base_env()
        env.update(
            HOST="127.0.0.1",
            PORT=str(port),
            SERVICE_NAME=service.name,
            INSTANCE_INDEX=str(index),
            INSTANCE_NAME=f"{service.name}.{index}",
            MESHVISOR_STATE_DIR=str(self.state_dir),
        )
        if service.route:
            env["SERVICE_ROUTE"] = service.route
        url = self.database_urls.get(service.name)
        if url:
            sep = "&" if "?" in url else "?"
            env["DATABASE_URL"] = f"{url}{sep}application_name={service.name}.{index}"
        env.update(service.env)
        return env

    def make_instance(self, service: Service, index: int, generation: int) -> Instance:
        cwd = str(self.config.root)
        taken: list[int] = []

        def take() -> int:
            port = self.ports.take()
            taken.append(port)
            return port

        # Unique per host and instance; a replacement during a rolling restart runs beside
        # the old one for a moment, so it gets its own ID (-r2, -r3, ...).
        service_id = f"{service.name}-{self.node}-{index}" + (f"-r{generation}" if generation > 1 else "")
        try:
            if not service.sidecar:
                port = service.port or take()
                admin = take() if service.port else None
                ports = InstancePorts(public=port, app=port, admin=admin, taken=taken)
                env = self.instance_env(service, index, port)
                # An app that registers itself (the gateway) uses this ID, so that status
                # can show its Consul health like a sidecar's.
                env["SERVICE_ID"] = service_id
                if admin is not None:  # instances share `port`; each answers on its own too
                    env.update(ADMIN_PORT=str(admin), REUSE_PORT="1")
                spec = app_spec(service, index, port, env, cwd, ready_port=admin)
                return Instance(service, index, ports, [self.make_process(spec)], service_id)
            ports = InstancePorts(
                public=service.port or take(), app=take(), admin=take(),
                upstreams={name: take() for name in service.upstreams}, taken=taken,
            )
        except PortsExhausted:
            for port in taken:
                self.ports.release(port)
            raise
        env = self.instance_env(service, index, ports.app)
        for name, port in ports.upstreams.items():
            env[f"UPSTREAM_{name.upper().replace('-', '_')}_URL"] = f"http://127.0.0.1:{port}"
        app_socket = self.app_socket(service, ports.app)
        if app_socket:
            env["APP_SOCKET"] = app_socket
        app = self.make_process(app_spec(service, index, ports.app, env, cwd))
        sidecar = self.make_process(sidecar_spec(service, index, ports, service_id, self.base_env(), cwd,
                                                 app_socket=app_socket))
        return Instance(service, index, ports, [app, sidecar], service_id)

    def app_socket(self, service: Service, app_port: int) -> str:
        """The Unix socket an `app_socket` service's instance listens on, named after its
        app port (unique while it runs); "" (TCP only) if its path would not fit a socket
        address (108 bytes on Linux). A file left by an earlier run is removed."""
        if not service.app_socket:
            return ""
        path = self._app_socket_path(app_port)
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            self.say(f"warning: {service.name}: the app socket path {path} is too long for a Unix socket; "
                     "TCP only (a shorter state directory fixes it)")
            return ""
        path.unlink(missing_ok=True)
        return str(path)

    def _app_socket_path(self, app_port: int) -> Path:
        return self.state_dir / "run" / f"app-{app_port}.sock"

    def release(self, instance: Instance) -> None:
        for port in instance.ports.taken:
            self.ports.release(port)
        if instance.service.app_socket and instance.service.sidecar:
            self._app_socket_path(instance.ports.app).unlink(missing_ok=True)

    # -- the run -------------------------------------------------------------------

    async def run(self) -> int:
        state.prepare(self.state_dir)
        lock = state.Lock(self.state_dir)
        try:
            lock.acquire()
        except state.AlreadyRunning as exc:
            print(f"a supervisor is already running for {self.state_dir} (pid {exc.pid})", file=sys.stderr)
            return 1
        control = ControlServer(self, self.config.socket_path)
        watchdog = None
        try:
            left = state.clean_leftovers(self.state_dir, self.say)
            if left:
                self.say(f"cleaned up {left} leftover process(es) of a supervisor that died")
            watchdog = Watchdog(self.state_dir)
            await control.start()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._on_signal, sig)
            self.say(f"supervisor {os.getpid()} starting, state in {self.state_dir}")
            overlap = ephemeral_overlap(*self.config.supervisor.port_range)
            if overlap is not None:
                self.say(f"warning: supervisor.port_range overlaps the kernel's ephemeral ports at "
                         f"[{overlap[0]}, {overlap[1]}] (net.ipv4.ip_local_port_range): an outgoing "
                         f"connection may take an instance's port while it restarts; move the range below "
                         f"{ephemeral_range()[0]} or reserve it with net.ipv4.ip_local_reserved_ports")
            code = await self._serve()
        finally:
            await self._shutdown()
            if watchdog is not None:
                watchdog.dismiss()
            await control.close()
            for file in self._files.values():
                file.close()
            lock.release()
        return code

    async def _serve(self) -> int:
        bring_up = asyncio.create_task(self._bring_up())
        stopped = asyncio.create_task(self._stop.wait())
        stats = asyncio.create_task(self._sample_forever())
        try:
            await asyncio.wait({bring_up, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not bring_up.done():
                bring_up.cancel()
                await asyncio.gather(bring_up, return_exceptions=True)
                return 0
            try:
                bring_up.result()
            except InfraError as exc:
                self.say(f"cannot start: {exc}")
                self.startup_problems.append(str(exc))
                self.phase = "failed"
                return 1
            self.phase = "running"
            if self.startup_problems:
                self.say("running, with problems: " + "; ".join(self.startup_problems))
            else:
                self.say("every instance is up")
            await stopped
            return 0
        finally:
            stats.cancel()
            stopped.cancel()

    async def _bring_up(self) -> None:
        env = self.base_env()
        if self.config.consul.mode == "embedded":
            await self._start_infra(consul_infra.spec(self.config, env), self.config.consul.start_timeout)
        else:
            await consul_infra.wait_for_external(
                self.config.consul.address, self.config.consul.token, self.config.consul.start_timeout
            )
        needs_db = any(s.database and not s.database_url for s in self.config.services.values())
        layout = None
        if self.config.postgres.mode == "embedded" and needs_db:
            layout = postgres_infra.layout(self.config)
            await postgres_infra.initdb(layout, ProcessLog("postgres", self._file("postgres"), self.printer))
            await self._start_infra(postgres_infra.spec(self.config, layout, env), self.config.postgres.start_timeout)
        try:
            self.database_urls = await postgres_infra.provision(self.config, layout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise InfraError(f"cannot reach PostgreSQL to create the service databases: {exc}") from None
        except Exception as exc:  # asyncpg.PostgresError and friends
            raise InfraError(f"creating the service databases failed: {exc}") from None

        for service in self.config.services.values():
            self.groups[service.name] = ServiceGroup(service, self.make_instance, self.release)
        counts = {
            name: self.scale_memory.count(name, group.service.instances) for name, group in self.groups.items()
        }
        results = await asyncio.gather(*(self._scale_group(self.groups[n], c) for n, c in counts.items()))
        for problems in results:
            self.startup_problems += problems

    async def _start_infra(self, spec: ProcessSpec, timeout: float) -> None:
        proc = self.make_process(spec)
        self.infra.append(proc)
        self.say(f"starting {spec.name}")
        proc.start()
        if not await proc.wait_settled(timeout):
            reason = proc.reason or f"not ready within {timeout:g}s"
            raise InfraError(f"{spec.name} did not come up: {reason} (see {self.state_dir}/logs/{spec.name}.log)")
        self.say(f"{spec.name} is up")

    async def _scale_group(self, group: ServiceGroup, count: int) -> list[str]:
        try:
            return await group.scale(count)
        except PortsExhausted as exc:
            return [f"{group.name}: {exc}"]

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals == 1:
            self.request_stop(f"received {signal.Signals(sig).name}")
        else:
            self.say("second signal: killing everything now")
            for group in self.groups.values():
                group.kill_now()
            for proc in self.infra:
                proc.kill_now()

    def request_stop(self, reason: str) -> None:
        if not self._stop.is_set():
            self._stop_reason = reason
            self.say(f"stopping: {reason}")
            self._stop.set()

    async def _shutdown(self) -> None:
        self.phase = "stopping"
        await asyncio.gather(*(g.stop_all() for g in self.groups.values()), return_exceptions=True)
        for proc in reversed(self.infra):
            self.say(f"stopping {proc.name}")
            await proc.stop()
        self.say("stopped")

    async def _sample_forever(self) -> None:
        while True:
            for proc in self._all_processes():
                proc.sample()
            await self.refresh_consul_health()
            await asyncio.sleep(STATS_INTERVAL)

    async def refresh_consul_health(self) -> None:
        """Each instance's check status as the local Consul agent sees it (for `status`)."""
        instances = [i for g in self.groups.values() for i in g.instances.values() if i.service_id]
        if not instances:
            return
        checks = await consul_infra.agent_checks(self.config.consul.address, self.config.consul.token)
        for instance in instances:
            if checks is None:
                instance.consul_health = "unknown"
            else:
                # Without a sidecar, registering is the app's own choice: not being in
                # Consul is only worth flagging for instances that have a sidecar.
                missing = "absent" if instance.service.sidecar else ""
                instance.consul_health = checks.get(instance.service_id, missing)

    def _all_processes(self) -> list[Process]:
        procs = list(self.infra)
        for group in self.groups.values():
            for instance in group.instances.values():
                procs += instance.processes
        return procs

    # -- control API ---------------------------------------------------------------

    def status(self) -> dict:
        rows = [{"service": p.name, "instance": None, **p.status()} for p in self.infra]
        for name in sorted(self.groups):
            rows += self.groups[name].status()
        return {
            "supervisor": {
                "pid": os.getpid(),
                "phase": self.phase,
                "uptime": time.time() - self.started_at,
                "state_dir": str(self.state_dir),
                "consul": self.config.consul.address,
                "problems": self.startup_problems,
                "time": timestamp(),
            },
            "processes": rows,
        }

    async def scale(self, counts: dict[str, int]) -> list[str]:
        if self.phase != "running":
            return [f"the supervisor is {self.phase}, not running"]
        problems = []
        for name, count in counts.items():
            if name not in self.groups:
                problems.append(f"no service named '{name}'")
            elif count < 0:
                problems.append(f"{name}: the count must not be negative")
        if problems:
            return problems
        for name, count in counts.items():
            self.scale_memory.remember(name, count, self.groups[name].service.instances)
        results = await asyncio.gather(*(self._scale_group(self.groups[n], c) for n, c in counts.items()))
        return [p for problems in results for p in problems]

    async def restart(self, target: str) -> list[str]:
        if self.phase != "running":
            return [f"the supervisor is {self.phase}, not running"]
        name, _, index_text = target.partition(".")
        group = self.groups.get(name)
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

