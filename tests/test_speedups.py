"""The per-connection asyncssh speed-ups change CPU time only, never bytes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

from asyncssh.crypto.cipher import GCMCipher

from test_lean_recv import _PausableTransport
from wraith_core.ssh.speedups import _GCM


def test_gcm_matches_asyncssh_packet_for_packet() -> None:
    for name, key_len in (("aes128-gcm", 16), ("aes256-gcm", 32)):
        key, iv = os.urandom(key_len), os.urandom(12)
        theirs, ours = GCMCipher(name, key, iv), _GCM(key, iv)
        reader = _GCM(key, iv)
        for size in (16, 64, 1000, 65536, 262144):
            header, data = size.to_bytes(4, "big"), os.urandom(size)
            assert ours.encrypt_and_sign(header, data) == theirs.encrypt_and_sign(header, data)
        theirs_reader = GCMCipher(name, key, iv)
        for size in (16, 64, 1000):
            header, data = size.to_bytes(4, "big"), os.urandom(size)
            sealed, mac = theirs_reader.encrypt_and_sign(header, data)
            assert reader.verify_and_decrypt(header, sealed[4:], mac) == data


def test_gcm_bad_tag_fails_and_counter_moves_on() -> None:
    key, iv = os.urandom(16), os.urandom(12)
    sender, receiver = _GCM(key, iv), _GCM(key, iv)
    header = b"\x00\x00\x00\x10"
    sealed, mac = sender.encrypt_and_sign(header, b"a" * 16)
    bad = bytes([mac[0] ^ 1]) + mac[1:]
    assert receiver.verify_and_decrypt(header, sealed[4:], bad) is None
    # both sides advanced once: the next packet still lines up (as asyncssh's cipher does)
    sealed, mac = sender.encrypt_and_sign(header, b"b" * 16)
    assert receiver.verify_and_decrypt(header, sealed[4:], mac) == b"b" * 16


def test_gcm_invocation_counter_wraps_at_64_bits() -> None:
    key = os.urandom(16)
    iv = b"\x01\x02\x03\x04" + b"\xff" * 8
    theirs, ours = GCMCipher("aes128-gcm", key, iv), _GCM(key, iv)
    for _ in range(3):
        assert ours.encrypt_and_sign(b"\x00\x00\x00\x08", b"12345678") == \
            theirs.encrypt_and_sign(b"\x00\x00\x00\x08", b"12345678")


class _Transport:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[bytes]]] = []

    def write(self, data: bytes) -> None:
        self.calls.append(("write", [data]))

    def writelines(self, data: list[bytes]) -> None:
        self.calls.append(("writelines", list(data)))

    def get_write_buffer_size(self) -> int:
        return 0


class _Conn:
    """The three asyncssh names the batching uses."""

    def __init__(self) -> None:
        self._transport: _Transport | None = _Transport()
        self.received: list[bytes] = []

    def _send(self, data: bytes) -> None:
        raise AssertionError("replaced by the batching")

    def _recv_data(self) -> None:
        # answering a batch of received packets with several packets
        self._send(b"close-reply")
        self._send(b"window-adjust")


def test_packets_sent_while_processing_received_bytes_go_out_in_one_write() -> None:
    from wraith_core.ssh.speedups import _batch_sends

    conn = _Conn()
    _batch_sends(conn)
    transport = conn._transport
    assert transport is not None
    conn._send(b"alone")  # outside a batch: written at once, as asyncssh does
    conn._recv_data()
    begin, end = conn.wraith_batch  # type: ignore[attr-defined]
    begin()
    conn._send(b"eof")
    begin()  # nested: only the outermost end writes
    conn._send(b"close")
    end()
    assert transport.calls[-1] == ("writelines", [b"close-reply", b"window-adjust"])
    end()
    assert transport.calls == [("write", [b"alone"]),
                               ("writelines", [b"close-reply", b"window-adjust"]),
                               ("writelines", [b"eof", b"close"])]


class _BackedUpTransport(_Transport, _PausableTransport):
    """A transport whose socket does not take more: what is written waits in its buffer."""

    def __init__(self, buffered: int) -> None:
        _Transport.__init__(self)
        _PausableTransport.__init__(self)
        self.buffered = buffered

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass


def test_a_backed_up_burst_waits_as_one_buffer() -> None:
    """A peer that sends requests and stops reading gets one small reply per request: kept
    as separate objects in the transport's buffer they cost ~10x their size (measured:
    ~400 bytes of server memory per 36-byte reply). Once the socket is backed up, a
    burst is joined."""
    from wraith_core.ssh.speedups import JOIN_OVER, _batch_sends

    conn = _Conn()
    conn._transport = _BackedUpTransport(buffered=1)
    replies = [b"reply%d" % i for i in range(JOIN_OVER + 1)]
    conn._recv_data = lambda: [conn._send(r) for r in replies]  # type: ignore[method-assign]
    _batch_sends(conn)
    conn._recv_data()
    assert conn._transport.calls == [("write", [b"".join(replies)])]


def test_batched_packets_reach_the_transport_they_were_sent_on() -> None:
    """asyncssh drops its transport reference when it force-closes (and aborts on the
    next loop pass): packets queued before that still go out, like an immediate write."""
    from wraith_core.ssh.speedups import _batch_sends

    conn = _Conn()
    _batch_sends(conn)
    transport = conn._transport
    begin, end = conn.wraith_batch  # type: ignore[attr-defined]
    begin()
    conn._send(b"disconnect")
    conn._transport = None
    conn._send(b"after close: dropped, as asyncssh's _send drops it")
    end()
    assert transport is not None and transport.calls == [("write", [b"disconnect"])]


def test_lean_packets_decrypt_with_asyncssh() -> None:
    """Packets from the lean path are what asyncssh's receiver expects: length, padding
    rule, message type, body, sequence and rekey accounting."""
    from asyncssh.encryption import GCMEncryption

    from wraith_core.ssh.speedups import _send_lean

    key, iv = os.urandom(16), os.urandom(12)
    sent: list[bytes] = []

    class Conn:
        _send_encryption = GCMEncryption(_GCM(key, iv))  # type: ignore[arg-type]
        _compressor = None
        _kex_complete = _auth_complete = True
        _rekey_bytes, _rekey_bytes_sent, _rekey_seconds, _rekey_time = 1 << 30, 0, 0, 0.0
        _send_enchdrlen, _send_blocksize, _send_seq = 1, 16, 7

        def _send(self, data: bytes) -> None:
            sent.append(bytes(data))

    conn = Conn()
    receiver = GCMEncryption(GCMCipher("aes128-gcm", key, iv))
    cases = [(94, (5).to_bytes(4, "big") + size.to_bytes(4, "big") + os.urandom(size))  # CHANNEL_DATA
             for size in (1, 15, 16, 17, 1000, 262144)]
    cases += [(96, (5).to_bytes(4, "big")), (97, (9).to_bytes(4, "big")),  # EOF, CLOSE
              (91, os.urandom(16)), (80, b"\x00\x00\x00\x05hello\x01")]  # OPEN_CONFIRMATION, GLOBAL_REQUEST
    for pkttype, body in cases:
        assert _send_lean(conn, pkttype, (body[:3], body[3:]))
        wire = sent[-1]
        pktlen = int.from_bytes(wire[:4], "big")
        assert len(wire) == 4 + pktlen + 16 and pktlen % 16 == 0  # AES-GCM: length not padded
        plain = receiver.decrypt_packet(0, wire[:16], wire[16:4 + pktlen], 4, wire[4 + pktlen:])
        assert plain is not None
        padlen = plain[0]
        assert 4 <= padlen < 4 + 16 and plain[1] == pkttype and plain[2 : len(plain) - padlen] == body
    assert conn._send_seq == 7 + len(cases)
    assert conn._rekey_bytes_sent == sum(int.from_bytes(w[:4], "big") for w in sent)
    conn._rekey_bytes_sent = conn._rekey_bytes  # a key exchange is due: asyncssh's path takes it
    assert not _send_lean(conn, 94, (b"\x00" * 8,)) and len(sent) == len(cases)


@contextlib.asynccontextmanager
async def _tunnel_pair(reply: Callable[[bytes], bytes], **ssh_opts: Any) -> AsyncIterator[tuple[Any, int, list]]:
    """An asyncssh server and client on loopback, both with wraith's per-connection changes
    (``conn_fixes.install``) and AES-GCM, and a target that answers ``reply(all it read)``.
    Yields the client connection, the target port and both connections."""
    import asyncssh

    from wraith_core.ssh import conn_fixes

    conns: list[Any] = []

    async def target(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(reply(await r.read()))
        await w.drain()
        w.close()

    class Server(asyncssh.SSHServer):
        def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
            conn_fixes.install(conn)
            conns.append(conn)

        def begin_auth(self, username: str) -> bool:
            return True

        def public_key_auth_supported(self) -> bool:
            return True

        def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
            return True

        def connection_requested(self, *args: object) -> bool:
            return True  # asyncssh dials the target itself

    class Client(asyncssh.SSHClient):
        def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
            conn_fixes.install(conn)
            conns.append(conn)

    algs = ["aes128-gcm@openssh.com"]
    srv = await asyncio.start_server(target, "127.0.0.1", 0)
    ssh = await asyncssh.listen("127.0.0.1", 0, server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
                                server_factory=Server, encryption_algs=algs, **ssh_opts)
    conn = await asyncssh.connect("127.0.0.1", ssh.sockets[0].getsockname()[1], known_hosts=None,
                                  client_keys=[asyncssh.generate_private_key("ssh-ed25519")], username="x",
                                  client_factory=Client, encryption_algs=algs, **ssh_opts)
    try:
        yield conn, srv.sockets[0].getsockname()[1], conns
    finally:
        conn.close()
        ssh.close()
        srv.close()


def _digest_then_data(data: bytes) -> bytes:
    return hashlib.sha256(data).digest() + data


async def test_bulk_data_across_key_exchanges(monkeypatch: Any) -> None:
    """Real asyncssh connections (both ends with wraith's per-connection changes, AES-GCM)
    re-keying every 256 KiB while 8 MiB go each way: every byte arrives, each new key
    gets the lean cipher too, and the lean receive loop (lean_recv) carries the channel
    packets while asyncssh's path takes the key exchanges in between."""
    from wraith_core.ssh import lean_recv

    lean_packets = [0]
    rewinds = [0]
    original_loop = lean_recv._lean_loop

    def counting_loop(conn: Any, cipher: Any, buf: bytes, pos: int, budget: int) -> tuple[int, bool, int]:
        seq = conn._recv_seq
        pos, foreign, budget = original_loop(conn, cipher, buf, pos, budget)
        lean_packets[0] += (conn._recv_seq - seq) & 0xFFFF_FFFF
        rewinds[0] += foreign
        return pos, foreign, budget

    monkeypatch.setattr(lean_recv, "_lean_loop", counting_loop)
    payload = os.urandom(8 << 20)
    async with _tunnel_pair(_digest_then_data, rekey_bytes=256 << 10) as (conn, tport, conns):
        keys_seen = set()
        reader, writer = await conn.open_connection("127.0.0.1", tport)
        for i in range(0, len(payload), 1 << 20):
            writer.write(payload[i : i + (1 << 20)])
            await writer.drain()
            keys_seen.add(id(conn._send_encryption))
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), 60)
        assert got[:32] == hashlib.sha256(payload).digest() and got[32:] == payload
        assert len(keys_seen) > 4  # the keys really changed during the transfer
        # one more small exchange, so both ends have sent and received since the last key exchange
        reader, writer = await conn.open_connection("127.0.0.1", tport)
        writer.write(b"ping")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == _digest_then_data(b"ping")
        for c in conns:
            assert type(c._send_encryption._cipher) is _GCM and type(c._recv_encryption._cipher) is _GCM
        assert lean_packets[0] > 10 and rewinds[0] > 4  # both paths were used


async def test_channel_write_copies_mutable_input_before_returning() -> None:
    """Like asyncssh: bytes written from a bytearray (or a view of one) are taken as they
    were at write() time, whatever the caller does with its buffer afterwards — also when
    the channel's window is closed and the data waits."""
    async with _tunnel_pair(lambda data: hashlib.sha256(data).digest()) as (conn, tport, _):
        reader, writer = await conn.open_connection("127.0.0.1", tport)
        expected = hashlib.sha256()
        buf = bytearray(os.urandom(3 << 20))  # more than one window: some of it has to wait
        for _ in range(3):
            writer.write(buf)
            writer.write(memoryview(buf)[: 1 << 20])
            expected.update(bytes(buf))
            expected.update(bytes(buf[: 1 << 20]))
            buf[:] = os.urandom(len(buf))  # scribble over it at once
        writer.write(b"tail")  # immutable: kept as is
        expected.update(b"tail")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 60) == expected.digest()
