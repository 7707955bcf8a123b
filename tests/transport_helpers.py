"""Helpers for the transport tests and bench: certificates, proxies, iroh servers."""

from __future__ import annotations

import datetime
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from helpers import Keys, Proc, free_port, wait_port, wraith


@dataclass
class Certs:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path

    @staticmethod
    def make(d: Path, names: tuple[str, ...] = ("localhost", "wraith.test")) -> Certs:
        """A CA, a server cert for ``names`` + 127.0.0.1 signed by it, and an unrelated CA."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
        import ipaddress

        d.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)

        def ca(cn: str) -> tuple[object, object]:
            k = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
            c = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                 .public_key(k.public_key()).serial_number(x509.random_serial_number())
                 .not_valid_before(now - datetime.timedelta(days=1))
                 .not_valid_after(now + datetime.timedelta(days=30))
                 .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                 .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                              content_commitment=False, key_encipherment=False,
                                              data_encipherment=False, key_agreement=False,
                                              encipher_only=False, decipher_only=False), critical=True)
                 .add_extension(x509.SubjectKeyIdentifier.from_public_key(k.public_key()), critical=False)
                 .sign(k, hashes.SHA256()))
            return k, c

        ca_key, ca_cert = ca("wraith test CA")
        _, other_cert = ca("some other CA")
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                .issuer_name(ca_cert.subject).public_key(key.public_key())  # type: ignore[attr-defined]
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),  # type: ignore[attr-defined]
                               critical=False)
                .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
        pem = serialization.Encoding.PEM
        paths = Certs(d / "ca.pem", d / "server.pem", d / "server.key", d / "other-ca.pem")
        paths.ca.write_bytes(ca_cert.public_bytes(pem))  # type: ignore[attr-defined]
        paths.other_ca.write_bytes(other_cert.public_bytes(pem))  # type: ignore[attr-defined]
        paths.cert.write_bytes(cert.public_bytes(pem))
        paths.key.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
        os.chmod(paths.key, 0o600)
        return paths


def tls_server_args(certs: Certs) -> list[str]:
    return ["--transport", "tls", "--tls-cert", str(certs.cert), "--tls-key", str(certs.key)]


def free_udp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_iroh_server(keys: Keys, tmp: Path, *extra: str, name: str = "serve-iroh",
                      listen: str = "127.0.0.1:0", env: dict[str, str] | None = None) -> tuple[Proc, str, str]:
    """An iroh ``wraith serve`` with relays off; returns (proc, endpoint id, ticket)."""
    p = Proc(wraith("serve", "--key", str(keys.host), "--authorized-keys", str(keys.authorized),
                    "--transport", "iroh", "--iroh-relay", "none", "--listen", listen, *extra),
             tmp / f"{name}.log", env=env, ready=r"listening iroh endpoint-id (\w+)$")
    assert p.match is not None
    endpoint_id = p.match.group(1)
    ticket = p.wait_line(r"listening iroh ticket (endpoint\w+)$", 10).group(1)
    return p, endpoint_id, ticket


def start_client_args(keys: Keys, tmp: Path, args: list[str], name: str = "connect",
                      env: dict[str, str] | None = None) -> tuple[Proc, int]:
    """``wraith connect`` with explicit transport args (no --server default); waits for 'session up'."""
    from helpers import wait_for_log

    p = Proc(wraith("connect", "--identity", str(keys.client), "--host-key", str(keys.host_pub),
                    "--socks5", "127.0.0.1:0", *args),
             tmp / f"{name}.log", env=env, ready=r"socks5 listening .*:(\d+)$")
    assert p.match is not None
    wait_for_log(p, "session up")
    return p, int(p.match.group(1))


class Microsocks:
    """Debian's microsocks on loopback; every CONNECT it serves is a line in its log."""

    def __init__(self, tmp: Path, name: str = "microsocks", auth: tuple[str, str] | None = None) -> None:
        exe = shutil.which("microsocks")
        assert exe, "microsocks is installed by scripts/test.sh (scripts/apt-packages.txt)"
        self.port = free_port()
        self.log_path = tmp / f"{name}.log"
        self._log = open(self.log_path, "wb")
        creds = ["-u", auth[0], "-P", auth[1]] if auth else []
        self.proc = subprocess.Popen([exe, "-i", "127.0.0.1", "-p", str(self.port), *creds],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        wait_port("127.0.0.1", self.port)
        self.url = f"socks5://127.0.0.1:{self.port}"

    def connections(self, dest_port: int | None = None) -> list[str]:
        self._log.flush()
        lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if "connected to" in ln]
        if dest_port is not None:
            lines = [ln for ln in lines if re.search(rf":{dest_port}\b", ln)]
        return lines

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        self._log.close()


class Tinyproxy:
    """Debian's tinyproxy (HTTP CONNECT) on loopback with its own config and log file."""

    def __init__(self, tmp: Path, name: str = "tinyproxy", auth: tuple[str, str] | None = None) -> None:
        exe = shutil.which("tinyproxy")
        assert exe, "tinyproxy is installed by scripts/test.sh (scripts/apt-packages.txt)"
        self.port = free_port()
        d = tmp / name
        d.mkdir(parents=True, exist_ok=True)
        self.log_path = d / "tinyproxy.log"
        conf = d / "tinyproxy.conf"
        conf.write_text(
            f"Port {self.port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 50\n"
            f"LogFile \"{self.log_path}\"\nLogLevel Connect\nPidFile \"{d / 'tinyproxy.pid'}\"\n"
            "Allow 127.0.0.1\nDisableViaHeader Yes\n"
            + (f"BasicAuth {auth[0]} {auth[1]}\n" if auth else ""))
        # -d: stay in the foreground (so we own the process)
        self.proc = subprocess.Popen([exe, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port("127.0.0.1", self.port)
        self.url = f"http://127.0.0.1:{self.port}"

    def connects(self, dest_port: int | None = None) -> list[str]:
        if not self.log_path.exists():
            return []
        lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines()
                 if "Request" in ln and "CONNECT " in ln]
        if dest_port is not None:
            lines = [ln for ln in lines if re.search(rf":{dest_port}\b", ln)]
        return lines

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def wait_until(pred, timeout: float = 10.0, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def slow_tls_login(port: int, stall: float, silent_first: bool = False, wait: float = 30.0) -> tuple[float, float]:
    """A TLS client that dawdles before SSH: part of its ClientHello, ``stall`` seconds, then
    the rest (``silent_first``: nothing at all for ``stall`` seconds, then the whole
    ClientHello, as a stealth server's peek sees it); once the handshake is done an SSH
    version line, and nothing more. The times from the TCP connect to the end of the
    handshake and to the server's close (``inf`` if still open ``wait`` seconds after the
    connect)."""
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        t0 = time.monotonic()
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        hello = outgoing.read()
        cut = 0 if silent_first else 10
        s.sendall(hello[:cut])
        time.sleep(stall)
        s.sendall(hello[cut:])
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    s.sendall(outgoing.read())
                data = s.recv(65536)
                assert data, "closed during the TLS handshake"
                incoming.write(data)
        handshake = time.monotonic() - t0
        tls.write(b"SSH-2.0-dawdler\r\n")
        s.sendall(outgoing.read())
        while (left := t0 + wait - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                if not s.recv(65536):
                    break
            except ConnectionResetError:
                break
            except socket.timeout:
                return handshake, float("inf")
        else:
            return handshake, float("inf")
        return handshake, time.monotonic() - t0
