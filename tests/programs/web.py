"""A small HTTP service for the supervisor tests; its behaviour comes from flags.

  GET  /bytes/N     N bytes of a repeating pattern (streamed, Content-Length)
  GET  /sleep/S     answers after S seconds
  GET  /openapi.json  a small OpenAPI document with one path under $SERVICE_ROUTE
  GET  /metrics     web_requests_total (requests answered so far), in Prometheus's text format
  GET  anything     {"pid": ..., "path": ..., "headers": {...}, "via": "tcp" or "unix"}
  POST anything     {"pid": ..., "length": ..., "sha256": ...} of the body (streamed)

  --exit-now        exit with code 3 at once (a crash loop)
  --ignore-term     ignore SIGTERM (only SIGKILL stops it)
  --spawn-child     start a grandchild that sleeps (tests whole-tree stops)
  --slow-start S    sleep S seconds before listening

It listens on 127.0.0.1:$PORT and, if $APP_SOCKET is set, on that Unix socket too.
"""

import argparse
import hashlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import ThreadingUnixStreamServer


PATTERN = bytes(range(256)) * 4096  # 1 MiB
ANSWERED = itertools.count()  # next() is atomic under the GIL: one per request, across threads


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real apps do

    def do_GET(self):
        answered = next(ANSWERED)
        if self.path == "/metrics":
            body = f"# TYPE web_requests counter\nweb_requests_total {answered}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        # Markers may follow a route prefix (/api/v1/x/sleep/2): the gateway passes full paths.
        if "/sleep/" in self.path:
            time.sleep(float(self.path.split("/sleep/")[1].split("/")[0]))
        if self.path == "/openapi.json":
            name = os.environ.get("SERVICE_NAME", "web")
            route = os.environ.get("SERVICE_ROUTE", "")
            self._json({
                "openapi": "3.0.3",
                "info": {"title": f"{name} service", "version": "1"},
                "paths": {f"{route}/things": {"get": {"summary": f"list {name} things",
                                                        "responses": {"200": {"description": "ok"}}}}},
                "components": {"schemas": {"Thing": {"type": "object", "title": name}}},
            })
            return
        if "/bytes/" in self.path:
            size = int(self.path.split("/bytes/")[1].split("/")[0])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            while size > 0:
                chunk = PATTERN[:min(size, len(PATTERN))]
                self.wfile.write(chunk)
                size -= len(chunk)
            return
        via = "unix" if self.server.address_family == socket.AF_UNIX else "tcp"
        self._json({"pid": os.getpid(), "path": self.path, "headers": dict(self.headers), "via": via})

    def do_POST(self):
        next(ANSWERED)
        remaining = int(self.headers.get("Content-Length", "0"))
        digest, length = hashlib.sha256(), 0
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            length += len(chunk)
            remaining -= len(chunk)
        self._json({"pid": os.getpid(), "length": length, "sha256": digest.hexdigest()})

    def _json(self, data):
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass


class QuietErrors:
    def handle_error(self, request, client_address):
        # A client (a readiness probe, a killed test) dropping its keep-alive connection
        # is not worth a traceback in the log.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class UnixServer(QuietErrors, ThreadingUnixStreamServer):
    daemon_threads = True


class Server(QuietErrors, ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self):
        if os.environ.get("REUSE_PORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--exit-now", action="store_true")
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--spawn-child", action="store_true")
    parser.add_argument("--slow-start", type=float, default=0)
    args = parser.parse_args()
    name = os.environ.get("INSTANCE_NAME", "web")
    if args.exit_now:
        print(f"{name}: exiting at once", flush=True)
        sys.exit(3)
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.spawn_child:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        print(f"{name}: child {child.pid}", flush=True)
    time.sleep(args.slow_start)
    port = int(os.environ["PORT"])
    server = Server(("127.0.0.1", port), Handler)
    if os.environ.get("APP_SOCKET"):
        path = os.environ["APP_SOCKET"]
        if os.path.exists(path):
            os.unlink(path)  # left by an earlier run of this instance
        threading.Thread(target=UnixServer(path, Handler).serve_forever, daemon=True).start()
    print(f"{name}: listening on {port} pid {os.getpid()}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
