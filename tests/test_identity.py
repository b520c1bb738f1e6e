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


async def rotate_ca(client, key: ec.EllipticCurvePrivateKey | None = None) -> None:
    """A new root key for the built-in CA: Consul makes a root for it, cross-signs it with
    the old one and keeps both in the bundle (the documented rotation)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
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


def _leaf_signed_by(root_pem: str, root_key, uri: str, days_from: int, days_to: int) -> tuple[bytes, bytes]:
    """A leaf for `uri` signed by the CA's own key, valid from/to these days from now."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    root = x509.load_pem_x509_certificate(root_pem.encode())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "example")]))
            .issuer_name(root.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now + datetime.timedelta(days=days_from))
            .not_valid_after(now + datetime.timedelta(days=days_to))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
            # Consul's roots carry a key identifier of their own making: point at it.
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value), critical=False)
            .sign(root_key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


async def test_an_expired_client_certificate_of_our_ca_is_refused(dev_agent, tmp_path):  # noqa: F811
    """With a CA key of our own (set through the rotation API) a leaf can be made that
    chains to a trusted root: refused once expired, accepted while valid (the control)."""
    (auth,), client = await _identities(dev_agent.address, "auth")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    await rotate_ca(client, ca_key)
    server = None
    try:
        for _ in range(100):
            roots = (await call(client, "GET", "/v1/agent/connect/ca/roots")).json()
            active = next(r for r in roots["Roots"] if r["Active"])
            if auth.roots_watch.roots and active["ID"] in auth.roots_watch.roots.ids:
                break
            await asyncio.sleep(0.1)
        server, port, peers = await _serve(auth)
        uri = f"spiffe://{auth.trust_domain}/ns/default/dc/dc1/svc/example"
        outcomes = {}
        for name, (start, end) in {"expired": (-3, -1), "valid": (-1, 1)}.items():
            cert, key = _leaf_signed_by(active["RootCert"], ca_key, uri, start, end)
            (tmp_path / f"{name}.pem").write_bytes(cert + key)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.load_verify_locations(cadata="\n".join(auth.roots_watch.roots.pems))
            context.load_cert_chain(tmp_path / f"{name}.pem")
            try:
                outcomes[name] = (await _roundtrip(port, context))[0]
            except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
                outcomes[name] = b""
        assert outcomes == {"expired": b"", "valid": b"ping"}, outcomes
        assert peers == ["example"], "only the valid one got through"
    finally:
        if server is not None:
            server.close()
        await auth.stop()
        await client.close()
