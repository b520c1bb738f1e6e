"""The typed contracts between processes: settings through the environment, the Consul Meta
an instance announces, and the names every process agrees on."""

from __future__ import annotations

import socket

import pytest

from services.gateway.settings import GatewaySettings
from shared.mesh import local
from shared.mesh.envstruct import SettingsError
from shared.mesh.meta import InstanceMeta
from shared.mesh.naming import node_name, service_id
from sidecar.settings import SidecarSettings
from supervisor.config import sidecar_env_from_supervisor

SIDECAR_REQUIRED = {"SERVICE_NAME": "api", "SIDECAR_PORT": "21001", "APP_PORT": "21000"}

# Every field away from its default, so a field that to_env drops or from_env misreads shows.
SIDECAR_ELSEWHERE = SidecarSettings(
    service="api", index=3, service_id="api-n-3-r2", node="n", consul_address="10.0.0.1:8501",
    consul_token="secret", host="0.0.0.0", port=21001, app_port=21000, app_socket="/run/a.sock",
    admin_port=21002, health="/healthz", route="/api/v1/api", openapi="/openapi.json", version="7",
    idempotency_key=True, upstreams={"billing": 21003, "auth-x": 21004}, reuse_port=True,
    drain_seconds=0.5, check_interval="5s", check_timeout="3s", deregister_after="2m",
    connect_timeout=1.5, request_timeout=60.0, header_timeout=4.0, retries=0, access_log=False, unix_socket=False,
    mtls=False, app_metrics="",
)
GATEWAY_ELSEWHERE = GatewaySettings(
    service="edge", index=2, service_id="edge-n-2", node="n", consul_address="10.0.0.1:8501",
    consul_token="secret", host="0.0.0.0", advertise="10.0.0.2", port=8080, admin_port=8081, reuse_port=True,
    register=False, max_body=1024, connect_timeout=1.5, request_timeout=60.0, header_timeout=2.5, retries=5,
    access_log=False, drain_seconds=0.25, mtls=False,
)


@pytest.mark.parametrize("settings", [SIDECAR_ELSEWHERE, GATEWAY_ELSEWHERE], ids=["sidecar", "gateway"])
def test_every_field_survives_to_env_and_from_env(settings):
    cls = type(settings)
    defaults = cls.from_env(SIDECAR_REQUIRED)
    for field in cls.__struct_fields__:
        if field not in ("service", "port", "app_port"):
            assert getattr(settings, field) != getattr(defaults, field), f"{field} is at its default here"
    env = settings.to_env()
    assert all(isinstance(value, str) for value in env.values())
    assert cls.from_env(env) == settings
    assert cls.from_env(defaults.to_env()) == defaults


def test_variable_names_and_defaults_are_the_documented_ones():
    s = SidecarSettings.from_env(SIDECAR_REQUIRED)
    assert s.service_id == f"api-{socket.gethostname()}-1" and s.instance == "api.1"
    assert (s.host, s.port, s.app_port, s.app_socket, s.admin_port) == ("127.0.0.1", 21001, 21000, "", 0)
    assert (s.health, s.route, s.openapi, s.version, s.idempotency_key) == ("/health", "", "", "0", False)
    assert (s.upstreams, s.consul_address, s.consul_token, s.reuse_port) == ({}, "127.0.0.1:8500", "", False)
    assert (s.drain_seconds, s.check_interval, s.check_timeout, s.deregister_after) == (2.0, "2s", "1s", "1m")
    assert (s.connect_timeout, s.request_timeout, s.retries, s.access_log, s.unix_socket) == (2.0, 30.0, 2, True, True)
    assert s.header_timeout == 10.0
    assert s.mtls is True  # plain HTTP between mesh members only when asked for
    assert s.app_metrics == "/metrics"
    assert SidecarSettings.env_names() == sidecar_env_from_supervisor() | {
        "CONSUL_NODE", "SIDECAR_CHECK_INTERVAL", "SIDECAR_CHECK_TIMEOUT", "SIDECAR_DEREGISTER_AFTER",
        "SIDECAR_CONNECT_TIMEOUT", "SIDECAR_REQUEST_TIMEOUT", "SIDECAR_HEADER_TIMEOUT", "SIDECAR_RETRIES",
        "SIDECAR_ACCESS_LOG", "SIDECAR_UNIX_SOCKET", "SIDECAR_APP_METRICS"}
    g = GatewaySettings.from_env({})
    assert (g.host, g.port, g.admin_port, g.reuse_port, g.service, g.index) == ("127.0.0.1", 3000, 0, False, "gateway", 1)
    assert g.service_id == f"gateway-{socket.gethostname()}-1" and g.instance == "gateway.1"
    assert (g.consul_address, g.consul_token, g.register, g.max_body) == ("127.0.0.1:8500", "", True, 10 * 1024 * 1024)
    assert (g.connect_timeout, g.request_timeout, g.retries, g.access_log, g.drain_seconds) == (2.0, 30.0, 2, True, 1.0)
    assert g.header_timeout == 10.0
    assert GatewaySettings.env_names() == {
        "HOST", "MESH_ADVERTISE", "PORT", "ADMIN_PORT", "REUSE_PORT", "SERVICE_NAME", "INSTANCE_INDEX", "SERVICE_ID", "CONSUL_NODE",
        "CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "MESH_MTLS", "GATEWAY_REGISTER", "GATEWAY_MAX_BODY", "GATEWAY_CONNECT_TIMEOUT",
        "GATEWAY_REQUEST_TIMEOUT", "GATEWAY_HEADER_TIMEOUT", "GATEWAY_RETRIES", "GATEWAY_ACCESS_LOG",
        "GATEWAY_DRAIN_SECONDS"}


def test_the_names_sidecar_env_may_not_use_are_those_the_supervisor_sets():
    assert sidecar_env_from_supervisor() == SidecarSettings.env_names(supervisor=True) == {
        "SERVICE_NAME", "INSTANCE_INDEX", "SERVICE_ID", "SIDECAR_PORT", "APP_PORT", "SIDECAR_ADMIN_PORT",
        "HEALTH_PATH", "SERVICE_ROUTE", "OPENAPI_PATH", "SERVICE_VERSION", "SERVICE_IDEMPOTENCY_KEY",
        "SIDECAR_UPSTREAMS", "SIDECAR_DRAIN_SECONDS", "SIDECAR_REUSE_PORT", "APP_SOCKET", "SIDECAR_HOST", "CONSUL_HTTP_ADDR",
        "CONSUL_HTTP_TOKEN", "MESH_MTLS"}
    # What the supervisor decides is always written, even at its default; the rest only
    # where it differs, so an operator's sidecar_env beneath is not overwritten.
    supervised = SidecarSettings(service="api", port=1, app_port=2, service_id="api-n-1")
    assert set(supervised.to_env()) == sidecar_env_from_supervisor()


SIDECAR_NUMBERS = ["INSTANCE_INDEX", "SIDECAR_PORT", "APP_PORT", "SIDECAR_ADMIN_PORT", "SIDECAR_DRAIN_SECONDS",
                   "SIDECAR_CONNECT_TIMEOUT", "SIDECAR_REQUEST_TIMEOUT", "SIDECAR_HEADER_TIMEOUT", "SIDECAR_RETRIES"]
GATEWAY_NUMBERS = ["PORT", "ADMIN_PORT", "INSTANCE_INDEX", "GATEWAY_MAX_BODY", "GATEWAY_CONNECT_TIMEOUT",
                   "GATEWAY_REQUEST_TIMEOUT", "GATEWAY_HEADER_TIMEOUT", "GATEWAY_RETRIES", "GATEWAY_DRAIN_SECONDS"]


@pytest.mark.parametrize("cls, name", [(SidecarSettings, n) for n in SIDECAR_NUMBERS]
                         + [(GatewaySettings, n) for n in GATEWAY_NUMBERS])
def test_a_bad_number_is_a_settings_error_naming_the_variable(cls, name):
    for bad in ("ten", "1,5", ""):
        with pytest.raises(SettingsError) as info:
            cls.from_env({**SIDECAR_REQUIRED, name: bad})
        message = str(info.value)
        required = f"{cls.component}: environment variable {name} is required"
        assert message in (f"{cls.component}: {name}={bad!r} is not a number", required), message


def test_missing_or_malformed_sidecar_settings_name_the_variable():
    for name in ("SERVICE_NAME", "SIDECAR_PORT", "APP_PORT"):
        for env in ({k: v for k, v in SIDECAR_REQUIRED.items() if k != name}, {**SIDECAR_REQUIRED, name: ""}):
            with pytest.raises(SettingsError, match=f"^sidecar: environment variable {name} is required$"):
                SidecarSettings.from_env(env)
    with pytest.raises(SettingsError, match=r"^sidecar: SIDECAR_UPSTREAMS item 'billing=x' is not NAME=PORT$"):
        SidecarSettings.from_env({**SIDECAR_REQUIRED, "SIDECAR_UPSTREAMS": "auth=1,billing=x"})


def test_switches_read_as_they_always_did():
    def read(**env: str) -> SidecarSettings:
        return SidecarSettings.from_env({**SIDECAR_REQUIRED, **env})

    # Off by default: only "1" turns it on. On by default: only "0" turns it off.
    assert not read(SERVICE_IDEMPOTENCY_KEY="true").idempotency_key and read(SERVICE_IDEMPOTENCY_KEY="1").idempotency_key
    assert not read(SIDECAR_REUSE_PORT="").reuse_port and read(SIDECAR_REUSE_PORT="1").reuse_port
    assert read(SIDECAR_ACCESS_LOG="").access_log and not read(SIDECAR_ACCESS_LOG="0").access_log
    assert read(SIDECAR_UNIX_SOCKET="no").unix_socket and not read(SIDECAR_UNIX_SOCKET="0").unix_socket
    assert read(SERVICE_ID="", CONSUL_NODE="n", INSTANCE_INDEX="4").service_id == "api-n-4"
    assert read(HEALTH_PATH="").health == "", "a variable given empty is empty, not the default"


def test_instance_meta_is_what_consul_held_before():
    sidecar = InstanceMeta(instance=2, version="1", health="/health", route="/api/v1/a", openapi="/openapi.json",
                           idempotency_key=True, unix_socket="@meshvisor/a-n-2/21001", host_id="boot.4026531840")
    assert sidecar.to_meta() == {
        "instance": "2", "version": "1", "health": "/health", "route": "/api/v1/a", "openapi": "/openapi.json",
        "idempotency_key": "true", "unix_socket": "@meshvisor/a-n-2/21001", "host_id": "boot.4026531840"}
    assert InstanceMeta(instance=1, version="0", health="/health").to_meta() == {
        "instance": "1", "version": "0", "health": "/health"}, "nothing announced that is not set"
    assert InstanceMeta(instance=1, role="gateway").to_meta() == {"instance": "1", "role": "gateway"}
    assert InstanceMeta.from_meta(sidecar.to_meta()) == sidecar


def test_instance_meta_reads_leniently():
    meta = InstanceMeta.from_meta({"instance": "two", "idempotency_key": "yes", "route": "/r", "zone": "b",
                                   "openapi": None})
    assert meta == InstanceMeta(route="/r"), "unknown keys ignored, unreadable values at their default"
    assert InstanceMeta.from_meta({}) == InstanceMeta()
    here = local.host_id()
    if here:
        name = "@meshvisor/x/1"
        assert local.reachable_socket(InstanceMeta(unix_socket=name, host_id=here).to_meta()) == "\0meshvisor/x/1"
        assert local.reachable_socket(InstanceMeta(unix_socket=name, host_id="other.1").to_meta()) is None
        assert local.reachable_socket(InstanceMeta(unix_socket="meshvisor/x/1", host_id=here).to_meta()) is None


def test_one_service_id_formula_and_one_node_name():
    assert service_id("auth", "n1", 2) == "auth-n1-2" and service_id("auth", "n1", 2, generation=3) == "auth-n1-2-r3"
    assert node_name("") == socket.gethostname() and node_name("n1") == "n1"
