"""shared.mesh.identity against a real Consul agent (dev mode has Connect on): leaf and
roots become TLS contexts, mTLS works between two identities, the peer's service is read
from its SPIFFE URI, foreign and wrong certificates are refused, a CA rotation is followed
without dropping open connections."""

from __future__ import annotations

import asyncio
import ssl

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shared.mesh.consul import call, make_client
from shared.mesh.identity import Identity, service_of
from tests.consul_testing import dev_agent  # noqa: F401  (fixture)


async def rotate_ca(client) -> None:
    """A new root key for the built-in CA: Consul makes a root for it, cross-signs it with
    the old one and keeps both in the bundle (the documented rotation)."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption()).decode()
    reply = await call(client, "PUT", "/v1/connect/ca/configuration",
                       payload={"Provider": "consul", "Config": {"LeafCertTTL": "72h", "PrivateKey": pem}})
    reply.raise_for_status()


async def _identities(address: str, *names: str) -> tuple[list[Identity], object]:
    client = make_client(address)
    identities = [Identity(client, name) for name in names]
    for identity in identities:
        await identity.start(timeout=20)
    return identities, client


async def _serve(identity: Identity) -> tuple[asyncio.AbstractServer, int, list[str]]:
    """An echo server over mTLS that records the peer service of each connection."""
    peers: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(identity.peer_service(writer.get_extra_info("ssl_object")))
        while data := await reader.read(100):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=identity.front)
    return server, server.sockets[0].getsockname()[1], peers


async def _roundtrip(port: int, context: ssl.SSLContext) -> tuple[bytes, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="")
    writer.write(b"ping")
    data = await asyncio.wait_for(reader.read(4), 5)
    server_uri = writer.get_extra_info("ssl_object").getpeercert()["subjectAltName"]
    writer.close()
    return data, dict(server_uri)["URI"]


def test_service_of_reads_only_our_trust_domain():
    td = "11111111-2222-3333-4444-555555555555.consul"
    assert service_of(f"spiffe://{td}/ns/default/dc/dc1/svc/auth", td) == "auth"
    assert service_of(f"spiffe://other.consul/ns/default/dc/dc1/svc/auth", td) == ""
    assert service_of(f"spiffe://{td}/ns/default/dc/dc1/svc/", td) == ""
    assert service_of(f"spiffe://{td}/ns/default/dc/dc1/svc/auth/x", td) == ""
    assert service_of("", td) == ""


async def test_mtls_between_two_identities_names_the_peer(dev_agent):  # noqa: F811
    (auth, example), client = await _identities(dev_agent.address, "auth", "example")
    server, port, peers = await _serve(auth)
    try:
        data, uri = await _roundtrip(port, example.client_context())
        assert data == b"ping"
        assert service_of(uri, auth.trust_domain) == "auth"
        assert peers == ["example"]
        assert auth.problem == "" and auth.changes == 1
        assert "PRIVATE" not in repr(auth.leaf_watch.leaf)
    finally:
        server.close()
        for identity in (auth, example):
            await identity.stop()
        await client.close()


async def test_foreign_and_missing_client_certificates_are_refused(dev_agent, tmp_path):  # noqa: F811
    (auth,), client = await _identities(dev_agent.address, "auth")
    server, port, peers = await _serve(auth)
    try:
        # A client trusting our CA but presenting no certificate.
        anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        anonymous.check_hostname = False
        anonymous.load_verify_locations(cadata="\n".join(auth.roots_watch.roots.pems))
        # A self-signed certificate, from another CA altogether.
        key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
        proc = await asyncio.create_subprocess_exec(
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=auth",
            "-addext", f"subjectAltName=URI:spiffe://{auth.trust_domain}/ns/default/dc/dc1/svc/example",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        assert await proc.wait() == 0
        forged = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        forged.check_hostname = False
        forged.load_verify_locations(cadata="\n".join(auth.roots_watch.roots.pems))
        forged.load_cert_chain(cert, key)
        for context in (anonymous, forged):
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                data, _ = await _roundtrip(port, context)
                assert data == b""  # TLS 1.3: the refusal may only show on the first read
                raise ConnectionError("closed without an answer")
        assert peers == []
    finally:
        server.close()
        await auth.stop()
        await client.close()


async def test_ca_rotation_is_followed_and_open_connections_survive(dev_agent):  # noqa: F811
    (auth, example), client = await _identities(dev_agent.address, "auth", "example")
    server, port, peers = await _serve(auth)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=example.client_context(),
                                                       server_hostname="")
        old_roots = auth.roots_watch.roots.ids
        await rotate_ca(client)
        for _ in range(200):
            if auth.changes >= 3 and example.changes >= 3 and auth.roots_watch.roots.ids != old_roots:
                break
            await asyncio.sleep(0.1)
        roots = auth.roots_watch.roots
        assert len(roots.ids) == 2 and set(old_roots) < set(roots.ids), "both roots are trusted"
        writer.write(b"open")  # the connection made before the rotation still works
        assert await asyncio.wait_for(reader.read(4), 5) == b"open"
        writer.close()
        data, _ = await _roundtrip(port, example.client_context())  # and new ones, on new leaves
        assert data == b"ping"
    finally:
        server.close()
        for identity in (auth, example):
            await identity.stop()
        await client.close()
