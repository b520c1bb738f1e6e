"""Test helpers: free ports, temporary projects, and a driver for the supervisor CLI."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import psutil

from supervisor.control_client import ControlClient
from supervisor.ports import ephemeral_range
from supervisor.state import clean_leftovers

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ROOT / "tests" / "programs"
PY = sys.executable


def _listen_range() -> tuple[int, int]:
    """Ports for test servers: below the kernel's ephemeral range (ip_local_port_range).

    A port from that range (what binding port 0 gives) can become the source port of some
    outgoing connection between the test choosing it and a server binding it; a sidecar
    then fails to bind on every restart (its port is fixed) and ends FATAL. Below the
    range no connection takes a port by itself.
    """
    low, high = 10000, max(ephemeral_range()[0] - 1, 12000)
    if len(_handed_out) > (high - low) // 2:  # long bound by now, or given back: start afresh
        _handed_out.clear()
    return low, high


# Defaults of the shipped config (Consul, PostgreSQL, gateway, the instance range): a
# range holding one of them is refused by config validation, and a developer's running
# stack may hold them, so tests never draw one.
_DEFAULT_PORTS = frozenset((3000, 8300, 8301, 8302, 8500, 54329, *range(20000, 21000)))
_random = random.Random()
# Ports handed out by this process: not bound yet when the next are drawn (a stack's
# gateway port, then its instance range), so "free now" alone could hand one out twice.
_handed_out: set[int] = set()


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """`count` different ports that are free now (see _listen_range)."""
    low, high = _listen_range()
    ports: list[int] = []
    for _ in range(1000):
        port = _random.randint(low, high)
        if port not in _DEFAULT_PORTS and port not in _handed_out and port_free(port):
            ports.append(port)
            _handed_out.add(port)
            if len(ports) == count:
                return ports
    raise RuntimeError(f"no {count} free ports in [{low}, {high}]")


def free_port() -> int:
    return free_ports(1)[0]


def free_range(size: int) -> tuple[int, int]:
    """A run of `size` consecutive ports that are free now (see _listen_range)."""
    low, high = _listen_range()
    for _ in range(200):
        start = _random.randint(low, high - size + 1)
        block = range(start, start + size)
        if any(p in _DEFAULT_PORTS or p in _handed_out for p in block):
            continue
        if all(port_free(p) for p in block):
            _handed_out.update(block)
            return start, start + size - 1
    raise RuntimeError("no free port range")


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class Project:
    """A throw-away project folder (Procfile + config/meshvisor.toml) with its own state dir.

    Lives under /tmp with mode 0755 so that PostgreSQL, run as the `postgres` user when
    the tests run as root, can reach its data directory.
    """

    def __init__(self, procfile: str, config: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="meshvisor-test-", dir="/tmp"))
        os.chmod(self.root, 0o755)
        (self.root / "config").mkdir()
        (self.root / "Procfile").write_text(textwrap.dedent(procfile))
        self.config_path = self.root / "config" / "meshvisor.toml"
        self.config_path.write_text(textwrap.dedent(config))
        self.state_dir = self.root / ".state"

    def cli(self, *args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [PY, "-m", "supervisor", "--config", str(self.config_path), *args],
            capture_output=True, text=True, timeout=timeout, cwd=self.root,
            env={**os.environ, "NO_COLOR": "1"},
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"supervisor {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def start(self, timeout: float = 120) -> subprocess.CompletedProcess:
        """`supervisor start --detach`; when the stack does not come up, every process is
        stopped (a fixture that fails here has no teardown) and the error says why."""
        try:
            return self.cli("start", "--detach", "--wait", str(timeout), timeout=timeout + 30, check=True)
        except (AssertionError, subprocess.TimeoutExpired) as exc:
            why = self.errors_logged()
            self.stop_everything()
            raise AssertionError(f"{exc}\nerrors in the logs:\n{why}") from None

    def errors_logged(self, per_file: int = 3) -> str:
        """The last error lines of every process's log (for a failure message)."""
        found = []
        for path in sorted((self.state_dir / "logs").glob("*.log")):
            lines = [line for line in path.read_text(errors="replace").splitlines()
                     if "Error" in line or '"level":"error"' in line or "FATAL" in line]
            found += [f"  {path.name}: {line[:300]}" for line in lines[-per_file:]]
        return "\n".join(found) or "  (none)"

    def status(self) -> dict:
        return ControlClient(self.state_dir / "run" / "control.sock", timeout=10).call("GET", "/v1/status")

    def rows(self, service: str | None = None) -> list[dict]:
        return [r for r in self.status()["processes"] if service is None or r["service"] == service]

    def supervisor_pid(self) -> int | None:
        try:
            return int((self.state_dir / "run" / "supervisor.lock").read_text() or 0) or None
        except (FileNotFoundError, ValueError):
            return None

    def descendants(self) -> list[psutil.Process]:
        pid = self.supervisor_pid()
        try:
            return psutil.Process(pid).children(recursive=True) if pid else []
        except psutil.Error:
            return []

    def log(self, name: str) -> str:
        try:
            return (self.state_dir / "logs" / f"{name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def cleanup(self) -> None:
        """Stop whatever is still running (a failed test must not leak processes), then
        remove the project folder."""
        self.stop_everything()
        shutil.rmtree(self.root, ignore_errors=True)

    def stop_everything(self) -> None:
        pid = self.supervisor_pid()
        procs = self.descendants()
        if pid and psutil.pid_exists(pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            else:
                exited(pid, 30)
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        # Leftovers recorded in pids.json (e.g. after a SIGKILL test): killed at once.
        clean_leftovers(self.state_dir, say=lambda message: None, grace=0)


def exited(pid: int, timeout: float) -> bool:
    """Wait until `pid` has exited (gone, or a zombie); False if it still runs after `timeout`.

    Not psutil's wait(): for a process that is not our child (a detached supervisor's
    parent is init) that waits until init has reaped it, and an init that reaps orphans
    only every ~2 s (as on the development machine) added that much to every stack's
    teardown. A zombie has stopped all the same: `alive` does not count it either.
    """
    deadline = time.monotonic() + timeout
    while alive([pid]):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.Error:
            pass
    return out


# Management tokens of the ACL agents of this test run, by address: stack_settings hands
# a stack on such an agent its token, as an operator's [consul] token would.
ACL_TOKENS: dict[str, str] = {}


class ConsulDevAgent:
    """A real Consul agent on free ports, restartable.

    Plain (`acl=False`): dev mode, state in memory; a restart loses every registration,
    which is exactly the case sidecars must heal. With `acl=True`: what a production
    cluster looks like to the stack, a one-node server keeping its state in its data dir,
    ACLs on with default deny (management token `token`, in a 0600 config file, never on
    the command line), the anonymous token allowed to read services and nodes (as the
    supervisor sets up its embedded agent), Connect on. Both have Connect's CA.
    """

    def __init__(self, acl: bool = False, *, token: str = "", bare: bool = False) -> None:
        """`token`: the management token to use (default: a new one). `bare`: ACLs as a
        new cluster has them, before anyone set them up (no agent token, the anonymous
        token with no rights): what the supervisor's bootstrap must do is left to it."""
        from supervisor.infra.consul import find_binary

        self.binary = find_binary(ROOT)
        self.http, self.server, self.serf = free_ports(3)
        self.address = f"127.0.0.1:{self.http}"
        self.dir = tempfile.mkdtemp(prefix="meshvisor-consul-")
        self.proc: subprocess.Popen | None = None
        self.acl = acl
        self.bare = bare
        self.token = (token or str(uuid.uuid4())) if acl else ""
        if acl:
            ACL_TOKENS[self.address] = self.token
            self._write_config()

    def start(self, timeout: float = 30) -> None:
        """Launch and wait until it has a leader (and with ACLs, until they work)."""
        self.launch()
        wait_for(self.leader, timeout, interval=0.1, what="consul agent leader")
        if self.acl:
            wait_for(self._acl_ready, timeout, interval=0.1, what="consul ACLs")
            if not self.bare:
                self._allow_anonymous_reads()

    def launch(self) -> None:
        if self.acl:
            argv = [self.binary, "agent", "-config-file", os.path.join(self.dir, "agent.json")]
        else:
            argv = [self.binary, "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1",
                    "-http-port", str(self.http), "-server-port", str(self.server), "-serf-lan-port", str(self.serf),
                    "-serf-wan-port", "-1", "-dns-port", "-1", "-hcl", "ports { grpc = -1 }", "-log-level", "warn"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.dir)

    def _write_config(self) -> None:
        config = {
            "datacenter": "dc1", "primary_datacenter": "dc1", "node_name": f"test-{self.http}", "server": True,
            "bootstrap_expect": 1, "bind_addr": "127.0.0.1", "client_addr": "127.0.0.1",
            "data_dir": os.path.join(self.dir, "data"), "log_level": "warn", "ui": True,
            "ports": {"http": self.http, "dns": -1, "server": self.server, "serf_lan": self.serf, "serf_wan": -1,
                      "grpc": -1},
            "performance": {"raft_multiplier": 1}, "connect": {"enabled": True},
            "acl": {"enabled": True, "default_policy": "deny", "down_policy": "extend-cache",
                    "enable_token_persistence": True,
                    "tokens": {"master": self.token} if self.bare else {"master": self.token, "agent": self.token}},
        }
        fd = os.open(os.path.join(self.dir, "agent.json"), os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as file:
            json.dump(config, file)

    def _acl_ready(self) -> bool:
        try:
            self.get("/v1/acl/token/self", token=self.token)
            return True
        except OSError:
            return False

    def _allow_anonymous_reads(self) -> None:
        from supervisor.infra import acl

        for name, rules in acl.POLICIES.items():
            if name == acl.ANONYMOUS_POLICY and not any(p["Name"] == name for p in
                                                        self.get("/v1/acl/policies", token=self.token)):
                self.put("/v1/acl/policy", {"Name": name, "Rules": rules})
        self.put(f"/v1/acl/token/{acl.ANONYMOUS_ACCESSOR}", {"Policies": [{"Name": acl.ANONYMOUS_POLICY}]})

    def put(self, path: str, body: dict):
        """PUT with the management token (writes need one when ACLs are on)."""
        import urllib.request

        request = urllib.request.Request(f"http://{self.address}{path}", data=json.dumps(body).encode(), method="PUT",
                                         headers={"X-Consul-Token": self.token} if self.token else {})
        with urllib.request.urlopen(request, timeout=5) as resp:
            return json.loads(resp.read() or b"null")

    def leader(self) -> bool:
        try:
            return bool(self.get("/v1/status/leader"))
        except OSError:
            return False

    def get(self, path: str, token: str = ""):
        import urllib.request

        request = urllib.request.Request(f"http://{self.address}{path}",
                                         headers={"X-Consul-Token": token} if token else {})
        with urllib.request.urlopen(request, timeout=5) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        self.terminate()

    def terminate(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def identity(self, service: str, *, server: bool = False, trust: str | None = None) -> ssl.SSLContext:
        """A TLS context presenting a Connect leaf of `service` (fetched with the
        management token): what a sidecar of that service presents. A client one trusts
        `trust` (PEM), by default every root of the CA; a `server` one checks nobody."""
        leaf = self.get(f"/v1/agent/connect/ca/leaf/{service}", token=self.token)
        if server:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        else:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            if trust is None:
                trust = "".join(r["RootCert"] for r in self.get("/v1/agent/connect/ca/roots")["Roots"])
            context.load_verify_locations(cadata=trust)
        with tempfile.NamedTemporaryFile("w", suffix=".pem") as pem:  # test keys only
            pem.write(leaf["CertPEM"] + leaf["PrivateKeyPEM"])
            pem.flush()
            context.load_cert_chain(pem.name)
        return context

    def checks(self, service: str) -> dict[str, str]:
        """{service ID: check status} in the catalog for one service."""
        return {c["ServiceID"]: c["Status"] for c in self.get(f"/v1/health/checks/{service}")}

    def passing(self, service: str) -> list[dict]:
        return [e["Service"] for e in self.get(f"/v1/health/service/{service}?passing=true")]

    def close(self) -> None:
        if self.proc is not None and not self.acl:
            # A dev agent keeps everything in memory and its folder goes next: nothing
            # is lost by SIGKILL, and Consul's clean shutdown takes ~0.5 s.
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        self.terminate()
        ACL_TOKENS.pop(self.address, None)
        shutil.rmtree(self.dir, ignore_errors=True)


# A test stack's [prometheus] table: none (the default would start one on port 9090 per stack).
PROMETHEUS_OFF = 'mode = "off"'


def mesh_project(consul: str, services: dict[str, str], *, gateway_port: int | None = None,
                 gateway_env: str = "", drain_seconds: float = 0.5, prometheus: str = PROMETHEUS_OFF) -> Project:
    """A stack on an external Consul agent: tests/programs/web.py for every service in
    `services` (name -> extra TOML lines of its table), each behind a sidecar, and the
    gateway on `gateway_port` if given; `prometheus`: its [prometheus] table (off)."""
    procfile = f"gateway: {PY} -m services.gateway\n" if gateway_port else ""
    procfile += "".join(f"{name}: {PY} {PROGRAMS / 'web.py'}\n" for name in services)
    tables = "".join(f"[services.{name}]\ndrain_seconds = {drain_seconds}\n{extra}\n"
                     for name, extra in services.items())
    if gateway_port:
        tables = (f"[services.gateway]\nport = {gateway_port}\nsidecar = false\nhealth = \"/health\"\n"
                  f"env = {{ GATEWAY_DRAIN_SECONDS = \"0.3\" {gateway_env} }}\n\n") + tables
    return Project(procfile, f"""{stack_settings(consul, start_timeout=20.0, prometheus=prometheus)}
{tables}""")


def stack_settings(consul: str, *, start_timeout: float, prometheus: str = PROMETHEUS_OFF) -> str:
    """The [supervisor], [restart], [consul] and [prometheus] tables of a test stack:
    instance ports of its own, quick restarts, the Consul agent at `consul` (with its
    management token as [consul] token when it is an ACL agent of this run: the supervisor
    then makes the services' tokens with it), no Prometheus unless `prometheus` (the
    table's lines) says otherwise."""
    low, high = free_range(80)
    token = ACL_TOKENS.get(consul)
    acl = f'acl = true\ntoken = "{token}"\n' if token else ""
    return f"""
[supervisor]
port_range = [{low}, {high}]
start_timeout = {start_timeout}

[restart]
backoff_initial = 0.2
backoff_max = 1.0

[prometheus]
{prometheus}

[consul]
mode = "external"
address = "{consul}"
{acl}"""
