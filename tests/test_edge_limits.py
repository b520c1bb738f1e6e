"""Edge limits: a request head's deadline (408 to a client that dribbles its head), the
open-files limit of every supervised process, and a gateway out of file descriptors.

The head deadline is tested on a relay in this process (as tests/test_relay.py does) and
on a real gateway process; the open-files limits on real supervised processes, read from
/proc/<pid>/limits; running out of descriptors on a real gateway (uvloop) started with a
low RLIMIT_NOFILE. Loopback only, every wait and loop bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import resource
import socket
import subprocess
import time

import pytest
import uvloop
from aiohttp import web

from services.gateway.settings import GatewaySettings
from shared.mesh.balancing import Balancer
from shared.mesh.relay import Relay, RelaySettings, Route
from shared.mesh.relay.pool import Pool
from shared.mesh.telemetry import RelayMetrics
from sidecar.settings import SidecarSettings
from supervisor.config import RestartPolicy
from supervisor.logs import LogFiles
from supervisor.process import Process, ProcessSpec
from tests.figures import figure
from tests.helpers import PROGRAMS, PY, ROOT, Project, free_port, free_range, wait_for

T = 10.0  # upper bound for any single wait
HEX32 = re.compile(r"[0-9a-f]{32}")
GET = b"GET /x HTTP/1.1\r\nHost: edge\r\n\r\n"


# -- plumbing ---------------------------------------------------------------------------


class Edge:
    """A relay listening on `port`, in front of one instance, `backend`."""

    def __init__(self, relay: Relay, port: int, backend) -> None:
        self.relay, self.port, self.backend = relay, port, backend


@contextlib.asynccontextmanager
async def relay_on(header_timeout: float, **settings):
    """A relay (header_timeout as given) in front of a small aiohttp app: an Edge."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    balancer = Balancer("app")
    balancer.update([("app-1", "127.0.0.1", runner.addresses[0][1], {})])
    route = Route("app", balancer, connect_timeout=2.0, request_timeout=T)
    relay = Relay(RelaySettings("edge", header_timeout=header_timeout, **settings),
                  lambda method, target: route, RelayMetrics("edge"))
    server = await asyncio.get_running_loop().create_server(relay.protocol, "127.0.0.1", 0, backlog=1024)
    try:
        yield Edge(relay, server.sockets[0].getsockname()[1], balancer.backends[0])
    finally:
        server.close()
        relay.close()
        for backend in balancer.backends:
            for up in list(backend.idle):
                up.close()
        await server.wait_closed()
        await runner.cleanup()


async def read_response(reader: asyncio.StreamReader, timeout: float = T) -> tuple[int, dict[str, str], bytes]:
    async def read():
        head = await reader.readuntil(b"\r\n\r\n")
        first, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        return int(first[9:12]), headers, body

    return await asyncio.wait_for(read(), timeout)


async def read_to_eof(reader: asyncio.StreamReader, timeout: float = T) -> bytes:
    """What the peer still sends before it closes (a reset counts as a close)."""
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return b""


def assert_408(status: int, headers: dict[str, str], body: bytes) -> dict:
    assert status == 408, (status, body)
    assert headers["content-type"] == "application/json" and headers.get("connection") == "close"
    data = json.loads(body)
    assert set(data) == {"status", "error", "message", "request_id"}, data
    assert data["status"] == 408 and data["error"] == "request_timeout" and "request head" in data["message"]
    assert HEX32.fullmatch(data["request_id"]) and headers["x-request-id"] == data["request_id"]
    return data


# -- the request head's deadline (a relay in this process) ------------------------------


async def test_half_a_head_then_silence_is_408_in_the_error_shape_and_closed():
    async with relay_on(0.5) as edge:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: edge\r\nUser-Ag")
        started = time.monotonic()
        status, headers, body = await read_response(reader)
        waited = time.monotonic() - started
        assert_408(status, headers, body)
        assert 0.45 <= waited < 2.5, waited
        assert await read_to_eof(reader) == b"", "closed after the 408"
        writer.close()
        await wait_for_async(lambda: not edge.relay.connections, "the relay to let the connection go")
        assert edge.relay.metrics.requests.get(("-", 408)) == 1


async def test_a_head_sent_slowly_within_the_timeout_is_served_and_keep_alive_waits_are_not_heads():
    async with relay_on(1.0) as edge:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        for _ in range(2):
            # The head in five pieces over ~0.4 s: within the 1 s it is given.
            for i in range(0, len(GET), 7):
                writer.write(GET[i:i + 7])
                await asyncio.sleep(0.08 if i + 7 < len(GET) else 0)
            status, _, body = await read_response(reader)
            assert (status, body) == (200, b"hello")
            # Idle on a kept-alive connection for longer than the head timeout: the idle
            # timeout's business (75 s), not the head's; the next request is served.
            await asyncio.sleep(1.5)
        # The clock of the next head starts with its first bytes: a stall there is a 408.
        writer.write(GET[:20])
        started = time.monotonic()
        assert_408(*await read_response(reader))
        assert 0.9 <= time.monotonic() - started < 3.0
        assert await read_to_eof(reader) == b""
        writer.close()


async def test_a_connection_that_sends_nothing_is_closed_quietly_after_the_timeout():
    async with relay_on(0.5) as edge:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        started = time.monotonic()
        assert await read_to_eof(reader) == b"", "no 408 to a client that asked nothing"
        assert 0.45 <= time.monotonic() - started < 2.5
        writer.close()
        assert ("-", 408) not in edge.relay.metrics.requests


async def scenario_many_dribblers() -> tuple[float, float]:
    """200 connections that each send a header line every 0.1 s: all get their 408 and
    are closed about when the 0.5 s run out; an honest client is served meanwhile."""
    count, timeout = 200, 0.5
    async with relay_on(timeout) as edge:
        started = time.monotonic()  # each connection's clock starts when it is accepted, after this
        streams = [await asyncio.open_connection("127.0.0.1", edge.port) for _ in range(count)]
        for _, writer in streams:
            writer.write(b"GET / HTTP/1.1\r\nHost: edge\r\n")

        async def dribble(writer: asyncio.StreamWriter) -> None:
            for n in range(60):  # at most 6 s
                await asyncio.sleep(0.1)
                if writer.is_closing():
                    return
                try:
                    writer.write(b"X-Dribble-%d: x\r\n" % n)
                except (ConnectionError, RuntimeError):
                    return

        async def outcome(reader: asyncio.StreamReader) -> float:
            assert_408(*await read_response(reader))
            assert await read_to_eof(reader) == b""
            return time.monotonic() - started

        dribblers = [asyncio.create_task(dribble(w)) for _, w in streams]
        try:
            honest_reader, honest_writer = await asyncio.open_connection("127.0.0.1", edge.port)
            honest_writer.write(GET)
            assert (await read_response(honest_reader))[0] == 200
            honest_writer.close()
            times = await asyncio.wait_for(asyncio.gather(*(outcome(r) for r, _ in streams)), 20)
        finally:
            for task in dribblers:
                task.cancel()
            await asyncio.gather(*dribblers, return_exceptions=True)
            for _, writer in streams:
                writer.close()
        await wait_for_async(lambda: not edge.relay.connections, "every dribbling connection gone")
        assert edge.relay.metrics.requests.get(("-", 408)) == count
        return min(times), max(times)


def test_two_hundred_dribbling_connections_are_all_cut_off_on_uvloop():
    first, last = uvloop.run(asyncio.wait_for(scenario_many_dribblers(), 60))
    assert 0.45 <= first and last < 4.0, (first, last)
    figure(f"[edge] 200 dribbling connections, head timeout 0.5 s: 408 + close after {first:.2f}-{last:.2f} s")


async def wait_for_async(predicate, what: str, timeout: float = T) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_the_head_timeout_is_a_setting_of_the_gateway_and_the_sidecar():
    assert GatewaySettings.from_env({}).header_timeout == 10.0
    assert GatewaySettings.from_env({"GATEWAY_HEADER_TIMEOUT": "2.5"}).header_timeout == 2.5
    required = {"SERVICE_NAME": "api", "SIDECAR_PORT": "1", "APP_PORT": "2"}
    assert SidecarSettings.from_env(required).header_timeout == 10.0
    assert SidecarSettings.from_env({**required, "SIDECAR_HEADER_TIMEOUT": "4"}).header_timeout == 4.0
    assert RelaySettings("x").header_timeout == 10.0


async def test_no_descriptor_for_an_upstream_connection_is_503_and_no_mark_against_the_instance(monkeypatch):
    async with relay_on(5.0) as edge:
        async def no_descriptors(*args, **kwargs):
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(Pool, "open", no_descriptors)
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        for _ in range(4):  # more than the 3 failures that eject an instance
            writer.write(GET)
            status, headers, body = await read_response(reader)
            data = json.loads(body)
            assert status == 503 and data["error"] == "service_unavailable", body
            assert "out of file descriptors" in data["message"]
        writer.close()
        assert edge.relay.metrics.upstream_errors == {("app", "descriptors"): 4}
        assert not edge.relay.metrics.retries, "another instance would need a descriptor too"
        assert edge.backend.failures == 0 and edge.backend.ejected_until == 0.0 and edge.backend.inflight == 0
        monkeypatch.undo()
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(GET)
        assert (await read_response(reader))[0] == 200, "the instance was never ejected"
        writer.close()


# -- open-files limits of supervised processes -------------------------------------------


def limits_of(pid: int) -> tuple[int, int]:
    """(soft, hard) 'Max open files' from /proc/<pid>/limits."""
    for line in open(f"/proc/{pid}/limits"):
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open-files line in /proc/{pid}/limits")


@contextlib.contextmanager
def low_soft_limit(soft: int = 256):
    """This process's soft RLIMIT_NOFILE lowered (children inherit it), then restored."""
    old_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= soft:
        pytest.skip(f"the hard open-files limit ({hard}) leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        yield hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (old_soft, hard))


async def test_a_supervised_process_gets_the_hard_open_files_limit(tmp_path):
    logs = LogFiles(tmp_path, 1 << 20, 1, None)
    spec = ProcessSpec("probe", [PY, "-c", "import time; time.sleep(30)"], dict(os.environ), str(tmp_path),
                       RestartPolicy())
    proc = Process(spec, logs.log("probe"))
    with low_soft_limit() as hard:
        proc.start()
        try:
            await wait_for_async(lambda: proc.pid is not None, "the probe to start")
            assert limits_of(os.getpid()) == (256, hard)
            assert limits_of(proc.pid) == (hard, hard)
        finally:
            await proc.stop(2)
            logs.close()


def test_the_supervisor_and_its_services_run_with_the_hard_open_files_limit(consul_agent):
    low, high = free_range(10)
    p = Project(f"web: {PY} {PROGRAMS / 'web.py'}\n", f"""
[supervisor]
port_range = [{low}, {high}]
stop_timeout = 3.0
start_timeout = 15.0

[consul]
mode = "external"
address = "{consul_agent}"

[services.web]
sidecar = false
""")
    try:
        with low_soft_limit() as hard:  # the CLI, and so the supervisor it starts, inherit 256
            p.start()
        (row,) = p.rows("web")
        assert limits_of(p.supervisor_pid()) == (hard, hard)
        assert limits_of(row["pid"]) == (hard, hard)
        p.cli("stop", check=True)
    finally:
        p.cleanup()


# -- a real gateway (uvloop) ------------------------------------------------------------


class GatewayProcess:
    """`python -m services.gateway` on a free port, no registration, plain HTTP, with
    RLIMIT_NOFILE's soft limit set to `nofile` in the child."""

    def __init__(self, consul: str, folder, nofile: int | None = None, **env: str) -> None:
        self.port, self.admin = free_port(), free_port()
        environ = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))),
                   "SERVICE_NAME": "gateway", "PORT": str(self.port), "ADMIN_PORT": str(self.admin),
                   "CONSUL_HTTP_ADDR": consul, "MESH_MTLS": "0", "GATEWAY_REGISTER": "0",
                   "GATEWAY_ACCESS_LOG": "0", **env}

        def lower() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

        self.log_path = folder / "gateway.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([PY, "-m", "services.gateway"], env=environ, cwd=ROOT, preexec_fn=lower,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._answers, 30, interval=0.1, what="the gateway to answer /health")

    def _answers(self) -> bool:
        assert self.proc.poll() is None, self.log_path.read_text()[-2000:]
        try:
            with self.connect(1) as s:
                return ask(s).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def connect(self, timeout: float = 3.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def cpu_seconds(self) -> float:
        fields = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def descriptors(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def ask(s: socket.socket, request: bytes = b"GET /health HTTP/1.1\r\nHost: edge\r\n\r\n") -> bytes:
    """The status line of the answer to `request` on `s`; b"" if the gateway closed it."""
    s.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            return b""
        body += chunk
    return head.split(b"\r\n", 1)[0]


def refused(gateway: GatewayProcess) -> bool:
    """A new connection gets no answer: closed (or reset) before any byte."""
    try:
        with gateway.connect() as s:
            return ask(s) == b""
    except OSError:
        return True


@pytest.fixture
def gateway_at(consul_agent, tmp_path):
    started = []

    def start(**kwargs) -> GatewayProcess:
        gateway = GatewayProcess(consul_agent, tmp_path, **kwargs)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


def test_the_gateway_answers_a_stalled_head_with_408_after_its_setting(gateway_at):
    gateway = gateway_at(GATEWAY_HEADER_TIMEOUT="0.5")
    with gateway.connect(T) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: ed")
        started = time.monotonic()
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        waited = time.monotonic() - started
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert_408(int(lines[0][9:12]), headers, body)
    assert 0.45 <= waited < 3.0, waited


def test_a_gateway_out_of_descriptors_serves_what_it_has_refuses_the_rest_idly_and_recovers(gateway_at):
    limit = 64
    gateway = gateway_at(nofile=limit, GATEWAY_HEADER_TIMEOUT="1")
    kept = gateway.connect()
    assert ask(kept).startswith(b"HTTP/1.1 200")
    held: list[socket.socket] = []
    try:
        # Open connections (each served once and kept alive) until the gateway has no
        # descriptor left for the next one.
        for _ in range(limit + 20):
            s = gateway.connect()
            try:
                answered = ask(s).startswith(b"HTTP/1.1 200")
            except OSError:
                answered = False
            if not answered:
                s.close()
                break
            held.append(s)
        else:
            raise AssertionError(f"{len(held)} connections and no refusal at a limit of {limit}")
        assert len(held) >= 10, f"only {len(held)} connections before running out"
        assert gateway.descriptors() >= limit - 1

        # Saturated, with a new client knocking every 50 ms for 2 s: each is refused, the
        # gateway does not spin, and the connections it has are served.
        cpu, started, knocks, answered = gateway.cpu_seconds(), time.monotonic(), 0, 0
        while time.monotonic() - started < 2.0:
            knocks += 1
            answered += not refused(gateway)
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        share = (gateway.cpu_seconds() - cpu) / elapsed
        assert answered == 0, f"{answered} of {knocks} new connections served with no descriptor free"
        assert share < 0.20, f"the gateway used {share:.0%} of a core while out of descriptors"
        for s in (kept, held[0], held[-1]):
            assert ask(s).startswith(b"HTTP/1.1 200"), "a connection it had is no longer served"

        # Descriptors back: new connections are served at once.
        for s in held:
            s.close()
        held.clear()
        recovered = time.monotonic()
        wait_for(lambda: not refused(gateway), 5, interval=0.05, what="new connections served again")
        recovered = time.monotonic() - recovered
        with gateway.connect() as s:
            assert ask(s).startswith(b"HTTP/1.1 200")
        assert ask(kept).startswith(b"HTTP/1.1 200")
    finally:
        kept.close()
        for s in held:
            s.close()
    figure(f"[edge] gateway at RLIMIT_NOFILE {limit}: refused {knocks} new connections in {elapsed:.1f} s "
           f"using {share:.1%} of a core; served again {recovered:.2f} s after the clients left")
