"""Open one stream to a target behind a wraith server — in process, and through the daemon.

    # a server and a target to talk to (loopback demo)
    wraith keygen /tmp/host && wraith keygen /tmp/me
    cp /tmp/me.pub /tmp/authorized_keys
    wraith serve --key /tmp/host --authorized-keys /tmp/authorized_keys --listen 127.0.0.1:2222 &
    python3 -m http.server 8000 --bind 127.0.0.1 &

    python3 examples/python_open_stream.py --server 127.0.0.1:2222 --identity /tmp/me \\
        --host-key /tmp/host.pub --target 127.0.0.1:8000

The first half uses ``wraith_core.open_stream`` (the SSH stack in this
process). The second half does the same through ``wraith_client`` (pip install
bindings/python), which talks to a local ``wraith daemon`` — found through
``WRAITH_DAEMON`` or ``daemon.json``, or started as a child process that stops
when this script exits.
"""

from __future__ import annotations

import argparse
import asyncio

REQUEST = b"GET / HTTP/1.0\r\nHost: example\r\n\r\n"


async def in_process(args: argparse.Namespace) -> None:
    import wraith_core

    opts = wraith_core.ConnectOptions(server=args.server, identity=args.identity, host_key=args.host_key)
    async with await wraith_core.open_stream(opts, target=args.target) as stream:
        stream.write(REQUEST)
        await stream.drain()
        stream.write_eof()                      # half-close: the response still comes back
        reply = await stream.read()             # until the server's EOF
    print(f"open_stream: {reply.splitlines()[0].decode()} ({len(reply)} bytes)")


async def through_daemon(args: argparse.Namespace) -> None:
    import wraith_client

    try:
        stream = await wraith_client.connect(server=args.server, identity=args.identity,
                                             host_key=args.host_key, target=args.target)
    except wraith_client.WraithError as exc:
        print(f"wraith_client: {exc.code}: {exc}")
        return
    async with stream:
        stream.write(REQUEST)
        await stream.drain()
        stream.write_eof()
        reply = await stream.read()
    print(f"wraith_client via daemon ({(await wraith_client.resolve()).source}): "
          f"{reply.splitlines()[0].decode()} ({len(reply)} bytes)")
    await wraith_client.shutdown()              # stops the child daemon if we started one


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", required=True)
    ap.add_argument("--identity", required=True)
    ap.add_argument("--host-key", required=True)
    ap.add_argument("--target", default="127.0.0.1:8000")
    args = ap.parse_args()
    asyncio.run(in_process(args))
    asyncio.run(through_daemon(args))


if __name__ == "__main__":
    main()
