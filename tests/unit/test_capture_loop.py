"""The capture loop against a scripted replication stream: nothing is confirmed before the
store has committed it, and every transaction is stored exactly once (PITFALLS 0.3, 6.3).

The source is a fake (bytes in, status updates out); the store is a real SQLite file.
"""

from __future__ import annotations

import os
import random
import sqlite3
import struct
from typing import Any

import pytest

from undo.core.config import Settings
from undo.core.records import Relation
from undo.store import open_store
from undo.stream import capture as cap

EPOCH_US = 0


def _writer(store: str) -> Any:
    """A new store's writer, for a source registered by hand."""
    db = open_store(store, create=True)
    db.register_source("s", "1", "s")
    return db.writer()


def _w(payload: bytes, lsn: int) -> bytes:
    return b"w" + struct.pack(">QQQ", lsn, lsn, 0) + payload


def _relation() -> bytes:
    cols = b"".join(b"\x01" + n + b"\0" + struct.pack(">Ii", 23, -1) for n in (b"id", b"v"))
    return b"R" + struct.pack(">I", 1) + b"public\0t\0f" + struct.pack(">h", 2) + cols


def _tuple(*values: bytes) -> bytes:
    out = struct.pack(">h", len(values))
    for v in values:
        out += b"t" + struct.pack(">i", len(v)) + v
    return out


class FakeSource:
    """A pgconn that plays a script of frames, with pauses, and records every status update."""

    def __init__(self, frames: list[bytes | None], store: str) -> None:
        self.frames = frames
        self.store = store
        self.confirmed: list[int] = []
        self.socket, self._w = os.pipe()  # always readable: select() returns at once
        os.write(self._w, b"x")

    def close(self) -> None:
        os.close(self.socket)
        os.close(self._w)

    # the parts of psycopg's PGconn that capture uses
    def send_query(self, q: bytes) -> None:
        assert q.startswith(b"START_REPLICATION")

    def get_result(self) -> Any:
        from psycopg import pq

        return type("R", (), {"status": pq.ExecStatus.COPY_BOTH})()

    def get_copy_data(self, async_: int) -> tuple[int, bytes]:
        if not self.frames:
            raise cap.ConnectionLost("end of script")
        frame = self.frames.pop(0)
        if frame is None:
            return 0, b""
        return len(frame), frame

    def consume_input(self) -> None:
        pass

    def put_copy_data(self, data: bytes) -> None:
        assert data[:1] == b"r"
        flushed = struct.unpack(">Q", data[9:17])[0]
        committed = (
            sqlite3.connect(self.store)
            .execute("SELECT value FROM source_meta WHERE key = 'position'")
            .fetchone()
        )
        durable = int(committed[0]) if committed else 0
        assert flushed <= durable, "confirmed a position the store has not committed"
        self.confirmed.append(flushed)

    def flush(self) -> None:
        pass

    def get_error_message(self) -> str:
        return "closed"


class FakeCatalog:
    def resolve(self, rel: Relation) -> tuple[bool, tuple[int, ...] | None, bool]:
        rel.types = ("integer", "text")
        return True, (0,), False


def script(rnd: random.Random, n_txns: int, start: int) -> tuple[list[bytes | None], int]:
    frames: list[bytes | None] = [_w(_relation(), start)]
    lsn = start
    row = 0
    for xid in range(1000, 1000 + n_txns):
        rows = rnd.choice([1, 2, 5, 300, 7000])
        commit_lsn = lsn + rows * 10 + 5
        frames.append(_w(b"B" + struct.pack(">QqI", commit_lsn, EPOCH_US, xid), lsn))
        for _ in range(rows):
            row += 1
            frames.append(
                _w(b"I" + struct.pack(">I", 1) + b"N" + _tuple(str(row).encode(), b"v"), lsn)
            )
            if rnd.random() < 0.001:
                frames.append(None)  # the server has nothing more for now
        end = commit_lsn + 8
        frames.append(_w(b"C" + struct.pack(">BQQq", 0, commit_lsn, end, EPOCH_US), commit_lsn))
        lsn = end + 10
        if rnd.random() < 0.2:
            frames.append(b"k" + struct.pack(">QQB", lsn, 0, rnd.random() < 0.5))
        if rnd.random() < 0.3:
            frames.append(None)
    return frames, row


@pytest.mark.parametrize("seed", range(6))
def test_nothing_is_confirmed_before_it_is_stored(tmp_path, seed):
    rnd = random.Random(seed)
    store = str(tmp_path / "s.db")
    writer = _writer(store)
    frames, rows = script(rnd, 60, 1 << 20)
    # a crash anywhere: cut the script at a random frame, then replay the whole of it again
    cut = rnd.randrange(len(frames))
    for attempt in (frames[:cut], frames):
        source = FakeSource(list(attempt), store)
        session = cap._Session(
            Settings(store=store), writer, "pgoutput", [], b"k" * 32, FakeCatalog(), None
        )  # type: ignore[arg-type]
        rconn = type("C", (), {"pgconn": source})()
        with pytest.raises(cap.ConnectionLost):
            session.run(rconn, writer.position, None, lambda: False)  # type: ignore[arg-type]
        source.close()
        writer.abort()
        if writer.batch_open:
            writer.flush()
        assert source.confirmed == sorted(source.confirmed)
    check = sqlite3.connect(store)
    assert check.execute("SELECT count(*), count(DISTINCT key) FROM changes").fetchone() == (
        rows,
        rows,
    )
    assert check.execute("SELECT count(*) FROM transactions").fetchone() == (60,)


@pytest.mark.parametrize("pure_python", [False, True])
def test_a_malformed_frame_stops_capture_with_nothing_of_it_confirmed(
    tmp_path, monkeypatch, pure_python
):
    """The server's stream, cut short or with a length past a value's end: capture stops with
    one line naming the frame's LSN, stores and confirms nothing from that transaction on, and
    never stores a shorter value in its place (PITFALLS 0.3); with the C module or without."""
    from undo.core.errors import UndoError
    from undo.stream import pgoutput
    from undo.stream._accel import no_stage

    if pure_python:
        monkeypatch.setattr(pgoutput, "_tuple", pgoutput._py_tuple)
        monkeypatch.setattr(pgoutput, "stage", no_stage)
    store = str(tmp_path / "s.db")
    writer = _writer(store)
    frames, _ = script(random.Random(1), 3, 1 << 20)
    frames = [f for f in frames if f is not None and f[:1] == b"w"]  # no pause, no keepalive
    first_end = 0
    for f in frames:  # the last commit's end: where the store stands before the bad frame
        if f[25:26] == b"C":
            first_end = struct.unpack(">Q", f[35:43])[0]
    bad_lsn = first_end + 100
    value = b"t" + struct.pack(">I", 0xFFFFFFFF) + b"abc"  # 4 GiB said, 3 bytes sent
    frames += [
        _w(b"B" + struct.pack(">QqI", bad_lsn + 50, EPOCH_US, 2000), bad_lsn),
        _w(b"I" + struct.pack(">I", 1) + b"N" + _tuple(b"1", b"v"), bad_lsn),
        _w(
            b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">h", 2) + _tuple(b"2")[2:] + value,
            bad_lsn + 10,
        ),
        _w(b"C" + struct.pack(">BQQq", 0, bad_lsn + 50, bad_lsn + 58, EPOCH_US), bad_lsn + 50),
    ]
    source = FakeSource(frames, store)
    session = cap._Session(
        Settings(store=store), writer, "pgoutput", [], b"k" * 32, FakeCatalog(), None
    )  # type: ignore[arg-type]
    rconn = type("C", (), {"pgconn": source})()
    with pytest.raises(UndoError) as info:
        session.run(rconn, writer.position, None, lambda: False)  # type: ignore[arg-type]
    source.close()
    message = str(info.value)
    assert "\n" not in message and "malformed" in message, message
    assert f"0/{bad_lsn + 10:X}" in message and "truncated tuple data" in message
    assert all(c < bad_lsn for c in source.confirmed)
    check = sqlite3.connect(store)
    assert check.execute("SELECT count(*) FROM transactions WHERE xid = 2000").fetchone() == (0,)


def test_idle_capture_logs_no_progress_line(tmp_path, monkeypatch, caplog):
    """The progress line every REPORT_SECONDS says how capture works: while it stores nothing
    and is caught up, it says nothing (it logged `0 changes stored (0/s)` every 30 s)."""
    import logging
    import time

    monkeypatch.setattr(cap, "REPORT_SECONDS", 0.001)
    store = str(tmp_path / "s.db")
    writer = _writer(store)
    busy, _ = script(random.Random(2), 1, 1 << 20)
    busy = [f for f in busy if f is not None]
    idle: list[bytes | None] = [None] * 20
    source = FakeSource(idle + busy + idle, store)
    plain = source.get_copy_data

    def slow(async_: int) -> tuple[int, bytes]:
        time.sleep(0.002)  # time passes between reports
        return plain(async_)

    source.get_copy_data = slow  # type: ignore[method-assign]
    session = cap._Session(
        Settings(store=store), writer, "pgoutput", [], b"k" * 32, FakeCatalog(), None
    )  # type: ignore[arg-type]
    rconn = type("C", (), {"pgconn": source})()
    with caplog.at_level(logging.INFO, logger=cap.log.name), pytest.raises(cap.ConnectionLost):
        session.run(rconn, writer.position, None, lambda: False)  # type: ignore[arg-type]
    source.close()
    lines = [r.getMessage() for r in caplog.records if "changes stored" in r.getMessage()]
    assert lines, "a line once it stored changes"
    assert not any("(0/s)" in line and line.endswith(", 0.0 s") for line in lines), lines
