"""Validation of what spanning several hosts asks of [supervisor], [consul] and [postgres].

Kept apart from supervisor/config.py (which calls it) so that each stays one idea: the
file's shape and its checks there, the cluster's rules here (the same on every host,
see the README's "Several hosts").
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Callable


def validate_hosts(supervisor, c, pg, fail: Callable[[str, str], None]) -> None:
    """`fail(key, message)` on the first rule broken; `supervisor`, `c`, `pg` are the
    config's [supervisor], [consul] and [postgres] settings."""
    for key, value in (("supervisor.advertise", supervisor.advertise), ("consul.bind", c.bind),
                       ("consul.advertise", c.advertise), ("postgres.listen", pg.listen)):
        if value and not _is_ip(value):
            fail(key, f"'{value}' is not an IP address")
    if c.role not in ("server", "client"):
        fail("consul.role", f"'{c.role}' is neither 'server' nor 'client'")
    if c.bootstrap_expect < 1:
        fail("consul.bootstrap_expect", "must be at least 1")
    if c.mode == "embedded":
        if c.role == "client" and not c.join:
            fail("consul.join", "a client agent needs the addresses of the cluster's servers")
        if not ipaddress.ip_address(c.bind).is_loopback and not c.encrypt:
            fail("consul.encrypt", f"bind = '{c.bind}' is not loopback: gossip needs a key "
                 "(`supervisor keygen` makes one; the same on every host)")
        if c.encrypt:
            try:
                key = base64.b64decode(c.encrypt, validate=True)
            except ValueError:
                key = b""
            if len(key) not in (16, 24, 32):
                fail("consul.encrypt", "is not a base64 key of 16, 24 or 32 bytes (`supervisor keygen`)")
        if c.acl and not c.token and (c.role == "client" or c.bootstrap_expect > 1):
            fail("consul.token", "every host of a cluster with ACLs needs the cluster's management "
                 "token (`supervisor token` on the first server prints it)")
    if pg.listen:
        if not pg.allow:
            fail("postgres.allow", "listen needs the networks of the cluster's hosts (CIDRs) that may log in")
    for network in pg.allow:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            fail("postgres.allow", f"'{network}' is not a network (CIDR)")
    if pg.mode == "peer":
        if port_of(pg.address) is None:
            fail("postgres.address", f"'{pg.address}' is not HOST:PORT of the host running PostgreSQL")
        if not c.acl:
            fail("postgres.mode", "peer: the roles' passwords come from the cluster's management "
                 "token, which needs [consul] acl = true")


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def port_of(address: str) -> int | None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return int(port)
