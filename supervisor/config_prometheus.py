"""The [prometheus] table: its settings and their checks.

Kept apart from supervisor/config.py (which holds the table in the file's shape and
calls `validate_prometheus`) so that each stays one idea; what runs is
supervisor/infra/prometheus.py.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

import msgspec

# Prometheus's duration syntax (model.ParseDuration): units from years to milliseconds,
# each at most once, largest first: "5s", "1m30s", "1d", "500ms".
_DURATION = re.compile(r"^(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$")
_UNIT_SECONDS = (365 * 86400, 7 * 86400, 86400, 3600, 60, 1, 0.001)
# The recording rules take rates over one minute: four samples in it at least.
MAX_SCRAPE_INTERVAL = 15.0


class PrometheusSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # "embedded": the supervisor runs a Prometheus that scrapes every gateway, sidecar and
    # app of this host (found through Consul); "off": none.
    mode: str = "embedded"
    address: str = "127.0.0.1:9090"  # its HTTP API and UI; loopback only (no login)
    scrape_interval: str = "5s"  # also how often the recording rules are evaluated
    retention: str = "1d"  # how long samples are kept (--storage.tsdb.retention.time)
    start_timeout: float = 30.0


def seconds(duration: str) -> float | None:
    """A Prometheus duration in seconds, or None if it is not one."""
    found = _DURATION.match(duration)
    if not duration or found is None:
        return None
    return sum(int(n) * unit for n, unit in zip(found.groups(), _UNIT_SECONDS) if n)


def validate_prometheus(p: PrometheusSettings, claim: Callable[[int, str], None],
                        fail: Callable[[str, str], None]) -> None:
    """`fail(key, message)` on the first mistake; `claim(port, key)` takes its fixed port."""
    if p.mode not in ("embedded", "off"):
        fail("prometheus.mode", f"'{p.mode}' is neither 'embedded' nor 'off'")
    if p.mode == "off":
        return
    host, _, port = p.address.rpartition(":")
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = None
    if loopback is None or not port.isdigit():
        fail("prometheus.address", f"'{p.address}' is not IP:PORT")
    if not loopback:
        fail("prometheus.address", f"'{host}' is not a loopback address: Prometheus's UI and API have no "
             "login, so they stay on this host (an SSH tunnel reaches them from elsewhere)")
    claim(int(port), "prometheus.address")
    interval = seconds(p.scrape_interval)
    if not interval:
        fail("prometheus.scrape_interval", f"'{p.scrape_interval}' is not a duration above zero like '5s'")
    if interval > MAX_SCRAPE_INTERVAL:
        fail("prometheus.scrape_interval", f"at most {MAX_SCRAPE_INTERVAL:g}s: the recording rules "
             "take rates over 1 minute, which need a few samples in it")
    if not seconds(p.retention):
        fail("prometheus.retention", f"'{p.retention}' is not a duration above zero like '1d'")
    if p.start_timeout <= 0:
        fail("prometheus.start_timeout", "must be greater than 0")
