"""Cost per instance and scale (`make bench-scale`): what N instances cost and how it grows.

S services x M instances of a tiny app (tests/programs/web.py), each an app + its sidecar,
behind one gateway, under the real supervisor with an embedded Consul on free ports (ACLs
on), Prometheus off, no PostgreSQL. Per size (--sizes 10,50,100 = 2x5, 5x10, 10x10), on a
fresh stack: `supervisor start --detach` -> all passing in Consul -> all routed by the
gateway; PSS/USS of every process; CPU at rest, and while a tenth of the apps are SIGKILLed
until all pass and are routed again; each process's connections to the agent and the
blocking queries ending within --monitor s, by sender (the agent's debug log); then
--changes times: `scale svcK=M+1` (-> passing -> routed), `scale svcK=M` (-> not routed)
and SIGKILL of one app (-> critical -> not routed -> routed again), Consul and the
gateway's /health polled every 20 ms. Prints a table (a column per size, then largest /
smallest), the issue's targets, and the PSS of a fresh Python as a sidecar's imports are added.
--sidecars fork,exec runs every size twice, forked sidecars (the default) then exec'd ones
([supervisor] fork_sidecars = false), for the A/B in one run; the per-sidecar PSS "with the
fork server's share" spreads the fork server's own PSS over the sidecars.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psutil

from bench.harness import ROOT, cpu_seconds, machine, render
from tests.helpers import PROGRAMS, PY, Project, free_ports, free_range

SHAPES = {10: (2, 5), 50: (5, 10), 100: (10, 10)}  # instances -> (services, instances of each)
POLL = 0.02
SHARED_PSS = "PSS per sidecar, with the fork server's share MB"
CONFIG = """[supervisor]\nport_range = [{low}, {high}]\nstart_timeout = 240.0\nfork_sidecars = {fork}\n
[consul]\naddress = "{consul}"\nserver_port = {server}\nserf_lan_port = {serf}\nserf_wan_port = -1\n
[prometheus]\nmode = "off"\n
[services.gateway]\nport = {gateway}\nsidecar = false\nenv = {{ GATEWAY_DRAIN_SECONDS = "0.5" }}\n"""
SERVICE = '\n[services.svc{i}]\ninstances = {m}\nroute = "/s{i}"\ndrain_seconds = 0.5\n'
FINISHED = re.compile(r"Request finished: method=GET url=(\S+?)\?\S*(?:index|hash)=\S* from=[\d.]+:(\d+)")


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def get(address: str, path: str, token: str = ""):
    request = urllib.request.Request(f"http://{address}{path}", headers={"X-Consul-Token": token} if token else {})
    with urllib.request.urlopen(request, timeout=5) as resp:
        return json.loads(resp.read())


def memory(pid: int) -> tuple[float, float]:
    """(PSS, USS) in MB."""
    kb = {p[0]: int(p[1]) for p in (line.split() for line in open(f"/proc/{pid}/smaps_rollup")) if len(p) == 3}
    return kb["Pss:"] / 1024, (kb["Private_Clean:"] + kb["Private_Dirty:"]) / 1024


def cpu(pids: list[int]) -> dict[int, float]:
    found = {}
    for pid in pids:
        try:
            found[pid] = cpu_seconds(pid)
        except (OSError, IndexError):
            pass
    return found


class Stack:
    def __init__(self, services: int, instances: int, fork: bool) -> None:
        self.s, self.m, self.n = services, instances, services * instances
        self.names = [f"svc{i}" for i in range(1, services + 1)]
        http_port, server, serf, gateway = free_ports(4)
        low, high = free_range(3 * (self.n + 2 * services) + 20)  # public, app, admin per instance
        self.consul, self.consul_port, self.gateway = f"127.0.0.1:{http_port}", http_port, f"127.0.0.1:{gateway}"
        procfile = "".join(f"{n}: {PY} {PROGRAMS}/web.py\n" for n in self.names)
        procfile += f"gateway: {PY} -m services.gateway\n"
        config = CONFIG.format(low=low, high=high, consul=self.consul, server=server, serf=serf, gateway=gateway,
                               fork=str(fork).lower())
        self.p = Project(procfile, config + "".join(SERVICE.format(i=i, m=instances) for i in range(1, services + 1)))

    def settled(self, routed: bool = True) -> bool:
        """Every instance passing in Consul (all its checks) and, with `routed`, routed by the gateway."""
        ok: dict[str, bool] = {}
        for check in get(self.consul, "/v1/health/state/any"):
            if check["ServiceName"] in self.names:
                ok[check["ServiceID"]] = ok.get(check["ServiceID"], True) and check["Status"] == "passing"
        routes = get(self.gateway, "/health")["routes"] if routed and sum(ok.values()) == self.n else {}
        return sum(ok.values()) == self.n and (not routed or all(
            routes.get(f"/s{i}", {}).get("instances") == self.m for i in range(1, self.s + 1)))

    def pids(self) -> dict[str, list[int]]:
        status = self.p.status()
        sup = status["supervisor"]["pid"]
        rows = [r for r in status["processes"] if r["pid"] and r["state"] == "RUNNING"]
        kinds = {"supervisor": [sup], "consul": [r["pid"] for r in rows if r["service"] == "consul"],
                 "gateway": [r["pid"] for r in rows if r["service"] == "gateway"],
                 "forkserver": [r["pid"] for r in rows if r["service"] == "forkserver"],
                 "watchdog": [c.pid for c in psutil.Process(sup).children() if "supervisor.watchdog" in c.cmdline()]}
        return kinds | {role: [r["pid"] for r in rows if r["service"] in self.names and r["role"] == role]
                        for role in ("app", "sidecar")}

    def app_pid(self, service: str, index: int) -> int:
        return next(r["pid"] for r in self.p.rows(service) if r["instance"] == index and r["role"] == "app")

    def close(self) -> None:
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this short
        try:
            self.p.cli("stop", "--timeout", "60", timeout=120)
        except subprocess.TimeoutExpired:
            pass
        self.p.cleanup()  # SIGTERM to the supervisor, SIGKILL to what it recorded, the folder removed
        for proc in psutil.process_iter():  # and anything still running in that folder
            try:
                if proc.cwd().startswith(str(self.p.root)):
                    proc.kill()
            except psutil.Error:
                pass
        signal.signal(signal.SIGINT, interrupt)


def until(predicate, timeout: float, t0: float | None = None, interval: float = POLL) -> float | None:
    """Seconds from t0 (default now) until predicate() holds, polled every `interval`; None on timeout."""
    t0 = time.monotonic() if t0 is None else t0
    while time.monotonic() - t0 < timeout:
        try:
            if predicate():
                return time.monotonic() - t0
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(interval)
    return None


def start(stack: Stack, timeout: float) -> dict:
    marks, t0 = {}, time.monotonic()
    cli = subprocess.Popen([PY, "-m", "supervisor", "--config", str(stack.p.config_path), "start", "--detach",
                            "--wait", str(timeout)], cwd=stack.p.root, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "NO_COLOR": "1"})

    def up() -> bool:
        if cli.poll() not in (None, 0):
            raise RuntimeError(f"supervisor start failed:\n{cli.stdout.read()}\n{stack.p.errors_logged()}")
        for mark, done in (("returned", lambda: cli.poll() is not None), ("passing", lambda: stack.settled(False)),
                           ("routed", stack.settled)):
            if mark not in marks and done():
                marks[mark] = time.monotonic() - t0
        if "routed" in marks:  # both seen in one poll: passing no later than routed
            marks.setdefault("passing", marks["routed"])
        return len(marks) == 3

    if until(up, timeout + 30, t0, interval=0.1) is None:
        raise RuntimeError(f"the stack was not up within {timeout:g}s ({marks}):\n{stack.p.errors_logged()}")
    return {"start: all passing in Consul s": marks["passing"], "start: gateway routes all s": marks["routed"],
            "start: `start --detach` returned s": marks["returned"]}


def cpu_window(pids: dict[str, list[int]], action) -> tuple[dict[str, float], float]:
    """% of one core per kind while action() runs; and how long it ran."""
    before, t0 = {k: cpu(v) for k, v in pids.items()}, time.monotonic()
    action()
    after, took = {k: cpu(v) for k, v in pids.items()}, time.monotonic() - t0
    return {k: 100 * sum(after[k][p] - before[k][p] for p in after[k] if p in before[k]) / took for k in pids}, took


def consul_queries(stack: Stack, pids: dict[str, list[int]], seconds: float) -> dict:
    """Connections to the agent per process; blocking queries (index= or hash=) that ended
    within `seconds`, by the process that sent them (the agent's debug log)."""
    owners, conns = {}, {}  # local port -> pid, pid -> connections

    def look() -> None:
        for pid in pids["sidecar"] + pids["gateway"] + pids["supervisor"]:
            mine = [c for c in psutil.Process(pid).net_connections("tcp")
                    if c.raddr and c.raddr.port == stack.consul_port and c.status == psutil.CONN_ESTABLISHED]
            conns.setdefault(pid, len(mine))
            owners.update((c.laddr.port, pid) for c in mine)

    look()
    token = (stack.p.state_dir / "secrets" / "consul-management-token").read_text().strip()
    request = urllib.request.Request(f"http://{stack.consul}/v1/agent/monitor?loglevel=debug",
                                     headers={"X-Consul-Token": token})
    seen, deadline = {pid: Counter() for pid in conns}, time.monotonic() + seconds
    with urllib.request.urlopen(request, timeout=10) as stream:  # the HTTP checks log every 2 s
        ended = [found for _ in iter(lambda: time.monotonic() < deadline, False)
                 if (found := FINISHED.search(stream.readline().decode(errors="replace")))]
    look()
    for found in ended:
        seen.setdefault(owners.get(int(found[2]), 0), Counter())[re.sub(r"svc\d+-\S+", "<own id>", found[1])] += 1
    side, paths = [conns[p] for p in pids["sidecar"]], [len(seen[p]) for p in pids["sidecar"]]
    gateway = pids["gateway"][0]
    key = f"blocking queries ended in {seconds:g} s:"
    return {"Consul connections: per sidecar (min-max) count": f"{min(side)}-{max(side)}",
            "Consul connections: gateway count": conns[gateway],
            "Consul connections: supervisor count": conns[pids["supervisor"][0]],
            "Consul connections: all, at the agent (limit: 200 a client) count": sum(
                1 for c in psutil.Process(pids["consul"][0]).net_connections("tcp")
                if c.laddr.port == stack.consul_port and c.status == psutil.CONN_ESTABLISHED),
            f"{key} paths per sidecar (min-max) count": f"{min(paths)}-{max(paths)}",
            f"{key} gateway paths count": len(seen[gateway]), f"{key} all count": len(ended),
            f"{key} most on one path by one process count": max(max(c.values(), default=0) for c in seen.values()),
            "paths": {"gateway": dict(seen[gateway]), "sidecar": dict(seen[pids["sidecar"][0]])}}  # for the notes


def propagation(stack: Stack, changes: int, timeout: float) -> dict[str, list]:
    got: dict[str, list] = {}
    pool, m = ThreadPoolExecutor(2), stack.m

    def count(service: str, gateway: bool) -> int:
        if gateway:
            return get(stack.gateway, "/health")["routes"].get(f"/s{service[3:]}", {}).get("instances", 0)
        return len(get(stack.consul, f"/v1/health/service/{service}?passing=true"))

    def watch(service: str, want, t0: float, *keys: str):
        """Seconds from t0 until Consul, and the gateway, count `want(n)` instances, noted under keys."""
        futures = [pool.submit(until, lambda g=g: want(count(service, g)), timeout, t0) for g in (False, True)]
        return lambda: [got.setdefault(k, []).append(v) for k, v in zip(keys, [f.result() for f in futures]) if k]

    for k in range(changes):
        service, t0 = stack.names[k % stack.s], time.monotonic()
        done = watch(service, lambda n: n == m + 1, t0, "scale up: command -> passing in Consul ms",
                     "scale up: command -> routed ms")
        stack.p.cli("scale", f"{service}={m + 1}", check=True)
        got.setdefault("scale up: command -> `scale` returned ms", []).append(time.monotonic() - t0)
        done()
        done = watch(service, lambda n: n == m, time.monotonic(), "scale down: command -> gone from Consul ms",
                     "scale down: command -> not routed ms")
        stack.p.cli("scale", f"{service}={m}", check=True)
        done()
        for way, consul, gateway in (("up", "passing in Consul", "routed"), ("down", "gone from Consul", "not routed")):
            first, then = (got[f"scale {way}: command -> {what} ms"][-1] for what in (consul, gateway))
            got.setdefault(f"scale {way}: {consul} -> {gateway} ms", []).append(
                then - first if None not in (first, then) else None)
        pid, t0 = stack.app_pid(service, (k // stack.s) % m + 1), time.monotonic()
        os.kill(pid, signal.SIGKILL)
        watch(service, lambda n: n < m, t0, "kill: SIGKILL -> critical in Consul ms",
              "kill: SIGKILL -> not routed ms")()
        watch(service, lambda n: n == m, t0, "", "kill: SIGKILL -> routed again ms")()
        say(f"change {k + 1}/{changes}: " + ", ".join(f"{key[:-3]} {v[-1] * 1000:.0f}"
                                                      for key, v in got.items() if v[-1] is not None))
    pool.shutdown()
    return got


def measure(services: int, instances: int, fork: bool, args) -> dict:
    stack = Stack(services, instances, fork)
    try:
        kind = "forked" if fork else "exec'd"
        say(f"{stack.n} instances ({services} services x {instances}), {kind} sidecars: starting")
        fig = start(stack, args.timeout)
        say("up: " + ", ".join(f"{k} {v:.1f}" for k, v in fig.items()))
        time.sleep(5)  # the last starts' work done
        pids = stack.pids()
        mem = {k: [memory(p) for p in v] for k, v in pids.items()}
        mean = lambda k, i=0: statistics.mean(x[i] for x in mem[k]) if mem[k] else math.nan  # noqa: E731
        fig.update({"PSS per sidecar MB": mean("sidecar"), "USS per sidecar MB": mean("sidecar", 1),
                    SHARED_PSS:
                        mean("sidecar") + sum(x[0] for x in mem["forkserver"]) / len(mem["sidecar"]),
                    "PSS fork server MB": sum(x[0] for x in mem["forkserver"]),
                    "PSS per app MB": mean("app"), "PSS per instance (app + sidecar) MB": mean("sidecar") + mean("app"),
                    "PSS gateway MB": mean("gateway"), "PSS supervisor MB": mean("supervisor"),
                    "PSS watchdog MB": mean("watchdog"), "PSS Consul agent MB": mean("consul"),
                    "PSS total MB": sum(x[0] for v in mem.values() for x in v)})
        rest, _ = cpu_window(pids, lambda: time.sleep(args.rest))
        fig.update({f"CPU at rest: {k} %": v for k, v in rest.items()})
        fig.update({"CPU at rest: per sidecar %": rest["sidecar"] / len(pids["sidecar"]),
                    "CPU at rest: all processes %": sum(rest.values())})
        fig.update(consul_queries(stack, pids, args.monitor))
        victims = [(stack.names[j % services], j // services % instances + 1) for j in range(math.ceil(stack.n / 10))]

        def kill_tenth() -> None:
            for service, index in victims:
                os.kill(stack.app_pid(service, index), signal.SIGKILL)
            until(lambda: not stack.settled(), 10)  # seen dying, then back:
            if until(stack.settled, args.timeout) is None:
                raise RuntimeError("the killed instances did not come back")

        busy, took = cpu_window({k: v for k, v in pids.items() if k != "app"}, kill_tenth)
        fig.update({"kill 10%: apps killed count": len(victims), "kill 10%: until all routed again s": took,
                    **{f"CPU, 10% killed: {k} %": v for k, v in busy.items()}})
        cli = [until(lambda: stack.p.cli("status", "--json", check=True), 30) for _ in range(3)]
        fig["CLI round trip (`status --json`) ms"] = [statistics.median(cli)]
        say(f"at rest, Consul, 10% killed: done; {args.changes} changes")
        return fig | propagation(stack, args.changes, args.timeout)
    finally:
        say(f"{stack.n} instances: stopping")
        stack.close()


def pct(values: list, q: float) -> float:
    """Nearest rank (of 20 values, p99 is the largest)."""
    s = sorted(v for v in values if v is not None)
    return s[min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1)] if s else math.nan


def cells(values) -> list[tuple[str, str]]:
    """(row suffix, text): a figure, or p50 / p99 (and timeouts) of seconds given in a list."""
    if isinstance(values, (str, int)):
        return [("", str(values))]
    if not isinstance(values, list):
        return [("", "-" if math.isnan(values) else f"{values:.2f}" if values < 10 else f"{values:.1f}")]
    out = [("", f"{values[0] * 1000:.0f}")] if len(values) == 1 else [
        (f" p{q}", f"{pct(values, q) * 1000:.0f}") for q in (50, 99)]
    return out + [(" timeouts", str(values.count(None)))] * (None in values)


def table(results: dict[tuple[int, str], dict], markdown: bool) -> str:
    """A column per (size, sidecars); then the largest size against the smallest (one kind of
    sidecar), or forked against exec'd sidecars at the largest size (both)."""
    keys, rows = list(results), {}
    for i, key in enumerate(keys):
        for figure, values in ((k, v) for k, v in results[key].items() if k != "paths"):
            name, unit = figure.rsplit(" ", 1)
            for suffix, text in cells(values):
                rows.setdefault(f"{name}{suffix} ({unit})", ["-"] * len(keys))[i] = text
    modes = list(dict.fromkeys(mode for _, mode in keys))
    largest = max(size for size, _ in keys)
    if len(modes) > 1:
        a, b = keys.index((largest, modes[0])), keys.index((largest, modes[1]))
        last = f"{modes[0]} / {modes[1]} at {largest}"
    else:
        a, b = len(keys) - 1, 0
        last = f"{keys[-1][0]} / {keys[0][0]}"
    out = [("figure", *(f"{n} ({'x'.join(map(str, shape(n)))}) {mode}" for n, mode in keys), last)]
    for name, values in rows.items():
        try:
            out.append((name, *values, f"{float(values[a]) / float(values[b]):.2f}x" if len(keys) > 1 else "-"))
        except (ValueError, ZeroDivisionError):
            out.append((name, *values, "-"))
    return render(out, markdown)


BREAKDOWN = [("interpreter", "pass"), ("+ asyncio, ssl, logging, json", "import asyncio, ssl, logging, json"),
             ("+ uvloop", "import uvloop"), ("+ aiohttp", "import aiohttp, aiohttp.web"),
             ("+ py-consul (requests, urllib3)", "import consul.aio"),
             ("+ prometheus_client", "import prometheus_client"), ("+ msgspec", "import msgspec"),
             ("+ the sidecar's own modules", "import sidecar.main, sidecar.settings, shared.mesh.endpoint")]


def breakdown(markdown: bool) -> str:
    """PSS/USS of one fresh interpreter (nothing of the benchmark in it) as imports are added."""
    code = ("import sys\nfor step in sys.argv[1:]:\n    exec(step)\n    kb = {l.split()[0]: int(l.split()[1]) "
            "for l in open('/proc/self/smaps_rollup') if l.endswith('kB\\n')}\n"
            "    print(kb['Pss:'] / 1024, (kb['Private_Clean:'] + kb['Private_Dirty:']) / 1024, flush=True)")
    out = subprocess.run([PY, "-c", code, *(s for _, s in BREAKDOWN)], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    rows, last = [("step", "PSS MB", "USS MB", "USS added MB")], 0.0
    for (name, _), line in zip(BREAKDOWN, out):
        pss, uss = map(float, line.split())
        rows.append((name, f"{pss:.1f}", f"{uss:.1f}", f"{uss - last:+.1f}"))
        last = uss
    return render(rows, markdown)


def shape(n: int) -> tuple[int, int]:
    return SHAPES.get(n) or (max(1, round(n / 10)), min(n, 10))


def notes(results: dict[tuple[int, str], dict]) -> str:
    size = max(results)
    r, p99 = results[size], lambda key: pct(results[size][key], 99)
    return "\n".join([
        f"targets at {size[0]} instances, {size[1]}ed sidecars (the issue's):",
        f"  all passing within 60 s of `supervisor start`: {r['start: all passing in Consul s']:.1f} s "
        f"(routed by the gateway: {r['start: gateway routes all s']:.1f} s)",
        "  route propagation p99 <= 1 s: scale up, passing -> routed "
        f"{p99('scale up: passing in Consul -> routed ms'):.2f} s (from the command "
        f"{p99('scale up: command -> routed ms'):.2f} s); kill -> not routed "
        f"{p99('kill: SIGKILL -> not routed ms'):.2f} s; scale down, gone from Consul -> not routed "
        f"{p99('scale down: gone from Consul -> not routed ms'):.2f} s (from the command "
        f"{p99('scale down: command -> not routed ms'):.2f} s)",
        f"  the supervisor's CPU at rest <= 2% of a core: {r['CPU at rest: supervisor %']:.2f}%",
        f"  a sidecar <= 15 MB PSS: {r['PSS per sidecar MB']:.1f} MB "
        f"({r[SHARED_PSS]:.1f} MB with the fork server's share)",
        *(f"blocking queries ended in the window, one {kind}: {paths}" for kind, paths in r["paths"].items())])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,50,100", help="instance counts (10, 50, 100: 2x5, 5x10, 10x10)")
    parser.add_argument("--changes", type=int, default=20, help="scale ups, scale downs and kills per size")
    parser.add_argument("--rest", type=float, default=10.0, help="seconds of the CPU-at-rest window")
    parser.add_argument("--monitor", type=float, default=33.0,
                        help="seconds of Consul's debug log read (its 30 s waits get up to 1/16 of jitter)")
    parser.add_argument("--timeout", type=float, default=300.0, help="bound of every wait (seconds)")
    parser.add_argument("--sidecars", default="fork",
                        help="fork, exec, or both (fork,exec): how the supervisor starts sidecars")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    for sig in (signal.SIGTERM, signal.SIGHUP):  # unwind like Ctrl-C: the stack is stopped
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    results, began = {}, time.monotonic()
    try:
        for size in map(int, args.sizes.split(",")):
            for mode in args.sidecars.split(","):
                results[size, mode] = measure(*shape(size), mode == "fork", args)
    except Exception as exc:
        if not results:
            raise
        say(f"stopped early: {exc!r}; reporting the sizes done")
    print(f"\nscale benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}, {machine()}, load average "
          f"{os.getloadavg()[0]:.2f}, {(time.monotonic() - began) / 60:.1f} min; {args.changes} changes per size")
    print(table(results, args.markdown) + "\n\n" + notes(results))
    print("\nPSS of one fresh Python process as a sidecar's imports are added:\n" + breakdown(args.markdown))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; every process of the benchmark is stopped")
