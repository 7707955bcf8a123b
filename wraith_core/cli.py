"""The ``wraith`` command: flags in, option objects out, library does the work."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import WraithError
from .logs import setup_logging
from .options import ConnectOptions, ServeOptions
from .transport.base import drain_transports

log = logging.getLogger("wraith")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common(p: argparse.ArgumentParser, proxy_help: str) -> None:
    p.add_argument("--transport", choices=["tcp", "tls", "iroh"], default="tcp",
                   help="what carries the SSH session (default tcp)")
    p.add_argument("--proxy", metavar="URL", help=proxy_help)
    p.add_argument("--iroh-relay", metavar="URL|none",
                   help="iroh: your own relay, or none for direct addresses only (default: iroh's public relays)")
    p.add_argument("--max-pktsize", type=int, metavar="BYTES", help="SSH channel packet size (default 262144)")
    p.add_argument("--window", type=int, metavar="BYTES", help="SSH channel window (default 4 MiB)")
    p.add_argument("--keepalive-interval", type=float, metavar="SECONDS",
                   help="SSH keepalive every SECONDS of silence (default 5, 0: off)")
    p.add_argument("--keepalive-count-max", type=int, metavar="N",
                   help="unanswered keepalives before the session counts as dead (default 2)")
    p.add_argument("--half-open-timeout", type=float, metavar="SECONDS",
                   help="close relays idle with EOF in one direction only (default 300, 0: never)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="default info; no level logs destinations")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="wraith", description="SSH tunnels over TCP, TLS or iroh.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"wraith {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("serve", help="run a wraith SSH server")
    s.add_argument("--key", required=True, metavar="HOSTKEY", help="host private key (OpenSSH format)")
    s.add_argument("--authorized-keys", metavar="FILE", help="client public keys, OpenSSH authorized_keys format")
    s.add_argument("--cert-authority", metavar="FILE", help="accept user certificates signed by these CA keys")
    s.add_argument("--listen", metavar="HOST:PORT", help="where to listen (default 0.0.0.0:2222)")
    s.add_argument("--tls-cert", metavar="PEM", help="tls: certificate chain")
    s.add_argument("--tls-key", metavar="PEM", help="tls: its private key")
    s.add_argument("--stealth", action="store_true",
                   help="tls: answer anything that is not SSH as nginx does (a 404 page)")
    s.add_argument("--stealth-timeout", type=float, metavar="SECONDS",
                   help="close a stealth connection that sends nothing after this long (default 60)")
    s.add_argument("--max-connections-per-ip", type=int, metavar="N",
                   help="connections one address may hold, from accept on (default 0: unlimited)")
    s.add_argument("--max-startups", metavar="START:RATE:FULL|N",
                   help="connections not yet logged in: from START on, drop new ones at accept with "
                        "probability RATE %%, rising to all at FULL; N: drop all past N; 0: no limit "
                        "(default 10:30:100, as OpenSSH)")
    s.add_argument("--max-auth-attempts", type=int, metavar="N", help="per connection (default 10)")
    s.add_argument("--login-grace-time", type=float, metavar="SECONDS",
                   help="time from accept to a finished login (default 30)")
    s.add_argument("--max-forwards-per-connection", type=int, metavar="N",
                   help="remote-forward listeners one SSH connection may hold (default 64; 0: no limit)")
    s.add_argument("--max-channels-per-connection", type=int, metavar="N",
                   help="channels open at once on one SSH connection (default 32768; 0: no limit)")
    _common(s, "dial channel targets through this socks5:// or http:// proxy (default: directly)")

    c = sub.add_parser("connect", help="connect to a wraith (or OpenSSH) server")
    c.add_argument("--server", metavar="[USER@]HOST:PORT", help="the server (default $WRAITH_SERVER; port 2222)")
    c.add_argument("--peer", metavar="ID_OR_TICKET", help="iroh: the server's endpoint id or ticket")
    c.add_argument("--identity", metavar="KEY", help="private key, OpenSSH format (default $WRAITH_IDENTITY)")
    c.add_argument("--certificate", metavar="FILE", help="user certificate (default KEY-cert.pub if present)")
    c.add_argument("--user", metavar="NAME", help="SSH user name (default: the local one)")
    c.add_argument("--socks5", metavar="ADDR:PORT", help="SOCKS5 listener (default 127.0.0.1:1080; 'off' to disable)")
    c.add_argument("--socks5-auth", metavar="USER:PASS", help="require RFC 1929 auth on the SOCKS5 listener")
    c.add_argument("--forward", "-L", action="append", default=[], metavar="[BIND:]PORT:HOST:HOSTPORT",
                   help="local port forward, as ssh -L (repeatable)")
    c.add_argument("--remote-forward", "-R", action="append", default=[], metavar="[BIND:]PORT:HOST:HOSTPORT",
                   help="remote port forward, as ssh -R (repeatable)")
    c.add_argument("--tls-server-name", metavar="NAME", help="tls: SNI and certificate name (default: the server host)")
    c.add_argument("--tls-ca", metavar="FILE", help="tls: trust only this CA (PEM) instead of the system's")
    c.add_argument("--insecure", action="store_true", help="tls: accept any certificate (SSH host keys still checked)")
    hk = c.add_mutually_exclusive_group()
    hk.add_argument("--known-hosts", metavar="FILE", help="trusted host keys, OpenSSH known_hosts format")
    hk.add_argument("--host-key", metavar="KEY|SHA256:FP",
                    help="trust exactly this host key (`wraith serve` prints its fingerprint)")
    hk.add_argument("--accept-any-host-key", action="store_true", help="no host key check (tests only)")
    _common(c, "reach the server through this socks5:// or http:// proxy (tcp and tls)")

    k = sub.add_parser("keygen", help="write an ed25519 key pair (KEY and KEY.pub)")
    k.add_argument("path", help="where the private key goes (the public key: PATH.pub)")
    k.add_argument("--force", action="store_true", help="overwrite existing files")
    k.add_argument("--comment", default="wraith", help="the public key's comment (default wraith)")

    d = sub.add_parser("demo", help="loopback demo: server + client + SOCKS5, fetches a page through it")
    d.add_argument("--socks5", default="127.0.0.1:1080", metavar="ADDR:PORT",
                   help="the demo's SOCKS5 listener (default 127.0.0.1:1080; port 0: any free one)")
    d.add_argument("--once", action="store_true", help="exit after the demo request instead of staying up")

    dm = sub.add_parser("daemon", help="local daemon: SSH streams for other processes over WebSocket (docs/ipc.md)")
    dm.add_argument("--ws", metavar="unix:PATH|tcp:127.0.0.1:PORT",
                    help="stream endpoint (default unix:$XDG_RUNTIME_DIR/wraith/daemon.sock)")
    dm.add_argument("--events", metavar="ipc://PATH|tcp://127.0.0.1:PORT|none",
                    help="ZeroMQ PUB endpoint for state events (default ipc://DIR/events.sock)")
    dm.add_argument("--dir", metavar="DIR", help="daemon directory (default $XDG_RUNTIME_DIR/wraith or /tmp/wraith-$UID)")
    dm.add_argument("--linger", type=float, default=5.0, metavar="SECONDS",
                    help="keep an unused pooled SSH session this long (default 5)")
    dm.add_argument("--exit-with-stdin", action="store_true", help="exit when stdin reaches EOF (child daemons)")
    dm.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                    help="default info; no level logs destinations")
    return parser


def _set(obj: Any, args: argparse.Namespace, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value is not False:
            setattr(obj, name, value)


_COMMON = ["transport", "proxy", "iroh_relay", "max_pktsize", "window", "keepalive_interval",
           "keepalive_count_max", "half_open_timeout"]


def serve_options(args: argparse.Namespace) -> ServeOptions:
    opts = ServeOptions()
    _set(opts, args, _COMMON + ["key", "authorized_keys", "cert_authority", "listen", "tls_cert", "tls_key",
                                "stealth", "stealth_timeout", "max_connections_per_ip", "max_startups",
                                "max_auth_attempts", "login_grace_time", "max_forwards_per_connection",
                                "max_channels_per_connection"])
    return opts


def connect_options(args: argparse.Namespace) -> ConnectOptions:
    opts = ConnectOptions()
    _set(opts, args, _COMMON + ["server", "peer", "identity", "certificate", "user", "socks5_auth",
                                "forward", "remote_forward", "tls_server_name", "tls_ca", "insecure",
                                "known_hosts", "host_key", "accept_any_host_key"])
    if args.socks5 is not None:
        opts.socks5 = None if args.socks5.lower() in ("off", "none", "") else args.socks5
    return opts


async def _until_signal(start: Callable[[], Any], stop: Callable[[], Any]) -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await start()
    await done.wait()
    log.info("shutting down")
    await stop()


async def run_serve(opts: ServeOptions) -> None:
    from .server_api import WraithServer

    server = WraithServer(opts)

    async def start() -> None:
        from .keys import fingerprint, load_private_key

        await server.start()
        # what clients pin (--host-key SHA256:…), as ssh-keygen -lf would print it
        print(f"wraith serve: host key {fingerprint(load_private_key(opts.key, 'host key'))}", flush=True)  # type: ignore[arg-type]
        for addr in server.addresses():
            print(f"wraith serve: listening {opts.transport} {addr}", flush=True)

    async def stop() -> None:
        await server.close()
        # let the transport finish closing (iroh: its endpoint) before the loop ends
        await server.runner.acceptor.wait_closed()
        await drain_transports()

    await _until_signal(start, stop)


async def run_connect(opts: ConnectOptions) -> None:
    from .client import WraithClient

    client = WraithClient(opts)

    async def start() -> None:
        await client.start()
        if client.socks is not None:
            print(f"wraith connect: socks5 listening {client.socks.host}:{client.socks.port}", flush=True)
        for fwd in client.forwarders:
            print(f"wraith connect: forward listening {fwd.spec.bind_host}:{fwd.port}", flush=True)

    async def stop() -> None:
        await client.close()
        await drain_transports()  # iroh streams finish closing before the loop ends

    await _until_signal(start, stop)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "log_level", "info"))
    from . import tuning

    try:
        if args.command == "serve":
            tuning.run(run_serve(serve_options(args)))
        elif args.command == "connect":
            tuning.run(run_connect(connect_options(args)))
        elif args.command == "keygen":
            from .keys import generate_ed25519

            path = Path(args.path)
            for existing in (path, Path(f"{path}.pub")):
                if (existing.exists() or existing.is_symlink()) and not args.force:
                    raise WraithError(f"{existing} exists (use --force to overwrite)", "EEXIST")
            priv, pub = generate_ed25519(path, args.comment)
            print(f"wrote {priv} and {pub}")
        elif args.command == "daemon":
            from .daemon import DaemonConfig, run_daemon

            tuning.run(run_daemon(DaemonConfig(ws=args.ws, events=args.events, dir=args.dir, linger=args.linger,
                                               exit_with_stdin=args.exit_with_stdin)))
        elif args.command == "demo":
            from .demo import run_demo

            tuning.run(run_demo(args.socks5, args.once))
        else:  # pragma: no cover - argparse enforces the choices
            parser.error(f"unknown command {args.command}")
    except WraithError as exc:
        print(f"wraith: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
