"""Routes declared with their contracts, and the OpenAPI 3.0.3 document built from them.

    api = Routes()

    @api.post("/api/v1/auth/register", request=RegisterRequest, response=UserProfile,
              status=201, summary="Create an account", errors=(409,))
    async def register(request): ...

`create_app(..., routes=api)` adds the handlers to the router and serves the document at
`/openapi.json`. Paths are the full paths the service serves: the gateway passes them
through unchanged, so the document is right for clients of the gateway too.

msgspec writes JSON Schema 2020-12 (what OpenAPI 3.1 uses); Swagger UI 4.x only renders
3.0, so `to_openapi30` rewrites the few constructs that differ.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Callable

import msgspec

from shared.kit.errors import Error

REF_TEMPLATE = "#/components/schemas/{name}"
_PARAM_RE = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")  # aiohttp's {name} and {name:regex}


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # aiohttp syntax; {name:regex} is allowed
    handler: Callable
    summary: str = ""
    request: type | None = None  # JSON body type
    response: type | None = None  # JSON body type of the success response
    status: int = 200
    query: type | None = None  # a Struct whose fields are query parameters (e.g. Pagination)
    params: dict[str, type] = field(default_factory=dict)  # path parameter types; str by default
    auth: bool = False  # needs `Authorization: Bearer <access token>`
    idempotent: bool = False  # honours an Idempotency-Key header (shared.kit.web.idempotency_key)
    errors: tuple[int, ...] = ()  # error statuses worth documenting beyond the usual ones
    tags: tuple[str, ...] = ()
    description: str = ""


class Routes:
    """A route table with contracts; decorators mirror aiohttp's RouteTableDef."""

    def __init__(self) -> None:
        self.routes: list[Route] = []

    def add(self, method: str, path: str, handler: Callable, **contract: Any) -> Route:
        route = Route(method.upper(), path, handler, **contract)
        self.routes.append(route)
        return route

    def route(self, method: str, path: str, **contract: Any):
        def register(handler: Callable) -> Callable:
            self.add(method, path, handler, **contract)
            return handler
        return register

    def get(self, path: str, **contract: Any):
        return self.route("GET", path, **contract)

    def post(self, path: str, **contract: Any):
        return self.route("POST", path, **contract)

    def put(self, path: str, **contract: Any):
        return self.route("PUT", path, **contract)

    def patch(self, path: str, **contract: Any):
        return self.route("PATCH", path, **contract)

    def delete(self, path: str, **contract: Any):
        return self.route("DELETE", path, **contract)

    def __iter__(self):
        return iter(self.routes)


def openapi_path(path: str) -> str:
    """aiohttp's `/items/{id:\\d+}` as OpenAPI's `/items/{id}`."""
    return _PARAM_RE.sub(lambda m: "{" + m.group(1) + "}", path)


def build_document(title: str, routes: list[Route] | Routes, version: str = "0.1.0",
                   description: str = "") -> dict:
    routes = list(routes)
    types: list[Any] = [Error]
    for r in routes:
        types += [t for t in (r.request, r.response, r.query) if t is not None]
        types += list(r.params.values())
    refs, components = msgspec.json.schema_components(types, ref_template=REF_TEMPLATE)
    schema_of = dict(zip(map(id, types), refs))  # type -> its schema (a $ref for Structs)

    paths: dict[str, dict] = {}
    for r in routes:
        op: dict[str, Any] = {
            "operationId": _operation_id(r),
            "summary": r.summary or r.handler.__name__.replace("_", " "),
            "responses": _responses(r, schema_of),
        }
        if r.description:
            op["description"] = r.description
        if r.tags:
            op["tags"] = list(r.tags)
        parameters = _path_parameters(r, schema_of) + _query_parameters(r, components) + _header_parameters(r)
        if parameters:
            op["parameters"] = parameters
        if r.request is not None:
            op["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": schema_of[id(r.request)]}}}
        if r.auth:
            op["security"] = [{"bearerAuth": []}]
        paths.setdefault(openapi_path(r.path), {})[r.method.lower()] = op

    info: dict[str, Any] = {"title": title, "version": version}
    if description:
        info["description"] = description
    doc = {
        "openapi": "3.0.3",
        "info": info,
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }
    return to_openapi30(doc)


def _operation_id(r: Route) -> str:
    return f"{r.method.lower()}_{r.handler.__name__}"


def _responses(r: Route, schema_of: dict[int, dict]) -> dict:
    error = {"$ref": REF_TEMPLATE.format(name="Error")}
    responses: dict[str, Any] = {}
    if r.response is not None:
        responses[str(r.status)] = {"description": "Success", "content": {
            "application/json": {"schema": schema_of[id(r.response)]}}}
    else:
        responses[str(r.status)] = {"description": "Success"}
    statuses = set(r.errors)
    if r.request is not None:
        statuses |= {400, 413, 415, 422}
    if r.query is not None:
        statuses.add(422)
    if r.params:
        statuses.add(404)
    if r.auth:
        statuses.add(401)
    if r.idempotent:
        statuses |= {400, 422}
    for status in sorted(statuses):
        responses[str(status)] = {"description": _describe(status),
                                  "content": {"application/json": {"schema": error}}}
    responses["default"] = {"description": "Error", "content": {"application/json": {"schema": error}}}
    return responses


def _describe(status: int) -> str:
    return HTTPStatus(status).phrase


def _path_parameters(r: Route, schema_of: dict[int, dict]) -> list[dict]:
    out = []
    for name in _PARAM_RE.findall(r.path):
        type_ = r.params.get(name)
        schema = schema_of[id(type_)] if type_ is not None else {"type": "string"}
        out.append({"name": name, "in": "path", "required": True, "schema": schema})
    return out


def _header_parameters(r: Route) -> list[dict]:
    if not r.idempotent:
        return []
    return [{"name": "Idempotency-Key", "in": "header", "required": False,
             "description": "Makes a repeat of this request answer the first outcome instead of acting again",
             "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x21-\\x7e]+$"}}]


def _query_parameters(r: Route, components: dict[str, dict]) -> list[dict]:
    if r.query is None:
        return []
    schema = components[r.query.__name__]
    required = set(schema.get("required", ()))
    out = []
    for name, prop in schema.get("properties", {}).items():
        param = {"name": name, "in": "query", "required": name in required, "schema": prop}
        if "description" in prop:
            param["description"] = prop["description"]
        out.append(param)
    return out


# ---- JSON Schema 2020-12 (OpenAPI 3.1) -> OpenAPI 3.0 schema objects ----

def to_openapi30(doc: dict) -> dict:
    """Rewrites every schema in `doc`: null unions become `nullable`, type lists become one
    type (+ nullable) or anyOf, `const` becomes a one-value enum, numeric exclusive bounds
    become 3.0's booleans, `$defs` move to components."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in list(schemas.items()):
        for def_name, sub in schema.pop("$defs", {}).items():
            schemas.setdefault(def_name, sub)
    return _walk(doc)


def _walk(node: Any) -> Any:
    if isinstance(node, list):
        return [_walk(x) for x in node]
    if not isinstance(node, dict):
        return node
    node = {k: _walk(v) for k, v in node.items() if k not in ("$schema", "$defs")}
    if "$ref" in node and node["$ref"].startswith("#/$defs/"):
        node["$ref"] = REF_TEMPLATE.format(name=node["$ref"].rsplit("/", 1)[1])
    if isinstance(node.get("type"), list):
        types = [t for t in node["type"] if t != "null"]
        if len(types) < len(node["type"]):
            node["nullable"] = True
        if len(types) == 1:
            node["type"] = types[0]
        else:
            del node["type"]
            node["anyOf"] = [{"type": t} for t in types]
    for key in ("anyOf", "oneOf"):
        if key in node:
            options = [o for o in node[key] if o != {"type": "null"}]
            if len(options) < len(node[key]):
                node["nullable"] = True
                del node[key]
                if len(options) == 1 and "$ref" in options[0]:
                    node["allOf"] = options  # 3.0 ignores siblings of $ref, so wrap it
                elif len(options) == 1:
                    node.update(options[0])
                else:
                    node[key] = options
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        value = node.get(bound)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            node[plain] = value
            node[bound] = True
    if "examples" in node and isinstance(node["examples"], list):
        examples = node.pop("examples")
        if examples:
            node["example"] = examples[0]
    if "prefixItems" in node:  # tuples: 3.0 has no positional items
        items = node.pop("prefixItems")
        node.setdefault("items", {"anyOf": items} if items else {})
    return node
