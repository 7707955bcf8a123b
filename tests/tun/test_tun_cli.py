"""wraith-tun's command line: errors are one line on stderr, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from netenv import _env


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    # a private network namespace: nothing we try here can touch the host's interfaces
    return subprocess.run(["unshare", "-n", sys.executable, "-m", "wraith_tun", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env())


@pytest.mark.parametrize("args, words", [
    (["--socks5", "nope"], "HOST:PORT"),
    (["--socks5", "127.0.0.1:99999"], "HOST:PORT"),
    (["--unshare"], "needs a command"),
    (["--", "true"], "needs --unshare"),
    (["--mtu", "10"], "--mtu"),
    (["--max-buffered", "0"], "between 1 and"),
    (["--idle-timeout", "-1"], "--idle-timeout"),
    (["--idle-timeout", "0.000001"], "--idle-timeout"),
    (["--idle-timeout", "nan"], "--idle-timeout"),
    (["--bypass", "10.9.0.0/16"], "--setup"),
    (["--bypass", "not-a-net", "--setup"], "--bypass"),
    (["--tun-addr", "10.0.0.0/24"], "host address"),
    (["--tun-addr", "banana"], "--tun-addr"),
    (["--dns-addr", "10.0.0.1"], "differ"),
    (["--dns", "bogus"], "--dns"),
    (["--frobnicate"], "unrecognized"),
    (["--setup", "--unshare", "--", "true"], "cannot be combined"),
])
def test_usage_errors_are_one_line(args: list[str], words: str) -> None:
    r = run(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wraith-tun: error:"), r.stderr
    assert words in lines[0]
    assert "Traceback" not in r.stderr


def test_device_failure_is_one_line() -> None:
    r = run("--tun-name", "x" * 40)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "TUN device" in lines[0], r.stderr


def test_unshare_missing_command_reports_and_exits_127() -> None:
    r = run("--unshare", "--", "/nonexistent/command")
    assert r.returncode == 127
    assert "cannot run /nonexistent/command" in r.stderr and "Traceback" not in r.stderr


def test_unshare_passes_exit_status_and_signals() -> None:
    assert run("--unshare", "--", "sh", "-c", "exit 3").returncode == 3
    assert run("--unshare", "--", "sh", "-c", "kill -TERM $$").returncode == 128 + 15


def test_help() -> None:
    r = run("--help")
    assert r.returncode == 0 and "--unshare" in r.stdout and "--bypass" in r.stdout


def test_imports_nothing_of_wraith_core_or_ssh() -> None:
    code = ("import sys, wraith_tun.cli, wraith_tun.shim, wraith_tun.netns, wraith_tun.routes; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('wraith_core', 'asyncssh')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cmd_ends_when_the_shim_is_killed() -> None:
    import os
    import signal
    import time

    p = subprocess.Popen(["unshare", "-n", sys.executable, "-m", "wraith_tun", "--unshare", "--", "sh", "-c",
                          "echo $$; exec sleep 60"], stdout=subprocess.PIPE, env=_env())
    try:
        assert p.stdout is not None
        pid = int(p.stdout.readline())
        assert os.path.exists(f"/proc/{pid}")
        p.send_signal(signal.SIGKILL)  # `unshare -n` execs, so this is the shim itself
        p.wait(timeout=10)
        def alive() -> bool:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
            except FileNotFoundError:
                return False

        deadline = time.monotonic() + 10
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(), "CMD outlived the shim"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_unshare_with_a_dangling_resolv_conf_symlink() -> None:
    # a world where /etc/resolv.conf points at a stopped systemd-resolved's stub file
    script = ('mount -t tmpfs none /etc && ln -s /run/wtun-stub/resolv.conf /etc/resolv.conf '
              '&& mount -t tmpfs none /run && mkdir /run/wtun-stub && exec "$@"')
    r = subprocess.run(["unshare", "-m", "-n", "--propagation", "private", "sh", "-c", script, "sh",
                        sys.executable, "-m", "wraith_tun", "--unshare", "--", "cat", "/etc/resolv.conf"],
                       capture_output=True, text=True, timeout=30, env=_env())
    assert r.returncode == 0, r.stderr
    assert "nameserver 10.0.0.2" in r.stdout


def test_unshare_never_imports_from_the_current_directory(tmp_path) -> None:
    """The namespace helper runs as root: a wraith_tun/ planted in the directory wraith-tun is
    started from (someone else's, say /tmp) must not be what it imports."""
    planted = tmp_path / "wraith_tun"
    planted.mkdir()
    marker = tmp_path / "planted-code-ran"
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (planted / "netns.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    # -P: like the `wraith-tun` console script, whose own path does not include the cwd
    r = subprocess.run(["unshare", "-n", sys.executable, "-P", "-c", "from wraith_tun.cli import main; raise SystemExit(main())",
                        "--unshare", "--", "sh", "-c", "exit 7"], capture_output=True, text=True,
                       timeout=30, env=_env(), cwd=tmp_path)
    assert r.returncode == 7, r.stderr
    assert not marker.exists()


def test_library_options_take_strings_as_the_docstring_shows() -> None:
    import ipaddress

    from wraith_tun.api import TunOptions

    o = TunOptions(setup=True, bypass=["203.0.113.7/32"], tun_addr="10.9.0.1/24")  # type: ignore[arg-type]
    assert o.bypass == [ipaddress.ip_network("203.0.113.7/32")]
    assert o.tun_addr == ipaddress.IPv4Interface("10.9.0.1/24") and o.dns_addr == "10.9.0.2"
    with pytest.raises(ValueError):
        TunOptions(bypass=["not-a-net"])  # type: ignore[list-item]


def test_a_tun_network_the_machine_already_uses_is_refused() -> None:
    """The default 10.0.0.1/24 on a LAN whose router is 10.0.0.1 would cut the machine off:
    an overlap with an address or a route is a one-line error, nothing is created."""
    script = ("ip link add d0 type veth peer name d1 && ip addr add 10.0.0.23/24 dev d0 && ip link set d0 up && "
              f"{sys.executable} -m wraith_tun; echo rc=$?; ip -o link show | grep -c tun || true")
    r = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, timeout=30, env=_env())
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "overlaps d0's 10.0.0.23/24" in lines[0], r.stderr
    assert "rc=1" in r.stdout and r.stdout.strip().endswith("0"), r.stdout
