"""Whether an idle pooled socket has something to read: a peer that closed it, or
sent what nobody asked for. Either way it is no longer fit to reuse.

Both pools (the database's, the LLM's) ask this of every connection they hand out.
The poll() is bound when this module is imported: under gevent a monkey-patched
poll() goes through gevent's hub (~30 us instead of ~1 us per call), and a
zero-timeout check needs none of that. `qna serve` imports this module in the
master, before the workers patch; imported later, the patched poll() is still
correct, only slower.
"""

from __future__ import annotations

import select

_POLL = getattr(select, "poll", None)


def readable(fd: int) -> bool:
    """True if reading `fd` would not block (zero timeout: never waits)."""
    if _POLL is not None:  # select() cannot watch descriptors past 1023
        poller = _POLL()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([fd], [], [], 0)[0])  # Windows
