"""End to end: the real gateway, auth and example services with their sidecars, started by
the supervisor on an embedded PostgreSQL and a real Consul agent, driven through the gateway."""

from __future__ import annotations

import re
import time

import pytest

from tests.helpers import wait_for
from tests.stack import app_stack, call, shaped, user


@pytest.fixture
def stack(agent):
    p = app_stack(agent.address)
    p.start(timeout=120)
    yield p
    p.cleanup()


def test_register_login_items_with_owner_profiles(stack):
    p = stack
    ada, ada_token = user(p, "ada@example.com", "Ada")
    bob, bob_token = user(p, "bob@example.com", "Bob")
    status, me = call(p, "GET", "/api/v1/auth/me", token=ada_token)
    assert status == 200 and me["id"] == ada["id"]

    status, item = call(p, "POST", "/api/v1/example/items",
                        {"title": "Difference engine", "description": "brass", "price_cents": 1200, "tags": ["math"]},
                        token=ada_token)
    assert status == 201, item
    assert item["owner"] == {"id": ada["id"], "name": "Ada"}, "enriched from auth through the sidecar upstream"
    for n in range(3):
        assert call(p, "POST", "/api/v1/example/items", {"title": f"note {n}"}, token=bob_token)[0] == 201

    status, page = call(p, "GET", "/api/v1/example/items?limit=2")
    assert status == 200 and page["total"] == 4 and len(page["items"]) == 2
    assert all(i["owner"]["name"] in ("Ada", "Bob") for i in page["items"])
    status, mine = call(p, "GET", f"/api/v1/example/items?owner_id={ada['id']}")
    assert [i["title"] for i in mine["items"]] == ["Difference engine"]

    status, got = call(p, "GET", f"/api/v1/example/items/{item['id']}")
    assert status == 200 and got["owner"]["name"] == "Ada"
    status, changed = call(p, "PATCH", f"/api/v1/example/items/{item['id']}", {"price_cents": 1500}, token=ada_token)
    assert status == 200 and changed["price_cents"] == 1500 and changed["title"] == "Difference engine"

    # Only the owner may change or delete; no or a forged token is 401.
    shaped(*call(p, "PATCH", f"/api/v1/example/items/{item['id']}", {"title": "mine now"}, token=bob_token), 403)
    shaped(*call(p, "DELETE", f"/api/v1/example/items/{item['id']}", token=bob_token), 403)
    shaped(*call(p, "POST", "/api/v1/example/items", {"title": "x"}), 401)
    shaped(*call(p, "POST", "/api/v1/example/items", {"title": "x"}, token=ada_token[:-4] + "AAAA"), 401)
    shaped(*call(p, "POST", "/api/v1/example/items", {"title": "x", "owner_id": bob["id"]}, token=ada_token), 422)
    shaped(*call(p, "GET", "/api/v1/example/items/not-a-uuid"), 404)
    assert call(p, "DELETE", f"/api/v1/example/items/{item['id']}", token=ada_token)[0] == 204
    shaped(*call(p, "GET", f"/api/v1/example/items/{item['id']}"), 404)

    # Swagger's document lists both services' endpoints.
    status, doc = call(p, "GET", "/api-docs/openapi.json")
    assert "/api/v1/auth/login" in doc["paths"] and "/api/v1/example/items" in doc["paths"]

    # Intentions: example -> auth denied, auth's sidecar refuses example's open connection
    # on its next request (403) and example answers 503 in its error shape within 2 s;
    # allowed again, it works. Every owner is new, so no cached profile answers for auth.
    owners = [user(p, f"owner{n}@example.com", f"Owner {n}")[1] for n in range(12)]
    assert call(p, "POST", "/api/v1/example/items", {"title": "allowed"}, token=owners.pop())[0] == 201
    answers: list[int] = []
    p.cli("intentions", "deny", "example", "auth", check=True)
    denied_at = time.monotonic()  # from the intention written (not the CLI's start-up: slow on a loaded box)
    while owners and time.monotonic() - denied_at < 5:
        status, body = call(p, "POST", "/api/v1/example/items", {"title": "denied?"}, token=owners.pop())
        answers.append(status)
        if status == 503:
            shaped(status, body, 503)
            break
        time.sleep(0.1)
    took = time.monotonic() - denied_at
    print(f"example -> auth denied: 503 after {took:.2f}s ({answers})")
    assert answers[-1] == 503 and took <= 2.0, answers

    def refused() -> bool:  # by auth's sidecar itself (its access log is written in batches)
        return any('"status":403' in line for path in (p.state_dir / "logs").glob("auth.*.sidecar.log")
                   for line in path.read_text().splitlines())

    wait_for(refused, 3, what="auth's sidecar logged the 403")
    listed = p.cli("intentions", check=True).stdout
    assert re.search(r"example\s+auth\s+deny", listed) and re.search(r"\*\s+\*\s+deny", listed), listed
    allowed_at = time.monotonic()
    p.cli("intentions", "allow", "example", "auth", check=True)
    wait_for(lambda: call(p, "POST", "/api/v1/example/items", {"title": "allowed"}, token=ada_token)[0] == 201,
             2.5, interval=0.1, what="example -> auth allowed again")
    print(f"example -> auth allowed again: 201 after {time.monotonic() - allowed_at:.2f}s")

    # auth stopped: example answers a clear 503 for what needs auth, never a 500. Carol's
    # profile was never fetched by example, so no cache can answer for auth.
    _, carol_token = user(p, "carol@example.com", "Carol")
    p.cli("scale", "auth=0", check=True)
    wait_for(lambda: call(p, "GET", "/api/v1/auth/.well-known/jwks.json")[0] in (404, 503), 10, what="auth gone")
    status, body = call(p, "GET", "/api/v1/example/items")
    assert status in (200, 503), body
    if status == 503:
        shaped(status, body, 503)
    shaped(*call(p, "POST", "/api/v1/example/items", {"title": "during outage"}, token=carol_token), 503)
