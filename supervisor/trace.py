"""`supervisor trace REQUEST_ID`: one request's path through the stack, read from the logs.

Every process the supervisor runs writes its output to `<state_dir>/logs/<name>.log`
(rotated to `.log.1`, `.log.2`, ...). What a request leaves there (shared.mesh.telemetry):
one `request` access line per listener it crossed, written at its end, each with the
request id, `ts` (the end, to the microsecond), `duration_ms`, status, method, path and
the address it was relayed to (`upstream`):
- `gateway`: the gateway, relaying to an instance's sidecar;
- `inbound`: a sidecar's public listener, relaying to its app;
- `app`: the app itself (shared.kit.app), from its handler's start to its answer;
- `upstream`: a sidecar's upstream listener, through which its app calls another service;
plus an `attempt` line per failed attempt of a request that was retried (one a request
answered at its first attempt never gets), and the apps' own log lines while serving it.
A sidecar's `listening` line says which addresses are its own (public, app), so an
`upstream` address names the process relayed to.

How: every log file is scanned for the exact `"request_id":"<id>"` (a memory map and
`find`, C speed: no line of another request is decoded), then the lines are turned into
hops and nested. A hop's parent is a hop upstream of it whose span contains its start:
a sidecar's inbound hop is the child of the gateway or upstream hop (or of its attempt)
that relayed to that sidecar's address; an app's hop the child of its own sidecar's
inbound hop; a sidecar's upstream hop the child of its app's hop. Where several could
be, the one that went to its address, with the same method and path, not yet taken, and
the tightest wins. Times are compared with a tolerance of TOLERANCE (lines from before
microsecond times had milliseconds). Logs of other hosts are not here: a hop on another
host shows as a hop without children.
"""

from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

# Seconds by which a child may seem to start before its parent or end after it.
TOLERANCE = 0.002
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # what the relays accept and log
_LISTENING = b'"msg":"listening"'
_decode = msgspec.json.Decoder(dict).decode


@dataclass(eq=False)
class Event:
    """A log line of a process while it served the request (not an access line)."""

    process: str
    ts: float
    level: str
    msg: str
    logger: str = ""


@dataclass(eq=False)
class Hop:
    """One listener's part in the request, or one attempt of it (`attempt` > 0)."""

    process: str  # the log file's name: gateway.1, example.1.sidecar, example.1
    kind: str  # gateway, inbound, upstream, app (a listener's name), or attempt
    service: str
    instance: str
    method: str
    path: str
    status: int
    start: float
    end: float
    upstream: str = ""  # the address relayed to
    target: str = ""  # the process at that address, when the logs say
    retries: int = 0  # as the access line counts them
    attempt: int = 0
    error: str = ""  # a failed attempt's kind of failure
    retried: bool = False  # a failed attempt after which another was made
    parent: Hop | None = None
    children: list[Hop] = field(default_factory=list)
    attempts: list[Hop] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class Trace:
    request_id: str
    roots: list[Hop]
    events: list[Event]  # lines not placed under a hop

    @property
    def start(self) -> float:
        return min([h.start for h in self.hops()] + [e.ts for e in self.events])

    @property
    def end(self) -> float:
        return max([h.end for h in self.hops()] + [e.ts for e in self.events])

    def hops(self) -> list[Hop]:
        """Every hop, attempts included, depth first in time order."""
        out: list[Hop] = []

        def walk(hop: Hop) -> None:
            out.append(hop)
            for child in hop.children:
                walk(child)

        for root in self.roots:
            walk(root)
        return out


class NotFound(Exception):
    pass


# -- reading ---------------------------------------------------------------------------


def log_files(log_dir: Path) -> dict[Path, str]:
    """{file: process name} of every process log, rotated backups included."""
    found = {}
    for path in sorted(log_dir.glob("*.log*")):
        name = path.name
        cut = name.rfind(".log")
        suffix = name[cut + 4:]
        if path.is_file() and (suffix == "" or (suffix[:1] == "." and suffix[1:].isdigit())):
            found[path] = name[:cut]
    return found


def _lines_with(path: Path, needle: bytes) -> list[bytes]:
    """Every line of the file that contains `needle`: found with mmap.find, so a large
    log is searched at memory speed and nothing else of it is decoded."""
    try:
        with open(path, "rb") as file:
            if os.fstat(file.fileno()).st_size == 0:
                return []
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                lines, pos = [], data.find(needle)
                while pos >= 0:
                    start = data.rfind(b"\n", 0, pos) + 1
                    end = data.find(b"\n", pos)
                    end = len(data) if end < 0 else end
                    lines.append(data[start:end])
                    pos = data.find(needle, end)
                return lines
    except (FileNotFoundError, ValueError):  # rotated away meanwhile; emptied (mmap of 0 bytes)
        return []


def _json_of(line: bytes) -> dict | None:
    """The JSON object of a `<timestamp> <json>` log line (None for any other line)."""
    text = line[line.find(b" ") + 1:]
    if not text.startswith(b"{"):
        return None
    try:
        entry = _decode(text)
    except msgspec.DecodeError:
        return None
    return entry if isinstance(entry.get("ts"), (int, float)) else None


def read(log_dir: Path, request_id: str) -> Trace:
    """The request's hops, nested, from every log in `log_dir`; NotFound if none has it."""
    needle = b'"request_id":"' + request_id.encode() + b'"'
    hops, attempts, events, seen = [], [], [], set()
    addresses: dict[str, list[tuple[float, str]]] = {}
    for path, process in log_files(log_dir).items():
        for line in _lines_with(path, needle):
            entry = _json_of(line)
            if entry is None or entry.get("request_id") != request_id or (process, line) in seen:
                continue
            seen.add((process, line))
            kind = entry.get("msg")
            if kind in ("request", "attempt") and "listener" in entry and "duration_ms" in entry:
                try:
                    (hops if kind == "request" else attempts).append(_hop(process, entry))
                except (TypeError, ValueError):  # not a line of ours after all
                    continue
            else:
                events.append(Event(process, float(entry["ts"]), str(entry.get("level", "")),
                                    str(kind or ""), str(entry.get("logger", ""))))
        if process.endswith(".sidecar"):
            for line in _lines_with(path, _LISTENING):
                entry = _json_of(line)
                if entry is not None:
                    for key, owner in (("public", process), ("app", process[: -len(".sidecar")])):
                        if isinstance(entry.get(key), str):
                            addresses.setdefault(entry[key], []).append((float(entry["ts"]), owner))
    if not hops and not attempts and not events:
        raise NotFound(request_id)
    return build(hops, attempts, events, addresses, request_id)


def _hop(process: str, entry: dict) -> Hop:
    end = float(entry["ts"])
    attempt = int(entry.get("attempt", 1 if entry.get("msg") == "attempt" else 0))
    return Hop(
        process=process, kind=str(entry.get("listener", "")), service=str(entry.get("service", "")),
        instance=str(entry.get("instance", "")), method=str(entry.get("method", "")),
        path=str(entry.get("path", "")), status=int(entry.get("status", 0)),
        start=end - float(entry["duration_ms"]) / 1000, end=end, upstream=str(entry.get("upstream", "")),
        retries=int(entry.get("retries", 0)), attempt=attempt, error=str(entry.get("error", "")),
    )


# -- nesting -----------------------------------------------------------------------------


def build(hops: list[Hop], attempts: list[Hop], events: list[Event],
          addresses: dict[str, list[tuple[float, str]]], request_id: str) -> Trace:
    """Nest the hops (see the module's doc); `addresses`: {address: [(since, process)]}."""
    for hop in hops + attempts:
        hop.target = _owner(addresses, hop.upstream, hop.start)
    hops = sorted(hops, key=lambda h: (h.start, -h.duration))
    roots = [a for a in attempts if not _attach_attempt(a, hops)]  # orphans: their hop was not logged
    for hop in hops:
        _settle_attempts(hop)
    taken: set[int] = set()
    for hop in hops:
        parent = _parent(hop, hops, taken)
        if parent is None:
            roots.append(hop)
        else:
            hop.parent = parent
            parent.children.append(hop)
            if hop.kind in ("inbound", "app"):
                taken.add(id(parent))  # one request, one connection: one such child each
    loose = []
    for event in sorted(events, key=lambda e: e.ts):
        owner = _event_owner(event, hops)
        (owner.events if owner is not None else loose).append(event)
    roots.sort(key=lambda h: (h.start, h.attempt))
    trace = Trace(request_id, roots, loose)
    for hop in trace.hops():
        hop.children.sort(key=lambda h: (h.start, h.attempt))
    return trace


def _owner(addresses: dict[str, list[tuple[float, str]]], address: str, when: float) -> str:
    """The process that listened at `address` at time `when` (the latest to say so before)."""
    owners = addresses.get(address)
    if not owners:
        return ""
    before = [o for o in owners if o[0] <= when]
    return max(before)[1] if before else min(owners)[1]


def _contains(outer: Hop, inner: Hop) -> bool:
    return outer.start - TOLERANCE <= inner.start and inner.end <= outer.end + TOLERANCE


def _attach_attempt(attempt: Hop, hops: list[Hop]) -> bool:
    """Put a failed attempt under the request hop it belongs to (same process and
    listener, same request line, ended within its span)."""
    fits = [h for h in hops if h.process == attempt.process and h.kind == attempt.kind
            and h.method == attempt.method and h.path == attempt.path
            and h.start - TOLERANCE <= attempt.end <= h.end + TOLERANCE]
    if not fits:
        attempt.kind, attempt.retried = "attempt", False
        return False
    hop = min(fits, key=lambda h: h.duration)
    attempt.kind = "attempt"
    hop.attempts.append(attempt)
    return True


def _settle_attempts(hop: Hop) -> None:
    """A retried hop's attempts in order, the last one made of what the hop's own line
    says when it was answered by an instance (its upstream), each one a child."""
    if not hop.attempts:
        return
    hop.attempts.sort(key=lambda a: (a.end, a.attempt))
    last = hop.attempts[-1]
    if hop.upstream:  # the answer came from an instance: that was the last attempt
        hop.attempts.append(Hop(
            process=hop.process, kind="attempt", service=hop.service, instance=hop.instance, method=hop.method,
            path=hop.path, status=hop.status, start=min(max(last.end, hop.start), hop.end), end=hop.end,
            upstream=hop.upstream, target=hop.target, attempt=last.attempt + 1))
    for attempt in hop.attempts[:-1]:
        attempt.retried = True
    for attempt in hop.attempts:
        attempt.parent = hop
        hop.children.append(attempt)


def _slots(hop: Hop) -> list[Hop]:
    """Where a hop relaying onwards hands a request to the next: its attempts, or itself."""
    return hop.attempts or [hop]


def _parent(hop: Hop, hops: list[Hop], taken: set[int]) -> Hop | None:
    if hop.kind == "inbound":  # relayed to this sidecar by a gateway or an upstream listener
        candidates = [s for h in hops if h.kind in ("gateway", "upstream") for s in _slots(h)]
        candidates = [c for c in candidates if not c.target or c.target == hop.process]
    elif hop.kind == "app":  # by its own sidecar; without one, straight from a relay
        candidates = [h for h in hops if h.kind == "inbound" and h.instance == hop.instance]
        if not candidates:
            candidates = [s for h in hops if h.kind in ("gateway", "upstream") for s in _slots(h)
                          if not s.target or s.target == hop.process]
    elif hop.kind == "upstream":  # called by its app (or, without an app line, during its inbound hop)
        candidates = [h for h in hops if h.kind == "app" and h.instance == hop.instance]
        candidates += [h for h in hops if h.kind == "inbound" and h.instance == hop.instance]
    else:
        return None
    fits = [c for c in candidates if c is not hop and _contains(c, hop)]
    if not fits:
        return None
    return max(fits, key=lambda c: (
        id(c) not in taken,
        # an upstream call: from the app rather than its sidecar; else a known address over a guess
        c.kind == "app" if hop.kind == "upstream" else bool(c.target),
        (c.method, c.path) == (hop.method, hop.path),
        -c.duration,
    ))


def _event_owner(event: Event, hops: list[Hop]) -> Hop | None:
    """The tightest hop of the event's process around its time (of its instance, else)."""
    instance = event.process.removesuffix(".sidecar")
    for same in (lambda h: h.process == event.process, lambda h: h.instance == instance):
        around = [h for h in hops if same(h) and h.start - TOLERANCE <= event.ts <= h.end + TOLERANCE]
        if around:
            return min(around, key=lambda h: h.duration)
    return None
