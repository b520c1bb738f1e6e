"""`supervisor logs`: read the per-process log files, merged in time order, and follow them.

Reads the files directly, so it works whether or not a supervisor is running.
"""

from __future__ import annotations

import heapq
import os
import time
from pathlib import Path

from supervisor.logs import Printer


def select(log_dir: Path, target: str | None) -> dict[str, Path]:
    """{process name: current file} for every process, a service, or an instance."""
    found = {}
    for path in sorted(log_dir.glob("*.log")):
        name = path.name[: -len(".log")]
        if target is None or name == target or name.startswith(target + "."):
            found[name] = path
    return found


def _split(line: str) -> tuple[str, str]:
    stamp, sep, text = line.partition(" ")
    if not sep or len(stamp) < 19 or stamp[4] != "-":
        return "", line
    return stamp, text


def _last_lines(path: Path, count: int) -> list[str]:
    """The last `count` lines, reading backwards from the end (files can be large)."""
    if count <= 0:
        return []
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        block, data = 65536, b""
        while end > 0 and data.count(b"\n") <= count:
            start = max(0, end - block)
            f.seek(start)
            data = f.read(end - start) + data
            end = start
    return data.decode("utf-8", "replace").splitlines()[-count:]


def show(files: dict[str, Path], count: int, follow: bool, printer: Printer) -> None:
    printer.width = max(len(n) for n in files)
    merged = heapq.merge(
        *([(*_split(line), name) for line in _last_lines(path, count)] for name, path in files.items()),
        key=lambda item: item[0],
    )
    for stamp, text, name in list(merged)[-count:] if count > 0 else []:
        printer.line(name, text, stamp or None)
    if not follow:
        return
    followers = {name: _Follower(path) for name, path in files.items()}
    while True:
        fresh = []
        for name, follower in followers.items():
            fresh += [(*_split(line), name) for line in follower.read_new()]
        fresh.sort(key=lambda item: item[0])
        for stamp, text, name in fresh:
            printer.line(name, text, stamp or None)
        time.sleep(0.25)


class _Follower:
    """Reads lines appended to a file, reopening it when it is rotated."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "rb")
        self._file.seek(0, os.SEEK_END)
        self._inode = os.fstat(self._file.fileno()).st_ino
        self._partial = b""

    def read_new(self) -> list[str]:
        data = self._file.read()
        try:
            st = os.stat(self.path)
            if st.st_ino != self._inode:  # rotated: finish the old file, start the new one
                self._file.close()
                self._file = open(self.path, "rb")
                self._inode = st.st_ino
                data += self._file.read()
        except FileNotFoundError:
            pass
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        return [line.decode("utf-8", "replace") for line in lines]
