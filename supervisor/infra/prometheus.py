"""The embedded Prometheus: a real server (Debian's package of the bullseye suite, 2.24.1,
unpacked into .tools/ by `make setup`) that scrapes every gateway, sidecar and app of this
host, found through Consul, and records per-service rates.

What it scrapes (three jobs over one `consul_sd_configs`, the local agent's catalog):

- `sidecar`: each sidecar's admin listener, 127.0.0.1:<Meta metrics_port>/metrics
  (`sidecar_requests_total`, `sidecar_request_duration_seconds`, retries, ejections);
- `gateway`: each gateway's own endpoints, 127.0.0.1:<Meta metrics_port>/metrics;
- `app`: each app behind a sidecar, 127.0.0.1:<Meta app_metrics_port><app_metrics_path>
  (shared.kit.app's `http_requests_total`...), announced by its sidecar unless the service
  says `SIDECAR_APP_METRICS = ""` in its sidecar_env;
- `prometheus`: itself.

Every target carries `service` (the Consul name), `instance` (the Consul service ID),
`node` and `role` (sidecar, gateway, app). Those listeners are on 127.0.0.1 only, so a
Prometheus can reach the instances of its own host alone: it keeps the targets whose
Consul node is its local agent's. With several hosts, each host's Prometheus scrapes its
own host (and a query across hosts asks each, or a federating Prometheus).

Recording rules (RULES), by service, every scrape interval: requests per second, the
share of 5xx answers, the 99th percentile latency, retries and ejections per second.
What a service receives is what its sidecars relay inbound (the gateway: everything it
answers); retries and ejections are the callers' (the gateway and the sidecars'
upstream listeners), counted against the service called.

Reading the catalog needs no token with the embedded agent, whose anonymous token may
read services and nodes (supervisor/infra/acl.py): Prometheus is given none, least of all
the management token. With an external agent it is given [consul] token, so its config
file is written at every start into <state>/prometheus/ (mode 0700) with mode 0600; the
UI's /classic/config page shows a token as <secret>. The data is kept there too, for [prometheus]
retention. Prometheus runs as the supervisor's own user (it does not mind root),
listening on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
from pathlib import Path

import aiohttp

from shared.mesh.naming import node_name
from supervisor.config import Config
from supervisor.config_prometheus import seconds
from supervisor.infra import InfraError, fetched_binary, server_spec
from supervisor.process import ProcessSpec

_META = "__meta_consul_service_metadata_"


def _served(metric: str, by: str, status: str = "") -> str:
    """sum by (`by`) of rate(metric) over what each service answers: its sidecars' inbound
    relays, and for a gateway (which has no sidecar) everything it relays."""
    match = f'status=~"{status}"' if status else ""
    inbound = ",".join(filter(None, ('route="inbound"', match)))
    return (f"sum by ({by}) (rate(sidecar_{metric}{{{inbound}}}[1m]))"
            f" or sum by ({by}) (rate(gateway_{metric}{{{match}}}[1m]))")


def _toward_service(metric: str, also: str = "") -> str:
    """rate(metric) of the gateway and of the sidecars' upstream listeners, whose `route` is
    the service called, summed by that service (with the series of `also` as they are)."""
    callers = f'{{__name__=~"gateway_{metric}|sidecar_{metric}",route!~"inbound|gateway"}}'
    by_callee = f'label_replace(rate({callers}[1m]), "service", "$1", "route", "(.+)")'
    return f"sum by (service) ({by_callee}{f' or {also}' if also else ''})"


RULES = [
    ("service:requests:rate1m", _served("requests_total", "service")),
    ("service:errors:rate1m", _served("requests_total", "service", status="5..")),
    ("service:errors:ratio_rate1m",
     "(service:errors:rate1m or service:requests:rate1m * 0) / service:requests:rate1m"),
    ("service:request_duration_seconds:p99_1m",
     f"histogram_quantile(0.99, {_served('request_duration_seconds_bucket', 'service, le')})"),
    # A sidecar's retries toward its own app (a stale pooled connection) count for its service.
    ("service:retries:rate1m",
     _toward_service("retries_total", also='rate(sidecar_retries_total{route="inbound"}[1m])')),
    ("service:ejections:rate1m", _toward_service("ejections_total")),
]


def find_binary(root: Path) -> str:
    """$MESHVISOR_PROMETHEUS, else the one `make setup` fetched (scripts/install-prometheus.sh).

    Not just any prometheus on PATH: Debian's builds since 2.33.5 (bookworm's among them)
    have no Consul discovery, which this config needs."""
    override = os.environ.get("MESHVISOR_PROMETHEUS")
    if override:
        return override
    fetched = fetched_binary(root, "prometheus")
    if fetched:
        return fetched
    raise InfraError('no prometheus binary: run `make setup` (fetches Debian\'s Prometheus into .tools/), '
                     'set MESHVISOR_PROMETHEUS to one with Consul discovery, or set [prometheus] mode = "off"')


def ui_flags(binary: str) -> list[str]:
    """Where an unpacked Debian package keeps its UI and consoles, when they are beside
    `binary` (<root>/usr/bin/prometheus): the built-in defaults are the installed package's."""
    root = Path(binary).resolve().parent.parent.parent
    assets, consoles = root / "usr" / "share" / "prometheus" / "web", root / "etc" / "prometheus"
    if not assets.is_dir():
        return []
    return [f"--web.local-assets={assets}/", f"--web.console.templates={consoles / 'consoles'}",
            f"--web.console.libraries={consoles / 'console_libraries'}"]


def _job(job: str, sd: dict, node: str, port_key: str, *, gateway: bool | None = None, path_key: str = "") -> dict:
    """A scrape job over the Consul catalog: the instances of `node` that announce
    `port_key` in their Meta, at 127.0.0.1:<that port>."""
    relabel: list[dict] = [
        {"source_labels": ["__meta_consul_node"], "regex": re.escape(node), "action": "keep"},
        {"source_labels": [_META + port_key], "regex": r"\d+", "action": "keep"},
    ]
    if gateway is not None:
        relabel.append({"source_labels": [_META + "role"], "regex": "gateway", "action": "keep" if gateway else "drop"})
    relabel.append({"source_labels": [_META + port_key], "target_label": "__address__", "replacement": "127.0.0.1:$1"})
    if path_key:
        relabel.append({"source_labels": [_META + path_key], "regex": "(/.*)", "target_label": "__metrics_path__"})
    relabel += [
        {"source_labels": ["__meta_consul_service"], "target_label": "service"},
        {"source_labels": ["__meta_consul_service_id"], "target_label": "instance"},
        {"source_labels": ["__meta_consul_node"], "target_label": "node"},
        {"target_label": "role", "replacement": job},
    ]
    return {"job_name": job, "consul_sd_configs": [sd], "relabel_configs": relabel}


def server_settings(config: Config, node: str, rules_file: Path) -> dict:
    """The whole prometheus.yml (as JSON, which YAML includes)."""
    p, c = config.prometheus, config.consul
    interval = p.scrape_interval
    sd: dict = {"server": c.address, "allow_stale": True, "refresh_interval": interval}
    if c.token and c.mode == "external":  # the embedded agent's anonymous token may read services and nodes
        sd["token"] = c.token
    else:
        # Else Prometheus asks /v1/agent/self for it, which needs agent:read (a 403 to the
        # anonymous token, every refresh, and no targets at all).
        sd["datacenter"] = c.datacenter
    return {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": interval if seconds(interval) <= 10 else "10s",
            "evaluation_interval": interval,
        },
        "rule_files": [str(rules_file)],
        "scrape_configs": [
            _job("sidecar", sd, node, "metrics_port", gateway=False),
            _job("gateway", sd, node, "metrics_port", gateway=True),
            _job("app", sd, node, "app_metrics_port", path_key="app_metrics_path"),
            {"job_name": "prometheus", "static_configs": [{"targets": [p.address], "labels": {"node": node}}]},
        ],
    }


def recording_rules() -> dict:
    return {"groups": [{"name": "meshvisor", "rules": [{"record": name, "expr": expr} for name, expr in RULES]}]}


def _write_private(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump(data, file, indent=1)
        file.write("\n")
    os.replace(tmp, path)


async def local_node(config: Config) -> str:
    """The local agent's node name (what the catalog lists this host's instances under);
    [consul] node_name's if the token may not read /v1/agent/self."""
    c = config.consul
    headers = {"X-Consul-Token": c.token} if c.token else {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3), headers=headers) as session:
            async with session.get(f"http://{c.address}/v1/agent/self") as resp:
                if resp.status == 200:
                    return (await resp.json(content_type=None))["Config"]["NodeName"]
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, KeyError, TypeError):
        pass
    return node_name(c.node_name)


async def spec(config: Config, env: dict[str, str]) -> ProcessSpec:
    """Its files written (config, rules), and its process."""
    p = config.prometheus
    _check_free(p.address)
    base = config.state_dir / "prometheus"
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o700)
    rules_file, config_file = base / "rules.yml", base / "prometheus.yml"
    _write_private(rules_file, recording_rules())
    _write_private(config_file, server_settings(config, await local_node(config), rules_file))
    binary = find_binary(config.root)
    argv = [
        binary,
        *ui_flags(binary),
        f"--config.file={config_file}",
        f"--storage.tsdb.path={base / 'data'}",
        f"--storage.tsdb.retention.time={p.retention}",
        f"--web.listen-address={p.address}",
        "--log.level=warn",
    ]
    return server_spec(
        "prometheus", argv, env, str(base), stop_timeout=20.0, stop_signal=signal.SIGTERM,
        port=int(p.address.rpartition(":")[2]), ready_check=lambda: ready(p.address),
    )


def _check_free(address: str) -> None:
    """Refuse at once, rather than after a crash loop, when something listens on the port."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Prometheus does
        try:
            probe.bind((host, int(port)))
        except OSError as exc:
            raise InfraError(f"Prometheus cannot listen on {address}: {exc.strerror} (another Prometheus? "
                             "Debian's own service: systemctl disable --now prometheus); set [prometheus] "
                             'address to a free port, or mode = "off"') from None


async def ready(address: str) -> bool:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        async with session.get(f"http://{address}/-/ready") as resp:
            return resp.status == 200
