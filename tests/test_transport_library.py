"""Library parity: serve() + open_stream() in process over tls+stealth and iroh, ConnectionInfo per transport."""

from __future__ import annotations

import asyncio

import pytest

from helpers import Keys
from transport_helpers import Certs

pytestmark = pytest.mark.timeout(60)


def _serve_options(keys: Keys, transport: str, certs: Certs):  # type: ignore[no-untyped-def]
    from wraith_core.options import ServeOptions

    opts = ServeOptions(key=keys.host.read_bytes(), authorized_keys=keys.authorized.read_bytes(),
                        transport=transport, listen="127.0.0.1:0", drain_time=0.5)
    if transport == "tls":
        opts = opts.replace(tls_cert=certs.cert.read_bytes(), tls_key=certs.key.read_bytes(), stealth=True)
    if transport == "iroh":
        opts = opts.replace(iroh_relay="none")
    return opts


@pytest.mark.parametrize("transport", ["tls", "iroh"])
async def test_serve_and_open_stream_in_process(keys: Keys, tmp_path, transport: str) -> None:
    from wraith_core import open_stream, serve
    from wraith_core.options import ConnectOptions
    from wraith_core.transport.base import drain_transports

    certs = Certs.make(tmp_path / "certs")
    got: asyncio.Queue = asyncio.Queue()

    async def echo(stream, info) -> None:  # type: ignore[no-untyped-def]
        await got.put(info)
        data = await stream.read(-1)
        stream.write(data[::-1])
        stream.write_eof()

    server = await serve(_serve_options(keys, transport, certs),
                         on_connection=lambda s, i: asyncio.ensure_future(echo(s, i)))
    try:
        lines = server.addresses()
        copts = ConnectOptions(transport=transport, identity=keys.client.read_bytes(),
                               host_key=keys.host_pub.read_bytes(), socks5=None)
        if transport == "tls":
            port = int(lines[0].rsplit(":", 1)[1])
            copts = copts.replace(server=f"127.0.0.1:{port}", tls_ca=certs.ca.read_bytes())
        else:
            ticket = next(ln.split(" ", 1)[1] for ln in lines if ln.startswith("ticket "))
            assert any(ln.startswith("endpoint-id ") for ln in lines)
            copts = copts.replace(peer=ticket, iroh_relay="none")
        payload = bytes(range(256)) * 4096  # 1 MiB, both ways, with half-close
        stream = await open_stream(copts)  # wraith-control:0
        stream.write(payload)
        stream.write_eof()
        back = await asyncio.wait_for(stream.read(-1), 30)
        stream.close()
        assert back == payload[::-1]
        info = await asyncio.wait_for(got.get(), 5)
        assert info.transport == transport
        if transport == "iroh":
            assert len(info.remote_address) == 64  # the client's endpoint id
        else:
            assert info.remote_address == "127.0.0.1"
    finally:
        await server.close()
        await server.runner.acceptor.wait_closed()
        await drain_transports()


async def test_iroh_authorized_keys_from_option(keys: Keys, tmp_path) -> None:
    """authorized_keys from= sees the iroh peer's UDP source address (direct path)."""
    from wraith_core import open_stream, serve
    from wraith_core.errors import AuthError
    from wraith_core.options import ConnectOptions
    from wraith_core.transport.base import drain_transports

    pub = keys.client_pub.read_text().strip()
    for pattern, allowed in (("127.0.0.1", True), ("10.9.9.9", False)):
        opts = _serve_options(keys, "iroh", Certs.make(tmp_path / "c")).replace(
            authorized_keys=f'from="{pattern}" {pub}\n'.encode())
        server = await serve(opts, on_connection=lambda s, i: s.close())
        try:
            ticket = next(ln.split(" ", 1)[1] for ln in server.addresses() if ln.startswith("ticket "))
            copts = ConnectOptions(transport="iroh", peer=ticket, iroh_relay="none", socks5=None,
                                   identity=keys.client.read_bytes(), host_key=keys.host_pub.read_bytes())
            if allowed:
                stream = await open_stream(copts)
                stream.close()
            else:
                with pytest.raises(AuthError):
                    await open_stream(copts)
        finally:
            await server.close()
            await server.runner.acceptor.wait_closed()
            await drain_transports()
