"""The control API: JSON over HTTP on a Unix socket in the state dir (owner only).

  GET  /v1/status                     every process with its figures
  GET  /v1/cluster                    every node and service instance, as Consul sees them
  POST /v1/scale    {"counts": {...}}  set instance counts, answer when done
  POST /v1/restart  {"target": "auth" | "auth.2"}  rolling restart, answer when done
  POST /v1/reload                     read the Procfile and the config again, apply what changed
  POST /v1/services/NAME/stop         stop one service (drained), remembered as stopped
  POST /v1/services/NAME/start        start it again with its count
  POST /v1/stop                       stop the stack and the supervisor

The verbs that act answer {"ok", "problems", "changes"} when done: 200, or 409 with the
problems (an unknown service is one of them).

The server is typed against the small `Controllable` Protocol, not the daemon: the
daemon imports this module to serve it, and this module imports nothing of the daemon.
The client is supervisor/control_client.py, apart so that the CLI does not import aiohttp.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import msgspec
from aiohttp import web


class Controllable(Protocol):
    """What the control API drives: the running supervisor (the verbs are supervisor/verbs.py)."""

    def status(self) -> dict: ...

    async def scale(self, counts: dict[str, int]) -> list[str]: ...

    async def restart(self, target: str) -> list[str]: ...

    async def reload(self) -> tuple[list[str], list[str]]:
        """(what changed, problems): see supervisor/reload.py."""
        ...

    async def stop_service(self, name: str) -> list[str]: ...

    async def start_service(self, name: str) -> list[str]: ...

    def request_stop(self, reason: str) -> None: ...

    async def refresh_consul_health(self) -> None: ...

    async def cluster(self) -> msgspec.Struct:
        """The cluster read from Consul (supervisor/cluster.py's Picture), with the
        supervisor's own token; raises ConnectionError when the agent does not answer."""
        ...


class ScaleRequest(msgspec.Struct, forbid_unknown_fields=True):
    counts: dict[str, int]


class RestartRequest(msgspec.Struct, forbid_unknown_fields=True):
    target: str


class Outcome(msgspec.Struct):
    ok: bool
    problems: list[str] = []
    changes: list[str] = []


def _json(data, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json")


async def _decode(request: web.Request, kind):
    try:
        return msgspec.json.decode(await request.read(), type=kind)
    except msgspec.DecodeError as exc:
        raise web.HTTPBadRequest(
            body=msgspec.json.encode(Outcome(ok=False, problems=[str(exc)])), content_type="application/json"
        ) from None


def build_app(daemon: Controllable) -> web.Application:
    async def status(request: web.Request) -> web.Response:
        await daemon.refresh_consul_health()
        return _json(daemon.status())

    async def cluster(request: web.Request) -> web.Response:
        try:
            return _json(await daemon.cluster())
        except ConnectionError as exc:
            return _json(Outcome(ok=False, problems=[str(exc)]), 503)

    async def scale(request: web.Request) -> web.Response:
        body = await _decode(request, ScaleRequest)
        problems = await daemon.scale(body.counts)
        return _json(Outcome(ok=not problems, problems=problems), 200 if not problems else 409)

    async def restart(request: web.Request) -> web.Response:
        body = await _decode(request, RestartRequest)
        problems = await daemon.restart(body.target)
        return _json(Outcome(ok=not problems, problems=problems), 200 if not problems else 409)

    async def reload(request: web.Request) -> web.Response:
        changes, problems = await daemon.reload()
        return _json(Outcome(ok=not problems, problems=problems, changes=changes), 200 if not problems else 409)

    async def service_verb(request: web.Request) -> web.Response:
        name, verb = request.match_info["name"], request.match_info["verb"]
        problems = await (daemon.stop_service(name) if verb == "stop" else daemon.start_service(name))
        return _json(Outcome(ok=not problems, problems=problems), 200 if not problems else 409)

    async def stop(request: web.Request) -> web.Response:
        daemon.request_stop("stop requested through the control API")
        return _json(Outcome(ok=True), 202)

    app = web.Application()
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/cluster", cluster)
    app.router.add_post("/v1/scale", scale)
    app.router.add_post("/v1/restart", restart)
    app.router.add_post("/v1/reload", reload)
    app.router.add_post("/v1/services/{name}/{verb:stop|start}", service_verb)
    app.router.add_post("/v1/stop", stop)
    return app


class ControlServer:
    def __init__(self, daemon: Controllable, path: Path) -> None:
        self.path = path
        self._runner = web.AppRunner(build_app(daemon), access_log=None, handle_signals=False)

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)
        await self._runner.setup()
        old = os.umask(0o177)
        try:
            await web.UnixSite(self._runner, str(self.path)).start()
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        await self._runner.cleanup()
        self.path.unlink(missing_ok=True)

