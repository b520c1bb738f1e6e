"""Cleans up after a supervisor that died without doing it itself (e.g. SIGKILL).

The parent-death signal reaches only the supervisor's direct children; whatever those
forked would live on. The watchdog runs in its own session with the read end of a pipe
whose write end only the supervisor holds. When the pipe closes without the supervisor
having said goodbye, the watchdog stops every process group recorded in run/pids.json.

    python -m supervisor.watchdog STATE_DIR   (stdin: the pipe)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from supervisor.state import clean_leftovers

GOODBYE = b"bye\n"


class Watchdog:
    """The supervisor's side: start it, and tell it when we leave on purpose."""

    def __init__(self, state_dir: Path) -> None:
        read, self._write = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.watchdog", str(state_dir)],
            stdin=read, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C or kill of our group must not reach it
        )
        os.close(read)

    def dismiss(self) -> None:
        try:
            os.write(self._write, GOODBYE)
            os.close(self._write)
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def main() -> None:
    state_dir = Path(sys.argv[1])
    data = b""
    while True:
        chunk = os.read(0, 64)
        if not chunk:
            break
        data += chunk
    if data.endswith(GOODBYE):
        return
    log = state_dir / "logs" / "supervisor.log"

    def say(message: str) -> None:
        from supervisor.logs import timestamp

        with open(log, "a") as f:
            f.write(f"{timestamp()} [watchdog] {message}\n")

    say("the supervisor died without stopping its processes; cleaning up")
    count = clean_leftovers(state_dir, say, grace=3.0)
    say(f"stopped {count} process(es)")


if __name__ == "__main__":
    main()
