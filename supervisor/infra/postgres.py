"""PostgreSQL for the services: an embedded server in the state dir, or an external one.

Embedded: `initdb` on first start, then `postgres` on its own port bound to 127.0.0.1,
with its Unix socket in a private folder. PostgreSQL refuses to run as root, so a root
supervisor runs it as the `postgres` user with the data owned by that user.

Either way every service that declares a database gets one database and one login role
of its own. Other roles may not connect to it. Its password is derived from the Consul
management token when ACLs are on (HMAC-SHA256: every host of a cluster holds that token,
so every host computes the same password and none resets another's), else generated and
kept in <state_dir>/postgres/credentials.json (mode 0600).

Across hosts: one host runs the embedded server with `listen` (its advertise address)
and `allow` (the hosts' networks), which adds password logins from there, for the
services' roles on their own databases only (never the superuser); the other hosts say
`mode = "peer"` with its `address` and make no roles themselves.
"""

from __future__ import annotations

import asyncio
import base64
import glob
import hashlib
import hmac
import json
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import asyncpg

from supervisor.config import Config
from supervisor.infra import InfraError, server_spec
from supervisor.process import ProcessSpec

SUPERUSER = "postgres"


@dataclass
class Layout:
    bin_dir: Path
    data_dir: Path
    socket_dir: Path
    uid: int | None  # None: run as ourselves
    gid: int | None


def layout(config: Config) -> Layout:
    pg = config.postgres
    bin_dir = Path(pg.bin_dir) if pg.bin_dir else _find_bin_dir()
    base = config.state_dir / "postgres"
    data_dir = Path(pg.data_dir) if pg.data_dir else base / "data"
    if not data_dir.is_absolute():
        data_dir = config.root / data_dir
    uid = gid = None
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            raise InfraError(
                "running as root, the embedded PostgreSQL needs the unprivileged 'postgres' user "
                "(Debian's postgresql package creates it)"
            ) from None
        uid, gid = user.pw_uid, user.pw_gid
        for path in (data_dir.parent, config.state_dir):
            blocked = _first_unreachable(path, uid, gid)
            if blocked:
                raise InfraError(
                    f"PostgreSQL runs as user 'postgres', which cannot enter {blocked}; "
                    f"give others search permission on it (chmod o+x {blocked}) "
                    "or set postgres.data_dir / supervisor.state_dir to a reachable folder"
                )
    return Layout(bin_dir=bin_dir, data_dir=data_dir, socket_dir=base / "run", uid=uid, gid=gid)


def _find_bin_dir() -> Path:
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return Path(candidates[-1]).parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip()
        if out and (Path(out) / "postgres").exists():
            return Path(out)
    found = shutil.which("postgres")
    if found:
        return Path(found).parent
    raise InfraError("no PostgreSQL server binaries (postgres, initdb): run `make setup` or set postgres.bin_dir")


def _first_unreachable(path: Path, uid: int, gid: int) -> Path | None:
    """The first folder on the way to `path` that uid/gid may not traverse."""
    current = Path("/")
    for part in path.resolve().parts[1:]:
        current = current / part
        try:
            st = current.stat()
        except FileNotFoundError:
            return None  # we create the rest, with traversable modes
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return current
    return None


def _owned_dir(path: Path, lay: Layout) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    if lay.uid is not None:
        os.chown(path, lay.uid, lay.gid)


async def initdb(lay: Layout, log) -> None:
    """Create the cluster on first start; a no-op once PG_VERSION exists."""
    lay.data_dir.parent.mkdir(parents=True, exist_ok=True)
    _owned_dir(lay.socket_dir, lay)
    if (lay.data_dir / "PG_VERSION").exists():
        return
    if lay.data_dir.exists() and any(lay.data_dir.iterdir()):
        raise InfraError(f"{lay.data_dir} is not empty and holds no PostgreSQL cluster")
    _owned_dir(lay.data_dir, lay)
    log.write(f"[meshvisor] initdb {lay.data_dir}".encode())
    proc = await asyncio.create_subprocess_exec(
        str(lay.bin_dir / "initdb"),
        "-D", str(lay.data_dir),
        "-U", SUPERUSER,
        "--auth-local=trust",  # the socket folder is private to the server's user
        "--auth-host=scram-sha-256",
        "--encoding=UTF8", "--locale=C",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=str(lay.data_dir.parent),
        user=lay.uid,
        group=lay.gid,
        extra_groups=[] if lay.uid is not None else None,
    )
    out, _ = await proc.communicate()
    for line in out.splitlines():
        log.write(line)
    if proc.returncode != 0:
        raise InfraError(f"initdb failed with code {proc.returncode}; see the postgres log")


def spec(config: Config, lay: Layout, env: dict[str, str]) -> ProcessSpec:
    port = config.postgres.port
    argv = [
        str(lay.bin_dir / "postgres"),
        "-D", str(lay.data_dir),
        "-p", str(port),
        "-c", f"listen_addresses={','.join(['127.0.0.1'] + ([config.postgres.listen] if config.postgres.listen else []))}",
        "-c", f"unix_socket_directories={lay.socket_dir}",
        "-c", "logging_collector=off",
        "-c", "password_encryption=scram-sha-256",
    ]
    if config.postgres.listen:
        argv += ["-c", f"hba_file={write_hba(config, lay)}"]
    # SIGINT is PostgreSQL's "fast shutdown": roll back clients, checkpoint, exit.
    return server_spec(
        "postgres", argv, env, str(lay.data_dir), stop_timeout=30.0, stop_signal=signal.SIGINT,
        user=lay.uid, group=lay.gid, port=port, ready_check=lambda: _accepts(lay.socket_dir, port),
    )


def write_hba(config: Config, lay: Layout) -> Path:
    """Who may log in, with `listen`: initdb's rules (the private socket folder: trust;
    loopback: passwords), and from each `allow` network each service's role, with its
    password, to its own database only."""
    lines = ["local all all trust", "host all all 127.0.0.1/32 scram-sha-256", "host all all ::1/128 scram-sha-256"]
    for network in config.postgres.allow:
        for service in config.services.values():
            if service.database and not service.database_url:
                lines.append(f"host {service.database} {service.database} {network} scram-sha-256")
    path = lay.data_dir.parent / "pg_hba.conf"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# written by the supervisor at every start: [postgres] listen/allow\n" + "\n".join(lines) + "\n")
    if lay.uid is not None:
        os.chown(tmp, lay.uid, lay.gid)
    os.replace(tmp, path)
    return path


def derived_password(secret: str, role: str) -> str:
    """The role's password on every host that holds `secret` (the management token)."""
    digest = hmac.new(secret.encode(), f"meshvisor/postgres/{role}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


async def _accepts(socket_dir: Path, port: int) -> bool:
    conn = await asyncpg.connect(host=str(socket_dir), port=port, user=SUPERUSER, database="postgres", timeout=2)
    await conn.close()
    return True


async def admin_connect(config: Config, lay: Layout | None) -> asyncpg.Connection:
    if config.postgres.mode == "embedded":
        assert lay is not None
        return await asyncpg.connect(
            host=str(lay.socket_dir), port=config.postgres.port, user=SUPERUSER, database="postgres", timeout=10
        )
    return await asyncpg.connect(config.postgres.dsn, timeout=10)


class Credentials:
    """<state_dir>/postgres/credentials.json: role passwords, readable by the owner only."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "postgres" / "credentials.json"

    def load(self) -> dict[str, str]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}

    def save(self, data: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, self.path)


async def provision(config: Config, lay: Layout | None, secret: str = "") -> dict[str, str]:
    """Make one database + role per service that needs one. Returns {service: base DSN}.
    `secret`: the cluster's management token, from which the passwords are derived."""
    wanted = {s.name: s.database for s in config.services.values() if s.database and not s.database_url}
    dsns = {s.name: s.database_url for s in config.services.values() if s.database_url}
    if not wanted:
        return dsns
    if config.postgres.mode == "peer":  # the roles are made by the host that runs the server
        return dsns | {service: _dsn(config, db, derived_password(secret, db), db) for service, db in wanted.items()}
    creds = Credentials(config.state_dir)
    passwords = {} if secret else creds.load()
    changed = False
    conn = await admin_connect(config, lay)
    try:
        for service, database in wanted.items():
            role = database
            password = derived_password(secret, role) if secret else passwords.get(role)
            if password is None:
                password = secrets.token_urlsafe(24)
                passwords[role] = password
                changed = True
            exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
            verb = "ALTER" if exists else "CREATE"
            # Role names are validated identifiers; the password is URL-safe base64.
            await conn.execute(f"{verb} ROLE \"{role}\" LOGIN PASSWORD '{password}'")
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database):
                await conn.execute(f'CREATE DATABASE "{database}" OWNER "{role}"')
            await conn.execute(f'REVOKE ALL ON DATABASE "{database}" FROM PUBLIC')
            await conn.execute(f'GRANT ALL ON DATABASE "{database}" TO "{role}"')
            dsns[service] = _dsn(config, role, password, database)
    finally:
        await conn.close()
    if not secret and (changed or not creds.path.exists()):
        creds.save(passwords)
    return dsns


def _dsn(config: Config, role: str, password: str, database: str) -> str:
    """The service's DSN: its role and database, at the server's address.

    For an external server the address is the admin DSN's, whether it names a host:port
    or passes host/port as query parameters (a Unix socket folder, several hosts).
    """
    credentials = f"{quote(role, safe='')}:{quote(password, safe='')}"
    if config.postgres.mode == "embedded":
        return f"postgresql://{credentials}@127.0.0.1:{config.postgres.port}/{quote(database)}"
    if config.postgres.mode == "peer":
        return f"postgresql://{credentials}@{config.postgres.address}/{quote(database)}"
    parts = urlsplit(config.postgres.dsn)
    location = parts.netloc.rpartition("@")[2]
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("user", "password", "dbname", "database")]
    suffix = f"?{urlencode(query)}" if query else ""
    return f"{parts.scheme}://{credentials}@{location}/{quote(database)}{suffix}"
