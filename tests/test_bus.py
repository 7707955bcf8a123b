"""The event hub of a real `wraith serve` process, driven by open_stream() clients speaking raw frames."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import uuid
from pathlib import Path
from typing import Any

import pytest

from helpers import PY, Keys, Proc, sha, start_server, wait_for_log
from wraith_core import ConnectOptions, open_stream
from wraith_core.duplex import DuplexStream
from wraith_core.protocol.envelope import (
    DEFAULT_MAX_FRAME,
    SUBSCRIBE,
    UNSUBSCRIBE,
    EndOfStream,
    Envelope,
    EnvelopeDecoder,
    encode,
    make_frame,
)


class Raw:
    """A control-stream client that speaks frames by hand (no adapter logic)."""

    def __init__(self, stream: DuplexStream) -> None:
        self.s = stream
        self.dec = EnvelopeDecoder()
        self.pending: list[Envelope] = []
        self.control: list[tuple[str, str]] = []  # (__subscribe|__unsubscribe, type) from the hub

    @classmethod
    async def open(cls, opts: ConnectOptions) -> Raw:
        return cls(await open_stream(opts))

    async def write(self, data: bytes) -> None:
        self.s.write(data)
        await self.s.drain()

    async def send(self, type: str, payload: Any = None) -> None:
        await self.write(make_frame(type, payload))

    async def sub(self, *types: str) -> None:
        for t in types:
            await self.send(SUBSCRIBE, {"type": t})
        await self.barrier()

    async def unsub(self, *types: str) -> None:
        for t in types:
            await self.send(UNSUBSCRIBE, {"type": t})
        await self.barrier()

    async def _pump(self, timeout: float) -> None:
        data = await asyncio.wait_for(self.s.read(1 << 20), timeout)
        assert data, "stream ended"
        self.dec.receive_data(data)
        for ev in self.dec.events():
            assert isinstance(ev, Envelope), ev
            if ev.type in (SUBSCRIBE, UNSUBSCRIBE):
                self.control.append((ev.type, ev.payload["type"]))
            else:
                self.pending.append(ev)

    async def recv(self, timeout: float = 10.0) -> Envelope:
        """The next non-control envelope."""
        while not self.pending:
            await self._pump(timeout)
        return self.pending.pop(0)

    async def wait_control(self, kind: str, type: str, timeout: float = 10.0) -> None:
        while (kind, type) not in self.control:
            await self._pump(timeout)

    async def barrier(self) -> None:
        """Return once the hub has processed everything this client sent so far."""
        t = f"ping-{uuid.uuid4().hex}"
        await self.send(SUBSCRIBE, {"type": t})
        await self.wait_control(SUBSCRIBE, t)
        await self.send(UNSUBSCRIBE, {"type": t})

    async def nothing(self, within: float = 0.3) -> None:
        """No event (control frames aside) arrives within ``within`` seconds."""
        try:
            ev = await self.recv(within)
        except (asyncio.TimeoutError, TimeoutError):
            return
        raise AssertionError(f"unexpected event {ev.type}")

    async def wait_closed_by_peer(self, timeout: float = 10.0) -> None:
        async def drain() -> None:
            try:
                while await self.s.read(1 << 20):
                    pass
            except ConnectionError:
                pass
        await asyncio.wait_for(drain(), timeout)

    def close(self) -> None:
        self.s.close()


@pytest.fixture
def server(keys: Keys, tmp_path: Path, procs: list) -> tuple[Proc, ConnectOptions]:
    proc, port = start_server(keys, tmp_path)
    procs.append(proc)
    opts = ConnectOptions(server=f"127.0.0.1:{port}", identity=str(keys.client), host_key=str(keys.host_pub),
                          socks5=None)
    return proc, opts


async def clients(opts: ConnectOptions, n: int) -> list[Raw]:
    return list(await asyncio.gather(*(Raw.open(opts) for _ in range(n))))


async def test_three_clients_fanout_and_own_events(server: tuple[Proc, ConnectOptions]) -> None:
    _, opts = server
    a, b, c = await clients(opts, 3)
    await a.sub("news")
    await b.sub("news", "chat")
    await c.send("news", {"n": 1})
    for r in (a, b):
        ev = await r.recv()
        assert (ev.type, ev.payload) == ("news", {"n": 1})
    await c.send("chat", "hello")
    assert (await b.recv()).payload == "hello"
    await c.send("nobody-listens", 1)
    await a.send("news", {"n": 2})  # A subscribed: gets its own event, B too; C (publisher of others) nothing
    assert (await a.recv()).payload == {"n": 2}
    assert (await b.recv()).payload == {"n": 2}
    await a.nothing()
    await b.nothing()
    await c.nothing()
    for r in (a, b, c):
        r.close()


async def test_event_ids_and_order_preserved(server: tuple[Proc, ConnectOptions]) -> None:
    _, opts = server
    a, b = await clients(opts, 2)
    await a.sub("seq")
    sent = [Envelope("seq", f"id-{i}", i) for i in range(300)]
    await b.write(b"".join(encode(e) for e in sent))
    got = [await a.recv() for _ in sent]
    assert got == sent


async def test_unsubscribe(server: tuple[Proc, ConnectOptions]) -> None:
    _, opts = server
    a, b, c = await clients(opts, 3)
    await a.sub("news", "chat")
    await b.sub("news")
    await a.unsub("news")
    await c.send("news", 1)
    await c.send("chat", 2)
    ev = await a.recv()
    assert (ev.type, ev.payload) == ("chat", 2)  # news (sent first) never reached A
    assert (await b.recv()).payload == 1
    await a.nothing()
    await b.unsub("news", "never-subscribed")  # unsubscribing twice / unknown types is harmless
    await c.send("news", 3)
    await b.nothing()


async def test_hub_announces_wanted_types(server: tuple[Proc, ConnectOptions]) -> None:
    _, opts = server
    a, b = await clients(opts, 2)
    await a.sub("topic-x")
    await b.wait_control(SUBSCRIBE, "topic-x")
    late = await Raw.open(opts)  # a new member learns the current subscriptions at once
    await late.wait_control(SUBSCRIBE, "topic-x")
    a.close()  # the last subscriber leaves: everyone hears the type is no longer wanted
    await b.wait_control(UNSUBSCRIBE, "topic-x")
    await late.wait_control(UNSUBSCRIBE, "topic-x")


async def test_eof_is_a_clean_close_handshake(server: tuple[Proc, ConnectOptions]) -> None:
    _, opts = server
    a, b = await clients(opts, 2)
    await a.sub("last-words")
    await b.wait_control(SUBSCRIBE, "last-words")
    for i in range(50):
        await b.send("last-words", i)
    await b.barrier()  # all 50 are routed (queued or sent) to A
    a.s.write_eof()
    got = [(await a.recv()).payload for _ in range(50)]
    assert got == list(range(50))  # what was queued for A is flushed before the hub closes
    rest = await asyncio.wait_for(a.s.read(), 10)  # then a clean EOF from the hub, not a reset
    a.dec.receive_data(rest)
    a.dec.receive_eof()
    tail = a.dec.events()
    assert tail[-1] == EndOfStream()
    assert all(isinstance(e, Envelope) and e.type in (SUBSCRIBE, UNSUBSCRIBE) for e in tail[:-1])
    await b.wait_control(UNSUBSCRIBE, "last-words")  # A left its subscriptions
    await b.send("last-words", "after")  # and the hub goes on for the others
    await b.barrier()


def _assert_log_clean(proc: Proc, *secrets: str) -> None:
    text = proc.log()
    for s in secrets:
        assert s not in text, "hub logged event contents"


@pytest.mark.parametrize("bad,reason", [
    (struct.pack(">I", DEFAULT_MAX_FRAME + 1) + b"{}", "frame-too-large"),
    (struct.pack(">I", 0xFFFFFFFF), "frame-too-large"),
    (struct.pack(">I", 9) + b"not json!", "invalid-json"),
    (struct.pack(">I", 3) + b"\xff\xfe\xfd", "invalid-utf8"),
    (make_frame(SUBSCRIBE, "secret-topic"), "bad-envelope"),
    (struct.pack(">I", 13) + b'{"type":"x"}\n', "bad-envelope"),
])
async def test_bad_frame_closes_only_that_stream(server: tuple[Proc, ConnectOptions], bad: bytes,
                                                 reason: str) -> None:
    proc, opts = server
    a, b, bad_client = await clients(opts, 3)
    await a.sub("secret-topic")
    await bad_client.sub("secret-topic")
    await bad_client.send("secret-topic", "secret-payload")
    assert (await a.recv()).payload == "secret-payload"
    assert (await bad_client.recv()).payload == "secret-payload"
    await bad_client.write(bad)
    await bad_client.wait_closed_by_peer()
    wait_for_log(proc, "control stream closed remote_addr=127.0.0.1 user=")
    assert f"reason={reason}" in proc.log()
    # everybody else is unaffected, the server keeps serving new members too
    await b.send("secret-topic", "after")
    assert (await a.recv()).payload == "after"
    fresh = await Raw.open(opts)
    await fresh.sub("secret-topic")
    await b.send("secret-topic", "again")
    assert (await fresh.recv()).payload == "again"
    assert proc.p.poll() is None
    _assert_log_clean(proc, "secret-topic", "secret-payload")
    assert proc.log().count("control stream closed") == 1


async def test_frame_of_exactly_the_limit_is_delivered(server: tuple[Proc, ConnectOptions]) -> None:
    _, opts = server
    a, b = await clients(opts, 2)
    await a.sub("big")
    overhead = len(encode(Envelope("big", "1", ""))) - 4
    blob = os.urandom(DEFAULT_MAX_FRAME // 2).hex()[: DEFAULT_MAX_FRAME - overhead]
    frame = encode(Envelope("big", "1", blob))
    assert len(frame) == DEFAULT_MAX_FRAME + 4
    await b.write(frame)
    ev = await a.recv(timeout=30)
    assert sha(ev.payload.encode()) == sha(blob.encode())
    await b.send("big", "small after big")
    assert (await a.recv()).payload == "small after big"


GHOST = r"""
import asyncio, sys, json, struct
from wraith_core import ConnectOptions, open_stream
from wraith_core.protocol.envelope import make_frame, EnvelopeDecoder
async def main():
    port, ident, hostkey = sys.argv[1:4]
    s = await open_stream(ConnectOptions(server=f"127.0.0.1:{port}", identity=ident, host_key=hostkey, socks5=None))
    s.write(make_frame("__subscribe", {"type": "ghost"}))
    dec = EnvelopeDecoder()
    while True:  # wait for the hub's echo: our subscription is in place
        dec.receive_data(await s.read(65536))
        if any(e.payload == {"type": "ghost"} for e in dec.events()):
            break
    body = json.dumps({"type": "ghost", "id": "1", "payload": "x" * 5000}).encode()
    s.write(struct.pack(">I", len(body)) + body[:2000])  # half a frame, then we die
    await s.drain()
    print("ready", flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


async def test_client_vanishing_mid_frame(server: tuple[Proc, ConnectOptions], keys: Keys, tmp_path: Path,
                                          procs: list) -> None:
    proc, opts = server
    a, b = await clients(opts, 2)
    await a.sub("live")
    port = opts.server.rsplit(":", 1)[1]  # type: ignore[union-attr]
    ghost = Proc([PY, "-c", GHOST, port, str(keys.client), str(keys.host_pub)], tmp_path / "ghost.log",
                 ready="ready")
    procs.append(ghost)
    await a.wait_control(SUBSCRIBE, "ghost")
    await asyncio.sleep(0.3)
    ghost.signal(9)
    ghost.p.wait(5)
    await a.wait_control(UNSUBSCRIBE, "ghost")  # its membership is gone
    wait_for_log(proc, "reason=truncated")
    await b.send("live", "ok")
    assert (await a.recv()).payload == "ok"


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


async def test_slow_subscriber_is_disconnected_and_memory_bounded(keys: Keys, tmp_path: Path, procs: list) -> None:
    # glibc tuning (tuning.py) keeps up to ~190 MiB of freed heap resident, which would hide what
    # the hub holds: measure this server without it.
    proc, port = start_server(keys, tmp_path, env={"WRAITH_NO_MALLOC_TUNING": "1", "MALLOC_MMAP_THRESHOLD_": "131072"})
    procs.append(proc)
    opts = ConnectOptions(server=f"127.0.0.1:{port}", identity=str(keys.client), host_key=str(keys.host_pub),
                          socks5=None)
    slow, fast, pub = await clients(opts, 3)
    await slow.sub("flood")
    await fast.sub("done")
    await pub.wait_control(SUBSCRIBE, "flood")
    base = _rss_kib(proc.p.pid, "VmRSS")
    chunk = json.dumps("z" * (1 << 20))
    frame = make_frame("flood", json.loads(chunk))
    total = 0
    for _ in range(240):  # 240 MiB toward a subscriber that never reads
        await pub.write(frame)
        total += len(frame)
    await pub.send("done", total)
    assert (await fast.recv(timeout=30)).payload == total  # the publisher was never held up
    growth_mib = (_rss_kib(proc.p.pid, "VmHWM") - base) / 1024
    print(f"server peak RSS growth while flooding a stalled subscriber: {growth_mib:.0f} MiB for "
          f"{total >> 20} MiB published")
    assert growth_mib < 160, growth_mib  # queue bound 64 MiB + transients, not the 240 MiB sent
    wait_for_log(proc, "reason=slow-consumer")
    await slow.wait_closed_by_peer(timeout=30)
