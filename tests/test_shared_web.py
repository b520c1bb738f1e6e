"""The web layer every service is built on: error shape, request ids, decoding, contracts,
OpenAPI, metrics and health (shared/kit/app.py, web.py, errors.py, types.py, openapi.py, log.py)."""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import uuid

import msgspec
import pytest
from aiohttp import web

from shared.kit import log as logsetup
from shared.kit.app import create_app
from shared.kit.errors import ApiError
from shared.kit.openapi import Routes, to_openapi30
from services.auth.contract import LoginRequest, PublicUser, RegisterRequest, TokenPair, UserProfile
from services.example.contract import Item, ItemCreate, ItemPage, ItemUpdate
from shared.kit.fields import Pagination
from shared.kit.web import decode, json_response, outgoing_headers, query

SECRET = "correct-horse-battery-staple"
ERROR_KEYS = {"status", "error", "message", "request_id"}


def sample_routes() -> Routes:
    api = Routes()

    @api.post("/api/v1/auth/register", request=RegisterRequest, response=UserProfile, status=201,
              summary="Create an account", errors=(409,))
    async def register(request):
        body = await decode(request, RegisterRequest)
        logging.getLogger("test.handler").info("registering %r", body)
        return json_response(UserProfile(id=uuid.uuid4(), email=body.email, name=body.name,
                                         created_at=__import__("datetime").datetime(2026, 1, 1)), status=201)

    @api.post("/api/v1/auth/login", request=LoginRequest, response=TokenPair, errors=(401,))
    async def login(request):
        await decode(request, LoginRequest, max_size=64)
        raise ApiError(401, "wrong email or password", headers={"WWW-Authenticate": "Bearer"})

    @api.get("/api/v1/example/items", query=Pagination, response=ItemPage, auth=True)
    async def list_items(request):
        page = query(request, Pagination)
        return json_response(ItemPage(items=[], total=0, limit=page.limit, offset=page.offset))

    @api.patch("/api/v1/example/items/{id}", params={"id": uuid.UUID}, request=ItemUpdate, response=Item,
               auth=True, errors=(403,))
    async def update_item(request):
        return json_response((await decode(request, ItemUpdate)).changes())

    @api.get("/api/v1/example/items/{id:[0-9a-f-]+}/owner", response=PublicUser)
    async def item_owner(request):
        raise web.HTTPNotFound(text="item not found")

    @api.get("/boom")
    async def boom(request):
        return 1 / 0

    @api.get("/context")
    async def context(request):
        return web.json_response(outgoing_headers())

    return api


@pytest.fixture
def captured_log():
    """JSON log lines, as shared.kit.log.setup would write them to stdout."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logsetup.JsonFormatter({"component": "app", "service": "test", "instance": "test.1"}))
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(old_level)


@pytest.fixture
async def client(aiohttp_client, monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    return await aiohttp_client(create_app("test", routes=sample_routes(), client_max_size=4096))


async def error_of(resp, status: int) -> dict:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert ERROR_KEYS <= body.keys() and body["status"] == status
    assert body["request_id"] == resp.headers["X-Request-Id"]
    assert "Traceback" not in json.dumps(body)
    return body


# ---- the error shape ----

async def test_validation_error_names_the_field(client):
    resp = await client.post("/api/v1/auth/register", json={"email": "not-an-email", "password": SECRET, "name": "A"})
    body = await error_of(resp, 422)
    assert body["error"] == "validation_error"
    assert body["details"][0]["field"] == "email"


@pytest.mark.parametrize("payload, field", [
    ({"email": "a@b.io", "password": "short", "name": "A"}, "password"),
    ({"email": "a@b.io", "password": SECRET}, "name"),  # missing
    ({"email": "a@b.io", "password": SECRET, "name": "A", "admin": True}, "admin"),  # unknown
    ({"email": "a@b.io", "password": SECRET, "name": "   "}, "name"),  # blank after stripping
    ({"email": 5, "password": SECRET, "name": "A"}, "email"),  # wrong type
])
async def test_each_kind_of_validation_error_names_its_field(client, payload, field):
    body = await error_of(await client.post("/api/v1/auth/register", json=payload), 422)
    assert body["details"][0]["field"] == field


async def test_nested_field_path(client):
    body = await error_of(await client.patch(f"/api/v1/example/items/{uuid.uuid4()}",
                                             json={"tags": ["ok", "Not OK"]}), 422)
    assert body["details"][0]["field"] == "tags[1]"


async def test_malformed_json_is_400(client):
    resp = await client.post("/api/v1/auth/register", data=b'{"email": ',
                             headers={"Content-Type": "application/json"})
    body = await error_of(resp, 400)
    assert body["error"] == "bad_request"


async def test_wrong_content_type_is_415(client):
    resp = await client.post("/api/v1/auth/register", data=b"email=a@b.io", headers={"Content-Type": "text/plain"})
    assert (await error_of(resp, 415))["error"] == "unsupported_media_type"


async def test_unknown_route_is_404(client):
    assert (await error_of(await client.get("/nope"), 404))["error"] == "not_found"


async def test_handler_http_exception_keeps_status_and_text(client):
    body = await error_of(await client.get("/api/v1/example/items/ab-12/owner"), 404)
    assert body["message"] == "item not found"


async def test_wrong_method_is_405_with_allow(client):
    resp = await client.delete("/api/v1/auth/register")
    assert (await error_of(resp, 405))["error"] == "method_not_allowed"
    assert "POST" in resp.headers["Allow"]


async def test_body_over_app_limit_is_413(client):
    resp = await client.post("/api/v1/auth/register", data=b"x" * 10_000, headers={"Content-Type": "application/json"})
    assert (await error_of(resp, 413))["error"] == "payload_too_large"


async def test_body_over_route_limit_is_413(client):
    resp = await client.post("/api/v1/auth/login", json={"email": "a@b.io", "password": "p" * 100})
    await error_of(resp, 413)


async def test_api_error_keeps_status_and_headers(client):
    resp = await client.post("/api/v1/auth/login", json={"email": "a@b.io", "password": "x"})
    body = await error_of(resp, 401)
    assert body == {"status": 401, "error": "unauthorized", "message": "wrong email or password",
                    "request_id": resp.headers["X-Request-Id"]}
    assert resp.headers["WWW-Authenticate"] == "Bearer"


async def test_unexpected_exception_is_500_and_traceback_only_in_log(client, captured_log):
    resp = await client.get("/boom")
    body = await error_of(resp, 500)
    assert body["message"] == "internal server error"
    assert "ZeroDivisionError" not in await resp.text()
    lines = [json.loads(line) for line in captured_log.getvalue().splitlines()]
    [entry] = [e for e in lines if "exception" in e]
    assert "ZeroDivisionError" in entry["exception"] and "Traceback" in entry["exception"]
    assert entry["request_id"] == resp.headers["X-Request-Id"]
    assert entry["level"] == "error"


async def test_database_unavailable_is_503(aiohttp_client, monkeypatch):
    db = pytest.importorskip("shared.kit.db")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    app = create_app("test")

    async def down(request):
        raise db.DatabaseUnavailable("database unreachable")

    app.router.add_get("/down", down)
    resp = await (await aiohttp_client(app)).get("/down")
    assert (await error_of(resp, 503))["error"] == "service_unavailable"


# ---- request ids and trace context ----

async def test_request_id_is_generated(client):
    resp = await client.get("/health")
    assert re.fullmatch(r"[0-9a-f]{32}", resp.headers["X-Request-Id"])


async def test_request_id_is_propagated(client):
    resp = await client.get("/context", headers={"X-Request-Id": "abc-123.x:y_z",
                                                 "traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"})
    assert resp.headers["X-Request-Id"] == "abc-123.x:y_z"
    forwarded = await resp.json()
    assert forwarded["X-Request-Id"] == "abc-123.x:y_z"
    version, trace, span, flags = forwarded["traceparent"].split("-")
    assert (version, trace, flags) == ("00", "ab" * 16, "01")
    assert re.fullmatch(r"[0-9a-f]{16}", span) and span != "cd" * 8  # our own span, same trace


@pytest.mark.parametrize("bad", ["has space", "x" * 129, "semi;colon", "é"])
async def test_invalid_request_id_is_replaced(client, bad):
    resp = await client.get("/context", headers={"X-Request-Id": bad.encode().decode("latin-1")})
    rid = resp.headers["X-Request-Id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    forwarded = await resp.json()
    assert forwarded["X-Request-Id"] == rid
    assert forwarded["traceparent"].split("-")[1] == rid  # a new trace, matching the request id


async def test_request_id_on_error_responses(client):
    resp = await client.get("/nope", headers={"X-Request-Id": "req-1"})
    assert resp.headers["X-Request-Id"] == "req-1"
    assert (await resp.json())["request_id"] == "req-1"


def test_outgoing_headers_empty_outside_a_request():
    assert outgoing_headers() == {}


# ---- logging ----

async def test_log_lines_are_json_with_request_id_and_no_password(client, captured_log):
    resp = await client.post("/api/v1/auth/register", headers={"X-Request-Id": "log-test-1"},
                             json={"email": "Someone@Example.COM", "password": SECRET, "name": "Some One"})
    assert resp.status == 201
    assert (await resp.json())["email"] == "someone@example.com"
    # a rejected body must not be echoed into the log either
    await client.post("/api/v1/auth/register", json={"email": "x", "password": SECRET, "name": "A"})
    logging.getLogger("test").info("with a secret field", extra={"fields": {"password": SECRET, "user": "u1"}})
    text = captured_log.getvalue()
    assert SECRET not in text
    lines = [json.loads(line) for line in text.splitlines()]
    handler_lines = [e for e in lines if e["logger"] == "test.handler"]
    assert handler_lines and handler_lines[0]["request_id"] == "log-test-1"
    assert "someone@example.com" in handler_lines[0]["msg"]
    assert lines[-1]["password"] == "[redacted]" and lines[-1]["user"] == "u1"
    assert "request_id" not in lines[-1]  # logged outside any request


# ---- pagination and contracts ----

async def test_pagination_defaults_and_values(client):
    assert (await (await client.get("/api/v1/example/items")).json())["limit"] == 20
    body = await (await client.get("/api/v1/example/items?limit=100&offset=40")).json()
    assert (body["limit"], body["offset"]) == (100, 40)


@pytest.mark.parametrize("qs, field", [("limit=0", "limit"), ("limit=101", "limit"),
                                       ("limit=ten", "limit"), ("offset=-1", "offset")])
async def test_bad_pagination_is_422(client, qs, field):
    body = await error_of(await client.get(f"/api/v1/example/items?{qs}"), 422)
    assert body["details"][0]["field"] == field


def test_secrets_are_not_in_repr():
    req = RegisterRequest(email="a@b.io", password=SECRET, name="A")
    assert SECRET not in repr(req) and "a@b.io" in repr(req)
    assert SECRET not in repr(LoginRequest(email="a@b.io", password=SECRET))
    shown = repr(TokenPair(access_token="tok1", refresh_token="tok2", expires_in=900))
    assert "tok1" not in shown and "tok2" not in shown


def test_item_update_tells_absent_from_sent():
    update = msgspec.json.decode(b'{"description": ""}', type=ItemUpdate)
    assert update.changes() == {"description": ""}
    assert msgspec.json.decode(b'{"title": "x", "tags": []}', type=ItemCreate).tags == []


# ---- OpenAPI ----

def resolve(doc: dict, ref: str) -> dict:
    assert ref.startswith("#/components/schemas/"), ref
    return doc["components"]["schemas"][ref.rsplit("/", 1)[1]]


def walk(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


async def test_openapi_document_is_3_0_3(client):
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["openapi"] == "3.0.3"
    assert {"title", "version"} <= doc["info"].keys()
    assert set(doc["paths"]) == {"/api/v1/auth/register", "/api/v1/auth/login", "/api/v1/example/items",
                                 "/api/v1/example/items/{id}", "/api/v1/example/items/{id}/owner",
                                 "/boom", "/context"}
    for node in walk(doc):
        assert "$defs" not in node and "const" not in node and "prefixItems" not in node
        assert not isinstance(node.get("type"), list)
        assert {"type": "null"} not in node.get("anyOf", []) + node.get("oneOf", [])
        if "$ref" in node:
            assert len(node) == 1  # 3.0 ignores $ref siblings
            resolve(doc, node["$ref"])  # every ref resolves to a component

    register = doc["paths"]["/api/v1/auth/register"]["post"]
    body_schema = resolve(doc, register["requestBody"]["content"]["application/json"]["schema"]["$ref"])
    assert body_schema["required"] == ["email", "password", "name"]
    assert body_schema["properties"]["password"]["minLength"] == 8
    assert body_schema["additionalProperties"] is False
    assert "201" in register["responses"] and "security" not in register
    for status in ("409", "422", "400"):
        schema = register["responses"][status]["content"]["application/json"]["schema"]
        assert resolve(doc, schema["$ref"]) is doc["components"]["schemas"]["Error"]

    owner = resolve(doc, "#/components/schemas/Item")["properties"]["owner"]
    assert owner["nullable"] is True and resolve(doc, owner["allOf"][0]["$ref"])
    details = doc["components"]["schemas"]["Error"]["properties"]["details"]
    assert details["nullable"] is True and details["type"] == "array"
    assert resolve(doc, "#/components/schemas/UserProfile")["properties"]["created_at"]["format"] == "date-time"

    items = doc["paths"]["/api/v1/example/items"]["get"]
    assert items["security"] == [{"bearerAuth": []}]
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {"type": "http", "scheme": "bearer",
                                                                  "bearerFormat": "JWT"}
    limit = next(p for p in items["parameters"] if p["name"] == "limit")
    assert limit["in"] == "query" and limit["schema"]["minimum"] == 1 and limit["schema"]["maximum"] == 100
    assert "401" in items["responses"]

    update = doc["paths"]["/api/v1/example/items/{id}"]["patch"]
    [param] = update["parameters"]
    assert param == {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
    [param] = doc["paths"]["/api/v1/example/items/{id}/owner"]["get"]["parameters"]
    assert param["name"] == "id" and param["in"] == "path"
    ids = [op["operationId"] for path in doc["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids))


def test_openapi30_conversion_of_3_1_constructs():
    doc = to_openapi30({"components": {"schemas": {"A": {
        "type": "object",
        "properties": {
            "a": {"type": ["string", "null"]},
            "b": {"type": ["string", "integer"]},
            "c": {"const": "x"},
            "d": {"type": "integer", "exclusiveMinimum": 0},
            "e": {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
            "f": {"$ref": "#/$defs/B"},
        },
        "$defs": {"B": {"type": "string"}},
    }}}})
    schemas = doc["components"]["schemas"]
    props = schemas["A"]["properties"]
    assert props["a"] == {"type": "string", "nullable": True}
    assert props["b"] == {"anyOf": [{"type": "string"}, {"type": "integer"}]}
    assert props["c"] == {"enum": ["x"]}
    assert props["d"] == {"type": "integer", "minimum": 0, "exclusiveMinimum": True}
    assert props["e"] == {"anyOf": [{"type": "string"}, {"type": "integer"}], "nullable": True}
    assert props["f"] == {"$ref": "#/components/schemas/B"} and schemas["B"] == {"type": "string"}
    assert "$defs" not in schemas["A"]


# ---- metrics ----

async def test_metrics_count_requests_by_route_template(client):
    item = uuid.uuid4()
    await client.patch(f"/api/v1/example/items/{item}", json={"title": "t"})
    await client.patch(f"/api/v1/example/items/{item}", json={"title": ""})
    await client.get("/nope")
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.content_type == "text/plain"
    text = await resp.text()
    assert str(item) not in text  # the template, not the raw path
    assert 'http_requests_total{method="PATCH",route="/api/v1/example/items/{id}",status="200"} 1.0' in text
    assert 'http_requests_total{method="PATCH",route="/api/v1/example/items/{id}",status="422"} 1.0' in text
    assert 'http_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
    assert 'http_request_duration_seconds_count{method="PATCH",route="/api/v1/example/items/{id}"} 2.0' in text


async def test_metrics_registries_are_per_app(aiohttp_client, monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    first = await aiohttp_client(create_app("one"))
    second = await aiohttp_client(create_app("two"))
    await first.get("/health")
    assert "/health" not in await (await second.get("/metrics")).text()


# ---- health ----

async def test_health_without_database(client):
    resp = await client.get("/health")
    assert resp.status == 200
    assert await resp.json() == {"status": 200, "service": "test"}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


async def test_health_with_unreachable_database_is_503(aiohttp_client, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", f"postgresql://user:secretpw@127.0.0.1:{closed_port()}/db")
    client = await aiohttp_client(create_app("test"))  # starts although PostgreSQL is down
    resp = await client.get("/health")
    body = await error_of(resp, 503)
    assert body["error"] == "service_unavailable"
    assert body["service"] == "test" and body["database"] == "unreachable"
    assert "secretpw" not in await resp.text()


def test_database_required_without_url(monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with pytest.raises(RuntimeError):
        create_app("test", database=True)


def test_services_still_build(monkeypatch):
    # Building connects to nothing; auth insists on being given a database.
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    monkeypatch.setenv("UPSTREAM_AUTH_URL", "http://127.0.0.1:1")
    from services.auth.app import build as auth
    from services.example.app import build as example
    assert isinstance(auth(), web.Application) and isinstance(example(), web.Application)


async def test_nul_characters_are_422_not_500(aiohttp_client):
    from services.auth.contract import RegisterRequest

    async def handler(request):
        await decode(request, RegisterRequest)
        return web.Response(text="ok")

    app = create_app("nul", database=False)
    app.router.add_post("/r", handler)
    client = await aiohttp_client(app)
    resp = await client.post("/r", json={"email": "a@example.com", "password": "long enough", "name": "A\u0000B"})
    body = await resp.json()
    assert resp.status == 422 and body["details"][0]["field"] == "name"


async def test_token_errors_map_to_401_and_503(aiohttp_client):
    from shared.kit.tokens import InvalidToken, VerifierUnavailable

    async def bad_token(request):
        raise InvalidToken("token expired")

    async def no_keys(request):
        raise VerifierUnavailable("jwks unreachable")

    app = create_app("tok", database=False)
    app.router.add_get("/bad", bad_token)
    app.router.add_get("/down", no_keys)
    client = await aiohttp_client(app)
    resp = await client.get("/bad")
    assert resp.status == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
    assert (await resp.json())["message"] == "token expired"
    resp = await client.get("/down")
    assert resp.status == 503 and (await resp.json())["error"] == "service_unavailable"


def test_offset_is_bounded_below_postgres_bigint():
    from shared.kit.fields import Pagination

    assert msgspec.convert({"offset": 1_000_000_000}, Pagination).offset == 1_000_000_000
    with pytest.raises(msgspec.ValidationError, match="offset"):
        msgspec.convert({"offset": 381637380236823446421504}, Pagination)


def test_a_librarys_background_upkeep_logs_one_line_without_a_request_id():
    """asyncpg's pool logs a traceback about once a second while PostgreSQL is down, in a
    task that inherited the request id of whichever request created it."""
    import sys

    from shared.kit.log import BackgroundNoise, JsonFormatter, request_id

    try:
        raise ConnectionRefusedError("connect to postgresql://app:s3cret@127.0.0.1/db failed")
    except ConnectionRefusedError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("asyncpg.pool", logging.WARNING, __file__, 1,
                               "Failed to restore the pool connection floor; retrying", None, exc_info)
    token = request_id.set("0" * 32)
    try:
        assert BackgroundNoise().filter(record)
        line = json.loads(JsonFormatter({"component": "app"}).format(record))
    finally:
        request_id.reset(token)
    assert line["error"] == "ConnectionRefusedError" and line["level"] == "warning"
    assert "exception" not in line and "request_id" not in line and "s3cret" not in json.dumps(line)
