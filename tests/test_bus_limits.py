"""Hub limits with small settings: serve(on_connection=hub.add) in process, open_stream() clients, real sockets."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from helpers import Keys
from test_bus import Raw
from wraith_core import ConnectOptions, ServeOptions, create_event_target, open_stream, serve
from wraith_core.bus import FRAME_OVERHEAD, Hub
from wraith_core.protocol.envelope import SUBSCRIBE, make_frame

MAX_FRAME = 4096
QUEUE_LIMIT = 512 * 1024


@pytest.fixture
async def hub_opts(keys: Keys) -> AsyncIterator[tuple[Hub, ConnectOptions]]:
    hub = Hub(max_frame=MAX_FRAME, queue_limit=QUEUE_LIMIT, max_subscriptions=3)
    server = await serve(ServeOptions(key=str(keys.host), authorized_keys=str(keys.authorized),
                                      listen="127.0.0.1:0"), on_connection=hub.add)
    opts = ConnectOptions(server=server.addresses()[0], identity=str(keys.client), host_key=str(keys.host_pub),
                          socks5=None, user="carol", window=256 * 1024, max_pktsize=32 * 1024)
    yield hub, opts
    await server.close()
    await hub.close()


def closed_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("control stream closed")]


async def test_queue_limit_must_hold_a_frame() -> None:
    with pytest.raises(ValueError):
        Hub(max_frame=1000, queue_limit=1000)


async def test_custom_frame_limit(hub_opts: tuple[Hub, ConnectOptions], caplog: pytest.LogCaptureFixture) -> None:
    hub, opts = hub_opts
    caplog.set_level(logging.INFO, logger="wraith.bus")
    a, b = Raw(await open_stream(opts)), Raw(await open_stream(opts))
    await a.sub("t")
    await b.send("t", "y" * (MAX_FRAME - 100))  # under the limit: delivered
    assert len((await a.recv()).payload) == MAX_FRAME - 100
    await b.send("t", "y" * MAX_FRAME)  # over it
    await b.wait_closed_by_peer()
    assert closed_lines(caplog) == ["control stream closed remote_addr=127.0.0.1 user=carol reason=frame-too-large"]
    assert hub.member_count == 1 and hub.subscriber_count("t") == 1


async def test_subscription_limit_and_reserved(hub_opts: tuple[Hub, ConnectOptions],
                                               caplog: pytest.LogCaptureFixture) -> None:
    hub, opts = hub_opts
    caplog.set_level(logging.INFO, logger="wraith.bus")
    greedy = Raw(await open_stream(opts))
    for t in ("a", "b", "c", "a"):  # re-subscribing does not count twice
        await greedy.send(SUBSCRIBE, {"type": t})
    await greedy.send("__future-control", {"anything": 1})  # unknown control types are ignored
    await greedy.wait_control(SUBSCRIBE, "c")
    assert hub.subscriber_count("c") == 1
    await greedy.send(SUBSCRIBE, {"type": "d"})
    await greedy.wait_closed_by_peer()
    reserved = Raw(await open_stream(opts))
    await reserved.send(SUBSCRIBE, {"type": "__subscribe"})
    await reserved.wait_closed_by_peer()
    assert [line.rsplit("reason=", 1)[1] for line in closed_lines(caplog)] == ["too-many-subscriptions",
                                                                              "reserved-type"]
    assert hub.subscriber_count("a") == 0 and hub.member_count == 0


async def test_slow_consumer_bound(hub_opts: tuple[Hub, ConnectOptions], caplog: pytest.LogCaptureFixture) -> None:
    hub, opts = hub_opts
    caplog.set_level(logging.INFO, logger="wraith.bus")
    slow, fast, pub = [Raw(await open_stream(opts)) for _ in range(3)]
    await slow.sub("flood")
    await fast.sub("flood")
    frame = make_frame("flood", "f" * 3000)
    peak = 0
    received = 0

    async def consume() -> None:
        nonlocal received
        while received < 3000:
            await fast.recv()
            received += 1

    consumer = asyncio.create_task(consume())
    for i in range(3000):  # ~9 MiB toward a subscriber that never reads, far over its bound
        await pub.write(frame)
        if i % 50 == 0:
            peak = max(peak, hub.queued_bytes())
            while received < i - 200:  # the publisher keeps pace with the reading subscriber only
                await asyncio.sleep(0.001)
    await asyncio.wait_for(consumer, 30)  # the reading subscriber got every event
    assert peak <= 2 * QUEUE_LIMIT  # two members' queues at most, each within its bound
    assert hub.subscriber_count("flood") == 1
    assert closed_lines(caplog) == ["control stream closed remote_addr=127.0.0.1 user=carol reason=slow-consumer"]
    assert len(frame) + FRAME_OVERHEAD < QUEUE_LIMIT


async def test_hub_close_ends_members(hub_opts: tuple[Hub, ConnectOptions]) -> None:
    hub, opts = hub_opts
    target = create_event_target(await open_stream(opts))
    target.add_event_listener("x", lambda e: None)
    await target.wait_subscribed("x")
    await hub.close()
    async for _ in target:  # a clean end of stream: iteration just stops
        raise AssertionError("no events expected")
    assert hub.member_count == 0
    late = await open_stream(opts)  # a closed hub refuses newcomers: the stream is reset
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(late.read(), 10)
