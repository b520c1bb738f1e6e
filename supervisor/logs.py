"""Process output: per-process log files rotated by size, and the foreground printer.

Each line in a file is `<ISO timestamp> <text>` so that `supervisor logs` can merge
several files in time order.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
import threading
from pathlib import Path

# Colours cycled over process names in the foreground, as honcho and foreman do.
_COLOURS = [36, 33, 32, 35, 34, 91, 96, 93, 92, 95, 94]


def timestamp() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="milliseconds")


class RotatingFile:
    """Appends lines to `path`; past max_bytes renames it to path.1 (path.1 to path.2, ...)."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "ab", buffering=0)
        self._size = self._file.tell()

    def write_line(self, stamp: str, text: bytes) -> None:
        self.write_lines(stamp, [text])

    def write_lines(self, stamp: str, lines: list[bytes]) -> None:
        """All `lines` with one stamp, in one write: a busy proxy's access log sends
        hundreds of lines per read, and a write and a clock reading per line cost the
        supervisor more CPU than the lines themselves."""
        prefix = stamp.encode() + b" "
        records = b"".join([prefix + line.rstrip(b"\n") + b"\n" for line in lines])
        if self._size + len(records) > self.max_bytes and self._size > 0:
            self._rotate()
        self._file.write(records)
        self._size += len(records)

    def _rotate(self) -> None:
        self._file.close()
        if self.backups > 0:
            for n in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{n}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self._file = open(self.path, "ab", buffering=0)
        self._size = 0

    def close(self) -> None:
        self._file.close()


class Printer:
    """Writes `HH:MM:SS name | line` to the terminal, coloured when it is one."""

    def __init__(self, stream=None, colour: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        if colour is None:
            colour = self.stream.isatty() and not os.environ.get("NO_COLOR")
        self.colour = colour
        self.width = 12
        self._colours: dict[str, int] = {}
        self._lock = threading.Lock()

    def _colour_of(self, name: str) -> int:
        base = name.split(".")[0]
        if base not in self._colours:
            self._colours[base] = _COLOURS[len(self._colours) % len(_COLOURS)]
        return self._colours[base]

    def line(self, name: str, text: str, stamp: str | None = None) -> None:
        clock = (stamp or timestamp())[11:19]
        self.width = max(self.width, len(name))
        prefix = f"{clock} {name:<{self.width}} | "
        if self.colour:
            prefix = f"\033[{self._colour_of(name)}m{prefix}\033[0m"
        with self._lock:
            try:
                self.stream.write(prefix + text.rstrip("\n") + "\n")
                self.stream.flush()
            except (BrokenPipeError, ValueError):
                pass


class ProcessLog:
    """Where one process's output goes: its file, and the printer when in the foreground."""

    def __init__(self, name: str, file: RotatingFile, printer: Printer | None) -> None:
        self.name = name
        self.file = file
        self.printer = printer

    def write(self, data: bytes) -> None:
        self.write_lines([data])

    def write_lines(self, lines: list[bytes]) -> None:
        """Lines read together: they share one timestamp."""
        stamp = timestamp()
        self.file.write_lines(stamp, lines)
        if self.printer is not None:
            for line in lines:
                self.printer.line(self.name, line.decode("utf-8", "replace"), stamp)

    def close(self) -> None:
        self.file.close()


class LogFiles:
    """The supervisor's log files: one per process name under `folder`, opened on first use
    and kept across restarts of that name, so every run of a process appends to one file."""

    def __init__(self, folder: Path, max_bytes: int, backups: int, printer: Printer | None) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.backups = backups
        self.printer = printer
        self._files: dict[str, RotatingFile] = {}

    def log(self, name: str) -> ProcessLog:
        if name not in self._files:
            self._files[name] = RotatingFile(self.folder / f"{name}.log", self.max_bytes, self.backups)
        return ProcessLog(name, self._files[name], self.printer)

    def close(self) -> None:
        for file in self._files.values():
            file.close()
