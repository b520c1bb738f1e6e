"""A small HTTP service for the supervisor tests; its behaviour comes from flags.

  --exit-now        exit with code 3 at once (a crash loop)
  --ignore-term     ignore SIGTERM (only SIGKILL stops it)
  --spawn-child     start a grandchild that sleeps (tests whole-tree stops)
  --slow-start S    sleep S seconds before listening
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = f'{{"pid": {os.getpid()}, "path": "{self.path}"}}'.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass


class Server(ThreadingHTTPServer):
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
    print(f"{name}: listening on {port} pid {os.getpid()}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
