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


async def _hub_server(keys: Keys, hub: Hub) -> tuple[object, ConnectOptions]:
    server = await serve(ServeOptions(key=str(keys.host), authorized_keys=str(keys.authorized),
                                      listen="127.0.0.1:0"), on_connection=hub.add)
    opts = ConnectOptions(server=server.addresses()[0], identity=str(keys.client), host_key=str(keys.host_pub),
                          socks5=None, user="carol")
    return server, opts


async def test_a_type_that_is_not_text_closes_only_that_stream(keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    """A JSON escape can make a lone surrogate: such a type is refused when subscribed (it
    could never be announced), the stream closes, and it leaves no subscription behind."""
    import json
    import struct

    caplog.set_level(logging.INFO, logger="wraith.bus")
    hub = Hub()
    server, opts = await _hub_server(keys, hub)
    try:
        evil = Raw(await open_stream(opts))
        await evil.sub("t0", "t1")
        body = json.dumps({"type": SUBSCRIBE, "id": "x", "payload": {"type": chr(0xD800)}}).encode()
        assert b"\\ud800" in body
        await evil.write(struct.pack(">I", len(body)) + body)
        await evil.wait_closed_by_peer()
        assert closed_lines(caplog)[-1].endswith("reason=bad-envelope")
        newcomer = Raw(await open_stream(opts))
        await newcomer.barrier()
        assert [t for _, t in newcomer.control if not t.startswith("ping-")] == []
        assert hub.subscriber_count("t0") == 0 and hub.member_count == 1
    finally:
        await server.close()  # type: ignore[attr-defined]
        await hub.close()


async def test_newcomers_hear_a_big_hub_without_using_their_queue(keys: Keys) -> None:
    """The join snapshot (one __subscribe per type wanted) is made by the newcomer's writer,
    not queued: a hub wanting more types than a member's queue holds does not drop
    newcomers as slow consumers. Distinct types per hub are capped."""
    hub = Hub(max_frame=MAX_FRAME, queue_limit=64 * 1024, max_types=3000)
    server, opts = await _hub_server(keys, hub)
    try:
        many = [f"{i:04d}-" + "t" * 200 for i in range(2900)]  # ~0.7 MB of announcements
        owners = [Raw(await open_stream(opts)) for _ in range(2)]
        for i in range(0, len(many), 50):  # members read what the hub announces, as they must
            owner = owners[(i // 50) % 2]
            for t in many[i:i + 50]:
                await owner.send(SUBSCRIBE, {"type": t})
            for o in owners:
                await o.barrier()
        assert sum(1 for t in many if hub.subscriber_count(t)) == len(many)
        newcomers = [Raw(await open_stream(opts)) for _ in range(3)]
        for n in newcomers:
            await n.sub("chat")
            await n.wait_control(SUBSCRIBE, many[-1])
            assert {t for k, t in n.control if k == SUBSCRIBE} >= set(many)
        assert hub.subscriber_count("chat") == 3 and hub.member_count == 5
        # past max_types, a new type is refused (that stream closes), known types still work
        greedy = Raw(await open_stream(opts))
        await greedy.sub(many[0])
        for i in range(200):
            await greedy.send(SUBSCRIBE, {"type": f"new-{i}"})
        await greedy.wait_closed_by_peer()
        assert hub.subscriber_count(many[0]) == 1 and len(hub._subs) <= 3000
    finally:
        await server.close()  # type: ignore[attr-defined]
        await hub.close()
