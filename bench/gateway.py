"""Gateway benchmark: the small JSON endpoint of an aiohttp app, reached

  direct                  client -> app
  gateway -> sidecar      client -> gateway -> sidecar -> app (routes from Consul)
  gateway x2 -> sidecar   the same with two gateway processes sharing the port
  nginx                   client -> nginx (1 worker, keep-alive upstream) -> app
  haproxy                 client -> HAProxy (1 thread, http-reuse) -> app
  node express            client -> express + http-proxy-middleware -> app

all in one run, interleaved rounds, medians; CPU per request of every proxy process from
/proc. Run with `make bench-gateway` (installs wrk, nginx, HAProxy and the Node packages
if missing).
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from bench.harness import (ROOT, Path_, Processes, consul_dev_agent, free_port, machine, measure, per_proxy,
                           reset, table, wait_http)

NGINX_CONF = """
worker_processes 1;
daemon off;
master_process on;
error_log {dir}/nginx-error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  upstream app {{ server 127.0.0.1:{app}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""

HAPROXY_CONF = """
global
  nbthread 1
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
frontend web
  bind 127.0.0.1:{port}
  default_backend app
backend app
  http-reuse always
  server app 127.0.0.1:{app}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--no-access-log", action="store_true", help="switch the gateway's and sidecar's access logs off")
    args = parser.parse_args()
    log_flag = "0" if args.no_access_log else "1"

    with Processes() as procs:
        tmp = Path(procs.tmp)
        consul = consul_dev_agent(procs)
        app_port = free_port()
        procs.start([sys.executable, "bench/app.py"], {"PORT": str(app_port)}, name="app")
        wait_http(f"http://127.0.0.1:{app_port}/health")

        public, admin = free_port(), free_port()
        sidecar = procs.start([sys.executable, "-m", "sidecar"], {
            "CONSUL_HTTP_ADDR": consul, "SERVICE_NAME": "bench", "INSTANCE_INDEX": "1",
            "SIDECAR_PORT": str(public), "APP_PORT": str(app_port), "SIDECAR_ADMIN_PORT": str(admin),
            "SERVICE_ROUTE": "/api/v1/bench", "SIDECAR_ACCESS_LOG": log_flag, "SIDECAR_DRAIN_SECONDS": "0"},
            name="sidecar")
        gw_port = free_port()

        def start_gateway(index: int):
            admin_port = free_port()
            proc = procs.start([sys.executable, "-m", "services.gateway"], {
                "CONSUL_HTTP_ADDR": consul, "PORT": str(gw_port), "REUSE_PORT": "1", "INSTANCE_INDEX": str(index),
                "ADMIN_PORT": str(admin_port), "GATEWAY_ACCESS_LOG": log_flag, "GATEWAY_DRAIN_SECONDS": "0"},
                name=f"gateway{index}")
            wait_http(f"http://127.0.0.1:{admin_port}/health")
            return proc

        gateway_one = start_gateway(1)
        wait_http(f"http://127.0.0.1:{gw_port}/api/v1/bench/")

        nginx_port = free_port()
        (tmp / "nginx.conf").write_text(NGINX_CONF.format(dir=tmp, app=app_port, port=nginx_port))
        nginx = procs.start(["nginx", "-c", str(tmp / "nginx.conf"), "-p", str(tmp)], name="nginx")
        haproxy_port = free_port()
        (tmp / "haproxy.cfg").write_text(HAPROXY_CONF.format(app=app_port, port=haproxy_port))
        haproxy = procs.start(["haproxy", "-f", str(tmp / "haproxy.cfg"), "-db"], name="haproxy")
        node_port = free_port()
        node = procs.start(["node", str(ROOT / "bench/node-proxy/server.js")],
                           {"PORT": str(node_port), "TARGET": f"http://127.0.0.1:{app_port}"}, name="node")
        for port in (nginx_port, haproxy_port, node_port):
            wait_http(f"http://127.0.0.1:{port}/")
        nginx_pids = [nginx.pid] + _children(nginx.pid)

        direct = Path_("direct (app)", f"http://127.0.0.1:{app_port}/api/v1/bench/")
        through = Path_("gateway -> sidecar -> app", f"http://127.0.0.1:{gw_port}/api/v1/bench/",
                        [gateway_one.pid, sidecar.pid])
        nginx_path = Path_("nginx -> app", f"http://127.0.0.1:{nginx_port}/api/v1/bench/", nginx_pids)
        paths = [
            direct, through, nginx_path,
            Path_("haproxy -> app", f"http://127.0.0.1:{haproxy_port}/api/v1/bench/", [haproxy.pid]),
            Path_("node express -> app", f"http://127.0.0.1:{node_port}/api/v1/bench/", [node.pid]),
        ]
        print(f"warming up, then {args.rounds} rounds of {args.seconds:g}s per path", file=sys.stderr)
        measure(paths, 1, 2)
        reset(paths)
        measure(paths, args.rounds, args.seconds)

        # A second gateway process on the same port (SO_REUSEPORT). A process sharing the
        # port cannot be paused without stranding the connections the kernel hands it, so
        # this phase comes after the first; direct is measured again as its baseline.
        gateway_two = start_gateway(2)
        two = Path_("gateway x2 -> sidecar -> app", through.url, [gateway_one.pid, gateway_two.pid, sidecar.pid])
        direct_again = Path_("direct (app)", direct.url)
        measure([direct_again, two], 1, 2)
        reset([direct_again, two])
        measure([direct_again, two], args.rounds, args.seconds)

        stamp = f"{datetime.date.today()}, {machine()}, wrk -t1 -c50, {args.rounds} rounds x {args.seconds:g}s, medians"
        print(f"\ngateway benchmark, {stamp}; access logs {'off' if args.no_access_log else 'on'}")
        print(table(paths, direct, nginx_path))
        gw, sc = per_proxy(through)
        print(f"gateway -> sidecar CPU split: gateway {gw:.1f} us/req, sidecar {sc:.1f} us/req")
        node_path = paths[-1]
        ratio = statistics.median(through.rps) / statistics.median(node_path.rps)
        print(f"gateway + sidecar vs node express: {ratio:.2f}x the requests/s")
        print("\nscaling the gateway (SO_REUSEPORT; x2 measured after the rounds above, with direct again):")
        print(table([direct_again, two], direct_again))
        x1 = statistics.median(through.rps) / statistics.median(direct.rps)
        x2 = statistics.median(two.rps) / statistics.median(direct_again.rps)
        print(f"gateway x1: {x1:.2f}x direct; gateway x2: {x2:.2f}x direct (throughput x2/x1 = {x2 / x1:.2f})")
        print("proxy CPU us/req: utime+stime of the proxy processes on the path / requests served")


def _children(pid: int) -> list[int]:
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        return [int(x) for x in out.split()]
    except OSError:
        return []


if __name__ == "__main__":
    if not all(shutil.which(tool) for tool in ("wrk", "nginx", "haproxy", "node")):
        sys.exit("bench needs wrk, nginx, haproxy and node: run it with `make bench-gateway`")
    main()
