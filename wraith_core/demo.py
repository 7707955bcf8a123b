"""``wraith demo``: a loopback demo of the whole tunnel.

Throwaway keys, a server on 127.0.0.1, a client with its SOCKS5 proxy, a
small web page on loopback, and one request through the proxy to prove it
works. Then it stays up until Ctrl-C so you can try it with curl.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import tempfile
from pathlib import Path

from python_socks.async_.asyncio import Proxy
from python_socks import ProxyType

from .client import WraithClient
from .keys import generate_ed25519
from .options import ConnectOptions, ServeOptions
from .server_api import WraithServer

PAGE = b"<html><body><h1>Hello through wraith</h1><p>This page came over SSH.</p></body></html>\n"


async def _page_server() -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n" % len(PAGE) + PAGE)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def _fetch_via_socks(socks_host: str, socks_port: int, host: str, port: int) -> bytes:
    sock = await Proxy(ProxyType.SOCKS5, socks_host, socks_port, rdns=True).connect(host, port, timeout=10)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
    body = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return body


async def run_demo(socks: str, once: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="wraith-demo-") as tmp:
        d = Path(tmp)
        host_key, _ = generate_ed25519(d / "host_key", "demo-host")
        client_key, client_pub = generate_ed25519(d / "client_key", "demo-client")
        server = WraithServer(ServeOptions(key=str(host_key), authorized_keys=str(client_pub),
                                           listen="127.0.0.1:0"))
        await server.start()
        server_addr = server.addresses()[0]
        host_pub = (d / "host_key.pub").read_text()
        client = WraithClient(ConnectOptions(server=server_addr, identity=str(client_key),
                                             host_key=host_pub, socks5=socks))
        pages = await _page_server()
        try:
            await client.start()
            await client.session.connection(timeout=15)
            assert client.socks is not None
            sh, sp = client.socks.host, client.socks.port
            page_port = pages.sockets[0].getsockname()[1]
            print(f"wraith demo: server   {server_addr} (throwaway keys in {tmp})")
            print(f"wraith demo: SOCKS5   {sh}:{sp}")
            body = await _fetch_via_socks(sh, sp, "localhost", page_port)
            ok = body.endswith(PAGE)
            print(f"wraith demo: GET http://localhost:{page_port}/ through the tunnel -> "
                  f"{body.split(b' ', 2)[1].decode() if ok else 'FAILED'} "
                  f"({len(PAGE)} bytes, sha256 {hashlib.sha256(PAGE).hexdigest()[:16]}…)")
            if not ok:
                raise SystemExit("wraith demo: the request through the tunnel failed")
            print("wraith demo: it works. Try it yourself:")
            print(f"    curl --socks5-hostname {sh}:{sp} http://localhost:{page_port}/")
            if once:
                return
            print("wraith demo: running; press Ctrl-C to stop.", flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        finally:
            pages.close()
            await client.close()
            await server.close()
