"""Structured JSON logging: one object per line on stdout, with service and instance.

The supervisor files each process's stdout; a JSON line per event keeps those files
greppable and machine-readable. Secrets never go in a message: callers log ids and
kinds of errors, not headers, bodies or DSNs.

Inside a service, the request being served is known through context variables set by
the request middleware (shared/kit/web.py): every line logged while serving it carries its
`request_id`, so one grep follows a request across the gateway, sidecars and apps.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time

import msgspec

_encode = msgspec.json.Encoder(enc_hook=str).encode  # an odd extra value must not lose the line

# Set per request by shared.kit.web's middleware; each aiohttp request runs in its own task,
# so these never leak from one request to another.
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
traceparent: contextvars.ContextVar[str] = contextvars.ContextVar("traceparent", default="")

# Extra fields whose values must never reach a log file, whatever a caller passes.
SECRET_FIELDS = frozenset({"password", "new_password", "token", "access_token", "refresh_token",
                           "authorization", "secret", "dsn", "cookie"})


class JsonFormatter(logging.Formatter):
    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__()
        self.fields = fields

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **self.fields,
        }
        rid = request_id.get()
        if rid and not getattr(record, "background", False):
            entry["request_id"] = rid
        extra = getattr(record, "fields", None)
        if extra:
            entry.update({k: "[redacted]" if k.lower() in SECRET_FIELDS else v for k, v in extra.items()})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _encode(entry).decode()


class BackgroundNoise(logging.Filter):
    """For a library's background upkeep (asyncpg's pool re-opening connections while
    PostgreSQL is down, about once a second): the error's type instead of a traceback,
    which is the same every time and may quote a DSN, and no request id, which is only
    that of the request during which the upkeep task happened to be created."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.fields = {**(getattr(record, "fields", None) or {}), "error": type(record.exc_info[1]).__name__}
            record.exc_info = None
            record.exc_text = None
        record.background = True
        return True


# Loggers of libraries' background tasks, quieted by BackgroundNoise.
BACKGROUND_LOGGERS = ("asyncpg.pool",)


def setup(component: str, service: str = "", instance: str = "", level: int = logging.INFO) -> None:
    for name in BACKGROUND_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, BackgroundNoise) for f in logger.filters):
            logger.addFilter(BackgroundNoise())
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter({"component": component, "service": service, "instance": instance}))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.Formatter.converter = time.gmtime
