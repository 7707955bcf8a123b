"""wraith-tun end to end: real TUN devices, network namespaces, curl, and real wraith serve/connect."""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import sys
import time

import pytest
from netenv import (CLIENT_ADDR, HERE, HTTP_ADDR, HTTP_ADDR6, HTTP_NAME, HTTP_PORT, SERVICE_ADDR, WraithNet,
                    wraith_tun_cmd)

URL_IP = f"http://{HTTP_ADDR}:{HTTP_PORT}"
URL_NAME = f"http://{HTTP_NAME}:{HTTP_PORT}"
URL_V6 = f"http://[{HTTP_ADDR6}]:{HTTP_PORT}"


def unshare(w: WraithNet, script: str, *flags: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return w.net.run(w.net.client, *wraith_tun_cmd("-v", "--socks5", w.socks, *flags, "--unshare", "--", "sh", "-c", script),
                     timeout=timeout)


def stats(stderr: bytes) -> dict[str, int]:
    m = re.search(rb"stopped: (.*)", stderr)
    assert m, stderr
    return {k.decode(): int(v) for k, v in (kv.split(b"=") for kv in m.group(1).split())}


def test_fetch_by_ip_and_by_server_side_name_many_parallel_flows(wnet: WraithNet) -> None:
    net = wnet.net
    # the name exists only in the server side's private /etc/hosts
    assert HTTP_NAME not in net.run(net.client, "cat", "/etc/hosts").stdout.decode()
    parallel = " ".join(f"-o {net.tmp}/p{i} {URL_NAME if i % 2 else URL_IP}/mid.bin" for i in range(48))
    script = f"""
        set -e
        cat /etc/resolv.conf
        getent hosts {HTTP_NAME}
        curl -sS -o {net.tmp}/by_ip {URL_IP}/big.bin
        curl -sS -o {net.tmp}/by_name {URL_NAME}/big.bin
        curl -sS -Z --parallel-max 48 {parallel}
        curl -sS --data-binary @{net.www}/big.bin {URL_NAME}/upload
        exit 42
    """
    r = unshare(wnet, script)
    out = r.stdout.decode()
    assert r.returncode == 42, (out, r.stderr)  # exit status is CMD's
    assert "nameserver 10.0.0.2" in out
    fake = re.search(rf"^(\S+)\s+{re.escape(HTTP_NAME)}", out, re.M)
    assert fake and fake.group(1).startswith("198.1"), out  # a virtual address, not the real one
    assert hashlib.sha256((net.tmp / "by_ip").read_bytes()).hexdigest() == wnet.files["big.bin"]
    assert hashlib.sha256((net.tmp / "by_name").read_bytes()).hexdigest() == wnet.files["big.bin"]
    for i in range(48):
        assert hashlib.sha256((net.tmp / f"p{i}").read_bytes()).hexdigest() == wnet.files["mid.bin"], i
    assert wnet.files["big.bin"] in out  # the upload arrived intact
    st = stats(r.stderr)
    assert st["flows_opened"] >= 40 and st["dns_queries"] >= 1 and st["bad_packets"] == 0


def test_half_close_through_the_tun(wnet: WraithNet) -> None:
    # the digest service answers only after our EOF: FIN app -> SOCKS -> SSH -> target, reply comes back
    code = f"""
import hashlib, socket
data = bytes(range(256)) * 20000
s = socket.create_connection(("{HTTP_NAME}", {HTTP_PORT + 1}))
s.sendall(data)
s.shutdown(socket.SHUT_WR)
reply = b""
while chunk := s.recv(100):
    reply += chunk
print("ok" if reply.strip().decode() == hashlib.sha256(data).hexdigest() else "bad", flush=True)
"""
    (wnet.net.tmp / "halfclose.py").write_text(code)
    r = unshare(wnet, f"python3 {wnet.net.tmp}/halfclose.py")
    assert r.stdout.decode().strip() == "ok", r.stderr


def test_refusals_reach_the_app_as_connection_refused(wnet: WraithNet) -> None:
    script = f"""
        curl -sS -m 10 {URL_IP[:-5]}:1/ ; echo "closed_port=$?"
        curl -sS -m 10 http://no-such-host.invalid/ ; echo "unresolvable=$?"
        python3 -c '
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.connect(("{HTTP_ADDR}", 9999))
s.send(b"x")
try:
    s.recv(10)
    print("udp=answered")
except ConnectionRefusedError:
    print("udp=refused")
except socket.timeout:
    print("udp=timeout")
'
    """
    t = time.monotonic()
    r = unshare(wnet, script)
    out = r.stdout.decode()
    assert "closed_port=7" in out, (out, r.stderr)  # curl 7 = couldn't connect (RST to our SYN)
    assert "unresolvable=7" in out, (out, r.stderr)  # server-side DNS failure -> refused
    assert "udp=refused" in out  # other UDP: ICMP port unreachable
    assert time.monotonic() - t < 30


def test_dns_never_leaves_the_tun(wnet: WraithNet) -> None:
    net = wnet.net
    sniffer = net.start(net.client, sys.executable, str(HERE / "sniff.py"), stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE)
    assert sniffer.stdout is not None and sniffer.stdin is not None
    assert sniffer.stdout.readline().strip() == b"ready"
    r = unshare(wnet, f"cat /etc/resolv.conf; getent hosts a.example b.example {HTTP_NAME}; "
                      f"curl -sS -o /dev/null {URL_NAME}/small.bin; echo done=$?")
    out = r.stdout.decode()
    assert "nameserver 10.0.0.2" in out and "done=0" in out
    assert stats(r.stderr)["dns_queries"] >= 3
    # positive control: a DNS packet that does go over the veth is counted
    ctl = net.run(net.client, sys.executable, "-c",
                  "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b'x', ('10.77.0.2', 53))")
    assert ctl.returncode == 0
    time.sleep(0.3)
    sniffer.stdin.close()
    summary = sniffer.stdout.readline().decode()
    sniffer.wait(timeout=10)
    m = re.search(r"dns=(\d+) frames=(\d+)", summary)
    assert m, summary
    assert int(m.group(1)) == 1, summary  # only the control packet: nothing from inside leaked
    assert int(m.group(2)) > 10  # the sniffer did see the tunnelled traffic (SSH on the veth)


FAKE_RESOLVERS = """
import select, socket, sys
log = open(sys.argv[1], "ab", buffering=0)
socks = []
for path in ("/run/nscd/socket", "/run/systemd/resolve/io.systemd.Resolve"):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(8)
    socks.append(s)
print("ready", flush=True)
while True:  # ends when the test kills it
    for s in select.select(socks, [], [])[0]:
        c, _ = s.accept()
        c.settimeout(2)
        try:
            log.write(c.recv(4096) + b"\\n")
        except OSError:
            pass
        c.close()  # no answer: glibc falls back to its NSS modules
"""


@pytest.mark.parametrize("userns", [False, True], ids=["root", "userns"])
def test_cmd_cannot_reach_the_host_name_service_daemons(wnet: WraithNet, userns: bool) -> None:
    """CMD's mount namespace shares /run with the host: glibc's getaddrinfo() asked the host's
    nscd first (and nss-resolve would ask systemd-resolved), so names were looked up on the
    host's network. Here stand-ins listen where those daemons do, in a private /run."""
    net = wnet.net
    (net.tmp / "resolvers.py").write_text(FAKE_RESOLVERS)
    log = net.tmp / "resolvers.log"
    log.write_bytes(b"")
    inner = ("getent ahosts secret-db.corp.test; echo getent=$?; ls -A /run/nscd /run/systemd/resolve; "
             "grep '^hosts:' /etc/nsswitch.conf; echo uid_map $(cat /proc/self/uid_map)")
    env = "env WRAITH_TUN_USERNS=1 " if userns else ""
    tun = env + " ".join(f"'{a}'" for a in wraith_tun_cmd("-v", "--socks5", wnet.socks, "--unshare", "--", "sh", "-c", inner))
    script = f"""
        mount -t tmpfs tmpfs /run && mkdir -p /run/nscd /run/systemd/resolve || exit 99
        rm -f {net.tmp}/resolvers.out  # (an earlier run's "ready" must not be taken for this one's)
        python3 {net.tmp}/resolvers.py {log} > {net.tmp}/resolvers.out & fake=$!
        i=0; until grep -qs ready {net.tmp}/resolvers.out || [ $i -ge 300 ]; do sleep 0.05; i=$((i+1)); done
        getent passwd root >/dev/null; echo control=$?
        {tun}
        kill $fake
    """
    r = net.run(net.client, "unshare", "-m", "sh", "-c", script, timeout=60)
    out = r.stdout.decode()
    assert "control=0" in out, (out, r.stderr)
    assert log.read_bytes().strip(), "control: outside the shim the stand-in nscd is asked (and falls back)"
    assert re.search(r"^198\.1[89]\.\S+\s+STREAM secret-db\.corp\.test", out, re.M), (out, r.stderr)
    assert b"secret-db" not in log.read_bytes(), log.read_bytes()  # nothing asked the host's daemons
    assert "io.systemd.Resolve" not in out and "socket" not in out  # both directories look empty
    assert "hosts: files dns" in out
    assert ("uid_map 0 0 1" in out) == userns, out  # the user-namespace path when asked for


def test_largest_mtu_upload(wnet: WraithNet) -> None:
    """--mtu 65535: the app's full-size segments (65535 bytes + the virtio header) are read whole."""
    net = wnet.net
    r = unshare(wnet, f"curl -sS -m 30 --data-binary @{net.www}/mid.bin {URL_IP}/upload; echo rc=$?",
                "--mtu", "65535")
    out = r.stdout.decode()
    assert "rc=0" in out and wnet.files["mid.bin"] in out, (out, r.stderr)
    assert stats(r.stderr)["bad_packets"] == 0


def _routes(w: WraithNet) -> str:
    return (w.net.run(w.net.client, "ip", "route").stdout.decode()
            + w.net.run(w.net.client, "ip", "-6", "route").stdout.decode())


def _whoami(w: WraithNet) -> str:
    r = w.net.run(w.net.client, "curl", "-sS", "-m", "10", f"{URL_IP}/whoami")
    return r.stdout.decode().strip()


def test_route_all_with_bypass_and_cleanup_on_sigterm(wnet: WraithNet) -> None:
    net = wnet.net
    before = _routes(wnet)
    assert _whoami(wnet) == CLIENT_ADDR  # plain route: the server sees the client's veth address
    p = net.start(net.client, *wraith_tun_cmd("--socks5", wnet.socks, "--tun-name", "wtrouteall", "--setup",
                                              "--bypass", f"{SERVICE_ADDR}/32", "--bypass", "10.77.0.0/30"),
                  stderr=subprocess.PIPE)  # the second one exists already (on-link): kept as is
    assert p.stderr is not None
    line = p.stderr.readline().decode()
    assert "ready" in line, line
    try:
        routes = _routes(wnet)
        assert "0.0.0.0/1 dev wtrouteall" in routes and "128.0.0.0/1 dev wtrouteall" in routes
        assert "::/1 dev wtrouteall" in routes and "8000::/1 dev wtrouteall" in routes
        assert f"{SERVICE_ADDR} via 10.77.0.2" in routes  # the SSH transport stays off the TUN
        # plain curl now goes TUN -> SOCKS5 -> SSH -> server: the target sees the server side's address
        who = _whoami(wnet)
        assert who and who != CLIENT_ADDR, who
        got = net.run(net.client, "curl", "-sS", "-m", "20", f"{URL_IP}/big.bin")
        assert hashlib.sha256(got.stdout).hexdigest() == wnet.files["big.bin"]
        # DNS to any server is answered by the virtual DNS inside the TUN
        q = net.run(net.client, sys.executable, "-c", """
import socket
from dnslib import DNSRecord
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
s.sendto(DNSRecord.question("some.name.test").pack(), ("10.80.0.1", 53))
print(DNSRecord.parse(s.recv(4096)).a.rdata)""")
        assert q.stdout.decode().startswith("198.1"), q
    finally:
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=15)
    err = p.stderr.read().decode()
    assert rc == 0, err
    assert "Traceback" not in err
    assert _routes(wnet) == before  # every route removed again
    assert "wtrouteall" not in net.run(net.client, "ip", "link").stdout.decode()
    assert _whoami(wnet) == CLIENT_ADDR


def test_routes_of_a_killed_run_are_cleared_by_the_next(wnet: WraithNet) -> None:
    """SIGKILL leaves the bypass routes (the /1 routes go with the TUN device); the next run
    removes them, and a second instance never takes an active one's routes away."""
    net = wnet.net
    before = _routes(wnet)

    def start(name: str, *extra: str) -> subprocess.Popen[bytes]:
        return net.start(net.client, *wraith_tun_cmd("--socks5", wnet.socks, "--tun-name", name, "--setup",
                                                     "--bypass", f"{SERVICE_ADDR}/32", *extra),
                         stderr=subprocess.PIPE)

    first = start("wtkill1")
    try:
        assert first.stderr is not None and "ready" in first.stderr.readline().decode()
        for extra, refusal in (((), "overlaps wtkill1's 10.0.0.1/24"),  # its address is taken
                               (("--tun-addr", "10.0.9.1/24"), "another wraith-tun --setup is active")):
            second = start("wtkill2", *extra)  # while the first is active
            assert second.wait(timeout=15) == 1
            assert second.stderr is not None and refusal in second.stderr.read().decode()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    for _ in range(50):
        if "wtkill1" not in _routes(wnet):
            break
        time.sleep(0.1)
    assert f"{SERVICE_ADDR} via 10.77.0.2" in _routes(wnet)  # the killed run's bypass route
    third = start("wtkill3")
    assert third.stderr is not None
    lines = [third.stderr.readline().decode() for _ in range(2)]
    assert "left by an earlier run" in lines[0] and "ready" in lines[1], lines
    third.send_signal(signal.SIGTERM)
    assert third.wait(timeout=15) == 0
    assert _routes(wnet) == before


def test_setup_without_bypass_warns_that_the_tunnel_would_loop(wnet: WraithNet) -> None:
    net = wnet.net
    p = net.start(net.client, *wraith_tun_cmd("--socks5", wnet.socks, "--tun-name", "wtnobyp", "--setup"),
                  stderr=subprocess.PIPE)
    assert p.stderr is not None
    try:
        lines = [p.stderr.readline().decode()]
        while "ready" not in lines[-1] and lines[-1]:
            lines.append(p.stderr.readline().decode())
        assert any("--setup without --bypass" in ln and "--bypass SERVER_IP/32" in ln for ln in lines), lines
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=15) == 0


def test_shim_crash_and_restart_do_not_disturb_the_session(wnet: WraithNet) -> None:
    net = wnet.net
    # a shim killed hard in the middle of a transfer...
    p = net.start(net.client, *wraith_tun_cmd("--socks5", wnet.socks, "--unshare", "--", "curl", "-sS",
                                              "--limit-rate", "1M", "-o", "/dev/null", f"{URL_IP}/big.bin"),
                  stderr=subprocess.DEVNULL)
    time.sleep(1.5)
    assert p.poll() is None
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=10)
    # ...and wraith connect carries on: a new shim and direct SOCKS5 both work
    for _ in range(2):
        r = unshare(wnet, f"curl -sS -o /dev/null -w '%{{http_code}}' {URL_NAME}/small.bin")
        assert r.stdout == b"200", r.stderr
    direct = wnet.net.run(wnet.net.client, "curl", "-sS", "--socks5-hostname", wnet.socks, f"{URL_NAME}/small.bin")
    assert hashlib.sha256(direct.stdout).hexdigest() == wnet.files["small.bin"]


def test_bad_packets_on_the_real_tun_are_dropped_without_harming_flows(wnet: WraithNet) -> None:
    net = wnet.net
    injector = net.tmp / "inject.py"
    injector.write_text(f"""
import socket, struct, time
from wraith_tun import ip
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # we write the IP header
src, dst = socket.inet_aton("10.0.0.1"), socket.inet_aton("{HTTP_ADDR}")
good = ip.build_tcp(src, dst, 4444, {HTTP_PORT}, 1, 0, ip.SYN, 1000, b"", ip.tcp_syn_options(1400, None))
bad_csum = good[:36] + bytes([good[36] ^ 0xFF]) + good[37:]      # TCP checksum wrong
truncated = good[:20] + good[20:30]                               # TCP header cut short
body = b"\\x00" * 40
frag = ip._ip_header(src, dst, 6, len(body), False)
frag = frag[:6] + b"\\x20\\x00" + frag[8:] + body                     # more-fragments set
for _ in range(50):
    for pkt in (bad_csum, truncated, frag):
        raw.sendto(pkt, ("{HTTP_ADDR}", 0))
    time.sleep(0.002)
print("injected 150", flush=True)
""")
    script = f"""
        curl -sS -o {net.tmp}/during {URL_IP}/big.bin & pid=$!
        python3 {injector}
        wait $pid; echo curl=$?
        curl -sS -o {net.tmp}/after {URL_NAME}/mid.bin; echo after=$?
    """
    r = unshare(wnet, script)
    out = r.stdout.decode()
    assert "injected 150" in out and "curl=0" in out and "after=0" in out, (out, r.stderr)
    assert hashlib.sha256((net.tmp / "during").read_bytes()).hexdigest() == wnet.files["big.bin"]
    assert hashlib.sha256((net.tmp / "after").read_bytes()).hexdigest() == wnet.files["mid.bin"]
    st = stats(r.stderr)
    assert st["bad_packets"] == 150, st  # bad checksum, truncated header, fragment: each one dropped


def test_ipv6_literal_through_the_tun(wnet: WraithNet) -> None:
    net = wnet.net
    script = f"""
        ip -6 route show default
        curl -sS -g -o {net.tmp}/v6 {URL_V6}/mid.bin; echo v6=$?
        curl -sS -g -m 10 "http://[{HTTP_ADDR6}]:1/"; echo closed6=$?
        python3 -c '
import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.settimeout(3)
s.connect(("{HTTP_ADDR6}", 9999))
s.send(b"x")
try:
    s.recv(10)
    print("udp6=answered")
except ConnectionRefusedError:
    print("udp6=refused")
except socket.timeout:
    print("udp6=timeout")
'
    """
    r = unshare(wnet, script)
    out = r.stdout.decode()
    assert "default dev wtun" in out, out
    assert "v6=0" in out and "closed6=7" in out and "udp6=refused" in out, (out, r.stderr)
    assert hashlib.sha256((net.tmp / "v6").read_bytes()).hexdigest() == wnet.files["mid.bin"]


def test_library_api_run_unshare(wnet: WraithNet) -> None:
    net = wnet.net
    host, port = wnet.socks.rsplit(":", 1)
    code = f"""
import asyncio
from wraith_tun import TunOptions, run_unshare
opts = TunOptions(socks5=({host!r}, {port}), tun_addr6=None)
rc = asyncio.run(run_unshare(opts, ["curl", "-sS", "-o", "{net.tmp}/api", "{URL_NAME}/mid.bin"], forward_signals=False))
print("rc", rc)
"""
    r = net.run(net.client, sys.executable, "-c", code)
    assert r.stdout.decode().strip() == "rc 0", r.stderr
    assert hashlib.sha256((net.tmp / "api").read_bytes()).hexdigest() == wnet.files["mid.bin"]


def test_user_namespace_path(wnet: WraithNet) -> None:
    # what an unprivileged user gets: CMD is root only inside its own user namespace
    net = wnet.net
    script = f"cat /proc/self/uid_map; curl -sS -o {net.tmp}/userns {URL_NAME}/mid.bin; echo rc=$?"
    r = net.run(net.client, "env", "WRAITH_TUN_USERNS=1",
                *wraith_tun_cmd("-v", "--socks5", wnet.socks, "--unshare", "--", "sh", "-c", script), timeout=60)
    out = r.stdout.decode()
    assert out.split()[:3] == ["0", "0", "1"], (out, r.stderr)  # a 1-uid map, not the initial namespace's
    assert "rc=0" in out
    assert hashlib.sha256((net.tmp / "userns").read_bytes()).hexdigest() == wnet.files["mid.bin"]


def test_route_all_keeps_a_remote_socks_server_off_the_tun(wnet: WraithNet) -> None:
    # no --bypass given: the SOCKS5 server's own address must still not loop into the TUN
    net = wnet.net
    host, port = net.start_microsocks(1081)
    p = net.start(net.client, *wraith_tun_cmd("--socks5", f"{host}:{port}", "--tun-name", "wtauto", "--setup"),
                  stderr=subprocess.PIPE)
    assert p.stderr is not None
    assert "ready" in p.stderr.readline().decode()
    try:
        assert f"{SERVICE_ADDR} via 10.77.0.2" in _routes(wnet)
        who = _whoami(wnet)
        assert who and who != CLIENT_ADDR, who
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=15) == 0
    assert "wtauto" not in _routes(wnet) and SERVICE_ADDR not in _routes(wnet)
