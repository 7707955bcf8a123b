"""Key material: OpenSSH keys from a path or the bytes themselves.

Only OpenSSH formats are accepted (ADR-011). PEM/PKCS#8 private keys are
refused with a message that names the conversion command.
"""

from __future__ import annotations

import datetime
import os
import shlex
import stat
import time
from pathlib import Path

import asyncssh

from .errors import KeyError_

KeyInput = str | bytes | os.PathLike[str]

_PEM_MARKERS = (
    b"-----BEGIN RSA PRIVATE KEY-----",
    b"-----BEGIN EC PRIVATE KEY-----",
    b"-----BEGIN DSA PRIVATE KEY-----",
    b"-----BEGIN PRIVATE KEY-----",
    b"-----BEGIN ENCRYPTED PRIVATE KEY-----",
)
_OPENSSH_PRIVATE = b"-----BEGIN OPENSSH PRIVATE KEY-----"
MAX_FILE = 16 << 20  # key, certificate and authorized_keys files


def _looks_inline(value: str) -> bool:
    return "\n" in value or value.startswith(("-----BEGIN", "ssh-", "ecdsa-", "sk-", "cert-authority"))


def read_key_input(value: KeyInput, what: str) -> tuple[bytes, str]:
    """Return ``(data, label)`` for a key given as a path or as its bytes/text.

    ``label`` is the path, or ``<inline>``, for error messages.
    """
    if isinstance(value, bytes):
        return value, f"<inline {what}>"
    text = os.fspath(value)
    if _looks_inline(text):
        return text.encode(), f"<inline {what}>"
    path = Path(text).expanduser()
    return read_small_file(path, what), str(path)


_DEV_NULL = os.makedev(1, 3)  # Linux's /dev/null (major 1, minor 3)


def read_small_file(path: Path, what: str) -> bytes:
    """The bytes of a regular file of at most ``MAX_FILE`` bytes. A FIFO or a device
    (``/dev/zero``) given as a key would block the event loop or fill the memory: they
    are refused without reading (the open does not wait for a FIFO's writer).
    ``/dev/null`` reads as empty."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        st = os.fstat(fd)
    except FileNotFoundError:
        raise KeyError_(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise KeyError_(f"{what} path is a directory: {path}") from None
    except PermissionError:
        raise KeyError_(f"{what} file not readable (permission denied): {path}") from None
    except OSError as exc:
        raise KeyError_(f"{what} file cannot be opened: {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):  # checked before fdopen, which refuses directories itself
        os.close(fd)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == _DEV_NULL:
            return b""  # an empty file, as for OpenSSH (``UserKnownHostsFile=/dev/null``)
        if stat.S_ISDIR(st.st_mode):
            raise KeyError_(f"{what} path is a directory: {path}")
        raise KeyError_(f"{what} is not a regular file: {path}")
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_FILE + 1)
    if len(data) > MAX_FILE:
        raise KeyError_(f"{what} file is larger than {MAX_FILE >> 20} MiB: {path}")
    return data


def load_private_key(value: KeyInput, what: str = "private key") -> asyncssh.SSHKey:
    data, label = read_key_input(value, what)
    stripped = data.strip()
    if any(stripped.startswith(m) for m in _PEM_MARKERS):
        keyfile = "KEYFILE" if label.startswith("<inline") else shlex.quote(label)
        raise KeyError_(
            f"{label}: PEM/PKCS#8 keys are not supported; wraith takes OpenSSH-format keys "
            f"(-----BEGIN OPENSSH PRIVATE KEY-----). Convert it in place with: ssh-keygen -p -N '' -f {keyfile}"
        )
    if not stripped.startswith(_OPENSSH_PRIVATE):
        raise KeyError_(
            f"{label}: not an OpenSSH private key (expected -----BEGIN OPENSSH PRIVATE KEY-----; "
            "make one with `wraith keygen` or `ssh-keygen -t ed25519`)"
        )
    try:
        return asyncssh.import_private_key(data)
    except (asyncssh.KeyEncryptionError, asyncssh.KeyImportError, ValueError) as exc:
        if isinstance(exc, asyncssh.KeyEncryptionError) or "passphrase" in str(exc).lower():
            keyfile = "KEYFILE" if label.startswith("<inline") else shlex.quote(label)
            raise KeyError_(f"{label}: the key is passphrase-protected; wraith needs an unencrypted key "
                            f"(remove the passphrase with: ssh-keygen -p -N '' -f {keyfile})") from None
        raise KeyError_(f"{label}: cannot read OpenSSH private key: {exc}") from None


def load_public_key(value: KeyInput, what: str = "public key") -> asyncssh.SSHKey:
    data, label = read_key_input(value, what)
    try:
        return asyncssh.import_public_key(data)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise KeyError_(f"{label}: not an OpenSSH public key ({exc})") from None


def load_certificate(value: KeyInput, what: str = "certificate") -> asyncssh.SSHCertificate:
    data, label = read_key_input(value, what)
    try:
        return asyncssh.import_certificate(data)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise KeyError_(f"{label}: not an OpenSSH certificate ({exc})") from None


# authorized_keys options wraith enforces, or that concern only what it never offers
# (shells, ptys, X11, agent or tun forwarding). Any other option is refused at start-up:
# ignoring an option one relies on (a misspelt "permitopen") would fail open.
ENFORCED_OPTIONS = frozenset({"from", "permitopen", "permitlisten", "no-port-forwarding", "port-forwarding",
                              "restrict", "cert-authority", "principals", "expiry-time", "no-touch-required",
                              "verify-required"})
INERT_OPTIONS = frozenset({"command", "environment", "pty", "no-pty", "user-rc", "no-user-rc", "x11-forwarding",
                           "no-x11-forwarding", "agent-forwarding", "no-agent-forwarding", "tunnel"})


def authorized_keys_text(value: KeyInput, what: str = "authorized keys") -> str:
    data, label = read_key_input(value, what)
    text = data.decode("utf-8", "replace")
    try:
        parsed = asyncssh.import_authorized_keys(text)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise KeyError_(f"{label}: invalid authorized_keys content ({exc})") from None
    for entry in [*getattr(parsed, "_user_entries", []), *getattr(parsed, "_ca_entries", [])]:
        options = getattr(entry, "options", {}) or {}
        for name in options:
            if name.lower() not in ENFORCED_OPTIONS | INERT_OPTIONS:
                raise KeyError_(f"{label}: key option {name!r} is not supported by wraith serve")
        for spec in options.get("expiry-time") or []:
            try:
                parse_expiry(spec)
            except ValueError:
                raise KeyError_(f"{label}: bad expiry-time {spec!r} (expected YYYYMMDD[HHMM[SS]][Z])") from None
    return text


def parse_expiry(spec: str) -> float:
    """OpenSSH's ``expiry-time`` (``YYYYMMDD[HHMM[SS]]``, local time, or UTC with a ``Z``)
    as a Unix time."""
    utc = spec.endswith(("Z", "z"))
    digits = spec[:-1] if utc else spec
    formats = {8: "%Y%m%d", 12: "%Y%m%d%H%M", 14: "%Y%m%d%H%M%S"}
    if not (digits.isascii() and digits.isdigit()) or len(digits) not in formats:
        raise ValueError(spec)
    when = datetime.datetime.strptime(digits, formats[len(digits)])
    return when.replace(tzinfo=datetime.timezone.utc).timestamp() if utc else time.mktime(when.timetuple())


def ca_public_keys(value: KeyInput) -> set[bytes]:
    """The public key blobs of the CAs in ``value`` (as for ``cert_authority_lines``)."""
    out = set()
    for line in cert_authority_lines(value).splitlines():
        fields = line.split()
        key_at = next((i for i, f in enumerate(fields) if f.startswith(("ssh-", "ecdsa-", "sk-"))), None)
        if key_at is None:
            continue
        try:
            out.add(bytes(asyncssh.import_public_key(" ".join(fields[key_at:])).public_data))
        except (asyncssh.KeyImportError, ValueError):
            continue
    return out


def cert_authority_lines(value: KeyInput) -> str:
    """Turn CA public keys (one per line) into ``cert-authority`` authorized_keys lines."""
    data, label = read_key_input(value, "cert authority")
    lines = []
    for raw in data.decode("utf-8", "replace").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("cert-authority"):
            try:
                asyncssh.import_public_key(line)
            except (asyncssh.KeyImportError, ValueError) as exc:
                raise KeyError_(f"{label}: not an OpenSSH CA public key ({exc})") from None
            line = "cert-authority " + line
        lines.append(line)
    if not lines:
        raise KeyError_(f"{label}: no CA public key found")
    return "\n".join(lines) + "\n"


def fingerprint(key: asyncssh.SSHKey) -> str:
    """OpenSSH-style ``SHA256:…`` fingerprint."""
    return key.get_fingerprint("sha256")


def generate_ed25519(path: Path, comment: str = "wraith") -> tuple[Path, Path]:
    """Write an ed25519 key pair (``path`` 0600 and ``path.pub``)."""
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    pub = Path(str(path) + ".pub")
    target = path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for target in (path, pub):
            if target.is_dir():
                raise IsADirectoryError(21, "Is a directory")
        # each file new, private from birth, written beside and then renamed over the name:
        # never through a symlink there, never O_TRUNC on an old file (which keeps its mode)
        target = pub
        _write_new(pub, key.export_public_key("openssh"), 0o644)
        target = path
        _write_new(path, key.export_private_key("openssh"), 0o600)
    except OSError as exc:
        raise KeyError_(f"cannot write the key to {target}: {exc.strerror or exc}") from None
    return path, pub


def _write_new(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
