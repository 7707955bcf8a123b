#!/usr/bin/env python3
"""Two Python processes exchanging events through the event hub of `wraith serve`.

Against your own server (each role in its own terminal)::

    python examples/python_pubsub.py responder --server HOST:PORT --identity KEY --host-key HOST_PUB
    python examples/python_pubsub.py requester --server HOST:PORT --identity KEY --host-key HOST_PUB

The responder subscribes to ``ping`` and answers each one with a ``pong``; the
requester subscribes to ``pong``, sends ``--count`` pings and prints the round
trips. Or let the example run everything on loopback (throwaway keys, a
`wraith serve` child, and both roles as child processes)::

    python examples/python_pubsub.py demo
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import wraith_core
from wraith_core import ConnectOptions
from wraith_core.events import Event, EventTarget


async def connect(args: argparse.Namespace) -> EventTarget:
    opts = ConnectOptions(server=args.server, identity=args.identity, host_key=args.host_key, socks5=None)
    stream = await wraith_core.open_stream(opts)  # no target: the server's control channel (its hub)
    return wraith_core.create_event_target(stream)


async def responder(args: argparse.Namespace) -> None:
    target = await connect(args)
    answered = 0
    done = asyncio.Event()

    async def on_ping(event: Event) -> None:
        nonlocal answered
        await target.wait_subscribed("pong")  # someone on the hub wants pongs
        target.dispatch_event("pong", {"seq": event.detail["seq"], "sent": event.detail["sent"]})
        await target.drain()
        answered += 1
        if answered == args.count:
            done.set()

    target.add_event_listener("ping", on_ping)
    await target.wait_subscribed("ping")  # our own subscription is in place at the hub
    print("responder: ready", flush=True)
    await done.wait()
    print(f"responder: answered {answered} pings", flush=True)
    target.close()
    await target.wait_closed()


async def requester(args: argparse.Namespace) -> None:
    target = await connect(args)
    async with target.events("pong") as pongs:
        await target.wait_subscribed("ping")  # a responder is listening
        rtts: list[float] = []
        for seq in range(args.count):
            target.dispatch_event("ping", {"seq": seq, "sent": time.monotonic()})
            await target.drain()
            pong = await anext(pongs)
            assert pong.detail["seq"] == seq
            rtts.append((time.monotonic() - pong.detail["sent"]) * 1000)
    rtts.sort()
    print(f"requester: {len(rtts)} round trips, median {rtts[len(rtts) // 2]:.2f} ms, "
          f"max {rtts[-1]:.2f} ms", flush=True)
    target.close()
    await target.wait_closed()


def demo(count: int) -> int:
    py = sys.executable
    with tempfile.TemporaryDirectory() as d:
        from wraith_core.keys import generate_ed25519

        host, host_pub = generate_ed25519(Path(d) / "host", "demo-host")
        client, client_pub = generate_ed25519(Path(d) / "client", "demo-client")
        auth = Path(d) / "authorized_keys"
        auth.write_bytes(client_pub.read_bytes())
        server = subprocess.Popen([py, "-m", "wraith_core", "serve", "--key", str(host), "--authorized-keys",
                                   str(auth), "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
        try:
            assert server.stdout is not None
            m = None
            for line in server.stdout:  # (the host key line comes first)
                m = re.search(r"listening tcp (\S+)$", line.strip())
                if m:
                    break
            if not m:
                print("demo: wraith serve did not start", file=sys.stderr)
                return 1
            common = ["--server", m.group(1), "--identity", str(client), "--host-key", str(host_pub),
                      "--count", str(count)]
            me = [py, os.path.abspath(__file__)]
            resp = subprocess.Popen([*me, "responder", *common], stdout=subprocess.PIPE, text=True)
            assert resp.stdout is not None
            print(resp.stdout.readline().strip(), flush=True)  # "responder: ready"
            req = subprocess.run([*me, "requester", *common], timeout=60)
            print(resp.communicate(timeout=30)[0].strip(), flush=True)
            return req.returncode or resp.returncode
        finally:
            server.terminate()
            server.wait(10)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("role", choices=["responder", "requester", "demo"])
    p.add_argument("--server", default=os.environ.get("WRAITH_SERVER"))
    p.add_argument("--identity", default=os.environ.get("WRAITH_IDENTITY"))
    p.add_argument("--host-key")
    p.add_argument("--count", type=int, default=100)
    args = p.parse_args()
    if args.role == "demo":
        return demo(args.count)
    if not (args.server and args.identity and args.host_key):
        p.error("--server, --identity and --host-key are required (or run the 'demo' role)")
    try:
        asyncio.run(responder(args) if args.role == "responder" else requester(args))
    except wraith_core.WraithError as exc:
        print(f"{args.role}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
