"""The running supervisor: brings the stack up in order, serves the control API, takes it down.

Order up: the sidecars' fork server (supervisor/forkserver.py) while Consul starts (until
it has a leader, and with ACLs until the management token works), the mesh's tokens and
intentions (supervisor/infra/connect.py), Prometheus (until it is ready;
supervisor/infra/prometheus.py), PostgreSQL (until it accepts logins, then one database and
role per service), then every instance of every service. Down: services first,
infrastructure last.

This module is the run's lifecycle only: what an instance is given is the builder's
(supervisor/builder.py), the figures `status` shows are the sampler's
(supervisor/sampler.py), the control API's verbs are supervisor/verbs.py, and a reload
(`supervisor reload`, SIGHUP) is supervisor/reload.py, which reuses the start-up steps
for the mesh (prepare_mesh) and the databases (provision_databases).
"""

from __future__ import annotations

import asyncio
import os
import stat
import signal
import sys
import time

import aiohttp

from supervisor import reload as reloading
from supervisor import state, verbs
from supervisor.builder import InstanceBuilder
from supervisor.config import Config, Service
from supervisor.control import ControlServer
from shared.mesh.consul import ConsulError, make_client
from shared.procctl import become_child_subreaper
from supervisor.forkserver import ForkServer
from supervisor.infra import RESTART_POLICY, InfraError, acl
from supervisor.infra import connect as connect_infra
from supervisor.infra import consul as consul_infra
from supervisor.infra import postgres as postgres_infra
from supervisor.infra import prometheus as prometheus_infra
from supervisor.logs import LogFiles, Printer
from supervisor.ports import ephemeral_overlap, ephemeral_range
from supervisor.process import Process, ProcessSpec, State, raise_open_files_limit
from supervisor.sampler import Sampler
from supervisor.service import ServiceGroup
from supervisor.watchdog import Watchdog

FORK_SERVER_START_TIMEOUT = 15.0  # its imports take ~0.5 s on a quiet machine


class Daemon:
    def __init__(self, config: Config, foreground: bool = True) -> None:
        self.config = config
        self.state_dir = config.state_dir
        self.phase = "starting"
        self.started_at = time.time()
        self.startup_problems: list[str] = []
        self.infra: list[Process] = []
        self.groups: dict[str, ServiceGroup] = {}
        self._stop = asyncio.Event()
        self._stop_reason = ""
        self._signals = 0
        sup = config.supervisor
        self.logs = LogFiles(self.state_dir / "logs", sup.log_max_bytes, sup.log_backups,
                             Printer() if foreground else None)
        self._own_log = self.logs.log("supervisor")
        self.scale_memory = state.ScaleMemory(self.state_dir)
        self.stopped = state.StoppedServices(self.state_dir)
        self.gate = verbs.Gate()  # scale/restart share it; reload, stop/start NAME and shutdown take it alone
        self._reloads: set[asyncio.Task] = set()
        self.builder = InstanceBuilder(config, self.logs, state.PidRecord(self.state_dir), self.say)
        self.sampler = Sampler(config.consul, self.infra, self.groups)
        self.fork_server = ForkServer() if sup.fork_sidecars else None

    def say(self, message: str) -> None:
        self._own_log.write(message.encode())

    # -- the run -------------------------------------------------------------------

    async def run(self) -> int:
        raise_open_files_limit()  # as for every process it starts (supervisor/process.py)
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
            loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
            self.say(f"supervisor {os.getpid()} starting, state in {self.state_dir}")
            overlap = ephemeral_overlap(*self.config.supervisor.port_range)
            if overlap is not None:
                self.say(f"warning: supervisor.port_range overlaps the kernel's ephemeral ports at "
                         f"[{overlap[0]}, {overlap[1]}] (net.ipv4.ip_local_port_range): an outgoing "
                         f"connection may take an instance's port while it restarts; move the range below "
                         f"{ephemeral_range()[0]} or reserve it with net.ipv4.ip_local_reserved_ports")
            self._warn_about_readable_secrets()
            if self.fork_server is not None and not become_child_subreaper():
                self.say("warning: cannot become a child subreaper (prctl); sidecars are exec'd, not forked")
                self.fork_server = None
            code = await self._serve()
        finally:
            await self._shutdown()
            if watchdog is not None:
                watchdog.dismiss()
            await control.close()
            self.logs.close()
            lock.release()
        return code

    def _warn_about_readable_secrets(self) -> None:
        consul = self.config.consul
        held = [key for key, value in (("consul.token", consul.token), ("consul.encrypt", consul.encrypt)) if value]
        try:
            mode = self.config.config_path.stat().st_mode
        except OSError:
            return
        if held and mode & (stat.S_IRWXG | stat.S_IRWXO):
            self.say(f"warning: {self.config.config_path} holds {' and '.join(held)} but others may read it "
                     f"(mode {stat.S_IMODE(mode):04o}): chmod 600 it")

    async def _serve(self) -> int:
        bring_up = asyncio.create_task(self._bring_up())
        stopped = asyncio.create_task(self._stop.wait())
        stats = asyncio.create_task(self.sampler.sample_forever())
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
        env = self.builder.base_env()
        if any(service.sidecar for service in self.config.services.values()):
            self._start_fork_server()  # it imports while Consul starts
        consul = self.config.consul
        if consul.mode == "embedded":
            if consul.acl and not consul.token:
                # The supervisor's own token from now on (status, intentions): the
                # management token, made on the first start, kept in the state dir. A
                # cluster's hosts are given theirs in [consul] token (config_hosts.py).
                consul.token = acl.Secrets(self.state_dir).management_token()
            await self._start_consul(consul_infra.spec(self.config, env, consul.token))
            try:
                await consul_infra.check_one_cluster(consul.address, consul.token, joining=bool(consul.join))
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise InfraError(f"cannot ask the Consul agent about its cluster: {exc}") from None
        else:
            await consul_infra.wait_for_external(consul.address, consul.token, consul.start_timeout)
        await self.prepare_mesh(self.config)
        if self.config.prometheus.mode == "embedded":
            await self._start_infra(await prometheus_infra.spec(self.config, env), self.config.prometheus.start_timeout)
        await self.provision_databases(self.config)
        await self._fork_server_settled()
        for service in self.config.services.values():
            self.groups[service.name] = self.new_group(service)
        stopped = self.stopped.names()  # with `supervisor stop NAME`: left stopped
        counts = {
            name: self.scale_memory.count(name, group.service.instances)
            for name, group in self.groups.items() if name not in stopped
        }
        self.startup_problems += await verbs.scale_groups(self.groups, counts)

    def _start_fork_server(self) -> None:
        """Once, when the first service with a sidecar is about to start (here or on a reload)."""
        server = self.fork_server
        if server is None or server.process is not None:
            return
        spec = ProcessSpec(name="forkserver", argv=server.argv(), env=self.builder.base_env(), cwd=str(self.config.root),
                           restart=RESTART_POLICY, stop_timeout=5.0, ready_check=server.ready,
                           tags={"role": "forkserver"})
        server.attach(self.builder.make_process(spec))
        self.infra.append(server.process)
        server.process.start()
        self.builder.fork_sidecar = server.fork

    async def _fork_server_settled(self) -> None:
        """Sidecars are forked once it serves; if it does not, they are exec'd (slower, heavier)."""
        if self.fork_server is None or self.fork_server.process is None:
            return
        if not await self.fork_server.process.wait_settled(FORK_SERVER_START_TIMEOUT):
            self.say(f"warning: the sidecar fork server is not up (see {self.state_dir}/logs/forkserver.log); "
                     "sidecars are exec'd until it is")

    def new_group(self, service: Service) -> ServiceGroup:
        if service.sidecar:
            self._start_fork_server()
        return ServiceGroup(service, self.builder.make_instance, self.builder.release)

    async def provision_databases(self, config: Config) -> None:
        """One database and role per service of `config` that declares one, on the
        embedded server (started here first if it does not run yet) or an external one."""
        needs_db = any(s.database and not s.database_url for s in config.services.values())
        layout = None
        if config.postgres.mode == "embedded" and needs_db:
            layout = postgres_infra.layout(config)
            running = next((p for p in self.infra if p.name == "postgres"), None)
            if running is None:
                await postgres_infra.initdb(layout, self.logs.log("postgres"))
                await self._start_infra(postgres_infra.spec(config, layout, self.builder.base_env()),
                                        config.postgres.start_timeout)
            elif config.postgres.listen:  # a new service's logins from the other hosts
                postgres_infra.write_hba(config, layout)
                running.send_signal(signal.SIGHUP)
        try:
            self.builder.database_urls = await postgres_infra.provision(
                config, layout, config.consul.token if config.consul.acl else "")
        except (OSError, asyncio.TimeoutError) as exc:
            raise InfraError(f"cannot reach PostgreSQL to create the service databases: {exc}") from None
        except Exception as exc:  # asyncpg.PostgresError and friends
            raise InfraError(f"creating the service databases failed: {exc}") from None

    async def prepare_mesh(self, config: Config) -> None:
        """Tokens for the services and the intentions the config implies (see connect.py)."""
        client = make_client(config.consul.address, config.consul.token)
        try:
            tokens, written = await connect_infra.prepare(client, config)
        except (ConsulError, OSError, asyncio.TimeoutError) as exc:
            raise InfraError(f"preparing Consul (ACL tokens, intentions) failed: {exc}") from None
        finally:
            await client.close()
        self.builder.service_tokens = tokens
        if written:
            self.say("intentions written: " + ", ".join(written))

    async def _start_consul(self, spec: ProcessSpec) -> None:
        """A server must have a leader within [consul] start_timeout; a client waits for
        the cluster's servers as long as it takes (a host may boot before them), saying so."""
        consul = self.config.consul
        if consul.role == "server":
            await self._start_infra(spec, consul.start_timeout)
            return
        proc = self.builder.make_process(spec)
        self.infra.append(proc)
        self.say(f"starting consul (client of {', '.join(consul.join)})")
        proc.start()
        patience = 5.0
        while not await proc.wait_settled(patience):
            patience = 30.0
            if proc.state == State.FATAL:
                raise InfraError(f"consul did not come up: {proc.reason} (see {self.state_dir}/logs/consul.log)")
            self.say(f"consul: no server with a leader reachable yet through {', '.join(consul.join)}; waiting")
        self.say("consul is up (joined)")

    async def _start_infra(self, spec: ProcessSpec, timeout: float) -> None:
        proc = self.builder.make_process(spec)
        self.infra.append(proc)
        self.say(f"starting {spec.name}")
        proc.start()
        if not await proc.wait_settled(timeout):
            reason = proc.reason or f"not ready within {timeout:g}s"
            raise InfraError(f"{spec.name} did not come up: {reason} (see {self.state_dir}/logs/{spec.name}.log)")
        self.say(f"{spec.name} is up")

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

    def _on_hangup(self) -> None:
        self.say("received SIGHUP: reloading")
        task = asyncio.create_task(self.reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    def request_stop(self, reason: str) -> None:
        if not self._stop.is_set():
            self._stop_reason = reason
            self.say(f"stopping: {reason}")
            self._stop.set()

    async def _shutdown(self) -> None:
        self.phase = "stopping"
        async with self.gate.exclusive():  # after a reload or scale in progress, never beside it
            await asyncio.gather(*(g.stop_all() for g in self.groups.values()), return_exceptions=True)
        for proc in reversed(self.infra):
            self.say(f"stopping {proc.name}")
            await proc.stop()
        self.say("stopped")

    # -- the control API (supervisor/control.py's Controllable) ----------------------

    def status(self) -> dict:
        return verbs.status(self)

    async def scale(self, counts: dict[str, int]) -> list[str]:
        return await verbs.scale(self, counts)

    async def restart(self, target: str) -> list[str]:
        return await verbs.restart(self, target)

    async def reload(self) -> tuple[list[str], list[str]]:
        report = await reloading.reload(self, self.say)
        return report.changes, report.problems

    async def stop_service(self, name: str) -> list[str]:
        problems = await verbs.stop_service(self, name)
        self.say(f"stopped {name} (`supervisor start {name}` starts it)" if not problems else
                 f"stop {name}: " + "; ".join(problems))
        return problems

    async def start_service(self, name: str) -> list[str]:
        problems = await verbs.start_service(self, name)
        self.say(f"started {name}" if not problems else f"start {name}: " + "; ".join(problems))
        return problems

    async def refresh_consul_health(self) -> None:
        await asyncio.gather(self.sampler.refresh_consul_health(), self.sampler.refresh_mesh_problems())

    async def cluster(self) -> verbs.cluster_view.Picture:
        return await verbs.cluster(self)
