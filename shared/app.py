"""The app factory every service starts from: JSON /health that checks the database,
an asyncpg pool from DATABASE_URL, uvloop, graceful shutdown on SIGTERM."""

from __future__ import annotations

import logging
import os
import time

import asyncpg
import uvloop
from aiohttp import web

log = logging.getLogger("meshvisor.app")

POOL = web.AppKey("pool", asyncpg.Pool)


def create_app(service: str) -> web.Application:
    app = web.Application()
    app["service"] = service
    dsn = os.environ.get("DATABASE_URL")
    if dsn:
        app.cleanup_ctx.append(_pool(dsn))
    app.router.add_get("/health", _health)
    return app


def _pool(dsn: str):
    async def ctx(app: web.Application):
        app[POOL] = await asyncpg.create_pool(dsn, min_size=1, max_size=5, timeout=5)
        yield
        await app[POOL].close()

    return ctx


async def _health(request: web.Request) -> web.Response:
    app = request.app
    body = {"status": 200, "service": app["service"], "timestamp": int(time.time() * 1000)}
    pool = app.get(POOL)
    if pool is not None:
        try:
            async with pool.acquire(timeout=2) as conn:
                await conn.fetchval("SELECT 1", timeout=2)
            body["database"] = "ok"
        except Exception as exc:  # the database is down: say so, do not crash
            log.warning("health: database unreachable: %s", type(exc).__name__)
            body.update(status=503, database="unreachable")
    return web.json_response(body, status=body["status"])


def run(app: web.Application) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    uvloop.install()
    web.run_app(
        app,
        host=os.environ.get("HOST", "127.0.0.1"),
        port=int(os.environ.get("PORT", "8080")),
        access_log=None,
        print=None,
        shutdown_timeout=5,
    )
