"""Configuration: a mistake stops with one clear message naming the file and the key."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from supervisor.config import ConfigError, load

GOOD = """
[supervisor]
port_range = [21000, 21099]

[services.web]
instances = 2
route = "/api/v1/web"
database = "web"
upstreams = ["worker"]
env = { GREETING = "hi" }
sidecar_env = { SIDECAR_ACCESS_LOG = "0" }

[services.web.restart]
max_retries = 2

[services.worker]
ready = "process"
"""


def write(tmp_path: Path, config: str, procfile: str = "web: python web.py\nworker: python w.py\n") -> Path:
    (tmp_path / "config").mkdir(exist_ok=True)
    (tmp_path / "Procfile").write_text(procfile)
    path = tmp_path / "config" / "meshvisor.toml"
    path.write_text(textwrap.dedent(config))
    return path


def error_of(tmp_path: Path, config: str, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, config, **kw))
    return str(info.value)


def test_valid_config_resolves_defaults_and_overrides(tmp_path):
    cfg = load(write(tmp_path, GOOD))
    web = cfg.services["web"]
    assert web.instances == 2 and web.command == "python web.py"
    assert web.restart.max_retries == 2 and web.restart.backoff_initial == 0.5  # override + default
    assert web.env == {"GREETING": "hi"} and web.upstreams == ["worker"]
    assert cfg.state_dir == tmp_path / ".state"
    assert cfg.services["worker"].ready == "process"


def test_sidecar_env_reaches_the_sidecar_but_may_not_name_what_the_supervisor_sets(tmp_path):
    from supervisor.config import sidecar_env_from_supervisor
    from supervisor.instance import InstancePorts, sidecar_spec

    web = load(write(tmp_path, GOOD)).services["web"]
    base = {"PATH": "/bin", "CONSUL_HTTP_ADDR": "127.0.0.1:8500", "CONSUL_HTTP_TOKEN": "t"}  # as the daemon's
    spec = sidecar_spec(web, 1, InstancePorts(public=21001, app=21002, admin=21003), "web-n-1", base, str(tmp_path))
    assert spec.env["SIDECAR_ACCESS_LOG"] == "0" and spec.env["PATH"] == "/bin"
    assert "GREETING" not in spec.env, "the app's env is the app's"
    # Every variable the supervisor sets is refused in sidecar_env, with the key named.
    assert set(spec.env) - {"PATH", "SIDECAR_ACCESS_LOG"} == sidecar_env_from_supervisor()
    for var in ("SIDECAR_PORT", "CONSUL_HTTP_ADDR"):
        message = error_of(tmp_path, GOOD.replace('SIDECAR_ACCESS_LOG = "0"', f'{var} = "1"'))
        assert f"services.web.sidecar_env.{var}: is set by the supervisor" in message


def test_the_shipped_config_is_valid():
    cfg = load(Path(__file__).resolve().parent.parent / "config" / "meshvisor.toml")
    assert set(cfg.services) >= {"auth", "example"}


@pytest.mark.parametrize(
    "config, expected",
    [
        ("[services.web]\ninstnces = 2\n[services.worker]\n", "services.web.instnces: unknown key"),
        ("[services.web]\ninstances = 'two'\n[services.worker]\n", "services.web.instances: expected `int`, got `str`"),
        ("[supervisr]\n[services.web]\n[services.worker]\n", "supervisr: unknown key"),
        ("[consul]\nmode = 'cloud'\n[services.web]\n[services.worker]\n", "consul.mode"),
        ("[consul]\naddress = 'nohost'\n[services.web]\n[services.worker]\n", "consul.address"),
        ("[services.web]\nupstreams = ['nope']\n[services.worker]\n", "services.web.upstreams: 'nope'"),
        ("[services.web]\nroute = 'api'\n[services.worker]\n", "services.web.route: 'api' must start with '/'"),
        ("[services.web]\ndatabase = 'Bad-Name'\n[services.worker]\n", "services.web.database"),
        ("[services.web]\nready = 'maybe'\n[services.worker]\n", "services.web.ready"),
        ("[services.web]\ninstances = -1\n[services.worker]\n", "services.web.instances: must not be negative"),
        ("[restart]\nmax_retries = 0\n[services.web]\n[services.worker]\n", "restart.max_retries"),
        ("[services.web.restart]\nbackoff_max = 0.1\n[services.worker]\n", "services.web.restart.backoff_max"),
        ("[services.web]\nenv = { 'BAD NAME' = 'x' }\n[services.worker]\n", "services.web.env.BAD NAME"),
        ("[services.web]\nsidecar_env = { 'A=B' = 'x' }\n[services.worker]\n", "services.web.sidecar_env.A=B"),
        ("[services.web]\nsidecar = false\nidempotency_key = true\n[services.worker]\n",
         "services.web.idempotency_key: is announced in Consul by the sidecars"),
        ("[services.web]\nsidecar = false\napp_socket = true\n[services.worker]\n",
         "services.web.app_socket: the app's socket is for its sidecar: needs sidecar = true"),
        ("[services.web]\n[services.worker]\ndatabase='web'\n[services.web2]\n", "services.web2"),
        # Across hosts (supervisor/config_hosts.py).
        ("[consul]\nrole = 'leader'\n[services.web]\n[services.worker]\n", "consul.role"),
        ("[consul]\nrole = 'client'\ntoken = 't'\n[services.web]\n[services.worker]\n",
         "consul.join: a client agent needs the addresses of the cluster's servers"),
        ("[consul]\nbind = '10.0.0.1'\n[services.web]\n[services.worker]\n", "consul.encrypt: bind = '10.0.0.1'"),
        ("[consul]\nencrypt = 'c2hvcnQ='\n[services.web]\n[services.worker]\n", "consul.encrypt: is not a base64 key"),
        ("[consul]\nbind = 'host1'\n[services.web]\n[services.worker]\n", "consul.bind: 'host1' is not an IP"),
        ("[consul]\nrole = 'client'\njoin = ['10.0.0.1']\n[services.web]\n[services.worker]\n",
         "consul.token: every host of a cluster with ACLs needs the cluster's management token"),
        ("[consul]\nbootstrap_expect = 3\n[services.web]\n[services.worker]\n", "consul.token"),
        ("[supervisor]\nadvertise = 'me'\n[services.web]\n[services.worker]\n", "supervisor.advertise"),
        ("[postgres]\nlisten = '10.0.0.1'\n[services.web]\n[services.worker]\n", "postgres.allow: listen needs"),
        ("[postgres]\nallow = ['10.0.0.0/33']\n[services.web]\n[services.worker]\n", "postgres.allow: '10.0.0.0/33'"),
        ("[postgres]\nmode = 'peer'\n[services.web]\n[services.worker]\n", "postgres.address"),
        ("[consul]\nacl = false\n[postgres]\nmode = 'peer'\naddress = '10.0.0.1:54329'\n[services.web]\n"
         "[services.worker]\n", "postgres.mode: peer"),
    ],
)
def test_mistakes_name_the_file_and_the_key(tmp_path, config, expected):
    message = error_of(tmp_path, config)
    assert message.startswith("config/meshvisor.toml: ") or "meshvisor.toml" in message
    assert expected in message


def test_a_client_host_of_a_cluster(tmp_path):
    key = "qUk9BXqK4EYo0fNU1Go0Hm5DntfQUWaq5OorSyrkxTs="
    cfg = load(write(tmp_path, GOOD + f"""
[consul]
role = "client"
join = ["10.0.0.1"]
bind = "10.0.0.2"
encrypt = "{key}"
token = "management"
node_name = "host2"
[postgres]
mode = "peer"
address = "10.0.0.1:54329"
"""))
    from supervisor.infra.consul import agent_settings

    agent = agent_settings(cfg, cfg.consul.token)
    assert agent["retry_join"] == ["10.0.0.1"] and agent["bind_addr"] == "10.0.0.2" and agent["encrypt"] == key
    assert "server" not in agent and agent["leave_on_terminate"] is True
    assert agent["retry_interval"] == "5s", "a host that booted before the servers joins soon after them"
    assert "tokens" not in agent["acl"], "the master token is for servers only"
    assert agent["client_addr"] == "127.0.0.1" and agent["node_name"] == "host2"


def test_duplicate_ports_are_refused(tmp_path):
    message = error_of(tmp_path, "[postgres]\nport = 8500\n[services.web]\ndatabase = 'web'\n[services.worker]\n")
    assert "postgres.port: port 8500 is already used by consul.address" in message
    # No service needs the embedded server: it does not run, so its port is not taken.
    load(write(tmp_path, "[postgres]\nport = 8500\n[services.web]\n[services.worker]\n"))
    message = error_of(tmp_path, "[services.web]\nport = 3000\n[services.worker]\nport = 3000\n")
    assert "services.worker.port: port 3000 is already used by services.web.port" in message
    message = error_of(tmp_path, "[supervisor]\nport_range=[3000, 3100]\n[services.web]\nport = 3000\n[services.worker]\n")
    assert "inside supervisor.port_range" in message


def test_procfile_and_config_must_match(tmp_path):
    message = error_of(tmp_path, "[services.web]\n", procfile="web: a\nworker: b\n")
    assert "'worker' has no [services.worker] table" in message
    message = error_of(tmp_path, "[services.web]\n[services.worker]\n[services.ghost]\n")
    assert "services.ghost: no 'ghost:' line in" in message


def test_procfile_syntax(tmp_path):
    message = error_of(tmp_path, "[services.web]\n", procfile="# comment\n\nweb: a\nthis is not a line\n")
    assert "Procfile:4: expected 'name: command'" in message
    message = error_of(tmp_path, "[services.web]\n", procfile="web: a\nweb: b\n")
    assert "Procfile:2: 'web' is defined twice" in message


def test_invalid_toml_and_missing_file(tmp_path):
    assert "not valid TOML" in error_of(tmp_path, "[services.web\n")
    with pytest.raises(ConfigError, match="file not found"):
        load(tmp_path / "nowhere" / "meshvisor.toml")


def test_cli_prints_one_line_and_no_traceback(tmp_path):
    path = write(tmp_path, "[services.web]\ninstances = 'x'\n[services.worker]\n")
    proc = subprocess.run([sys.executable, "-m", "supervisor", "--config", str(path), "status"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "services.web.instances: expected `int`, got `str`" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
