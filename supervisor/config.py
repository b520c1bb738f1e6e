"""Procfile + config/meshvisor.toml -> one validated model.

Everything is checked up front so that a typo stops the supervisor with a single
message naming the file and the key, before any process starts.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import tomllib
from pathlib import Path

import msgspec

from supervisor.config_hosts import port_of as _port_of
from supervisor.config_hosts import validate_hosts
from supervisor.config_prometheus import PrometheusSettings, validate_prometheus
from supervisor.procfile import ProcfileError, parse_procfile

CONFIG_FILE = "config/meshvisor.toml"
PROCFILE = "Procfile"

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@functools.cache
def sidecar_env_from_supervisor() -> frozenset[str]:
    """A sidecar's environment that the supervisor sets (supervisor/instance.sidecar_spec,
    and [consul] for every process): sidecar_env may not name these, since a value there
    would be either ignored or, for Consul's address, point one service's sidecars elsewhere.

    Read from the sidecar's settings when first asked, not at import: every CLI verb
    loads the config, and only a service with sidecar_env needs them (importing them and
    reading their table took ~10 ms)."""
    from sidecar.settings import SidecarSettings

    return SidecarSettings.env_names(supervisor=True)


class ConfigError(Exception):
    """A configuration mistake; str() is the whole message shown to the operator."""


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class RestartPolicy(_Strict):
    """Crash restart: delay = backoff_initial * 2**(failures-1), capped at backoff_max.

    A run shorter than stable_after counts as a failure; max_retries consecutive
    failures put the process in FATAL. A longer run resets the count.
    """

    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    max_retries: int = 6
    stable_after: float = 10.0


class RestartOverride(_Strict):
    backoff_initial: float | None = None
    backoff_max: float | None = None
    max_retries: int | None = None
    stable_after: float | None = None


class SupervisorSettings(_Strict):
    state_dir: str = ".state"
    host: str = "127.0.0.1"
    # This host's address as the other hosts see it: sidecars and gateways take mesh
    # traffic on it and register it in Consul (apps stay on 127.0.0.1).
    advertise: str = "127.0.0.1"
    # Ports handed to instances are taken from this range (inclusive).
    port_range: tuple[int, int] = (20000, 20999)
    stop_timeout: float = 10.0
    start_timeout: float = 30.0
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 3
    # Sidecars are forked from one process that imported the sidecar once (a third of the
    # memory each; supervisor/forkserver.py); false: each is exec'd as `python -m sidecar`.
    fork_sidecars: bool = True


class ConsulSettings(_Strict):
    mode: str = "embedded"  # "embedded" runs an agent; "external" uses one at `address`
    address: str = "127.0.0.1:8500"
    # Embedded agent across hosts: a few "server"s hold the catalog (Raft, every one with
    # the same bootstrap_expect); every other host runs a "client". See the README.
    role: str = "server"
    bootstrap_expect: int = 1
    join: list[str] = []  # agents to join (retried until one answers)
    token: str = ""
    datacenter: str = "dc1"
    node_name: str = ""  # default: the host name; must differ per host
    bind: str = "127.0.0.1"  # cluster (serf/RPC) address; a routable one when joining others
    advertise: str = ""  # the address the others use, when `bind` is not it (NAT)
    encrypt: str = ""  # gossip key (`supervisor keygen`): required when `bind` is not loopback
    server_port: int = 8300
    serf_lan_port: int = 8301
    serf_wan_port: int = 8302
    dns_port: int = -1  # -1 disables the agent's DNS interface
    start_timeout: float = 60.0
    # ACLs with default deny (supervisor/infra/acl.py). Embedded (default on): the
    # supervisor bootstraps them and keeps the management token in the state dir.
    # External (default off: the cluster's own choice): `token` must be allowed to make
    # the services' tokens and the intentions (see the README).
    acl: bool | None = None


class MeshSettings(_Strict):
    # mTLS with Connect identities on every hop the mesh owns (gateway -> sidecar,
    # sidecar -> sidecar) and intentions deciding who may call whom. false: plain HTTP
    # between mesh members, kept only to measure what mTLS costs.
    mtls: bool = True


class PostgresSettings(_Strict):
    mode: str = "embedded"  # "embedded" runs a server; "external" uses `dsn`
    port: int = 54329
    # external: a DSN of a role allowed to create roles and databases.
    dsn: str = ""
    # embedded: where the cluster lives; default <state_dir>/postgres/data.
    data_dir: str = ""
    # embedded: folder of initdb/postgres; default the newest /usr/lib/postgresql/*/bin.
    bin_dir: str = ""
    start_timeout: float = 60.0
    # embedded: also listen on this address (this host's advertise address), for the
    # other hosts' services; they log in with passwords, from `allow` (CIDRs) only.
    listen: str = ""
    allow: list[str] = []
    # peer: the embedded server of another host of this cluster, at `address`
    # (HOST:PORT); it makes the roles, whose passwords every host derives from the
    # cluster's management token (needs [consul] acl).
    address: str = ""


class ServiceSettings(_Strict):
    instances: int = 1
    route: str = ""
    health: str = "/health"
    # When an instance counts as up: "http" (GET health answers 2xx), "tcp" (its
    # port accepts connections) or "process" (alive for a second).
    ready: str = "http"
    openapi: str = ""
    database: str = ""
    # Use this DSN instead of a database the supervisor provisions.
    database_url: str = ""
    upstreams: list[str] = []
    env: dict[str, str] = {}
    # A fixed public port shared by every instance (SO_REUSEPORT); 0 = one port per instance.
    port: int = 0
    # Run a sidecar beside each instance: it registers the instance in Consul, proxies
    # inbound traffic to the app and serves the upstream listeners.
    sidecar: bool = True
    # Extra environment of this service's sidecars, e.g. SIDECAR_ACCESS_LOG = "0" or
    # SIDECAR_REQUEST_TIMEOUT = "60" (not what the supervisor sets: sidecar_env_from_supervisor()).
    sidecar_env: dict[str, str] = {}
    # The app answers a repeated Idempotency-Key with the first outcome on all its
    # non-idempotent operations: the gateway and sidecars may then resend keyed requests.
    idempotency_key: bool = False
    # The app also listens on the Unix socket named in its APP_SOCKET (beside PORT), and
    # its sidecar relays to it there: no TCP stack on either side of that hop.
    app_socket: bool = False
    version: str = "1"
    drain_seconds: float = 2.0  # how long a stopping sidecar keeps serving after deregistering
    stop_timeout: float | None = None
    start_timeout: float | None = None
    restart: RestartOverride = msgspec.field(default_factory=RestartOverride)


class FileSettings(_Strict):
    supervisor: SupervisorSettings = msgspec.field(default_factory=SupervisorSettings)
    restart: RestartPolicy = msgspec.field(default_factory=RestartPolicy)
    consul: ConsulSettings = msgspec.field(default_factory=ConsulSettings)
    mesh: MeshSettings = msgspec.field(default_factory=MeshSettings)
    postgres: PostgresSettings = msgspec.field(default_factory=PostgresSettings)
    prometheus: PrometheusSettings = msgspec.field(default_factory=PrometheusSettings)
    services: dict[str, ServiceSettings] = msgspec.field(default_factory=dict)


class Service(msgspec.Struct, kw_only=True):
    """One Procfile entry with its settings resolved."""

    name: str
    command: str
    instances: int
    route: str
    health: str
    ready: str
    openapi: str
    database: str
    database_url: str
    upstreams: list[str]
    env: dict[str, str]
    port: int
    sidecar: bool
    sidecar_env: dict[str, str]
    idempotency_key: bool
    app_socket: bool
    version: str
    drain_seconds: float
    stop_timeout: float
    start_timeout: float
    restart: RestartPolicy


class Config(msgspec.Struct, kw_only=True):
    root: Path
    config_path: Path
    state_dir: Path
    supervisor: SupervisorSettings
    consul: ConsulSettings
    mesh: MeshSettings
    postgres: PostgresSettings
    prometheus: PrometheusSettings
    services: dict[str, Service]

    @property
    def consul_http_addr(self) -> str:
        return self.consul.address

    @property
    def socket_path(self) -> Path:
        return self.state_dir / "run" / "control.sock"


def default_config_path(root: Path | None = None) -> Path:
    env = os.environ.get("MESHVISOR_CONFIG")
    if env:
        return Path(env).resolve()
    return ((root or Path.cwd()) / CONFIG_FILE).resolve()


def load(config_path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate; raise ConfigError with one readable message."""
    path = Path(config_path).resolve() if config_path else default_config_path()
    # The project root is the folder holding config/ (and the Procfile).
    root = path.parent.parent if path.parent.name == "config" else path.parent
    shown = _shown(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{shown}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{shown}: not valid TOML: {exc}") from None
    settings = _convert_file(raw, shown)
    if settings.consul.acl is None:
        settings.consul.acl = settings.consul.mode == "embedded"

    procfile_path = root / PROCFILE
    try:
        commands = parse_procfile(procfile_path)
    except ProcfileError as exc:
        raise ConfigError(str(exc)) from None

    state_dir = Path(os.environ.get("MESHVISOR_STATE_DIR") or settings.supervisor.state_dir)
    if not state_dir.is_absolute():
        state_dir = root / state_dir
    config = Config(
        root=root,
        config_path=path,
        state_dir=state_dir,
        supervisor=settings.supervisor,
        consul=settings.consul,
        mesh=settings.mesh,
        postgres=settings.postgres,
        prometheus=settings.prometheus,
        services={
            name: _resolve_service(name, commands[name], svc, settings)
            for name, svc in settings.services.items()
            if name in commands
        },
    )
    _validate(config, settings, commands, shown, _shown(procfile_path))
    return config


def _resolve_service(name: str, command: str, svc: ServiceSettings, file: FileSettings) -> Service:
    policy = msgspec.structs.replace(
        file.restart,
        **{k: v for k, v in msgspec.structs.asdict(svc.restart).items() if v is not None},
    )
    # What the file says as it is, copied (lists and tables too: a Service owns its own);
    # what it leaves to the globals, resolved here.
    given = {field: copy.copy(getattr(svc, field)) for field in Service.__struct_fields__
             if field in ServiceSettings.__struct_fields__ and field not in ("stop_timeout", "start_timeout", "restart")}
    return Service(
        name=name,
        command=command,
        **given,
        stop_timeout=svc.stop_timeout if svc.stop_timeout is not None else file.supervisor.stop_timeout,
        start_timeout=svc.start_timeout if svc.start_timeout is not None else file.supervisor.start_timeout,
        restart=policy,
    )


def _validate(config: Config, file: FileSettings, commands: dict[str, str], shown: str, procfile: str) -> None:
    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{shown}: {key}: {message}")

    for name in commands:
        if name not in file.services:
            raise ConfigError(f"{procfile}: '{name}' has no [services.{name}] table in {shown}")
    for name in file.services:
        if name not in commands:
            fail(f"services.{name}", f"no '{name}:' line in {procfile}")
        if not _NAME.match(name):
            fail(f"services.{name}", "service names are lower-case letters, digits, '-' and '_'")

    sup = config.supervisor
    lo, hi = sup.port_range
    if not (1024 <= lo <= hi <= 65535):
        fail("supervisor.port_range", f"[{lo}, {hi}] is not a range within 1024..65535")
    for key in ("stop_timeout", "start_timeout"):
        if getattr(sup, key) <= 0:
            fail(f"supervisor.{key}", "must be greater than 0")
    if sup.log_max_bytes < 4096:
        fail("supervisor.log_max_bytes", "must be at least 4096")
    if sup.log_backups < 0:
        fail("supervisor.log_backups", "must not be negative")
    _validate_restart(file.restart, "restart", fail)

    if config.consul.mode not in ("embedded", "external"):
        fail("consul.mode", f"'{config.consul.mode}' is neither 'embedded' nor 'external'")
    consul_port = _port_of(config.consul.address)
    if consul_port is None:
        fail("consul.address", f"'{config.consul.address}' is not HOST:PORT")
    if config.postgres.mode not in ("embedded", "external", "peer"):
        fail("postgres.mode", f"'{config.postgres.mode}' is not one of 'embedded', 'external', 'peer'")
    validate_hosts(config.supervisor, config.consul, config.postgres, fail)
    if config.postgres.mode == "external" and not config.postgres.dsn:
        needing = [s.name for s in config.services.values() if s.database and not s.database_url]
        if needing:
            fail("postgres.dsn", f"external mode needs a DSN (services {', '.join(needing)} declare a database)")

    # Every fixed port must be distinct and outside the range instances draw from.
    fixed: dict[int, str] = {}

    def claim(port: int, key: str) -> None:
        if not (1 <= port <= 65535):
            fail(key, f"{port} is not a TCP port")
        if port in fixed:
            fail(key, f"port {port} is already used by {fixed[port]}")
        if lo <= port <= hi:
            fail(key, f"port {port} lies inside supervisor.port_range [{lo}, {hi}]")
        fixed[port] = key

    if config.consul.mode == "embedded":
        claim(consul_port, "consul.address")
        for key in ("server_port", "serf_lan_port", "serf_wan_port", "dns_port"):
            port = getattr(config.consul, key)
            if port != -1 or key in ("server_port", "serf_lan_port"):
                claim(port, f"consul.{key}")
    # The embedded server only runs when some service needs a database it provisions.
    if config.postgres.mode == "embedded" and any(
            s.database and not s.database_url for s in config.services.values()):
        claim(config.postgres.port, "postgres.port")
    validate_prometheus(config.prometheus, claim, fail)

    databases: dict[str, str] = {}
    for svc in config.services.values():
        key = f"services.{svc.name}"
        if svc.instances < 0:
            fail(f"{key}.instances", "must not be negative")
        if svc.port:
            claim(svc.port, f"{key}.port")
        for field in ("route", "health", "openapi"):
            value = getattr(svc, field)
            if value and not value.startswith("/"):
                fail(f"{key}.{field}", f"'{value}' must start with '/'")
        if svc.route and svc.route != "/" and svc.route.endswith("/"):
            fail(f"{key}.route", f"'{svc.route}' must not end with '/'")
        if svc.ready not in ("http", "tcp", "process"):
            fail(f"{key}.ready", f"'{svc.ready}' is not one of 'http', 'tcp', 'process'")
        if svc.ready == "http" and not svc.health:
            fail(f"{key}.health", "ready = 'http' needs a health path")
        if svc.database:
            if not _DB_NAME.match(svc.database):
                fail(f"{key}.database", f"'{svc.database}' is not a plain lower-case SQL identifier")
            if svc.database in databases:
                fail(f"{key}.database", f"'{svc.database}' is already the database of {databases[svc.database]}")
            databases[svc.database] = svc.name
        for upstream in svc.upstreams:
            if upstream not in config.services:
                fail(f"{key}.upstreams", f"'{upstream}' is not a service in {shown}")
            if upstream == svc.name:
                fail(f"{key}.upstreams", "a service cannot be its own upstream")
        for var in svc.env:
            if not _ENV_NAME.match(var):
                fail(f"{key}.env.{var}", "is not a valid environment variable name")
        for var in svc.sidecar_env:
            if not _ENV_NAME.match(var):
                fail(f"{key}.sidecar_env.{var}", "is not a valid environment variable name")
            if var in sidecar_env_from_supervisor():
                fail(f"{key}.sidecar_env.{var}", "is set by the supervisor for each instance (ports, identity, "
                     "the service's settings, [consul]): set the matching key of the config instead")
        if svc.idempotency_key and not svc.sidecar:
            fail(f"{key}.idempotency_key", "is announced in Consul by the sidecars: needs sidecar = true")
        if svc.app_socket and not svc.sidecar:
            fail(f"{key}.app_socket", "the app's socket is for its sidecar: needs sidecar = true")
        if svc.upstreams and not svc.sidecar:
            fail(f"{key}.upstreams", "upstream listeners are served by the sidecar: needs sidecar = true")
        if svc.sidecar and not svc.health:
            fail(f"{key}.health", "the sidecar's Consul check needs a health path")
        if svc.drain_seconds < 0:
            fail(f"{key}.drain_seconds", "must not be negative")
        for field in ("stop_timeout", "start_timeout"):
            if getattr(svc, field) <= 0:
                fail(f"{key}.{field}", "must be greater than 0")
        _validate_restart(svc.restart, f"{key}.restart", fail)


def _validate_restart(policy: RestartPolicy, key: str, fail) -> None:
    if policy.backoff_initial <= 0:
        fail(f"{key}.backoff_initial", "must be greater than 0")
    if policy.backoff_max < policy.backoff_initial:
        fail(f"{key}.backoff_max", "must be at least backoff_initial")
    if policy.max_retries < 1:
        fail(f"{key}.max_retries", "must be at least 1")
    if policy.stable_after <= 0:
        fail(f"{key}.stable_after", "must be greater than 0")


def _convert_file(raw: dict, shown: str) -> FileSettings:
    """Decode section by section so that errors inside a table keyed by service name
    still name the service (msgspec alone would say `services[...]`)."""
    services = raw.pop("services", {})
    try:
        settings = msgspec.convert(raw, FileSettings)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{shown}: {_explain(exc, '')}") from None
    if not isinstance(services, dict):
        raise ConfigError(f"{shown}: services: expected a table of [services.NAME] tables")
    for name, table in services.items():
        try:
            settings.services[name] = msgspec.convert(table, ServiceSettings)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{shown}: {_explain(exc, f'services.{name}')}") from None
    return settings


def _explain(exc: msgspec.ValidationError, prefix: str) -> str:
    """Turn msgspec's 'Expected `int`, got `str` - at `$.instances`' (under prefix
    'services.auth') into 'services.auth.instances: expected `int`, got `str`'."""
    text = str(exc)
    message, sep, where = text.rpartition(" - at `")
    if not sep:
        message, where = text, "$`"
    path = where.rstrip("`").removeprefix("$").lstrip(".")
    path = ".".join(p for p in (prefix, path) if p)
    unknown = re.match(r"Object contains unknown field `([^`]+)`", message)
    if unknown:
        full = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
        return f"{full}: unknown key"
    message = message[:1].lower() + message[1:]
    return f"{path or '(top level)'}: {message}"


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
