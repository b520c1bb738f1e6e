"""Talking to Consul: one way to make a client, to call the agent's HTTP API, to learn the
agent's version, to build registrations that agent accepts, and to report outages once.

Sidecars, the gateway and the supervisor all go through here, so that timeouts, the token
header and version quirks are handled in one place.
"""

from __future__ import annotations

import json
import logging
import os
import re
import urllib.parse
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import consul.aio
from consul.base import Response

DEFAULT_ADDRESS = "127.0.0.1:8500"
DEFAULT_PORT = 8500

# Every request that is not a blocking query must answer within this. Blocking queries
# pass their own, longer timeout (their wait plus this margin).
REQUEST_TIMEOUT = 10.0

# Consul caps a blocking query's wait at 10 minutes.
MAX_WAIT = 600.0

Version = tuple[int, int, int]
LogTarget = logging.Logger | Callable[[str], None] | None


def parse_address(address: str) -> tuple[str, int]:
    """'127.0.0.1:8500', 'http://localhost:8500', '[::1]:8500', 'localhost' -> (host, port)."""
    text = address.strip()
    if "://" not in text:
        text = "//" + text
    parts = urllib.parse.urlsplit(text)
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as exc:
        raise ValueError(f"bad Consul address {address!r}: {exc}") from None
    if not parts.hostname:
        raise ValueError(f"bad Consul address {address!r}: no host")
    return parts.hostname, port


def make_client(address: str = DEFAULT_ADDRESS, token: str = "") -> consul.aio.Consul:
    """An asyncio Consul client for the agent at `address` (HOST:PORT, or an http(s) URL).

    Call it from inside the running event loop: aiohttp binds its session to the loop.
    Close it with `await client.close()`.

    The token travels in the X-Consul-Token header (py-consul's own behaviour; `?token=`
    is gone from newer Consul). An empty `token` falls back to CONSUL_HTTP_TOKEN, as
    Consul's own CLI does.
    """
    host, port = parse_address(address)
    scheme = "https" if address.strip().lower().startswith("https://") else "http"
    url_host = f"[{host}]" if ":" in host else host  # py-consul pastes the host into its URLs
    with warnings.catch_warnings():
        # py-consul 1.8.0 hands aiohttp its deprecated verify_ssl/ssl_context arguments.
        warnings.simplefilter("ignore", DeprecationWarning)
        client = consul.aio.Consul(
            host=url_host,
            port=port,
            scheme=scheme,
            # Without this an http client builds (and never uses) a CA-loaded TLS context.
            verify=scheme == "https",
            # The session default applies to py-consul's own methods; without it a
            # request to a hung agent would wait aiohttp's 5 minutes.
            connections_timeout=REQUEST_TIMEOUT,
        )
    # py-consul lets CONSUL_HTTP_TOKEN override an explicit token; we want the reverse.
    client.token = token or os.environ.get("CONSUL_HTTP_TOKEN") or None
    return client


class ConsulError(Exception):
    """The agent answered, with a status that the caller did not expect."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path}: {status} {body.strip()[:200]}")
        self.status = status
        self.body = body


@dataclass(frozen=True, slots=True)
class Reply:
    """One HTTP answer from the agent, whatever its status."""

    method: str
    path: str
    status: int
    headers: Mapping[str, str]
    body: str

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def index(self) -> int:
        """X-Consul-Index (0 when absent or not a number)."""
        try:
            return int(self.headers.get("X-Consul-Index", "0"))
        except ValueError:
            return 0

    @property
    def content_hash(self) -> str:
        """X-Consul-ContentHash: the agent endpoints' blocking token."""
        return self.headers.get("X-Consul-ContentHash", "")

    def json(self) -> Any:
        return json.loads(self.body)

    def raise_for_status(self) -> Reply:
        if not self.ok:
            raise ConsulError(self.method, self.path, self.status, self.body)
        return self


async def call(
    client: consul.aio.Consul,
    method: str,
    path: str,
    *,
    params: Iterable[tuple[str, str]] = (),
    payload: Any = None,
    timeout: float = REQUEST_TIMEOUT,
) -> Reply:
    """One request through the client's session (its token, its connection pool).

    py-consul's endpoint methods cannot send `stale` on health queries, cannot give a
    blocking query a timeout longer than the session's, and turn 404 into None; this
    goes one level down, to its HTTP adapter, and hands back status, headers and body.
    Connection failures and timeouts raise (aiohttp.ClientError, TimeoutError).
    """
    headers = client.prepare_headers()
    query = list(params)
    http = client.http

    def keep(response: Response) -> Reply:
        return Reply(method, path, response.code, response.headers, response.body)

    if method == "GET":
        return await http.get(keep, path, params=query, headers=headers, connections_timeout=timeout)
    data = "" if payload is None else json.dumps(payload)
    if payload is not None:
        headers["Content-Type"] = "application/json"
    if method == "PUT":
        return await http.put(keep, path, params=query, data=data, headers=headers, connections_timeout=timeout)
    if method == "POST":
        return await http.post(keep, path, params=query, data=data, headers=headers, connections_timeout=timeout)
    if method == "DELETE":
        return await http.delete(keep, path, params=query, data=data, headers=headers, connections_timeout=timeout)
    raise ValueError(f"unsupported method {method}")


def duration(seconds: float) -> str:
    """Seconds as a Go duration for Consul's `wait` and check fields ('1500ms')."""
    return f"{max(0, round(seconds * 1000))}ms"


# ---------------------------------------------------------------------------------------
# The agent's version, and payloads it accepts

_versions: weakref.WeakKeyDictionary[consul.aio.Consul, Version] = weakref.WeakKeyDictionary()


def parse_version(text: str) -> Version:
    """'1.8.7' -> (1, 8, 7); '1.10.0-beta1' -> (1, 10, 0); 'v1.9' -> (1, 9, 0)."""
    match = re.match(r"v?(\d+)\.(\d+)(?:\.(\d+))?", text.strip())
    if not match:
        raise ValueError(f"not a Consul version: {text!r}")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


# The oldest agent this code is written and tested for (Debian bullseye's Consul).
OLDEST_SUPPORTED: Version = (1, 8, 7)


async def agent_version(client: consul.aio.Consul) -> Version:
    """The oldest Consul version among the cluster's members (the `build` tag of
    /v1/agent/members), asked once per client: only fields every agent knows go out.

    Not /v1/agent/self: it needs agent:read, which a service identity's token lacks, and
    each refusal is an ERROR line in the agent's log. Members need node:read, which such
    a token has; where even that is missing (the list comes back filtered to nothing),
    the oldest agent we support is assumed.
    """
    cached = _versions.get(client)
    if cached is None:
        reply = await call(client, "GET", "/v1/agent/members")
        builds = [m.get("Tags", {}).get("build", "") for m in (reply.json() if reply.ok else [])]
        versions = [parse_version(b) for b in builds if b and b[0].isdigit()]
        if not reply.ok and reply.status != 403:
            reply.raise_for_status()
        cached = min(versions) if versions else OLDEST_SUPPORTED
        _versions[client] = cached
    return cached


# Check fields that came after Consul 1.0, with the release that introduced each. Since
# 1.7 an agent answers 400 ("json: unknown field") to a field it does not know, so these
# are only sent to agents that have them. The other fields used here are in the v1 API
# since 1.0, and Consul keeps them.
CHECK_FIELDS_SINCE: dict[str, Version] = {
    "SuccessBeforePassing": (1, 7, 0),
    "FailuresBeforeCritical": (1, 7, 0),
    "H2PING": (1, 10, 0),
    "FailuresBeforeWarning": (1, 11, 0),
}


def http_check(
    url: str,
    *,
    check_id: str,
    name: str,
    interval: str,
    timeout: str,
    deregister_after: str,
    status: str,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """An HTTP health check definition for a service registration.

    `options` are further check fields (e.g. {"FailuresBeforeCritical": 2}); those the
    agent is too old for are dropped by `registration_payload`.
    """
    return {
        **(options or {}),
        "CheckID": check_id,
        "Name": name,
        "HTTP": url,
        "Interval": interval,
        "Timeout": timeout,
        "DeregisterCriticalServiceAfter": deregister_after,
        "Status": status,
    }


def registration_payload(
    *,
    service_id: str,
    name: str,
    address: str,
    port: int,
    meta: Mapping[str, str] | None = None,
    tags: Iterable[str] = (),
    check: Mapping[str, Any] | None = None,
    connect_native: bool = False,
    version: Version,
) -> dict[str, Any]:
    """The body of PUT /v1/agent/service/register that an agent of `version` accepts.

    `connect_native`: the instance speaks Connect's mTLS itself (our sidecar does): it is
    then listed by /v1/health/connect/<name> and shown in the UI as part of the mesh."""
    payload: dict[str, Any] = {
        "ID": service_id,
        "Name": name,
        "Address": address,
        "Port": port,
        "Meta": dict(meta or {}),
        "Tags": list(tags),
    }
    if connect_native:
        payload["Connect"] = {"Native": True}
    if check is not None:
        payload["Check"] = {
            key: value for key, value in check.items() if version >= CHECK_FIELDS_SINCE.get(key, (0, 0, 0))
        }
    return payload


# ---------------------------------------------------------------------------------------
# Outages: retry quietly, say it once


class Log:
    """`log` as the modules here accept it: a logging.Logger or any callable(str)."""

    def __init__(self, target: LogTarget, default: str) -> None:
        if target is None:
            target = logging.getLogger(default)
        self._logger: logging.Logger | None = target if isinstance(target, logging.Logger) else None
        self._call: Callable[[str], None] | None = None if self._logger is not None else target

    def warning(self, message: str) -> None:
        self._emit(logging.WARNING, message)

    def info(self, message: str) -> None:
        self._emit(logging.INFO, message)

    def debug(self, message: str) -> None:
        # A plain callable gets what an operator needs, not the chatter.
        if self._logger is not None:
            self._logger.debug(message)

    def _emit(self, level: int, message: str) -> None:
        if self._logger is not None:
            self._logger.log(level, message)
        elif self._call is not None:
            self._call(message)


def describe(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class OutageReporter:
    """Logs once when Consul becomes unavailable (unreachable, timing out, failing) and once
    when it is back, not on every retry."""

    def __init__(self, log: Log, what: str) -> None:
        self._log = log
        self._what = what
        self.down = False
        self.problem = ""  # while down: the first failure, described

    def failed(self, error: BaseException, consequence: str = "") -> None:
        if self.down:
            return
        self.down = True
        self.problem = f"{self._what}: {describe(error)}"
        suffix = f"; {consequence}" if consequence else ""
        self._log.warning(f"Consul unavailable ({self._what}): {describe(error)}{suffix}; retrying")

    def recovered(self) -> None:
        if self.down:
            self.down = False
            self.problem = ""
            self._log.info(f"Consul reachable again ({self._what})")
