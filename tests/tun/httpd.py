"""Test HTTP server: serves a directory, /whoami (client address), POST /upload (sha256 of body)."""

from __future__ import annotations

import hashlib
import socket
import sys
import threading
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


def _digest_after_eof(conn: socket.socket) -> None:
    """Read until the client half-closes, then answer with the SHA-256 and close."""
    with conn:
        h = hashlib.sha256()
        try:
            while chunk := conn.recv(1 << 16):
                h.update(chunk)
            conn.sendall(h.hexdigest().encode() + b"\n")
        except OSError:
            pass  # the client went away (e.g. the benchmark's idle flows being closed)


def _digest_server(host: str, port: int) -> None:
    ls = socket.create_server((host, port), backlog=128)
    while True:
        c, _ = ls.accept()
        threading.Thread(target=_digest_after_eof, args=(c,), daemon=True).start()


def main() -> None:
    host, port, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    srv = Server((host, port), partial(Handler, directory=root))
    threading.Thread(target=_digest_server, args=(host, port + 1), daemon=True).start()
    if len(sys.argv) > 4:  # an IPv6 address too
        class Server6(Server):
            address_family = socket.AF_INET6

        srv6 = Server6((sys.argv[4], port), partial(Handler, directory=root))
        threading.Thread(target=srv6.serve_forever, daemon=True).start()
    print("ready", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
