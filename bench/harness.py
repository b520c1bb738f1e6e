"""Shared benchmark plumbing: processes on free ports, wrk runs, CPU time from /proc.

Method (the same for every benchmark here): wrk with 1 thread and 50 connections,
several rounds with the paths interleaved, every other round in reverse order (so drift
of this noisy 2-core machine hits every path alike), medians over rounds. CPU per
request is the utime+stime a proxy process spent during a run (from /proc/<pid>/stat)
divided by the requests wrk counted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout}s")


class ForkedSidecar:
    """The few Popen members Processes uses, for a forked child of this process."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and os.waitpid(self.pid, os.WNOHANG)[0] == self.pid:
            self.returncode = 0
        return self.returncode

    def terminate(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.05)


class Processes:
    """Starts processes and makes sure every one is gone at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.tmp = tempfile.mkdtemp(prefix="meshvisor-bench-")

    def start(self, argv: list[str], env: dict[str, str] | None = None, name: str = "") -> subprocess.Popen:
        log = open(Path(self.tmp) / f"{name or Path(argv[0]).name}-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                cwd=ROOT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def fork_sidecar(self, env: dict[str, str], name: str) -> ForkedSidecar:
        """A sidecar forked by a fork server of this benchmark, as the supervisor forks them
        ([supervisor] fork_sidecars): this process becomes a child subreaper and gets it."""
        sys.path.insert(0, str(ROOT))
        from shared.procctl import become_child_subreaper
        from supervisor.forkserver import ForkServer, fork_request

        if not hasattr(self, "_fork_server"):
            assert become_child_subreaper()
            self._fork_server = ForkServer()
            server = self.start(self._fork_server.argv(), name="forkserver")
            deadline = time.monotonic() + 30
            while True:
                try:
                    if self._fork_server.ping(server.pid):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.1)
            self._fork_server_pid = server.pid
        with open(Path(self.tmp) / f"{name}-{len(self.procs)}.log", "wb") as log:
            request = fork_request({**os.environ, **env}, str(ROOT), signal.SIGTERM)
            reply = self._fork_server.ask(request, log.fileno(), self._fork_server_pid)
        proc = ForkedSidecar(int(reply["pid"]))
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def consul_dev_agent(procs: Processes) -> str:
    sys.path.insert(0, str(ROOT))
    from supervisor.infra.consul import find_binary

    http, server, serf = free_port(), free_port(), free_port()
    procs.start([find_binary(ROOT), "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1",
                 "-http-port", str(http), "-server-port", str(server), "-serf-lan-port", str(serf),
                 "-serf-wan-port", "-1", "-dns-port", "-1", "-hcl", "ports { grpc = -1 }", "-log-level", "warn"],
                name="consul")
    address = f"127.0.0.1:{http}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{address}/v1/status/leader", timeout=1) as resp:
                if resp.read().strip(b'"\n'):
                    return address
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("consul dev agent did not get a leader")


def connect_proxy_pair(procs: Processes, consul: str, app_port: int) -> tuple[int, list[int]]:
    """Consul Connect's own built-in proxies in front of the app on `app_port`, from the
    same consul binary: `connect proxy -sidecar-for` (the inbound side, mTLS, public
    listener on loopback) and `connect proxy -upstream` (the caller's side). Returns the
    caller's local listener port and both proxies' pids. Also mTLS with Connect leaves."""
    from supervisor.infra.consul import find_binary

    public, upstream = free_port(), free_port()
    registration = {
        "Name": "benchconnect", "ID": "benchconnect-1", "Address": "127.0.0.1", "Port": app_port,
        "Connect": {"SidecarService": {"Port": public, "Proxy": {"Config": {"bind_address": "127.0.0.1"}},
                                       # the proxy's default checks pass only after their first
                                       # 10 s interval: none here, it is benchmarked, not watched
                                       "Checks": [{"Name": "alive", "TTL": "1h", "Status": "passing"}]}},
    }
    request = urllib.request.Request(f"http://{consul}/v1/agent/service/register",
                                     data=json_bytes(registration), method="PUT")
    with urllib.request.urlopen(request, timeout=5):
        pass
    env = {"CONSUL_HTTP_ADDR": consul}
    inbound = procs.start([find_binary(ROOT), "connect", "proxy", "-sidecar-for", "benchconnect-1",
                           "-log-level", "warn"], env, name="connect-proxy-inbound")
    outbound = procs.start([find_binary(ROOT), "connect", "proxy", "-service", "benchcaller",
                            "-upstream", f"benchconnect:{upstream}", "-log-level", "warn"], env,
                           name="connect-proxy-upstream")
    wait_http(f"http://127.0.0.1:{upstream}/")
    return upstream, [inbound.pid, outbound.pid]


def json_bytes(value) -> bytes:
    import json

    return json.dumps(value).encode()


def bench_app(procs: Processes) -> tuple[int, str]:
    """Starts bench/app.py; its port and Unix socket (it listens on both, as a service
    with app_socket = true does: its sidecar is given the socket as APP_SOCKET)."""
    port, socket_path = free_port(), f"{procs.tmp}/app.sock"
    procs.start([sys.executable, "bench/app.py"], {"PORT": str(port), "APP_SOCKET": socket_path}, name="app")
    wait_http(f"http://127.0.0.1:{port}/health")
    return port, socket_path


@dataclass
class Path_:
    name: str
    url: str
    proxies: list[int] = field(default_factory=list)  # pids whose CPU counts for this path
    kinds: list[str] = field(default_factory=list)  # optional: the kind of each proxy ("gateway", "sidecar")
    # Optional: other processes measured apart from the proxies, by label (e.g. "app": the app pids).
    others: dict[str, list[int]] = field(default_factory=dict)
    rps: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    cpu_each: list[list[float]] = field(default_factory=list)  # per proxy process, per round
    others_us: dict[str, list[float]] = field(default_factory=dict)  # per label: its processes summed, per round


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    number, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()
    return float(number) * _UNITS[unit]


def wrk(url: str, seconds: float, connections: int = 50) -> tuple[float, float, float, int]:
    """(requests/s, p50 ms, p99 ms, requests)."""
    run = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", url],
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"wrk {url} failed ({run.returncode}): {run.stderr.strip() or run.stdout.strip()}")
    out = run.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = _ms(re.search(r"\s50%\s+([\d.]+\w+)", out).group(1))
    p99 = _ms(re.search(r"\s99%\s+([\d.]+\w+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{url}: {errors.group(1)} non-2xx responses")
    return rps, p50, p99, total


def measure(paths: list[Path_], rounds: int, seconds: float) -> None:
    # Every other round runs the paths in reverse order (A B C, C B A, ...): drift of the
    # machine during a round then favours no path over another, and neighbours in the list
    # are always measured back to back (what paired() compares).
    for number in range(1, rounds + 1):
        for path in (paths if number % 2 else paths[::-1]):
            pids = path.proxies + [pid for group in path.others.values() for pid in group]
            before = [cpu_seconds(pid) for pid in pids]
            rps, p50, p99, total = wrk(path.url, seconds)
            after = [cpu_seconds(pid) for pid in pids]
            path.rps.append(rps)
            path.p50.append(p50)
            path.p99.append(p99)
            spent = [(a - b) / total * 1e6 for a, b in zip(after, before)]
            each, rest = spent[:len(path.proxies)], spent[len(path.proxies):]
            if path.proxies:
                path.cpu_us.append(sum(each))
                path.cpu_each.append(each)
            for label, group in path.others.items():
                path.others_us.setdefault(label, []).append(sum(rest[:len(group)]))
                rest = rest[len(group):]
        print(f"round {number}/{rounds}: " + ", ".join(f"{p.name} {p.rps[-1]:.0f} req/s" for p in paths),
              file=sys.stderr)


def paired(a: Path_, b: Path_) -> float:
    """Median over rounds of a's req/s over b's in the same round: for two paths measured
    back to back, the noise of this shared machine (which moves every path by 10-20% from
    one round to the next) largely cancels out of it."""
    return statistics.median(x / y for x, y in zip(a.rps, b.rps))


def reset(paths: list[Path_]) -> None:
    for p in paths:
        for series in (p.rps, p.p50, p.p99, p.cpu_us, p.cpu_each):
            series.clear()
        p.others_us.clear()


def per_proxy(path: Path_) -> list[float]:
    """Median CPU us/req of each proxy process of a path."""
    return [statistics.median(r[i] for r in path.cpu_each) for i in range(len(path.proxies))]


def by_kind(path: Path_) -> dict[str, float]:
    """Median CPU us/req of each kind of proxy on a path (the processes of a kind summed
    per round, then the median over rounds), in the order the kinds first appear."""
    kinds = list(dict.fromkeys(path.kinds))
    return {kind: statistics.median(sum(v for v, k in zip(r, path.kinds) if k == kind) for r in path.cpu_each)
            for kind in kinds}


def table(paths: list[Path_], baseline: Path_, second: Path_ | None = None,
          extra: list[tuple[str, Callable[[Path_], str]]] = (), markdown: bool = False) -> str:
    """Medians per path; ratios against `baseline` (and `second`, e.g. nginx, if given);
    `extra` columns (header, cell of a path) go after the proxy CPU column."""
    return render(table_rows(paths, baseline, second, extra), markdown)


def table_rows(paths: list[Path_], baseline: Path_, second: Path_ | None = None,
               extra: list[tuple[str, Callable[[Path_], str]]] = ()) -> list[tuple[str, ...]]:
    """The header and one row of cells per path, for render()."""
    med = statistics.median
    head = ["path", "req/s", "p50 ms", "p99 ms", "proxy CPU us/req", *(h for h, _ in extra), "req/s vs direct"]
    if second is not None:
        head += [f"req/s vs {second.name.split()[0]}", f"CPU vs {second.name.split()[0]}"]
    rows = [tuple(head)]
    for p in paths:
        row = [
            p.name, f"{med(p.rps):.0f}", f"{med(p.p50):.2f}", f"{med(p.p99):.2f}",
            f"{med(p.cpu_us):.1f}" if p.cpu_us else "-",
            *(cell(p) for _, cell in extra),
            f"{med(p.rps) / med(baseline.rps):.2f}x",
        ]
        if second is not None:
            row.append(f"{med(p.rps) / med(second.rps):.2f}x")
            row.append(f"{med(p.cpu_us) / med(second.cpu_us):.2f}x" if p.cpu_us and second.cpu_us else "-")
        rows.append(tuple(row))
    return rows


def render(rows: list[tuple[str, ...]], markdown: bool = False) -> str:
    """Aligned columns; with `markdown`, a Markdown table (still aligned, so it reads in a
    terminal and pastes into a README)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    if markdown:
        lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
        lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
        return "\n".join(lines)
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return f"{os.cpu_count()} cores, {cpu}, Python {sys.version.split()[0]}"
