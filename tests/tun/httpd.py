"""Test HTTP server: serves a directory, /whoami (client address), POST /upload (sha256 of body)."""

from __future__ import annotations

import hashlib
import sys
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


class Handler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/whoami":
            self._reply(f"{self.client_address[0]}\n".encode())
            return
        super().do_GET()

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length", "0"))
        h = hashlib.sha256()
        while n:
            chunk = self.rfile.read(min(n, 1 << 16))
            if not chunk:
                break
            h.update(chunk)
            n -= len(chunk)
        self._reply(f"{h.hexdigest()}\n".encode())


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256


def main() -> None:
    host, port, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    srv = Server((host, port), partial(Handler, directory=root))
    print("ready", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
