"""How `supervisor trace` shows a request (supervisor/trace.py): a waterfall in the
terminal, or JSON.

One line per hop, depth first in time order: its start (ms after the request's first hop
started), duration and status, a bar on one time scale for the whole request, then,
indented by depth, the process and its listener, where it relayed to, and the method and
path where they differ from the hop above. A retried hop's attempts are lines of their own
under it, each failed one marked `retry`; the apps' log lines while serving the request
are lines under their hop, a dot at their time.
"""

from __future__ import annotations

import datetime as _dt

from supervisor.trace import Event, Hop, Trace

MIN_LABEL = 40  # columns a label keeps, however narrow the terminal
BAR_MIN, BAR_MAX, BAR_PIPED = 20, 60, 40


def _rows(trace: Trace) -> list[tuple[int, Hop | Event]]:
    rows: list[tuple[int, Hop | Event]] = []

    def walk(hop: Hop, depth: int) -> None:
        rows.append((depth, hop))
        rows.extend((depth + 1, event) for event in hop.events)
        for child in hop.children:
            walk(child, depth + 1)

    for root in trace.roots:
        walk(root, 0)
    rows.extend((0, event) for event in trace.events)
    return rows


def _request_line_above(hop: Hop) -> tuple[str, str] | None:
    above = hop.parent
    while above is not None and above.kind == "attempt":
        above = above.parent
    return (above.method, above.path) if above is not None else None


def label(hop: Hop) -> str:
    where = hop.target or hop.upstream
    if hop.kind == "attempt":
        text = f"attempt {hop.attempt} -> {where or '?'}"
        if hop.error:
            text += f" {hop.error}"
        return text + (", retry" if hop.retried else "")
    text = f"{hop.process} {hop.kind}"
    if where and hop.kind != "app":
        text += f" -> {where}"
    if _request_line_above(hop) != (hop.method, hop.path):
        text += f" {hop.method} {hop.path}"
    if hop.retries and not hop.attempts:
        text += f" ({hop.retries} {'retry' if hop.retries == 1 else 'retries'})"
    return text


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def render(trace: Trace, width: int | None = None, unicode: bool = True) -> str:
    """The waterfall for a terminal `width` columns wide: the bar takes what the hops'
    labels leave (BAR_MIN to BAR_MAX columns); labels that still do not fit are clipped.
    Without a width (not a terminal), a bar of BAR_PIPED columns and whole labels."""
    start, end = trace.start, trace.end
    total = max(end - start, 1e-6)
    full, dot = ("█", "•") if unicode else ("#", "*")
    rows = _rows(trace)
    labels = []
    for depth, item in rows:
        text = label(item) if isinstance(item, Hop) else f"{item.level} {item.logger + ': ' if item.logger else ''}{item.msg}"
        labels.append("  " * depth + text)
    fixed = 8 + 2 + 8 + 2 + 6 + 2 + 2 + 2  # START, MS, STATUS, the bar's edges, gaps
    longest = max([len("HOP")] + [len(text) for text in labels])
    if width is None:
        bar_width, room = BAR_PIPED, longest
    else:
        bar_width = max(BAR_MIN, min(BAR_MAX, width - fixed - longest))
        room = max(MIN_LABEL, width - fixed - bar_width)
    hops = [item for _, item in rows if isinstance(item, Hop)]
    root = trace.roots[0] if trace.roots else None
    retries = sum(1 for hop in hops if hop.retried)
    stamp = _dt.datetime.fromtimestamp(start).astimezone().isoformat(timespec="milliseconds")
    lines = [
        f"request {trace.request_id}"
        + (f": {root.method} {root.path} -> {root.status or '-'}" if root is not None else "")
        + f" in {_ms(total)} ms",
        f"started {stamp}; {len(hops)} {'hop' if len(hops) == 1 else 'hops'}"
        + (f", {retries} {'retry' if retries == 1 else 'retries'}" if retries else ""),
        "",
        f"{'START ms':>8}  {'MS':>8}  {'STATUS':>6}  |0{(_ms(total) + ' ms').rjust(bar_width - 1)}|  HOP",
    ]
    for (depth, item), text in zip(rows, labels):
        if isinstance(item, Hop):
            first = min(bar_width - 1, int((item.start - start) / total * bar_width))
            last = max(first + 1, min(bar_width, round((item.end - start) / total * bar_width + 0.4999)))
            bar = " " * first + full * (last - first) + " " * (bar_width - last)
            cells = f"{_ms(item.start - start):>8}  {_ms(item.duration):>8}  {item.status or '-':>6}"
        else:
            at = min(bar_width - 1, int((item.ts - start) / total * bar_width))
            bar = " " * at + dot + " " * (bar_width - at - 1)
            cells = f"{_ms(item.ts - start):>8}  {'':>8}  {'':>6}"
        lines.append(f"{cells}  |{bar}|  {_clip(text, room)}")
    return "\n".join(line.rstrip() for line in lines) + "\n"


def as_json(trace: Trace) -> dict:
    """The trace for machines: every hop in display order, with its depth and its parent's
    index in the list (None for a root); times in ms from the request's start."""
    start = trace.start
    hops: list[dict] = []
    index: dict[int, int] = {}
    for depth, item in _rows(trace):
        if not isinstance(item, Hop):
            continue
        index[id(item)] = len(hops)
        hops.append({
            "depth": depth, "parent": index.get(id(item.parent)) if item.parent is not None else None,
            "process": item.process, "kind": item.kind, "service": item.service, "instance": item.instance,
            "method": item.method, "path": item.path, "status": item.status,
            "start_ms": round((item.start - start) * 1000, 3), "duration_ms": round(item.duration * 1000, 3),
            "upstream": item.upstream, "target": item.target, "retries": item.retries,
            "attempt": item.attempt, "retried": item.retried, "error": item.error,
            "events": [_event(event, start) for event in item.events],
        })
    return {
        "request_id": trace.request_id, "start": start, "duration_ms": round((trace.end - start) * 1000, 3),
        "hops": hops, "events": [_event(event, start) for event in trace.events],
    }


def _event(event: Event, start: float) -> dict:
    return {"process": event.process, "at_ms": round((event.ts - start) * 1000, 3), "level": event.level,
            "logger": event.logger, "msg": event.msg}
