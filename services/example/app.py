"""The example service. Today it serves /health (with its database check); its API comes next."""

from aiohttp import web

from shared.app import create_app


def build() -> web.Application:
    return create_app("example")
