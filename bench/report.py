"""The benchmark report: the real stack, started by the supervisor, measured in one run.

The supervisor runs gateway, auth and example (each app with its sidecar) on a Consul dev
agent and an embedded PostgreSQL; wrk loads GET /api/v1/example/items/<id> (one seeded
item: a primary-key read in PostgreSQL, its owner's profile from a cache refreshed from
auth through the sidecar's upstream every 30 s) reached

  direct                        client -> example app
  sidecar                       client -> example's sidecar -> app
  gateway                       client -> gateway -> sidecar -> app (routes from Consul)
  nginx, haproxy                client -> nginx / HAProxy -> app(s), round-robin
  node express                  client -> express + http-proxy-middleware -> app (1 instance)

in four phases, changed between them with `supervisor scale`:
  1 example instance, 1 gateway process -> example=3 -> 3 instances, 1 gateway
  -> gateway=2 -> 3 instances, 2 gateways -> example=1 -> 1 instance, 2 gateways

wrk -t1 -c50, paths interleaved within a phase, medians over rounds; CPU per request of
every proxy process (and of the apps) from /proc. Prints one table and a line per target
of the sidecar and gateway issues. Run with `make bench` (installs wrk, nginx, HAProxy
and the Node packages if missing); see bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import signal
import statistics
import sys
import time
from dataclasses import dataclass

from bench import proxies
from bench.harness import Path_, Processes, by_kind, consul_dev_agent, machine, measure, render, reset, table_rows
from bench.stack import Stack

med = statistics.median

# The targets of the sidecar and gateway issues.
SIDECAR_TARGET_US = 30.0
GATEWAY_TARGET_US = 60.0
NODE_TARGET_RATIO = 3.0
SCALE_TARGET_RATIO = 1.05  # "throughput grows": by more than this machine's noise (5%)


@dataclass
class Phase:
    label: str
    paths: list[Path_]
    direct: Path_
    nginx: Path_

    def find(self, prefix: str) -> Path_ | None:
        return next((p for p in self.paths if p.name.startswith(prefix)), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="rounds per phase (default 5)")
    parser.add_argument("--seconds", type=int, default=3, help="seconds of wrk per path and round (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of the discarded warm-up round per path (default 1)")
    args = parser.parse_args()
    missing = [tool for tool in proxies.TOOLS if not shutil.which(tool)]
    if missing:
        sys.exit(f"bench needs {', '.join(missing)}: run it with `make bench`")
    # A SIGTERM (or SIGHUP) unwinds like Ctrl-C, so every process is stopped.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))

    started = time.monotonic()
    load = os.getloadavg()
    with Processes() as procs:
        stack = None
        try:
            consul = consul_dev_agent(procs)
            stack = Stack(consul)
            print(f"starting the stack in {stack.root} (Consul dev agent at {consul})", file=sys.stderr)
            stack.start()
            phases = run(stack, procs, args)
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
            if stack is not None:
                print("stopping the stack", file=sys.stderr)
                stack.close()
    took = time.monotonic() - started
    print(report(phases, args, load, took))


def run(stack: Stack, procs: Processes, args) -> list[Phase]:
    item = stack.seed()
    stack.wait_settled("example", 1)  # passing in Consul, and the gateway routes to it
    phases: list[Phase] = []

    def measured(phase: Phase) -> Phase:
        print(f"\n{phase.label}: warm-up, then {args.rounds} rounds of {args.seconds:g}s per path", file=sys.stderr)
        measure(phase.paths, 1, args.warmup)
        reset(phase.paths)
        measure(phase.paths, args.rounds, args.seconds)
        phases.append(phase)
        return phase

    def url(port: int) -> str:
        return f"http://127.0.0.1:{port}{item}"

    # -- 1 instance --------------------------------------------------------------------------
    app_ports, apps = stack.ports("example"), stack.pids("example")
    sidecar_ports, sidecars = stack.ports("example", "sidecar"), stack.pids("example", "sidecar")
    gateways = stack.pids("gateway")
    nginx1_port, nginx1 = proxies.nginx(procs, app_ports, item)
    haproxy1_port, haproxy1 = proxies.haproxy(procs, app_ports, item)
    node_port, node = proxies.node_express(procs, app_ports[0], item)

    supervisor = stack.supervisor()

    def others(apps: list[int]) -> dict[str, list[int]]:
        return {"app": apps, "supervisor": [supervisor]}

    def gateway_path(name: str, gateways: list[int], sidecars: list[int], apps: list[int]) -> Path_:
        return Path_(name, stack.url + item, gateways + sidecars,
                     ["gateway"] * len(gateways) + ["sidecar"] * len(sidecars), others(apps))

    def proxy_path(name: str, port: int, pids: list[int], apps: list[int]) -> Path_:
        return Path_(name, url(port), pids, [name.split()[0]] * len(pids), others(apps))

    def direct_path(name: str, port: int, app: int) -> Path_:
        return Path_(name, url(port), others=others([app]))

    direct = direct_path("direct (app)", app_ports[0], apps[0])
    nginx = proxy_path("nginx -> app", nginx1_port, nginx1, apps)
    measured(Phase("1 instance, 1 gateway", [
        direct,
        Path_("sidecar -> app", url(sidecar_ports[0]), sidecars, ["sidecar"], others(apps)),
        gateway_path("gateway -> sidecar -> app", gateways, sidecars, apps),
        nginx,
        proxy_path("haproxy -> app", haproxy1_port, haproxy1, apps),
        proxy_path("node express -> app", node_port, node, apps),
    ], direct, nginx))

    # -- 3 instances --------------------------------------------------------------------------
    stack.scale("example", 3)
    app_ports, apps3 = stack.ports("example"), stack.pids("example")
    sidecars3 = stack.pids("example", "sidecar")
    assert apps3[0] == apps[0], "scaling up replaced instance 1"
    nginx3_port, nginx3 = proxies.nginx(procs, app_ports, item)
    haproxy3_port, haproxy3 = proxies.haproxy(procs, app_ports, item)
    direct = direct_path("direct (app 1 of 3)", app_ports[0], apps3[0])
    nginx = proxy_path("nginx -> 3 apps", nginx3_port, nginx3, apps3)
    measured(Phase("3 instances, 1 gateway", [
        direct,
        gateway_path("gateway -> 3 sidecars -> 3 apps", gateways, sidecars3, apps3),
        nginx,
        proxy_path("haproxy -> 3 apps", haproxy3_port, haproxy3, apps3),
    ], direct, nginx))

    # -- 2 gateway processes (SO_REUSEPORT) ----------------------------------------------------
    # A process sharing the port cannot be paused without stranding the connections the
    # kernel hands it, so x1 and x2 are measured in different phases, each with its own
    # direct and nginx rows (drift between phases shows there).
    stack.scale("gateway", 2)
    gateways2 = stack.pids("gateway")
    direct = direct_path("direct (app 1 of 3)", app_ports[0], apps3[0])
    nginx = proxy_path("nginx -> 3 apps", nginx3_port, nginx3, apps3)
    measured(Phase("3 instances, 2 gateways", [
        direct,
        gateway_path("gateway x2 -> 3 sidecars -> 3 apps", gateways2, sidecars3, apps3),
        nginx,
    ], direct, nginx))

    stack.scale("example", 1)
    assert stack.pids("example") == apps[:1], "scaling down replaced instance 1"
    direct = direct_path("direct (app)", app_ports[0], apps[0])
    nginx = proxy_path("nginx -> app", nginx1_port, nginx1, apps)
    measured(Phase("1 instance, 2 gateways", [
        direct,
        gateway_path("gateway x2 -> sidecar -> app", gateways2, sidecars, apps),
        nginx,
    ], direct, nginx))
    return phases


def _kind(kind: str):
    def cell(path: Path_) -> str:
        split = by_kind(path) if path.cpu_each else {}
        return f"{split[kind]:.1f}" if kind in split else "-"
    return cell


def _other(label: str, digits: int):
    def cell(path: Path_) -> str:
        series = path.others_us.get(label)
        return f"{med(series):.{digits}f}" if series else "-"
    return cell


EXTRA = [("gateway us", _kind("gateway")), ("sidecar us", _kind("sidecar")), ("app us", _other("app", 0)),
         ("supervisor us", _other("supervisor", 1))]


def report(phases: list[Phase], args, load: tuple[float, float, float], took: float) -> str:
    rows: list[tuple[str, ...]] = []
    for phase in phases:
        part = table_rows(phase.paths, phase.direct, phase.nginx, EXTRA)
        if not rows:
            rows.append(("phase", *part[0]))
        rows += [(phase.label, *row) for row in part[1:]]
    after = os.getloadavg()
    out = [
        f"meshvisor benchmark report, {datetime.datetime.now():%Y-%m-%d %H:%M}, {machine()}",
        f"wrk -t1 -c50, GET /api/v1/example/items/<id>, {args.rounds} rounds x {args.seconds:g}s per path, "
        f"paths interleaved within a phase, medians; run took {took / 60:.1f} min; load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} before, {after[0]:.2f} {after[1]:.2f} {after[2]:.2f} after",
        "",
        render(rows, markdown=True),
        "",
        "CPU columns are us per request: utime+stime (/proc/<pid>/stat) during the run / requests wrk counted. "
        "proxy CPU: every proxy process on the path (nginx: master + worker); gateway us, sidecar us: its split "
        "by kind (the processes of a kind summed); app us: the example app process(es) behind the path; "
        "supervisor us: the supervisor, which files every process's output (the access lines of gateway and "
        "sidecars). Ratios against direct and nginx of the same phase.",
        "",
        "targets (from the sidecar and gateway issues):",
        *targets(phases),
    ]
    return "\n".join(out)


def targets(phases: list[Phase]) -> list[str]:
    one, three, three_x2, one_x2 = phases

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    nginx_us = med(one.nginx.cpu_us)
    sidecar = med(one.find("sidecar").cpu_us)
    gw_path = one.find("gateway")
    split = by_kind(gw_path)
    node = one.find("node")
    vs_node = med(gw_path.rps) / med(node.rps)
    nginx_vs_node = med(one.nginx.rps) / med(node.rps)
    lines = [
        f"- one sidecar hop <= {SIDECAR_TARGET_US:g} us CPU/req: {verdict(sidecar <= SIDECAR_TARGET_US)} "
        f"({sidecar:.1f} us alone, {split['sidecar']:.1f} us behind the gateway; nginx on the same path "
        f"{nginx_us:.1f} us, so the sidecar is {sidecar / nginx_us:.2f}x nginx)",
        f"- gateway <= {GATEWAY_TARGET_US:g} us CPU/req: {verdict(split['gateway'] <= GATEWAY_TARGET_US)} "
        f"({split['gateway']:.1f} us = {split['gateway'] / nginx_us:.2f}x nginx; with 3 instances "
        f"{by_kind(three.find('gateway'))['gateway']:.1f} us)",
        f"- gateway + sidecar >= {NODE_TARGET_RATIO:g}x the req/s of express + http-proxy-middleware: "
        f"{verdict(vs_node >= NODE_TARGET_RATIO)} ({vs_node:.2f}x: {med(gw_path.rps):.0f} vs {med(node.rps):.0f} "
        f"req/s; nginx reaches {nginx_vs_node:.2f}x, direct {med(one.direct.rps) / med(node.rps):.2f}x)",
    ]
    growth = []
    for x1, x2, label in ((one, one_x2, "1 instance"), (three, three_x2, "3 instances")):
        raw = med(x2.find("gateway").rps) / med(x1.find("gateway").rps)
        # Against nginx of the same phase: drift of the machine between phases cancels out.
        fair = (med(x2.find("gateway").rps) / med(x2.nginx.rps)) / (med(x1.find("gateway").rps) / med(x1.nginx.rps))
        growth.append((label, raw, fair))
    ok = all(fair > SCALE_TARGET_RATIO for _, _, fair in growth)
    lines.append(f"- 2 gateway processes: throughput grows (by more than {SCALE_TARGET_RATIO - 1:.0%}): {verdict(ok)} ("
                 + "; ".join(f"{label}: x2/x1 {raw:.2f} raw, {fair:.2f} against nginx" for label, raw, fair in growth)
                 + ")")
    return lines


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; every process of the benchmark is stopped")
