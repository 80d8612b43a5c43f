"""Positions in the WAL (LSNs) and transaction ids, as the stream and the store name them."""

from __future__ import annotations


def lsn_to_int(text: str) -> int:
    """'16/B374D848' -> 97500059720.

    >>> lsn_to_int('16/B374D848')
    97500059720
    """
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def int_to_lsn(value: int) -> str:
    """97500059720 -> '16/B374D848'.

    >>> int_to_lsn(97500059720)
    '16/B374D848'
    """
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def is_xid_of(full_xid: object, xid: int) -> bool:
    """Whether a 64-bit xid (as a tag carries it) is the transaction the stream calls ``xid``
    (its low 32 bits).

    >>> is_xid_of(2**32 + 7, 7), is_xid_of(8, 7), is_xid_of(True, 1)
    (True, False, False)
    """
    return type(full_xid) is int and full_xid % 2**32 == xid
