"""The Python event target: point-to-point over serve() + open_stream(), through the hub of a real
`wraith serve`, and over plain --forward / --remote-forward port forwards to a standalone hub."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from helpers import PY, Keys, Proc, free_port, start_client, start_server, wait_for_log
from wraith_core import ConnectOptions, ServeOptions, create_event_target, open_stream, serve
from wraith_core.duplex import DuplexStream
from wraith_core.events import Event, EventStreamError, EventTarget, EventTargetClosed
from wraith_core.keys import fingerprint, load_private_key
from wraith_core.protocol.envelope import SUBSCRIBE, UNSUBSCRIBE, Envelope, EnvelopeDecoder, make_frame
from wraith_core.server_api import WraithServer
from wraith_core.ssh.server import ConnectionInfo

PY_HUB = ["-m", "wraith_core.bus", "--listen", "127.0.0.1:0"]


def client_opts(keys: Keys, port: int, **kw: object) -> ConnectOptions:
    return ConnectOptions(server=f"127.0.0.1:{port}", identity=str(keys.client), host_key=str(keys.host_pub),
                          socks5=None, **kw)  # type: ignore[arg-type]


class Incoming:
    """serve() with an on_connection callback that records (stream, info)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[DuplexStream, ConnectionInfo]] = asyncio.Queue()

    def __call__(self, stream: DuplexStream, info: ConnectionInfo) -> None:
        self.queue.put_nowait((stream, info))

    async def next(self) -> tuple[DuplexStream, ConnectionInfo]:
        return await asyncio.wait_for(self.queue.get(), 10)


@pytest.fixture
async def p2p(keys: Keys) -> AsyncIterator[tuple[WraithServer, Incoming, ConnectOptions]]:
    incoming = Incoming()
    server = await serve(ServeOptions(key=str(keys.host), authorized_keys=str(keys.authorized),
                                      listen="127.0.0.1:0"), on_connection=incoming)
    port = int(server.addresses()[0].rsplit(":", 1)[1])
    yield server, incoming, client_opts(keys, port, user="alice")
    await server.close()


async def pair(incoming: Incoming, opts: ConnectOptions) -> tuple[EventTarget, EventTarget, ConnectionInfo]:
    client = create_event_target(await open_stream(opts))
    stream, info = await incoming.next()
    return client, create_event_target(stream), info


async def test_connection_info(p2p: tuple[WraithServer, Incoming, ConnectOptions], keys: Keys) -> None:
    _, incoming, opts = p2p
    _, _, info = await pair(incoming, opts)
    assert info.remote_address == "127.0.0.1"
    assert info.transport == "tcp"
    assert info.user == "alice"
    assert info.key_fingerprint == fingerprint(load_private_key(str(keys.client), "client key"))


async def test_point_to_point_both_directions(p2p: tuple[WraithServer, Incoming, ConnectOptions]) -> None:
    _, incoming, opts = p2p
    client, server_side, _ = await pair(incoming, opts)
    to_server: asyncio.Queue[Event] = asyncio.Queue()
    to_client: asyncio.Queue[Event] = asyncio.Queue()
    server_side.add_event_listener("to-server", to_server.put_nowait)
    client.add_event_listener("to-client", to_client.put_nowait)
    await client.wait_subscribed("to-server")
    await server_side.wait_subscribed("to-client")
    assert client.peer_subscriptions == {"to-server"}
    assert client.dispatch_event(Event("to-server", {"n": 1}, id="e1"))
    assert server_side.dispatch_event("to-client", [1, "two", None])
    got = await asyncio.wait_for(to_server.get(), 10)
    assert (got.type, got.detail, got.id) == ("to-server", {"n": 1}, "e1")
    assert (await asyncio.wait_for(to_client.get(), 10)).detail == [1, "two", None]
    # types the peer did not subscribe to are not sent at all
    assert client.dispatch_event("to-client", "nope") is False
    assert server_side.dispatch_event("to-server", "nope") is False
    client.close()
    await client.wait_closed()
    await asyncio.wait_for(server_side.wait_closed(), 10)


async def test_peer_eof_closes_this_side_too(p2p: tuple[WraithServer, Incoming, ConnectOptions]) -> None:
    _, incoming, opts = p2p
    client, server_side, _ = await pair(incoming, opts)
    evs = client.events("bye")
    await server_side.wait_subscribed("bye")
    assert server_side.dispatch_event("bye", "last")
    server_side.close()  # flush, EOF, close
    assert (await evs.__anext__()).detail == "last"
    with pytest.raises(StopAsyncIteration):  # a clean end, not an error
        await evs.__anext__()
    await asyncio.wait_for(client.wait_closed(), 10)
    assert client.error is None
    with pytest.raises(EventTargetClosed):
        client.dispatch_event("bye", 1)


async def test_close_through_the_hub_is_prompt(keys: Keys, tmp_path: Path, procs: list) -> None:
    proc, port = start_server(keys, tmp_path)
    procs.append(proc)
    stream = await open_stream(client_opts(keys, port))
    target = create_event_target(stream)
    target.add_event_listener("x", lambda e: None)
    await target.wait_subscribed("x")
    t0 = asyncio.get_running_loop().time()
    target.close()
    await asyncio.wait_for(target.wait_closed(), 5)
    assert asyncio.get_running_loop().time() - t0 < 2
    assert target.error is None


async def test_not_point_to_point_sends_everything(p2p: tuple[WraithServer, Incoming, ConnectOptions]) -> None:
    _, incoming, opts = p2p
    sender = create_event_target(await open_stream(opts), point_to_point=False)
    stream, _ = await incoming.next()
    raw = RawPeer(stream)
    assert sender.dispatch_event("unannounced", 1)  # nobody subscribed, sent anyway
    (env,) = await raw.read_until(1)
    assert (env.type, env.payload) == ("unannounced", 1)


class RawPeer:
    """The far side of a stream read frame by frame, to see exactly what the adapter sends."""

    def __init__(self, stream: DuplexStream) -> None:
        self.s = stream
        self.dec = EnvelopeDecoder()
        self.got: list[Envelope] = []

    async def read_until(self, n: int, timeout: float = 10.0) -> list[Envelope]:
        while len(self.got) < n:
            data = await asyncio.wait_for(self.s.read(65536), timeout)
            assert data, "stream ended"
            self.dec.receive_data(data)
            self.got += [e for e in self.dec.events() if isinstance(e, Envelope)]
        return self.got


async def test_adapter_wire_behaviour(p2p: tuple[WraithServer, Incoming, ConnectOptions]) -> None:
    _, incoming, opts = p2p
    target = create_event_target(await open_stream(opts))
    stream, _ = await incoming.next()
    raw = RawPeer(stream)

    def f1(ev: Event) -> None: ...
    def f2(ev: Event) -> None: ...

    target.add_event_listener("x", f1)
    target.add_event_listener("x", f2)  # second listener: no second __subscribe
    target.add_event_listener("x", f1)  # duplicate: ignored
    target.remove_event_listener("x", f1)  # one left: no __unsubscribe
    assert target.dispatch_event("unwanted", 1) is False
    target.remove_event_listener("x", f2)  # last one: __unsubscribe
    stream.write(make_frame(SUBSCRIBE, {"type": "wanted"}))
    await target.wait_subscribed("wanted")
    assert target.dispatch_event("wanted", {"ok": True})
    got = await raw.read_until(3)
    assert [(e.type, e.payload) for e in got] == [
        (SUBSCRIBE, {"type": "x"}), (UNSUBSCRIBE, {"type": "x"}), ("wanted", {"ok": True})]
    stream.write(make_frame(UNSUBSCRIBE, {"type": "wanted"}))
    stream.write(make_frame("x", "not subscribed any more: dropped"))
    # after the peer unsubscribes nothing more is sent
    while "wanted" in target.peer_subscriptions:
        await asyncio.sleep(0.01)
    assert target.dispatch_event("wanted", 2) is False
    with pytest.raises(ValueError):
        target.add_event_listener("__subscribe", f1)
    with pytest.raises(ValueError):
        target.dispatch_event("__anything", 1)
    target.close()
    with pytest.raises(EventTargetClosed):
        target.dispatch_event("wanted", 3)


async def test_listeners_async_and_failing(p2p: tuple[WraithServer, Incoming, ConnectOptions]) -> None:
    _, incoming, opts = p2p
    client, server_side, _ = await pair(incoming, opts)
    order: list[str] = []
    done = asyncio.Event()
    errors: list[BaseException] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _l, ctx: errors.append(ctx["exception"]))

    def broken(ev: Event) -> None:
        raise RuntimeError("listener bug")

    async def slow(ev: Event) -> None:
        await asyncio.sleep(0.05)
        order.append(f"slow-{ev.detail}")

    def fast(ev: Event) -> None:
        order.append(f"fast-{ev.detail}")
        if ev.detail == 2:
            done.set()

    for fn in (broken, slow, fast):
        server_side.add_event_listener("t", fn)
    await client.wait_subscribed("t")
    for i in (1, 2):
        client.dispatch_event("t", i)
    await asyncio.wait_for(done.wait(), 10)
    assert order == ["slow-1", "fast-1", "slow-2", "fast-2"]  # async listeners are awaited, in order
    assert len(errors) == 2 and all(isinstance(e, RuntimeError) for e in errors)
    loop.set_exception_handler(None)


async def test_iteration_bounded_and_in_order(p2p: tuple[WraithServer, Incoming, ConnectOptions]) -> None:
    _, incoming, opts = p2p
    client = create_event_target(await open_stream(opts), queue_size=4)
    stream, _ = await incoming.next()
    server_side = create_event_target(stream)
    got: list[int] = []
    async with client.events("n") as numbers:
        await server_side.wait_subscribed("n")
        for i in range(500):
            assert server_side.dispatch_event("n", i)
        await server_side.drain()
        async for ev in numbers:
            got.append(ev.detail)
            if len(got) % 50 == 0:
                await asyncio.sleep(0.01)  # a slow consumer: the reader waits, nothing is lost
            if len(got) == 500:
                break
    assert got == list(range(500))
    while "n" in server_side.peer_subscriptions:  # leaving the block unsubscribed
        await asyncio.sleep(0.01)
    server_side.close()
    async for _ in client:  # the catch-all iterator ends when the stream does
        raise AssertionError("no events expected")


async def test_protocol_error_from_peer_ends_iteration(p2p: tuple[WraithServer, Incoming, ConnectOptions]) -> None:
    _, incoming, opts = p2p
    client = create_event_target(await open_stream(opts))
    stream, _ = await incoming.next()
    evs = client.events("a")
    stream.write(make_frame("a", 1) + b"\x00\x00\x00\x05junk!")
    assert (await evs.__anext__()).detail == 1
    with pytest.raises(EventStreamError):
        await evs.__anext__()
    assert client.closed
    await asyncio.wait_for(stream.wait_closed(), 10)  # the adapter closed the broken stream


async def test_a_peer_subscribing_to_too_many_types_is_cut_off(
        p2p: tuple[WraithServer, Incoming, ConnectOptions]) -> None:
    """What a peer subscribes to is remembered (to send only those types): bounded, like the hub."""
    from wraith_core.events import MAX_PEER_TYPES

    _, incoming, opts = p2p
    client = create_event_target(await open_stream(opts))
    stream, _ = await incoming.next()
    frames = b"".join(make_frame(SUBSCRIBE, {"type": f"t{i}"}) for i in range(MAX_PEER_TYPES))
    stream.write(frames)
    await asyncio.wait_for(client.wait_subscribed(f"t{MAX_PEER_TYPES - 1}"), 30)  # the limit itself is fine
    stream.write(make_frame(SUBSCRIBE, {"type": "one-more"}))
    await asyncio.wait_for(stream.wait_closed(), 10)
    assert client.closed and isinstance(client.error, EventStreamError)
    assert "more than 65536 types" in str(client.error)


async def test_async_iteration_of_serve(keys: Keys) -> None:
    server = await serve(ServeOptions(key=str(keys.host), authorized_keys=str(keys.authorized),
                                      listen="127.0.0.1:0"))
    port = int(server.addresses()[0].rsplit(":", 1)[1])
    seen: list[ConnectionInfo] = []

    async def accept() -> None:
        async for stream, info in server:
            seen.append(info)
            target = create_event_target(stream)
            await target.wait_subscribed("hello")
            target.dispatch_event("hello", info.user)

    task = asyncio.create_task(accept())
    client = create_event_target(await open_stream(client_opts(keys, port, user="bob")))
    async with client.events("hello") as hellos:
        async for ev in hellos:
            assert ev.detail == "bob"
            break
    await server.close()
    await asyncio.wait_for(task, 10)  # iteration ends when the server closes
    assert [i.user for i in seen] == ["bob"]


async def test_adapters_through_the_hub_of_wraith_serve(keys: Keys, tmp_path: Path, procs: list) -> None:
    proc, port = start_server(keys, tmp_path)
    procs.append(proc)
    a, b, c = [create_event_target(await open_stream(client_opts(keys, port))) for _ in range(3)]
    got: dict[str, list[object]] = {"a": [], "b": [], "c": []}
    a.add_event_listener("room", lambda e: got["a"].append(e.detail))
    b.add_event_listener("room", lambda e: got["b"].append(e.detail))
    await c.wait_subscribed("room")  # the hub wants "room" on behalf of a and b
    await a.wait_subscribed("room")
    assert c.dispatch_event("room", "from c")
    assert a.dispatch_event("room", "from a")  # a subscribed: gets its own event back
    assert c.dispatch_event("other", 1) is False  # nobody on the hub wants it: not sent
    while len(got["a"]) < 2 or len(got["b"]) < 2:
        await asyncio.sleep(0.01)
    assert got == {"a": ["from c", "from a"], "b": ["from c", "from a"], "c": []}
    for t in (a, b, c):
        t.close()
        await t.wait_closed()


async def _forward_roundtrip(port: int) -> None:
    """Two adapters on plain TCP connections to ``port`` exchange events through a hub."""
    a = create_event_target(await asyncio.open_connection("127.0.0.1", port))
    b = create_event_target(await asyncio.open_connection("127.0.0.1", port))
    inbox: asyncio.Queue[Event] = asyncio.Queue()
    a.add_event_listener("fwd", inbox.put_nowait)
    await b.wait_subscribed("fwd")
    payload = {"blob": "x" * 200_000, "n": 7}
    assert await b.publish("fwd", payload)
    assert (await asyncio.wait_for(inbox.get(), 10)).detail == payload
    a.remove_event_listener("fwd", inbox.put_nowait)
    while "fwd" in b.peer_subscriptions:
        await asyncio.sleep(0.01)
    assert b.dispatch_event("fwd", 1) is False
    for t in (a, b):
        t.close()
        await t.wait_closed()


def _start_hub(tmp_path: Path, procs: list) -> int:
    hub = Proc([PY, *PY_HUB], tmp_path / "hub.log", ready=r"listening 127\.0\.0\.1:(\d+)$")
    procs.append(hub)
    assert hub.match is not None
    return int(hub.match.group(1))


async def test_over_local_forward_to_a_hub(keys: Keys, tmp_path: Path, procs: list) -> None:
    hub_port = _start_hub(tmp_path, procs)
    server, sport = start_server(keys, tmp_path)
    procs.append(server)
    client, _ = start_client(keys, tmp_path, sport, "--forward", f"127.0.0.1:0:127.0.0.1:{hub_port}")
    procs.append(client)
    m = client.wait_line(r"forward listening 127\.0\.0\.1:(\d+)$")
    await _forward_roundtrip(int(m.group(1)))


async def test_over_remote_forward_to_a_hub(keys: Keys, tmp_path: Path, procs: list) -> None:
    hub_port = _start_hub(tmp_path, procs)
    server, sport = start_server(keys, tmp_path)
    procs.append(server)
    rport = free_port()
    client, _ = start_client(keys, tmp_path, sport, "--remote-forward", f"127.0.0.1:{rport}:127.0.0.1:{hub_port}")
    procs.append(client)
    wait_for_log(client, "remote forward up")
    await _forward_roundtrip(rport)  # server side listens, connections come back to the client's hub


async def test_async_on_connection_callback(keys: Keys) -> None:
    served: list[str] = []

    async def on_connection(stream: DuplexStream, info: ConnectionInfo) -> None:
        async with create_event_target(stream) as target:
            async with target.events("job") as jobs:
                async for job in jobs:
                    served.append(job.detail)
                    await target.wait_subscribed("result")
                    target.dispatch_event("result", job.detail * 2)

    server = await serve(ServeOptions(key=str(keys.host), authorized_keys=str(keys.authorized),
                                      listen="127.0.0.1:0"), on_connection=on_connection)
    port = int(server.addresses()[0].rsplit(":", 1)[1])
    async with create_event_target(await open_stream(client_opts(keys, port))) as client:
        async with client.events("result") as results:
            await client.wait_subscribed("job")
            for i in (1, 2, 3):
                client.dispatch_event("job", i)
                assert (await results.__anext__()).detail == 2 * i
    await server.close()  # also ends callback tasks still running
    assert served == [1, 2, 3]
