"""Building instances: everything one instance of a service is given before it starts.

An instance gets ports drawn from the configured range (its public port, the app's, the
sidecar's admin port and one per upstream), an environment (the supervisor's own, the
service's settings, its database URL), optionally a Unix socket for the app, a service
ID and its processes (the app, then its sidecar). What it was given is given back when
it stops: the ports return to the range and its socket file is removed.

The builder decides names, numbers and paths only; starting, stopping and restarting
instances is `supervisor/service.py`'s, the processes' specs are `supervisor/instance.py`'s.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from shared.mesh.naming import node_name, service_id
from supervisor.config import Config, Service
from supervisor.instance import Instance, InstancePorts, app_spec, sidecar_spec
from supervisor.logs import LogFiles
from supervisor.ports import PortAllocator, PortsExhausted
from supervisor.process import Process, ProcessSpec
from supervisor.state import PidRecord

# The longest Unix socket path Linux accepts (sun_path: 108 bytes with the final NUL).
MAX_SOCKET_PATH = 107


class InstanceBuilder:
    def __init__(self, config: Config, logs: LogFiles, pids: PidRecord, say: Callable[[str], None]) -> None:
        self.config = config
        self.logs = logs
        self.pids = pids
        self.say = say
        sup = config.supervisor
        # A port must be free where the apps listen (loopback) and where the sidecars do.
        self.ports = PortAllocator(sup.host, *sup.port_range,
                                   also=(sup.advertise,) if sup.advertise != sup.host else ())
        self.node = node_name(config.consul.node_name)
        # Filled in once PostgreSQL has provisioned the services' databases.
        self.database_urls: dict[str, str] = {}
        # Each service's own Consul token (ServiceIdentity), once ACLs are bootstrapped;
        # without them, every process that talks to Consul gets [consul] token.
        self.service_tokens: dict[str, str] = {}
        # Set by the daemon when sidecars are forked (supervisor/forkserver.py).
        self.fork_sidecar: Callable[[ProcessSpec], Awaitable[Any]] | None = None

    def make_process(self, spec: ProcessSpec) -> Process:
        """A process logging to its own file, its pid recorded for a successor that
        finds it left behind by a supervisor that died."""
        return Process(
            spec,
            self.logs.log(spec.name),
            on_spawn=lambda p: self.pids.add(p.pid, p.name),
            on_exit=lambda p: self.pids.remove(p.pid),
        )

    def base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "/usr/bin:/bin")
        env["PYTHONUNBUFFERED"] = "1"
        env["CONSUL_HTTP_ADDR"] = self.config.consul.address
        env["MESH_MTLS"] = "1" if self.config.mesh.mtls else "0"
        # No token by default: only the processes that talk to Consul get one, their own
        # (consul_token); an app does not, and nor does a server the supervisor runs.
        env.pop("CONSUL_HTTP_TOKEN", None)
        return env

    def consul_token(self, service: Service) -> str:
        """The token `service`'s sidecar (or the app itself, without one) uses with Consul."""
        return self.service_tokens.get(service.name) or self.config.consul.token

    def instance_env(self, service: Service, index: int, port: int) -> dict[str, str]:
        env = self.base_env()
        env.update(
            HOST="127.0.0.1",
            PORT=str(port),
            SERVICE_NAME=service.name,
            INSTANCE_INDEX=str(index),
            INSTANCE_NAME=f"{service.name}.{index}",
            MESHVISOR_STATE_DIR=str(self.config.state_dir),
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

        sid = service_id(service.name, self.node, index, generation)
        try:
            if not service.sidecar:
                port = service.port or take()
                admin = take() if service.port else None
                ports = InstancePorts(public=port, app=port, admin=admin, taken=taken)
                env = self.instance_env(service, index, port)
                # An app that registers itself (the gateway) uses this ID, so that status
                # can show its Consul health like a sidecar's, and its service's token.
                env["SERVICE_ID"] = sid
                # Its mesh listener for the other hosts, beside 127.0.0.1 (HOST).
                env["MESH_ADVERTISE"] = self.config.supervisor.advertise
                if token := self.consul_token(service):
                    env["CONSUL_HTTP_TOKEN"] = token
                if admin is not None:  # instances share `port`; each answers on its own too
                    env.update(ADMIN_PORT=str(admin), REUSE_PORT="1")
                spec = app_spec(service, index, port, env, cwd, ready_port=admin)
                return Instance(service, index, ports, [self.make_process(spec)], sid)
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
        sidecar_env = self.base_env()
        if token := self.consul_token(service):
            sidecar_env["CONSUL_HTTP_TOKEN"] = token
        spec = sidecar_spec(service, index, ports, sid, sidecar_env, cwd,
                            app_socket=app_socket, host=self.config.supervisor.advertise)
        spec.fork = self.fork_sidecar
        sidecar = self.make_process(spec)
        return Instance(service, index, ports, [app, sidecar], sid)

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
        return self.config.state_dir / "run" / f"app-{app_port}.sock"

    def release(self, instance: Instance) -> None:
        """Gives back what make_instance gave: the ports, and the app's socket file."""
        for port in instance.ports.taken:
            self.ports.release(port)
        if instance.service.app_socket and instance.service.sidecar:
            self._app_socket_path(instance.ports.app).unlink(missing_ok=True)
