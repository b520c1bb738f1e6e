"""The Linux process controls that the supervisor and the sidecars' fork server both use.

prctl(2) has no binding in the standard library, so it is called through libc; and the
peer credentials of a Unix socket come back as a packed struct ucred.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(signal_number: int, parent: int) -> bool:
    """Have the kernel send `signal_number` when our parent dies; False if the parent is
    no longer `parent` (it died before the setting took effect, or we were handed to
    someone else), and then the caller should exit. Credential changes clear the setting:
    call it after setuid/setsid."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal_number, 0, 0, 0)
    return os.getppid() == parent


def become_child_subreaper() -> bool:
    """Orphaned descendants become our children (not init's); False if refused."""
    return _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected Unix socket."""
    pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid, gid
