from typing import Any

def tuple_tokens(buf: bytes, pos: int, /) -> tuple[list[str], list[int] | None, int]: ...
def stage(
    frame: Any,
    resolved: dict[int, tuple[int | None, tuple[int, ...] | None]],
    rows: list[Any],
    counts: dict[tuple[int, str], int],
    change_id: int,
    txn_id: int,
    ord: int,
    /,
) -> int: ...
def stage_wal2json(
    frame: Any,
    resolved: dict[bytes, tuple[int | None, tuple[int, ...] | None]],
    rows: list[Any],
    counts: dict[tuple[int, str], int],
    change_id: int,
    txn_id: int,
    ord: int,
    /,
) -> int: ...
def compact_flat_array(data: Any, /) -> str | None: ...
