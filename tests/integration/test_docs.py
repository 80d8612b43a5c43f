"""The docs' examples, run: README.md and docs/*.md cannot drift from the tool.

Every fenced block says what it is in its info string (a block without one fails the test):

- ```console: run. A line starting with `$ ` is a command (a line ending in `\\` goes on to the
  next); the lines after it, up to the next `$ ` or the end of the block, are its output:
  stdout and stderr as written, in order. Each command runs in bash, in order down the page,
  and must exit 0 as written (show a refusal with `; echo "exit $?"`).
- ```sql: run against the page's audit store (SQLite), after the console blocks above it: each
  statement must run, and a query must return a row.
- `norun (why)` after the language (```console norun (systemd)): shown, not run (systemd, a
  managed service, docker). Counted and reported; the reason is required.
- any other language (text, ini, json, yaml): not an example.

Each page runs in a folder of its own (the store is `undo.db` there, undo's default) against a
database `tickets` on the test cluster, the demo's schema and rows (undo/demo), reached through
libpq's PGHOST, PGPORT, PGUSER and PGDATABASE (no UNDO_* variable is set). A line
`<!-- docs-test: setup=NAME -->` makes the database and the folder anew for the blocks below
it: `fresh` (what a page starts with: the rows, nothing of undo's), or `incident`, which also
runs `undo init`, the web app's writes, the routine `usage-metrics` script's DELETE
(application_name `usage-metrics`) and `undo capture --once`: where on-call starts.

What changes between runs is normalised before comparing, on both sides:

- a session id (`6b167627.369c`) and an xid (the number after `xid `, `xact `, `"xid": `) are
  placeholders bound on first sight: the page's value stands for the run's from then on (in
  later commands too), and one page value must stand for one run value;
- times (ISO 8601, with `T` or a space, any fraction and zone), LSNs (`0/1F49DA8`), sizes
  (`744 bytes`, `239,080 bytes`, `1.2 MB`), durations (`5.3s`, `12 ms`), rates (`(1,234/s)`),
  pids (`pid 4242`) match any value;
- runs of spaces are one space, runs of `-` (table rules) one `--`; trailing spaces go;
- `...` alone on a line stands for any number of lines; `...` inside a line for any text.

UNDO_DOCS_WRITE=1 writes the outputs this run printed into the pages where they differ, with the
page's own values for what it bound (those that matched stay, `...` and all): review the diff,
trim, commit.
"""

from __future__ import annotations

import os
import re
import shlex
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click
import psycopg
import pytest
from psycopg import sql

from undo.cli import cli
from undo.demo import BUGGY_SCRIPT, SCHEMA

ROOT = Path(__file__).parents[2]
PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("docs/*.md"))]

FENCE = re.compile(r"^```(.*)$")
SETUP = re.compile(r"<!-- docs-test: setup=(\w+) -->")

#: bound placeholders: (class, pattern); the page's value stands for the run's
BOUND = [
    ("session", r"\b[0-9a-f]{8}\.[0-9a-f]{1,8}\b"),
    ("xid", r'(?:(?<=xid )|(?<=xact )|(?<="xid": )|(?<=undo_xid": ))\d+\b'),
]
#: free placeholders: any value matches
FREE = [
    r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d(?::?\d\d)?)?",
    r"\b[0-9A-F]{1,8}/[0-9A-F]{1,8}\b",
    r"\b\d[\d,.]*\s?(?:bytes|B|kB|KB|MB|GB)\b",
    r"\b\d+(?:\.\d+)?\s?(?:ms|s)\b",
    r"\(\d[\d,.]*/s\)",
    r"(?<=pid )\d+",
]
TOKEN = re.compile(
    "|".join(f"(?P<{name}>{pat})" for name, pat in BOUND)
    + "|"
    + "|".join(f"(?P<free{n}>{pat})" for n, pat in enumerate(FREE))
    + r"|(?P<dots>\.\.\.)"
)


@dataclass
class Command:
    line: int  # 1-based line of the `$ ` in the page
    text: str  # the command, without `$ ` and line continuations joined as written
    output: list[str]  # the lines shown after it


@dataclass
class Block:
    line: int
    lang: str
    norun: str | None  # the reason, for a block not run
    body: list[str]
    commands: list[Command] = field(default_factory=list)


def blocks(page: str) -> Iterator[Block]:
    lines = (ROOT / page).read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        info = m.group(1).strip()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and lines[i] != "```":
            body.append(lines[i])
            i += 1
        i += 1
        lang, _, rest = info.partition(" ")
        norun = None
        if rest.startswith("norun"):
            norun = rest[len("norun") :].strip().strip("()") or ""
        block = Block(start, lang, norun, body)
        if lang == "console":
            for n, text in enumerate(body):
                if text.startswith("$ "):
                    block.commands.append(Command(start + n + 1, text[2:], []))
                elif block.commands and block.commands[-1].text.endswith("\\"):
                    block.commands[-1].text += "\n" + text
                elif block.commands:
                    block.commands[-1].output.append(text)
        yield block


def _shape(line: str) -> str:
    return re.sub(r"-{2,}", "--", re.sub(r"[ \t]+", " ", line)).strip()


def _line_pattern(
    line: str, bound: dict[tuple[str, str], str]
) -> tuple[str, list[tuple[str, tuple[str, str]]]]:
    """A page's output line as a regex over a run's line (both normalised), and the groups
    that bind its placeholders not bound yet."""
    out, pos, groups = [], 0, []
    line = _shape(line)
    for m in TOKEN.finditer(line):
        out.append(re.escape(line[pos : m.start()]))
        pos = m.end()
        kind = m.lastgroup
        if kind == "dots":
            out.append(".*?")
        elif kind in ("session", "xid"):
            key = (kind, m.group())
            if key in bound:
                out.append(re.escape(bound[key]))
            else:
                group = f"g{len(groups)}"
                groups.append((group, key))
                out.append(f"(?P<{group}>{dict(BOUND)[kind]})")
        else:
            out.append(f"(?:{FREE[int(str(kind)[4:])]})")  # the same kind of value
    out.append(re.escape(line[pos:]))
    return "".join(out), groups


def _match_line(
    want: str, got: str, bound: dict[tuple[str, str], str]
) -> dict[tuple[str, str], str] | None:
    """The bindings after matching one line, or None when it does not match: one page value
    stands for one run value, and the other way round."""
    pattern, groups = _line_pattern(want, bound)
    m = re.fullmatch(pattern, _shape(got))
    if m is None:
        return None
    new = dict(bound)
    for group, key in groups:
        value = m.group(group)
        if new.get(key, value) != value:
            return None
        if key not in new and any(k[0] == key[0] and v == value for k, v in new.items()):
            return None
        new[key] = value
    return new


def match(
    want: list[str], got: list[str], bound: dict[tuple[str, str], str]
) -> dict[tuple[str, str], str] | None:
    """Match a page's output with a run's, `...` lines standing for any lines."""
    if not want:
        return bound if not got else None
    if want[0].strip() == "...":
        for skip in range(len(got) + 1):
            found = match(want[1:], got[skip:], bound)
            if found is not None:
                return found
        return None
    if not got:
        return None
    first = _match_line(want[0], got[0], bound)
    return None if first is None else match(want[1:], got[1:], first)


def bind_in(text: str, bound: dict[tuple[str, str], str]) -> str:
    """A page's command with the run's values for the placeholders bound so far."""
    pattern = "|".join(f"(?P<{name}>{pat})" for name, pat in BOUND)
    return re.sub(pattern, lambda m: bound.get((str(m.lastgroup), m.group()), m.group()), text)


# -- the page's database ---------------------------------------------------------------------


def _environment(cluster, workdir: Path) -> dict[str, str]:
    params = psycopg.conninfo.conninfo_to_dict(cluster.admin_dsn)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UNDO_", "PG"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PGHOST=str(params.get("host", "")),
        PGPORT=str(params.get("port", "5432")),
        PGUSER=str(params.get("user", "postgres")),
        PGDATABASE="tickets",
        PYTHONUNBUFFERED="1",
        PAGER="",
        TZ="UTC",
        LC_ALL="C.UTF-8",
    )
    if params.get("password"):
        env["PGPASSWORD"] = str(params["password"])
    return env


def _run(command: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
    )


def _setup(kind: str, cluster, env: dict[str, str], cwd: Path) -> None:
    with psycopg.connect(cluster.admin_dsn, autocommit=True) as c:
        for (slot,) in c.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE database = 'tickets'"
        ).fetchall():
            c.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        c.execute("DROP DATABASE IF EXISTS tickets WITH (FORCE)")
        c.execute("CREATE DATABASE tickets")
    with psycopg.connect(cluster.dsn("tickets"), autocommit=True) as c:
        c.execute(SCHEMA.encode())
    if kind == "fresh":
        return
    assert kind == "incident", f"unknown setup {kind}"
    steps = [
        "undo -q init",
        "PGAPPNAME=web psql -qc 'UPDATE accounts SET last_login = now() WHERE id = 42'",
        "PGAPPNAME=usage-metrics psql -qc " + shlex.quote(BUGGY_SCRIPT.strip()),
        'PGAPPNAME=web psql -qc "INSERT INTO registrations (event_id, email)'
        " VALUES (12, 'fan@example.net')\"",
        "undo -q capture --once",
    ]
    for step in steps:
        done = _run(step, env, cwd)
        assert done.returncode == 0, f"setup: {step}: {done.stdout}"


def _drop(cluster) -> None:
    with psycopg.connect(cluster.admin_dsn, autocommit=True) as c:
        for (slot,) in c.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE database = 'tickets'"
        ).fetchall():
            c.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                " WHERE slot_name = %s AND active_pid IS NOT NULL",
                (slot,),
            )
            time.sleep(0.2)
            c.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        c.execute(sql.SQL("DROP DATABASE IF EXISTS tickets WITH (FORCE)"))


def _run_sql(block: Block, store: Path) -> str | None:
    """None if every statement ran (a query returning a row), else what went wrong."""
    text = "\n".join(block.body)
    with sqlite3.connect(store) as db:
        for statement in [s for s in text.split(";") if _code(s)]:
            try:
                rows = db.execute(statement).fetchall()
            except sqlite3.Error as e:
                return f"{e}: {statement.strip()}"
            if _code(statement).lower().startswith(("select", "with")) and not rows:
                return f"no row: {statement.strip()}"
    return None


def _code(statement: str) -> str:
    return "\n".join(
        line for line in statement.splitlines() if not line.strip().startswith("--")
    ).strip()


@pytest.mark.parametrize("page", PAGES)
def test_the_examples_run_and_print_what_the_page_shows(page, cluster, tmp_path):
    lines = (ROOT / page).read_text().splitlines()
    setups = {n: m.group(1) for n, line in enumerate(lines, 1) if (m := SETUP.search(line))}
    page_blocks = [b for b in blocks(page) if b.lang in ("console", "sql") and b.norun is None]
    if not page_blocks:
        pytest.skip(f"{page}: no runnable example")
    env = _environment(cluster, tmp_path)
    write = os.environ.get("UNDO_DOCS_WRITE") == "1"
    rewrites: dict[int, list[str]] = {}  # page line of a command -> its new lines
    failures: list[str] = []
    bound: dict[tuple[str, str], str] = {}
    done_to = 0  # the page's line up to which setups are done
    try:
        for block in page_blocks:
            asked = [n for n in setups if done_to < n < block.line]
            if asked or done_to == 0:
                kind = setups[asked[-1]] if asked else "fresh"
                for f in tmp_path.iterdir():
                    f.unlink()
                _setup(kind, cluster, env, tmp_path)
                bound = {}
            done_to = block.line
            if block.lang == "sql":
                problem = _run_sql(block, tmp_path / "undo.db")
                if problem:
                    failures.append(f"{page}:{block.line}: {problem}")
                continue
            for cmd in block.commands:
                command = bind_in(cmd.text, bound)
                done = _run(command.replace("\\\n", " "), env, tmp_path)
                got = done.stdout.splitlines()
                if done.returncode != 0:
                    failures.append(
                        f"{page}:{cmd.line}: `{command}` exited {done.returncode}:\n" + done.stdout
                    )
                    continue
                found_bound = match(cmd.output, got, bound)
                if found_bound is not None:
                    bound = found_bound
                    continue
                # bind positionally, so that later commands still run with the run's values
                for name, pat in BOUND:
                    for mine, theirs in zip(
                        re.findall(pat, "\n".join(cmd.output)),
                        re.findall(pat, "\n".join(got)),
                        strict=False,
                    ):
                        bound.setdefault((name, mine), theirs)
                # the page keeps its own values for what it bound: the diff shows what changed
                page_value = {(k, run): mine for (k, mine), run in bound.items()}
                rewrites[cmd.line] = [
                    "$ " + cmd.text,
                    *[bind_in(line.rstrip(), page_value) for line in got],
                ]
                failures.append(
                    f"{page}:{cmd.line}: `{command}` printed something else; it printed:\n"
                    + "\n".join(got)
                    + "\n--- the page shows:\n"
                    + "\n".join(cmd.output)
                )
    finally:
        _drop(cluster)
    if write and rewrites:
        _rewrite(page, rewrites)
    assert not failures, "\n\n".join(failures)


def _rewrite(page: str, rewrites: dict[int, list[str]]) -> None:
    lines = (ROOT / page).read_text().splitlines()
    out: list[str] = []
    commands = {c.line: c for b in blocks(page) for c in b.commands}
    skip_until = 0
    for n, line in enumerate(lines, 1):
        if n < skip_until:
            continue
        if n in rewrites:
            cmd = commands[n]
            out.extend(rewrites[n])
            skip_until = n + cmd.text.count("\n") + 1 + len(cmd.output)
            continue
        out.append(line)
    (ROOT / page).write_text("\n".join(out) + "\n")


# -- what needs no database ------------------------------------------------------------------


def test_every_block_says_what_it_is_and_why_it_is_not_run():
    ran, not_run = 0, []
    for page in PAGES:
        for block in blocks(page):
            assert block.lang, f"{page}:{block.line}: a fenced block without a language"
            if block.lang in ("console", "sql"):
                if block.norun is None:
                    ran += 1
                else:
                    assert block.norun, f"{page}:{block.line}: norun without its reason"
                    not_run.append(f"{page}:{block.line} ({block.norun})")
            if block.lang == "console" and block.norun is None:
                assert block.commands, f"{page}:{block.line}: a console block with no `$ `"
    print(f"docs: {ran} example block(s) run, {len(not_run)} not run: {', '.join(not_run)}")
    assert ran > 0


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    found = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().lower()
        slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
        found.add(slug)
    return found


def test_relative_links_resolve():
    for page in PAGES:
        path = ROOT / page
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            assert dest.exists(), f"{page}: link to {target}: no such file"
            if anchor and dest.suffix == ".md":
                assert anchor in _anchors(dest), f"{page}: link to {target}: no such heading"


def _commands(group: click.Group, prefix: str = "undo") -> Iterator[tuple[str, click.Command]]:
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix} {name}")
        else:
            yield f"{prefix} {name}", command


def test_the_reference_names_every_command_and_option():
    reference = (ROOT / "docs" / "reference.md").read_text()
    for option in cli.params:
        for name in option.opts:
            assert f"`{name}" in reference, f"undo {name}: not in docs/reference.md"
    for name, command in _commands(cli):
        assert f"`{name}" in reference, f"{name}: not in docs/reference.md"
        for option in command.params:
            if isinstance(option, click.Option):
                for opt in option.opts:
                    assert opt in reference, f"{name} {opt}: not in docs/reference.md"
