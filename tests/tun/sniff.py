"""Count DNS packets (UDP or TCP port 53) on every interface of the current netns until stdin closes."""

from __future__ import annotations

import select
import socket
import struct
import sys

ETH_P_ALL = 0x0003


def main() -> None:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    count = 0
    seen = 0
    print("ready", flush=True)
    while True:
        r, _, _ = select.select([s, sys.stdin], [], [], 30)
        if not r or sys.stdin in r:
            break
        frame, addr = s.recvfrom(65535)
        if addr[2] == socket.PACKET_OUTGOING and addr[0] == "lo":
            continue  # loopback frames show up twice
        seen += 1
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue
        ihl = (frame[14] & 0xF) * 4
        proto = frame[23]
        if proto in (6, 17) and len(frame) >= 14 + ihl + 4:
            sport, dport = struct.unpack_from("!HH", frame, 14 + ihl)
            if 53 in (sport, dport):
                count += 1
    print(f"dns={count} frames={seen}", flush=True)


if __name__ == "__main__":
    main()
