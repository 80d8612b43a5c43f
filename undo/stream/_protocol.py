"""Replication framing inside CopyBoth: XLogData, primary keepalive, standby status update.

Pure functions over bytes, so they can be tested without a server.
"""

from __future__ import annotations

import struct
import time

_PG_EPOCH_UNIX = 946684800
_KEEPALIVE = struct.Struct(">QQB")
_STATUS = struct.Struct(">cQQQQB")


def parse_keepalive(msg: bytes) -> tuple[int, bool]:
    """'k' message -> (wal_end, reply_requested)."""
    end, _, reply = _KEEPALIVE.unpack_from(msg, 1)
    return end, bool(reply)


def status_update(flush_lsn: int, reply: bool = False) -> bytes:
    """Standby status update: written, flushed and applied all at ``flush_lsn``.

    >>> status_update(0x10, False)[:9]
    b'r\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x10'
    """
    now = int((time.time() - _PG_EPOCH_UNIX) * 1_000_000)
    return _STATUS.pack(b"r", flush_lsn, flush_lsn, flush_lsn, now, 1 if reply else 0)
