"""A process of the platform that cannot take its port ends with one clear line.

Binding fails when a port is taken (by another program, or as the source port of some
outgoing connection when the instance range overlaps the kernel's ephemeral ports) or not
allowed. That is the operator's to fix, and the supervisor shows the process's last exit:
a log line naming the address serves them better than a 40-line traceback through
uvloop. Every other error keeps its traceback.
"""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

BIND_ERRORS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})
EXIT_CANNOT_LISTEN = 3


@contextmanager
def exit_cleanly_if_it_cannot_listen() -> Iterator[None]:
    """Around a process's main loop: a bind error becomes one log line and exit status 3."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in BIND_ERRORS:
            raise
        logging.getLogger("meshvisor").error("cannot listen: %s", exc)
        sys.exit(EXIT_CANNOT_LISTEN)
