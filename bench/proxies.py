"""The reverse proxies the gateway and sidecar are measured against, each on a free port
in front of one or several app ports: nginx (1 worker, keep-alive upstream), HAProxy
(1 thread, http-reuse) and express + http-proxy-middleware (one target only).

Each starter returns (port, pids whose CPU counts for the proxy). The processes belong to
`procs` (bench.harness.Processes), which stops them at the end.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench.harness import ROOT, Processes, free_port, wait_http

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
  upstream app {{ {servers} keepalive 64; }}
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
  balance roundrobin
  http-reuse always
{servers}
"""

TOOLS = ("wrk", "nginx", "haproxy", "node")


def _own_dir(procs: Processes, name: str) -> Path:
    path = Path(procs.tmp) / name
    path.mkdir()
    return path


def nginx(procs: Processes, app_ports: list[int], probe: str = "/") -> tuple[int, list[int]]:
    """nginx balancing round-robin over `app_ports`; its pids are the master and its worker."""
    home = _own_dir(procs, f"nginx-{len(procs.procs)}")
    port = free_port()
    servers = " ".join(f"server 127.0.0.1:{p};" for p in app_ports)
    (home / "nginx.conf").write_text(NGINX_CONF.format(dir=home, servers=servers, port=port))
    proc = procs.start(["nginx", "-c", str(home / "nginx.conf"), "-p", str(home)], name="nginx")
    wait_http(f"http://127.0.0.1:{port}{probe}")
    return port, [proc.pid] + children(proc.pid)


def haproxy(procs: Processes, app_ports: list[int], probe: str = "/") -> tuple[int, list[int]]:
    """HAProxy balancing round-robin over `app_ports`."""
    home = _own_dir(procs, f"haproxy-{len(procs.procs)}")
    port = free_port()
    servers = "\n".join(f"  server app{i} 127.0.0.1:{p}" for i, p in enumerate(app_ports, 1))
    (home / "haproxy.cfg").write_text(HAPROXY_CONF.format(port=port, servers=servers))
    proc = procs.start(["haproxy", "-f", str(home / "haproxy.cfg"), "-db"], name="haproxy")
    wait_http(f"http://127.0.0.1:{port}{probe}")
    return port, [proc.pid]


def node_express(procs: Processes, app_port: int, probe: str = "/") -> tuple[int, list[int]]:
    """express + http-proxy-middleware to one app port (it balances nothing)."""
    port = free_port()
    proc = procs.start(["node", str(ROOT / "bench/node-proxy/server.js")],
                       {"PORT": str(port), "TARGET": f"http://127.0.0.1:{app_port}"}, name="node")
    wait_http(f"http://127.0.0.1:{port}{probe}")
    return port, [proc.pid]


def children(pid: int) -> list[int]:
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        return [int(x) for x in out.split()]
    except OSError:
        return []
