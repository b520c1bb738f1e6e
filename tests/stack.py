"""The real application stack for end-to-end tests: gateway, auth and example with their
sidecars, started by the supervisor on a Consul agent, and a small blocking client that
talks to it through the gateway."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from tests.helpers import PY, Project, free_ports, stack_settings


def app_stack(consul: str, *, auth: int = 2, example: int = 1, postgres_dsn: str = "",
              extra_procfile: str = "", extra_config: str = "") -> Project:
    """A Project running the shipped services on the Consul agent at `consul`.

    PostgreSQL is embedded (in the project's state dir) unless `postgres_dsn`, an admin
    DSN of an external server, is given. The project's `url` is the gateway's. Not started:
    call `start()`.
    """
    gateway, pg = free_ports(2)
    postgres = (f'mode = "external"\ndsn = "{postgres_dsn}"' if postgres_dsn else f"port = {pg}")
    p = Project(
        f"gateway: {PY} -m services.gateway\nauth: {PY} -m services.auth\nexample: {PY} -m services.example\n"
        + extra_procfile,
        f"""{stack_settings(consul, start_timeout=30.0)}
[postgres]
{postgres}

[services.gateway]
port = {gateway}
sidecar = false
env = {{ GATEWAY_DRAIN_SECONDS = "0.5" }}

[services.auth]
instances = {auth}
route = "/api/v1/auth"
openapi = "/openapi.json"
database = "auth"
drain_seconds = 0.5

[services.example]
instances = {example}
route = "/api/v1/example"
openapi = "/openapi.json"
database = "example"
upstreams = ["auth"]
idempotency_key = true
drain_seconds = 0.5
{extra_config}
""")
    p.url = f"http://127.0.0.1:{gateway}"
    return p


def call(p: Project, method: str, path: str, body=None, token: str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict | None]:
    """(status, decoded JSON body or None) of one request through the gateway."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(p.url + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=15) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as err:
        raw = err.read()
        return err.code, json.loads(raw) if raw else None


def shaped(status: int, body: dict | None, expected: int) -> dict:
    """Assert a response is `expected` in the shared error shape, without a traceback."""
    assert status == expected, (status, body)
    assert body is not None and {"status", "error", "message", "request_id"} <= set(body)
    assert body["status"] == expected and "Traceback" not in json.dumps(body)
    return body


def user(p: Project, email: str, name: str, password: str = "long password") -> tuple[dict, str]:
    """Register and log in; (profile, access token)."""
    status, profile = call(p, "POST", "/api/v1/auth/register", {"email": email, "password": password, "name": name})
    assert status == 201, profile
    status, pair = call(p, "POST", "/api/v1/auth/login", {"email": email, "password": password})
    assert status == 200, pair
    return profile, pair["access_token"]
