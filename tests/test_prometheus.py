"""The embedded Prometheus: its settings, the files the supervisor writes for it, and a real
Prometheus (Debian's package) scraping a small stack found through a real Consul agent."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import time
import urllib.parse
import urllib.request

import psutil
import pytest

from shared.mesh.balancing import Balancer
from shared.mesh.meta import InstanceMeta
from shared.mesh.telemetry import RelayMetrics
from supervisor.config import load
from supervisor.infra import prometheus as prometheus_infra
from tests.helpers import ROOT, free_port, free_ports, mesh_project, wait_for
from tests.test_config import GOOD, error_of, write

try:
    PROMETHEUS = prometheus_infra.find_binary(ROOT)
except prometheus_infra.InfraError:
    PROMETHEUS = None
PROMTOOL = shutil.which("promtool", path=os.path.dirname(PROMETHEUS)) if PROMETHEUS else None
NOT_THERE = "no Prometheus (`make setup` fetches it into .tools/)"
RULE_NAMES = ["service:requests:rate1m", "service:errors:rate1m", "service:errors:ratio_rate1m",
              "service:request_duration_seconds:p99_1m", "service:retries:rate1m", "service:ejections:rate1m"]


# -- settings ------------------------------------------------------------------------------


def test_defaults_and_the_shipped_config(tmp_path):
    p = load(write(tmp_path, GOOD)).prometheus
    assert (p.mode, p.address, p.scrape_interval, p.retention) == ("embedded", "127.0.0.1:9090", "5s", "1d")
    shipped = load(os.path.join(os.path.dirname(__file__), "..", "config", "meshvisor.toml")).prometheus
    assert shipped == p
    off = load(write(tmp_path, GOOD + '[prometheus]\nmode = "off"\naddress = "127.0.0.1:8500"\n')).prometheus
    assert off.mode == "off", "off claims no port"


@pytest.mark.parametrize("table, expected", [
    ('mode = "sidecar"', "prometheus.mode: 'sidecar' is neither 'embedded' nor 'off'"),
    ('address = "9090"', "prometheus.address: '9090' is not IP:PORT"),
    ('address = "localhost:9090"', "prometheus.address: 'localhost:9090' is not IP:PORT"),
    ('address = "0.0.0.0:9090"', "prometheus.address: '0.0.0.0' is not a loopback address"),
    ('address = "127.0.0.1:8500"', "prometheus.address: port 8500 is already used by consul.address"),
    ('address = "127.0.0.1:21050"', "prometheus.address: port 21050 lies inside supervisor.port_range"),
    ('scrape_interval = "5"', "prometheus.scrape_interval: '5' is not a duration"),
    ('scrape_interval = "0s"', "prometheus.scrape_interval: '0s' is not a duration above zero"),
    ('scrape_interval = "30s"', "prometheus.scrape_interval: at most 15s"),
    ('retention = "a week"', "prometheus.retention: 'a week' is not a duration"),
    ("start_timeout = 0", "prometheus.start_timeout: must be greater than 0"),
    ("scrape = 1", "prometheus.scrape: unknown key"),
])
def test_mistakes_name_the_key(tmp_path, table, expected):
    assert expected in error_of(tmp_path, GOOD + f"[prometheus]\n{table}\n")


def test_durations():
    seconds = prometheus_infra.seconds
    assert [seconds(d) for d in ("5s", "1m30s", "1d", "2w", "500ms", "1h0m")] == [5, 90, 86400, 1209600, 0.5, 3600]
    assert [seconds(d) for d in ("", "5", "s", "1.5s", "5m1h")] == [None] * 5


def test_the_metrics_ports_are_announced_in_the_meta():
    meta = InstanceMeta(instance=1, metrics_port=21002, app_metrics_port=21000, app_metrics_path="/prom")
    assert meta.to_meta() == {"instance": "1", "metrics_port": "21002", "app_metrics_port": "21000",
                              "app_metrics_path": "/prom"}
    assert InstanceMeta.from_meta(meta.to_meta()) == meta


def test_ejections_are_counted_by_the_service_called():
    metrics = RelayMetrics("sidecar")
    auth = Balancer("auth")
    auth.update([("a", "127.0.0.1", 1, {}), ("b", "127.0.0.1", 2, {})])
    metrics.balancers = lambda: [auth]
    for _ in range(3):
        auth.failed(auth.backends[0])
    text = metrics.render().decode()
    assert 'sidecar_ejections_total{route="auth"} 1.0' in text
    assert 'sidecar_ejected_instances{route="auth"} 1.0' in text
    assert "sidecar_ejections_total{" not in RelayMetrics("sidecar").render().decode(), "no balancer, no sample"


# -- the files -----------------------------------------------------------------------------


def test_the_config_keeps_this_node_and_its_loopback_listeners(tmp_path):
    cfg = load(write(tmp_path, GOOD + '[consul]\nmode = "external"\ntoken = "secret-token"\n'))
    settings = prometheus_infra.server_settings(cfg, "node-1.example", tmp_path / "rules.yml")
    jobs = {job["job_name"]: job for job in settings["scrape_configs"]}
    assert list(jobs) == ["sidecar", "gateway", "app", "prometheus"]
    sd = jobs["sidecar"]["consul_sd_configs"][0]
    assert sd == {"server": "127.0.0.1:8500", "allow_stale": True, "refresh_interval": "5s", "token": "secret-token"}
    for name in ("sidecar", "gateway", "app"):
        relabel = jobs[name]["relabel_configs"]
        assert relabel[0] == {"source_labels": ["__meta_consul_node"], "regex": r"node\-1\.example", "action": "keep"}
        address = next(r for r in relabel if r.get("target_label") == "__address__")
        assert address["replacement"] == "127.0.0.1:$1"
        assert {r.get("target_label") for r in relabel} >= {"service", "instance", "node", "role"}
    assert settings["global"] == {"scrape_interval": "5s", "scrape_timeout": "5s", "evaluation_interval": "5s"}
    # The embedded agent's anonymous token reads the catalog: the management token stays home.
    cfg.consul.mode = "embedded"
    sd = prometheus_infra.server_settings(cfg, "n", tmp_path / "rules.yml")["scrape_configs"][0]["consul_sd_configs"]
    assert "token" not in sd[0]


@pytest.mark.skipif(PROMTOOL is None, reason=NOT_THERE)
def test_promtool_accepts_the_files(tmp_path):
    cfg = load(write(tmp_path, GOOD))
    rules = tmp_path / "rules.yml"
    rules.write_text(json.dumps(prometheus_infra.recording_rules()))
    (tmp_path / "prometheus.yml").write_text(json.dumps(prometheus_infra.server_settings(cfg, "n", rules)))
    out = subprocess.run([PROMTOOL, "check", "config", str(tmp_path / "prometheus.yml")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(RULE_NAMES)} rules found" in out.stdout
    assert [name for name, _ in prometheus_infra.RULES] == RULE_NAMES


# -- a real Prometheus ---------------------------------------------------------------------


def api(address: str, path: str, **query: str):
    url = f"http://{address}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]


def targets_up(address: str) -> dict[str, list[dict]]:
    """{job: labels of each target that is up}."""
    up: dict[str, list[dict]] = {}
    for target in api(address, "/api/v1/targets", state="active")["activeTargets"]:
        if target["health"] == "up":
            up.setdefault(target["labels"]["job"], []).append(target["labels"])
    return up


@pytest.mark.skipif(PROMETHEUS is None, reason=NOT_THERE)
def test_prometheus_scrapes_the_stack_and_records_requests_per_service(agent):
    gateway, port = free_ports(2)
    address = f"127.0.0.1:{port}"
    p = mesh_project(agent.address, {"web": 'route = "/api/v1/web"\ninstances = 2'}, gateway_port=gateway,
                     prometheus=f'address = "{address}"\nscrape_interval = "1s"')
    try:
        started = time.monotonic()
        p.start()
        print(f"stack up in {time.monotonic() - started:.1f}s")
        [row] = p.rows("prometheus")
        assert row["state"] == "RUNNING" and psutil.Process(row["pid"]).uids().real == os.getuid()

        base = p.state_dir / "prometheus"
        assert stat.S_IMODE(base.stat().st_mode) == 0o700
        for name in ("prometheus.yml", "rules.yml"):
            assert stat.S_IMODE((base / name).stat().st_mode) == 0o600
        assert agent.token in (base / "prometheus.yml").read_text()
        assert agent.token not in json.dumps(api(address, "/api/v1/status/config")), "the UI shows <secret>"

        def every_target_up():
            up = targets_up(address)
            counts = {job: len(up.get(job, ())) for job in ("sidecar", "app", "gateway", "prometheus")}
            return counts == {"sidecar": 2, "app": 2, "gateway": 1, "prometheus": 1} and up
        up = wait_for(every_target_up, 30, interval=0.5, what="every sidecar, app and gateway target up")
        print(f"targets up {time.monotonic() - started:.1f}s after the start")
        node = f"test-{agent.address.rpartition(':')[2]}"
        for labels in up["sidecar"] + up["app"]:
            assert labels["service"] == "web" and labels["node"] == node
            assert labels["instance"].startswith("web-") and labels["role"] == labels["job"]
        assert sorted(label["instance"] for label in up["sidecar"]) == sorted(label["instance"] for label in up["app"])
        assert up["gateway"][0]["service"] == "gateway" and up["gateway"][0]["role"] == "gateway"

        sent = 0

        def recorded():
            # A counter's first sample only starts its series: rates need requests after it.
            nonlocal sent
            for _ in range(5):
                with urllib.request.urlopen(f"http://127.0.0.1:{gateway}/api/v1/web/thing", timeout=5) as resp:
                    assert resp.status == 200
                sent += 1
            found = {r["metric"]["service"]: float(r["value"][1])
                     for r in api(address, "/api/v1/query", query="service:requests:rate1m")["result"]}
            return found.get("web", 0) > 0 and found.get("gateway", 0) > 0 and found
        rates = wait_for(recorded, 30, interval=0.5, what="service:requests:rate1m for web and the gateway")
        print(f"recorded {rates} {time.monotonic() - started:.1f}s after the start, {sent} requests sent")
        errors = {r["metric"]["service"]: float(r["value"][1])
                  for r in api(address, "/api/v1/query", query="service:errors:ratio_rate1m")["result"]}
        assert errors.get("web") == 0.0, errors
        p99 = api(address, "/api/v1/query", query='service:request_duration_seconds:p99_1m{service="web"}')
        assert p99["result"] and 0 < float(p99["result"][0]["value"][1]) < 30
        rules = api(address, "/api/v1/rules")["groups"][0]["rules"]
        assert [r["name"] for r in rules] == RULE_NAMES and all(r["health"] == "ok" for r in rules), rules
        # The apps' own metrics (tests/programs/web.py counts what it answered) come in too.
        answered = api(address, "/api/v1/query", query='sum(web_requests_total{job="app"})')["result"]
        assert answered and float(answered[0]["value"][1]) >= 1
    finally:
        p.cleanup()


def test_off_starts_none(agent):
    p = mesh_project(agent.address, {"web": ""})
    try:
        p.start()
        assert {r["service"] for r in p.rows()} == {"web", "forkserver"}, "no prometheus"
        assert not (p.state_dir / "prometheus").exists()
        assert not [c for c in p.descendants() if "prometheus" in c.name()]
    finally:
        p.cleanup()


def test_a_taken_port_is_said_at_once():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = "127.0.0.1:%d" % taken.getsockname()[1]
        with pytest.raises(prometheus_infra.InfraError, match=f"Prometheus cannot listen on {address}"):
            prometheus_infra._check_free(address)
    prometheus_infra._check_free(f"127.0.0.1:{free_port()}")
