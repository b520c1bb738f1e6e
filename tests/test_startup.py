"""A process that cannot take its port ends with one log line and exit status 3."""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess

import pytest

from shared.kit.startup import EXIT_CANNOT_LISTEN, exit_cleanly_if_it_cannot_listen
from tests.helpers import PY, ROOT


def test_a_bind_error_is_one_line_and_status_3(caplog):
    with pytest.raises(SystemExit) as ended, exit_cleanly_if_it_cannot_listen():
        raise OSError(errno.EADDRINUSE, "error while attempting to bind on address ('127.0.0.1', 1): address already in use")
    assert ended.value.code == EXIT_CANNOT_LISTEN
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage().startswith("cannot listen: [Errno 98]") and record.exc_info is None


def test_other_errors_keep_their_traceback():
    with pytest.raises(ConnectionResetError), exit_cleanly_if_it_cannot_listen():
        raise ConnectionResetError(errno.ECONNRESET, "reset")


def test_the_gateway_on_a_taken_port_says_so_without_a_traceback(consul_agent):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([PY, "-m", "services.gateway"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PORT": str(port), "CONSUL_HTTP_ADDR": consul_agent,
                                   "GATEWAY_REGISTER": "0"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_CANNOT_LISTEN, output
    assert "cannot listen: [Errno 98]" in output and str(port) in output
    assert "Traceback" not in output and "Unclosed" not in output
