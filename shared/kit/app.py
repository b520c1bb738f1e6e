"""The app factory every service starts from.

`create_app("auth", routes=api, database=True, migrations=folder)` gives an aiohttp app with:
the request-id and error middlewares of shared/kit/web.py, `/health` (checks the database when
the service has one), `/openapi.json` built from the declared routes, Prometheus `/metrics`
(requests by route template and status, latency), a body size limit (413), and a database
pool that survives PostgreSQL being down at start-up. `run(app)` serves it on HOST/PORT
(and on the Unix socket APP_SOCKET, if given) with uvloop and JSON logs; web.run_app handles SIGTERM and drains in-flight requests.

Served by `run`, an app writes one access line per request, health checks aside
(`listener: "app"`, the relay's format and batching: shared.mesh.telemetry), so
`supervisor trace` sees the app's own span and status beside its sidecar's: about 11k
instructions per request (cachegrind), what a sidecar's own line costs.
APP_ACCESS_LOG=0 turns it off.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import asyncpg
import uvloop
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from shared.backoff import Backoff
from shared.kit import db
from shared.kit import log as logsetup
from shared.kit.errors import ApiError, code_for
from shared.kit.openapi import Routes, build_document
from shared.kit.startup import exit_cleanly_if_it_cannot_listen
from shared.kit.web import REQUEST_ID, echo_request_id, errors, json_response, request_context
from shared.mesh.telemetry import AccessLog

log = logging.getLogger("meshvisor.app")

SERVICE = web.AppKey("service", str)
ROUTES = web.AppKey("routes", Routes)
METRICS = web.AppKey("metrics", "HttpMetrics")
VERSION = web.AppKey("version", str)
_OPENAPI_CACHE = web.AppKey("openapi_cache", dict)
DATABASE = web.AppKey("database", "DatabaseHook")

MAX_BODY = 1024 * 1024  # bytes; our APIs take small JSON documents
# The request head a service accepts. The relay in front of it (gateway, sidecar) is the
# one place that bounds heads: above its 64 KiB it answers 431 in the error shape. aiohttp's
# own limits are much lower (8190-byte lines, 128 headers) and it answers those with a
# plain-text 400 that bypasses the error middleware, so they are raised past what a relay
# passes on (the relays add a few headers of their own).
APP_MAX_HEAD = 128 * 1024
SERVER_LIMITS = {"max_line_size": APP_MAX_HEAD, "max_field_size": APP_MAX_HEAD, "max_headers": APP_MAX_HEAD // 4}
SHUTDOWN_TIMEOUT = 10.0  # seconds in-flight requests get after SIGTERM
HEALTH_TIMEOUT = 2.0  # seconds: a health check must answer well inside the checker's interval

Hook = Callable[[web.Application], Awaitable[None]]


def create_app(service: str, *, routes: Routes | None = None, database: bool | str | None = None,
               migrations: str | Path | None = None, on_startup: Iterable[Hook] = (),
               on_cleanup: Iterable[Hook] = (), middlewares: Iterable = (),
               client_max_size: int = MAX_BODY, version: str = "0.1.0") -> web.Application:
    """`database`: None uses DATABASE_URL when it is set, True requires it, a string is the DSN,
    False means no database. `on_startup` hooks run after the first attempt to connect to
    the database: pool_of(app) is the pool, or None while PostgreSQL is not reachable."""
    metrics = HttpMetrics()
    app = web.Application(
        middlewares=[request_context, metrics.middleware, *middlewares, errors],
        client_max_size=client_max_size,
    )
    app[SERVICE] = service
    app[ROUTES] = routes if routes is not None else Routes()
    app[METRICS] = metrics
    app[VERSION] = version
    app[_OPENAPI_CACHE] = {}
    app.on_response_prepare.append(echo_request_id)

    dsn = os.environ.get("DATABASE_URL") if database in (None, True) else database or None
    if database is True and not dsn:
        raise RuntimeError(f"{service} needs a database: DATABASE_URL is not set")
    if dsn:
        app[DATABASE] = DatabaseHook(service, dsn, Path(migrations) if migrations else None)
        app.cleanup_ctx.append(app[DATABASE].context)
    app.on_startup.extend(on_startup)
    app.on_cleanup.extend(on_cleanup)

    app.router.add_get("/health", _health)
    app.router.add_get("/openapi.json", _openapi)
    app.router.add_get("/metrics", _metrics)
    for r in app[ROUTES]:
        app.router.add_route(r.method, r.path, r.handler)
    return app


def get_pool(request: web.Request) -> asyncpg.Pool:
    """The service's pool, or a 503 in the error shape while the database is not reachable yet."""
    pool = pool_of(request.app)
    if pool is None:
        raise ApiError(503, "database unavailable")
    return pool


def pool_of(app: web.Application) -> asyncpg.Pool | None:
    """The pool once connected; None before that and for services without a database."""
    hook = app.get(DATABASE)
    return hook.pool if hook is not None else None


def run(app: web.Application) -> None:
    service = app[SERVICE]
    instance = os.environ.get("INSTANCE_NAME", "")
    logsetup.setup("app", service, instance)
    if os.environ.get("APP_ACCESS_LOG", "1") != "0":
        access = app[METRICS].access = AccessLog(service, instance)

        async def flush_access_log(app: web.Application) -> None:
            access.flush()

        app.on_cleanup.append(flush_access_log)
    with exit_cleanly_if_it_cannot_listen():
        web.run_app(
            app,
            host=os.environ.get("HOST", "127.0.0.1"),
            port=int(os.environ.get("PORT", "8080")),
            # A service with app_socket = true: also here, where its sidecar relays to.
            path=os.environ.get("APP_SOCKET") or None,
            backlog=1024,  # a burst of new connections from the sidecar waits rather than being refused
            loop=uvloop.new_event_loop(),
            access_log=None,  # aiohttp's own: ours is the JSON line of HttpMetrics.access
            print=None,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            **SERVER_LIMITS,
        )


# ---- database ----

class DatabaseHook:
    """Opens the pool (and applies migrations) at start-up. If PostgreSQL is not there yet the
    app still starts, answers 503 on /health, and keeps trying in the background: the
    supervisor may start services and the database together."""

    def __init__(self, service: str, dsn: str, migrations: Path | None) -> None:
        self.service = service
        self.dsn = dsn
        self.migrations = migrations
        self.error = "not connected yet"
        self.pool: asyncpg.Pool | None = None  # held here: the app's state is frozen once it runs
        self._task: asyncio.Task | None = None

    async def context(self, app: web.Application):
        if not await self._connect(app):
            self._task = asyncio.create_task(self._retry(app))
        yield
        if self._task is not None:
            self._task.cancel()
        if self.pool is not None:
            await self.pool.close()

    async def _connect(self, app: web.Application) -> bool:
        pool = None
        try:
            pool = await db.create_pool(self.dsn)
            if self.migrations is not None:
                await db.migrate(pool, self.migrations, service=self.service)
        except Exception as exc:
            if pool is not None:
                await pool.close()
            # The type only: asyncpg messages may quote the DSN, which holds a password.
            self.error = type(exc).__name__
            log.warning("database not ready (%s); /health answers 503 until it is", self.error)
            return False
        self.pool = pool
        return True

    async def _retry(self, app: web.Application) -> None:
        backoff = Backoff(0.5, 10.0)
        while not await self._connect(app):
            await asyncio.sleep(backoff.next())
        log.info("database ready")


async def _health(request: web.Request) -> web.Response:
    app = request.app
    body: dict = {"status": 200, "service": app[SERVICE]}
    if DATABASE in app:
        try:
            pool = app[DATABASE].pool
            if pool is None:
                raise ConnectionError(app[DATABASE].error)
            async with pool.acquire(timeout=HEALTH_TIMEOUT) as conn:
                await conn.fetchval("SELECT 1", timeout=HEALTH_TIMEOUT)
            body["database"] = "ok"
        except Exception as exc:  # the database is down: say so in the error shape, do not crash
            log.warning("health: database unreachable: %s", type(exc).__name__)
            # The error shape plus the health fields, so both kinds of reader understand it.
            return json_response({
                "status": 503, "error": code_for(503), "message": "database unreachable",
                "request_id": request.get(REQUEST_ID, ""), "service": app[SERVICE], "database": "unreachable",
            }, status=503)
    return json_response(body)


async def _openapi(request: web.Request) -> web.Response:
    app = request.app
    cache = app[_OPENAPI_CACHE]
    if "doc" not in cache:  # routes are fixed once the app runs: build it once
        cache["doc"] = json_response(build_document(app[SERVICE], app[ROUTES], app[VERSION])).body
    return web.Response(body=cache["doc"], content_type="application/json")


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(request.app[METRICS].registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


# ---- metrics ----

UNLOGGED_ROUTES = frozenset(("/health", "/metrics"))


class HttpMetrics:
    """Requests by route template (not raw path: ids would explode the label set) and status;
    with `access` (set by `run`), one access line per request too."""

    def __init__(self) -> None:
        self.access: AccessLog | None = None
        # A registry per app: two apps in one process (tests) must not share counters.
        self.registry = CollectorRegistry()
        self.requests = Counter("http_requests", "HTTP requests served",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("http_request_duration_seconds", "Time to produce the response",
                                 ["method", "route"], registry=self.registry)

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            seconds = time.perf_counter() - started
            route = _route_template(request)
            self.requests.labels(request.method, route, str(status)).inc()
            self.latency.labels(request.method, route).observe(seconds)
            # Not for /health (the sidecar's probe and Consul's check, every second or
            # two) nor /metrics (Prometheus, every scrape): lines no one traces.
            if self.access is not None and route not in UNLOGGED_ROUTES:
                # the id from request_context's context variable: a C call, where the
                # request's own mapping goes through Python's Mapping.get
                self.access.record("app", request.method, request.raw_path, status, seconds, "",
                                   logsetup.request_id.get(), 0)


def _route_template(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"
