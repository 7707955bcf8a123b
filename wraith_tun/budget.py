"""A shim-wide cap on the bytes read from SOCKS5 sockets that apps have not acknowledged yet.

Each flow's send buffer is bounded (``TcpConfig.snd_buf``, 256 KiB), but 4096 flows whose apps
never read would still hold 1 GiB. So reads are also charged to one budget, in two halves:

* a shared half: while less than half the budget is used, a flow reads up to its own free space;
* a reserved half, split evenly over ``max_flows``: beyond the shared half, a flow reads only
  up to its reserve (8 KiB per flow with the defaults, 64 MiB and 4096 flows).

Reads are sized to the allowance (the driver hands the socket a buffer that big), so the total
never exceeds the budget, and a flow whose app reads always gets its reserve back as the app
acknowledges: stalled flows slow the others down, they never stop them. (A reserve that shrank
as flows came, say budget / flows, would not bound the total: each flow stalls holding the
reserve of its day.)
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_LIMIT = 64 << 20
MIN_RESERVE = 4096  # progress for every flow even with a tiny budget (the cap then grows to fit)


@dataclass
class Budget:
    limit: int = DEFAULT_LIMIT
    max_flows: int = 4096
    held: int = 0  # bytes charged right now, over all flows

    @property
    def reserve(self) -> int:
        return max(self.limit // (2 * max(self.max_flows, 1)), MIN_RESERVE)

    @property
    def cap(self) -> int:
        """What ``held`` never exceeds: the budget, unless MIN_RESERVE makes the reserves larger."""
        return self.limit // 2 + self.max_flows * self.reserve

    def allowance(self, held_by_flow: int, space: int) -> int:
        """How many bytes a flow holding ``held_by_flow``, with ``space`` free in its own
        buffer, may read now."""
        free = max(self.limit // 2 - self.held, self.reserve - held_by_flow)
        return max(0, min(space, free))

    def charge(self, delta: int) -> None:
        self.held += delta

    @property
    def relaxed(self) -> bool:
        """Well inside the shared half: flows paused by the budget may read again. (The gap keeps
        a sweep over paused flows from running on every acknowledgement.)"""
        return self.held < self.limit * 3 // 8
