"""supervisor.infra.acl against a real Consul server with ACLs on (default deny, nothing set
up yet): the
bootstrap gives the agent, the anonymous user and each service exactly their rights, is
idempotent, survives a lost token and keeps its secrets in 0600 files."""

from __future__ import annotations

import asyncio
import stat

import aiohttp
import pytest

from shared.mesh.consul import make_client
from supervisor.infra.acl import Secrets, bootstrap
from tests.helpers import ConsulDevAgent


@pytest.fixture
def acl_agent(tmp_path):
    secrets = Secrets(tmp_path)
    agent = ConsulDevAgent(acl=True, token=secrets.management_token(), bare=True)
    agent.start()
    agent.secrets = secrets
    try:
        yield agent
    finally:
        agent.close()


async def _status(address: str, method: str, path: str, token: str = "", body: dict | None = None) -> int:
    headers = {"X-Consul-Token": token} if token else {}
    async with aiohttp.ClientSession() as session:
        async with session.request(method, f"http://{address}{path}", json=body, headers=headers) as resp:
            await resp.read()
            return resp.status


async def test_bootstrap_gives_each_party_its_rights(acl_agent):
    address, secrets = acl_agent.address, acl_agent.secrets
    admin = make_client(address, secrets.management_token())
    try:
        tokens = await bootstrap(admin, ["gateway", "auth", "example"], secrets)
        assert set(tokens) == {"gateway", "auth", "example"}
        auth = tokens["auth"]
        register = {"Name": "auth", "ID": "auth-1", "Port": 1234}
        # Nobody without a token may register (the fake instance of the issue).
        assert await _status(address, "PUT", "/v1/agent/service/register", body=register) == 403
        # auth's token registers auth, not example; fetches auth's leaf, not example's.
        assert await _status(address, "PUT", "/v1/agent/service/register", auth, register) == 200
        assert await _status(address, "PUT", "/v1/agent/service/register", auth,
                             {"Name": "example", "Port": 1}) == 403
        assert await _status(address, "GET", "/v1/agent/connect/ca/leaf/auth", auth) == 200
        assert await _status(address, "GET", "/v1/agent/connect/ca/leaf/example", auth) == 403
        assert await _status(address, "GET", "/v1/agent/connect/ca/leaf/auth") == 403
        # Writing intentions needs more than a service identity.
        assert await _status(address, "POST", "/v1/connect/intentions", auth,
                             {"SourceName": "*", "DestinationName": "*", "Action": "allow"}) == 403
        # The anonymous user reads services and nodes: what the UI shows without a login.
        async with aiohttp.ClientSession() as session:
            for _ in range(50):  # the agent syncs the registration to the catalog
                async with session.get(f"http://{address}/v1/catalog/services") as resp:
                    if "auth" in await resp.json():
                        break
                await asyncio.sleep(0.1)
            assert "auth" in await resp.json()
            async with session.get(f"http://{address}/v1/catalog/nodes") as resp:
                assert [n["Node"] for n in await resp.json()] == [f"test-{acl_agent.http}"]  # the agent token works
            async with session.get(f"http://{address}/v1/acl/tokens") as resp:
                assert resp.status == 403

        # Idempotent: a second run changes nothing.
        before = (secrets.dir / "tokens.json").read_text()
        assert await bootstrap(admin, ["gateway", "auth", "example"], secrets) == tokens
        assert (secrets.dir / "tokens.json").read_text() == before

        # A token Consul lost comes back with the same secret.
        accessor = secrets.tokens()["service:auth"]["AccessorID"]
        assert await _status(address, "DELETE", f"/v1/acl/token/{accessor}", secrets.management_token()) == 200
        assert await _status(address, "GET", "/v1/acl/token/self", auth) == 403  # "ACL not found"
        assert (await bootstrap(admin, ["gateway", "auth", "example"], secrets))["auth"] == auth
        assert await _status(address, "GET", "/v1/acl/token/self", auth) == 200

        assert stat.S_IMODE(secrets.dir.stat().st_mode) == 0o700
        for path in secrets.dir.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    finally:
        await admin.close()
