"""Hub bounds that need exact control of who reads: members on in-memory streams.

A member whose stream never drains is a subscriber that stopped reading; the hub
cannot tell it from a slow network. These tests check what the hub holds and
how it sheds members, independent of socket buffer sizes.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import tracemalloc
from typing import Any

import pytest

from wraith_core import bus
from wraith_core.bus import FRAME_OVERHEAD, Hub
from wraith_core.protocol.envelope import SUBSCRIBE, UNSUBSCRIBE, Envelope, EnvelopeDecoder, make_frame
from wraith_core.ssh.server import ConnectionInfo


class MemStream:
    """The stream calls the hub makes; ``reading=False``: drain() never returns."""

    def __init__(self, reading: bool = True) -> None:
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.out = bytearray()
        self.reading = reading
        self.closed = asyncio.Event()
        self.aborted = False

    async def read(self, n: int = -1) -> bytes:
        return await self.inbox.get()

    def write(self, data: bytes) -> None:
        self.out += data

    async def drain(self) -> None:
        if not self.reading:
            await asyncio.Event().wait()

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        self.closed.set()
        self.inbox.put_nowait(b"")

    def abort(self) -> None:
        self.aborted = True
        self.close()

    async def wait_closed(self) -> None:
        await self.closed.wait()

    def send(self, *frames: bytes) -> None:
        self.inbox.put_nowait(b"".join(frames))

    def received(self) -> list[Envelope]:
        dec = EnvelopeDecoder()
        dec.receive_data(bytes(self.out))
        return [e for e in dec.events() if isinstance(e, Envelope)]


def join(hub: Hub, reading: bool = True) -> MemStream:
    s = MemStream(reading)
    hub.add(s, ConnectionInfo("127.0.0.1", "test", "u", ""))  # type: ignore[arg-type]
    return s


async def settle(hub: Hub) -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def sub(t: str) -> bytes:
    return make_frame(SUBSCRIBE, {"type": t})


def of_cost(t: str, cost: int) -> bytes:
    """A frame whose queue cost (its length + FRAME_OVERHEAD) is exactly ``cost``."""
    pad = cost - FRAME_OVERHEAD - len(make_frame(t, "", id="x"))
    frame = make_frame(t, "a" * pad, id="x")
    assert len(frame) + FRAME_OVERHEAD == cost
    return frame


async def test_a_chain_of_slow_consumer_drops_is_worked_off_without_recursion(
        caplog: pytest.LogCaptureFixture) -> None:
    """Members left with almost no room: one event overflows them all, and each one's last
    unsubscribes are announced to the others. 400 such drops (thousands of stack frames when
    done recursively) end cleanly: all logged, all out of the routing, the publisher served."""
    caplog.set_level(logging.INFO, logger="wraith.bus")
    n = 400
    hub = Hub(max_frame=256 * 1024 - FRAME_OVERHEAD, queue_limit=256 * 1024)
    stuck = [join(hub, reading=False) for _ in range(n)]
    pub = join(hub)
    for i, s in enumerate(stuck):
        s.send(sub("T"), sub(f"U{i}"))
    await settle(hub)
    assert hub.subscriber_count("T") == n
    for i, s in enumerate(stuck):  # fill each queue to 100 bytes short of its limit
        m = next(m for m in hub._members if m.stream is s)
        pub.send(of_cost(f"U{i}", hub.queue_limit - m.queued - 100))
        await settle(hub)
    rooms = sorted(hub.queue_limit - m.queued for m in hub._members if m.stream is not pub)
    assert rooms == [100] * n, (rooms[:5], rooms[-5:])
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
    pub.send(make_frame("T", {"hello": 1}))
    await settle(hub)
    assert not errors
    assert all(s.aborted for s in stuck)
    assert [m.stream for m in hub._members] == [pub] and not pub.closed.is_set()
    assert not hub._subs and hub.held_bytes() == 0
    reasons = [r.getMessage().rsplit("reason=", 1)[-1] for r in caplog.records
               if r.getMessage().startswith("control stream closed")]
    assert reasons == ["slow-consumer"] * n
    pub.send(sub("still"), make_frame("still", 1))  # and the hub still routes
    await settle(hub)
    assert [e.payload for e in pub.received() if e.type == "still"] == [1]
    await hub.close()


async def test_the_hub_bounds_what_all_queues_hold(caplog: pytest.LogCaptureFixture) -> None:
    """Each member's queue is bounded, and so is the sum of distinct frames queued on the hub:
    past it, the longest queues are cut, and members that read are not."""
    caplog.set_level(logging.INFO, logger="wraith.bus")
    hub = Hub(max_frame=4096, queue_limit=64 * 1024, memory_limit=256 * 1024)
    stuck = [join(hub, reading=False) for _ in range(10)]
    reader = join(hub)
    pub = join(hub)
    for i, s in enumerate(stuck):
        s.send(sub(f"t{i}"))
    reader.send(sub("r"))
    await settle(hub)
    peak = 0
    for k in range(150):  # 10 x 15 distinct frames of 4 KiB each: ~600 KiB if nothing were shed
        pub.send(make_frame(f"t{k % 10}", "x" * 4000), make_frame("r", k))
        await settle(hub)
        peak = max(peak, hub.held_bytes())
    assert peak <= hub.memory_limit
    cut = sum(s.aborted for s in stuck)
    assert 5 <= cut < 10  # enough to stay under 256 KiB, not everyone
    assert not reader.aborted and not pub.aborted
    assert [e.payload for e in reader.received() if e.type == "r"] == list(range(150))
    await hub.close()


async def test_the_hub_does_not_keep_the_payloads_it_routes() -> None:
    """A member that sends one big event and then goes quiet must not pin the parsed
    payload (a JSON array of empty objects is ~20x its size in Python objects)."""
    hub = Hub()
    quiet = join(hub)
    body = "[" + ",".join(["{}"] * 400_000) + "]"  # 1.2 MB of JSON
    await settle(hub)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        quiet.send(_frame_with_raw_payload("nobody-listens", body))
        await settle(hub)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert held < 4 * len(body), held  # the frame bytes at most, not ~30 MB of objects
    await hub.close()


def _frame_with_raw_payload(t: str, payload_json: str) -> bytes:
    body = ('{"type":"%s","id":"x","payload":%s}' % (t, payload_json)).encode()
    return len(body).to_bytes(4, "big") + body


async def test_announcing_subscription_changes_is_paced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each first subscribe / last unsubscribe is sent to every member. A member that keeps
    changing them is read more slowly past its allowance; others are served meanwhile."""
    monkeypatch.setattr(bus, "SUB_BURST", 50.0)
    monkeypatch.setattr(bus, "SUB_RATE", 500.0)
    hub = Hub()
    storm = join(hub)
    other = join(hub)
    other.send(sub("ping"))
    await settle(hub)
    t0 = time.monotonic()
    storm.send(*(f(f"s{i}") for i in range(300) for f in (sub, lambda t: make_frame(UNSUBSCRIBE, {"type": t}))))
    await asyncio.sleep(0.2)
    other.send(make_frame("ping", 1))  # in the middle of the storm
    await settle(hub)
    assert [e.payload for e in other.received() if e.type == "ping"] == [1]
    while len([e for e in other.received() if e.type == UNSUBSCRIBE]) < 300:
        assert time.monotonic() - t0 < 10
        await asyncio.sleep(0.05)
    assert time.monotonic() - t0 >= (600 - 50) / 500 * 0.9  # 600 announced changes, 50 at once
    await hub.close()


async def test_a_big_frame_is_parsed_without_stalling_the_loop() -> None:
    """16 MiB of tiny JSON values take the parser a good part of a second; the hub shares its
    loop with every tunnel of the server, so such frames are parsed in a worker process. The
    frame is still routed intact, and in order with the member's next frame."""
    import json

    body = "[" + ",".join(["{}"] * 5_000_000) + "]"
    t0 = time.perf_counter()
    json.loads(body)
    inline = time.perf_counter() - t0
    hub = Hub()
    sender, receiver = join(hub), join(hub)
    receiver.send(sub("big"), sub("after"))
    await settle(hub)
    frame = _frame_with_raw_payload("big", body)
    lateness: list[float] = []

    async def tick() -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            lateness.append(time.perf_counter() - t - 0.005)

    ticker = asyncio.ensure_future(tick())
    try:
        sender.send(frame, make_frame("after", 1))
        deadline = time.monotonic() + 30
        while not any(e.type == "after" for e in receiver.received()):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    finally:
        ticker.cancel()
    got = receiver.received()
    assert [e.type for e in got if not e.type.startswith("__")] == ["big", "after"]
    assert bytes(receiver.out).count(frame) == 1
    assert max(lateness) < inline / 2, (max(lateness), inline)
    await hub.close()


async def test_the_subscription_allowance_comes_back_with_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past its allowance a member is read more slowly, and only while it is past it: after
    a pause its plain events flow at full speed again."""
    monkeypatch.setattr(bus, "SUB_BURST", 20.0)
    monkeypatch.setattr(bus, "SUB_RATE", 200.0)
    hub = Hub()
    member, other = join(hub), join(hub)
    other.send(sub("plain"))
    member.send(*(sub(f"s{i}") for i in range(60)))  # 40 over the allowance: ~0.2 s of pacing
    deadline = time.monotonic() + 5
    while hub.subscriber_count("s59") == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # the allowance refills meanwhile
    t0 = time.monotonic()
    for i in range(100):
        member.send(make_frame("plain", i))
    while len([e for e in other.received() if e.type == "plain"]) < 100:
        assert time.monotonic() - t0 < 5
        await asyncio.sleep(0.01)
    assert time.monotonic() - t0 < 0.3  # not 100 / SUB_RATE = 0.5 s
    await hub.close()


async def test_members_that_said_goodbye_are_shed_first(caplog: pytest.LogCaptureFixture) -> None:
    """A member that sent EOF keeps its queue while it drains; over the hub's memory limit,
    those queues go before a live member's."""
    caplog.set_level(logging.INFO, logger="wraith.bus")
    hub = Hub(max_frame=16 * 1024, queue_limit=64 * 1024, memory_limit=256 * 1024)
    leavers = [join(hub, reading=False) for _ in range(4)]
    victim = join(hub, reading=False)
    for i, s in enumerate(leavers):
        s.send(sub(f"own{i}"))
    victim.send(sub("v"))
    await settle(hub)  # (each writer has written once and now waits forever)
    for i, s in enumerate(leavers):
        s.send(*(make_frame(f"own{i}", "x" * 15000) for _ in range(4)))
    await settle(hub)
    for s in leavers:
        s.inbox.put_nowait(b"")  # EOF: out of the routing, the queue still waits to drain
    await settle(hub)
    assert hub.member_count == 1
    pub = join(hub)
    for k in range(4):
        pub.send(make_frame("v", "y" * 15000))
        await settle(hub)
    assert hub.held_bytes() <= hub.memory_limit
    assert not victim.aborted and sum(s.aborted for s in leavers) >= 1


async def test_a_member_cut_while_its_read_completes_routes_nothing() -> None:
    """Bytes a member sent before it was cut are not routed: a subscription routed for a
    member that is gone would stay wanted forever."""
    hub = Hub(max_frame=8 * 1024 - FRAME_OVERHEAD, queue_limit=8 * 1024)
    watcher = join(hub)
    slow = join(hub, reading=False)
    pub = join(hub)
    slow.send(sub("T"))
    await settle(hub)
    pub.send(of_cost("T", hub.queue_limit - 100))
    await settle(hub)
    pub.send(make_frame("T", 1))  # this wakes the hub's reader of pub first ...
    slow.send(sub("Z"))  # ... then slow's, whose member the first one cuts
    await settle(hub)
    assert slow.aborted
    assert hub.subscriber_count("Z") == 0
    assert ("Z" not in {e.payload["type"] for e in watcher.received() if e.type == SUBSCRIBE})
    await hub.close()


async def test_a_frame_the_parser_child_cannot_finish_closes_only_its_member(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A big frame the child does not answer in time ends that member (too-complex); the
    child is replaced and the next big frame, from anyone, is parsed as usual."""
    from wraith_core.protocol import parse_worker

    caplog.set_level(logging.INFO, logger="wraith.bus")
    hub = Hub()
    bad, good, receiver = join(hub), join(hub), join(hub)
    receiver.send(sub("big"))
    await settle(hub)
    monkeypatch.setattr(parse_worker, "PARSE_TIMEOUT", 0.05)
    bad.send(_frame_with_raw_payload("big", "[" + ",".join(["{}"] * 5_000_000) + "]"))
    deadline = time.monotonic() + 20
    while not bad.aborted:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    monkeypatch.setattr(parse_worker, "PARSE_TIMEOUT", 20.0)
    ok = _frame_with_raw_payload("big", '"' + "z" * (2 << 20) + '"')
    good.send(ok)
    while bytes(receiver.out).count(ok) == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert any("reason=too-complex" in r.getMessage() for r in caplog.records)
    assert not good.aborted and not receiver.aborted
    await hub.close()


def test_the_parser_child_ends_with_its_parent(tmp_path) -> None:
    """The child reads frames from its parent's pipe and ends at EOF: a parent killed with
    SIGKILL leaves no process behind."""
    import os
    import signal
    import subprocess
    import sys

    prog = tmp_path / "parent.py"
    prog.write_text(
        "import asyncio\n"
        "from wraith_core.protocol.parse_worker import ParseWorker\n"
        "async def main():\n"
        "    w = ParseWorker()\n"
        "    body = b'{\"type\":\"t\",\"id\":\"i\",\"payload\":1}'\n"
        "    print(await w.parse(len(body).to_bytes(4, 'big') + body), flush=True)\n"
        "    print(w._proc.pid, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n")
    p = subprocess.Popen([sys.executable, str(prog)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        assert "Envelope" in p.stdout.readline()
        child = int(p.stdout.readline())
        os.kill(child, 0)  # alive while the parent is
        p.send_signal(signal.SIGKILL)
        p.wait(5)
        deadline = time.monotonic() + 5
        while True:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "the parser child outlived its parent"
            time.sleep(0.05)
    finally:
        p.kill()
