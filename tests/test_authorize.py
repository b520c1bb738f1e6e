"""shared.mesh.authorize and shared.mesh.intentions against a real Consul agent: callers
are judged by the agent per identity, one question per identity, and a change of the
intentions reaches decisions already made (so open connections) within 2 s."""

from __future__ import annotations

import asyncio
import time

import pytest

from shared.mesh.authorize import Authorizer
from shared.mesh.consul import make_client
from shared.mesh.intentions import list_intentions, upsert
from tests.consul_testing import dev_agent  # noqa: F401  (fixture)


def uri(trust_domain: str, service: str) -> str:
    return f"spiffe://{trust_domain}/ns/default/dc/dc1/svc/{service}"


async def test_decisions_follow_intentions(dev_agent):  # noqa: F811
    client = make_client(dev_agent.address)
    authorizer = Authorizer(client, "auth")
    trust_domain = dev_agent.get("/v1/agent/connect/ca/roots")["TrustDomain"]
    try:
        await upsert(client, "*", "*", "deny")
        await upsert(client, "example", "auth", "allow")
        await authorizer.start()
        example, gateway = uri(trust_domain, "example"), uri(trust_domain, "gateway")
        answers = await asyncio.gather(*(authorizer.decide(example, "01") for _ in range(5)))
        assert all(a is answers[0] for a in answers), "one decision per identity"
        assert answers[0].allowed
        assert not (await authorizer.decide(gateway, "02")).allowed
        assert authorizer.known(example) is answers[0]

        _, changed = await upsert(client, "example", "auth", "deny")
        assert changed
        started = time.monotonic()
        while answers[0].allowed and time.monotonic() - started < 5:
            await asyncio.sleep(0.05)
        took = time.monotonic() - started
        assert not answers[0].allowed and took < 2.0, f"deny reached the open decision after {took:.2f}s"

        await upsert(client, "gateway", "auth", "allow")
        started = time.monotonic()
        gateway_decision = authorizer.known(gateway)
        while not gateway_decision.allowed and time.monotonic() - started < 5:
            await asyncio.sleep(0.05)
        assert gateway_decision.allowed and time.monotonic() - started < 2.0
        listed = {(i.source, i.destination): i.action for i in await list_intentions(client)}
        assert listed == {("*", "*"): "deny", ("example", "auth"): "deny", ("gateway", "auth"): "allow"}
        assert (await upsert(client, "gateway", "auth", "allow"))[1] is False  # already so
        with pytest.raises(ValueError):
            await upsert(client, "gateway", "auth", "maybe")
    finally:
        await authorizer.stop()
        await client.close()


async def test_unknown_identity_is_refused_when_the_agent_cannot_be_asked(dev_agent):  # noqa: F811
    client = make_client(dev_agent.address)
    authorizer = Authorizer(client, "auth")
    trust_domain = dev_agent.get("/v1/agent/connect/ca/roots")["TrustDomain"]
    try:
        known = await authorizer.decide(uri(trust_domain, "example"), "01")
        assert known.allowed  # dev agent, no ACLs, no intentions: allowed by default
        await dev_agent.stop()
        stranger = await authorizer.decide(uri(trust_domain, "stranger"), "03")
        assert not stranger.allowed and "could not be asked" in stranger.reason
        assert authorizer.problem
        assert authorizer.known(uri(trust_domain, "stranger")) is None  # not kept: asked again next time
        assert authorizer.known(uri(trust_domain, "example")).allowed  # what was decided stands
    finally:
        await authorizer.stop()
        await client.close()
