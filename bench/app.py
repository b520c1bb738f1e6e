"""The benchmark's app: an aiohttp app with one small JSON endpoint (and /health), on
127.0.0.1:$PORT and, like a service with app_socket = true, on the Unix socket $APP_SOCKET."""

import os

import uvloop
from aiohttp import web


async def hello(request: web.Request) -> web.Response:
    return web.json_response({"message": "hello", "items": [1, 2, 3], "ok": True})


app = web.Application()
app.router.add_get("/{tail:.*}", hello)  # any path: behind the gateway it sees /api/v1/bench/
uvloop.install()
web.run_app(app, host="127.0.0.1", port=int(os.environ["PORT"]), path=os.environ.get("APP_SOCKET") or None,
            access_log=None, print=None)
