"""The Procfile: `name: command` per line, as honcho and foreman read it."""

from __future__ import annotations

import re
from pathlib import Path

_LINE = re.compile(r"^([A-Za-z0-9_-]+):\s*(.+)$")


class ProcfileError(Exception):
    pass


def parse_procfile(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProcfileError(f"{path}: file not found") from None
    commands: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _LINE.match(stripped)
        if not match:
            raise ProcfileError(f"{path}:{number}: expected 'name: command', got {stripped!r}")
        name, command = match.group(1), match.group(2).strip()
        if name in commands:
            raise ProcfileError(f"{path}:{number}: '{name}' is defined twice")
        commands[name] = command
    if not commands:
        raise ProcfileError(f"{path}: no processes defined")
    return commands
