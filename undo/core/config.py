"""Settings resolved once by the CLI and passed to the library."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from psycopg import conninfo

DECODERS = ("pgoutput", "wal2json")
#: libpq's variables that name a server or a database: set, they stand in for --dsn
LIBPQ_SOURCE = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")
_SLOT_NAME = re.compile(r"^[a-z0-9_]{1,63}$")


@dataclass(frozen=True)
class Settings:
    """Where the source, the store and the slot are. Frozen: resolved once, then shared."""

    dsn: str = ""
    store: str = "undo.db"
    slot: str = "undo"
    decoder: str | None = None
    #: --source (UNDO_SOURCE), repeatable: the sources a listing covers (none: every one), or
    #: the one a command acts on (:meth:`source`)
    sources: tuple[str, ...] = ()

    @property
    def source(self) -> str | None:
        """The one source named (--source), for a command that acts on one; None: not named."""
        from undo.core.errors import BadInput

        if len(set(self.sources)) > 1:
            raise BadInput(
                f"this command acts on one source, and --source names {len(set(self.sources))}"
                f" ({', '.join(dict.fromkeys(self.sources))}): give one"
            )
        return self.sources[0] if self.sources else None

    def __post_init__(self) -> None:
        from undo.core.errors import BadInput

        if not _SLOT_NAME.match(self.slot):
            raise BadInput(
                f"invalid slot name {self.slot!r}: use 1-63 lower-case letters, digits or '_'"
            )
        if self.decoder is not None and self.decoder not in DECODERS:
            raise BadInput(f"unknown decoder {self.decoder!r}: use pgoutput or wal2json")
        if self.dsn and (complaint := malformed(self.dsn)):
            raise BadInput(
                f"malformed DSN ({complaint}): use key=value pairs"
                " (host=db dbname=shop) or a postgresql://user@host/dbname URI"
            )
        # checked before anything connects (a command may reach the source first)
        if postgres_location(self.store) and (complaint := malformed(self.store)):
            raise BadInput(
                f"malformed store location ({complaint}): use key=value pairs"
                " (host=db dbname=audit) or a postgresql://user@host/dbname URI"
                " (check --store/UNDO_STORE)"
            )


def postgres_location(store: str) -> bool:
    """Whether --store names a PostgreSQL store: a URI, or a libpq conninfo string (a file path
    never holds '=' in practice; a path that does is given as ./path).

    >>> postgres_location("postgresql://u@h/db"), postgres_location("host=h dbname=d")
    (True, True)
    >>> postgres_location("a.db"), postgres_location("./a=b.db")
    (False, False)
    """
    return store.startswith(("postgresql://", "postgres://")) or (
        "=" in store and not store.startswith(("/", "./", "../", "~"))
    )


def names_source(settings: Settings) -> bool:
    """Whether a source is named, by --dsn (UNDO_DSN) or libpq's variables (PGHOST,
    PGDATABASE, ...): where a command may go without one (history), it goes to that one."""
    return bool(settings.dsn) or any(os.environ.get(v) for v in LIBPQ_SOURCE)


def malformed(dsn: str) -> str | None:
    """What libpq finds wrong with a conninfo string or URI (--dsn, a PostgreSQL --store),
    without the parts it quotes (the password among them); None when it parses.

    >>> malformed("postgresql://u:secret@[::1/x")
    'end of string reached when looking for matching "..." in IPv6 host address in URI: "..."'
    >>> malformed("host=db user=u") is None
    True
    """
    try:
        conninfo.conninfo_to_dict(dsn)
    except Exception as e:
        return _unquoted(str(e))
    return None


def _unquoted(message: str) -> str:
    """libpq's complaint about a DSN without the parts it quotes, which may hold the password.

    >>> _unquoted('missing "=" after "user:secret" in connection info string')
    'missing "..." after "..." in connection info string'
    """
    return re.sub(r'"[^"]*"', '"..."', message.strip().splitlines()[0] if message.strip() else "")


def masked_dsn(dsn: str) -> str:
    """The DSN as it may be shown: the password replaced by '***'.

    >>> masked_dsn("host=db user=u password=secret")
    'host=db password=*** user=u'
    >>> masked_dsn("postgresql://u:secret@db/x")
    'dbname=x host=db password=*** user=u'
    """
    if not dsn:
        return "(libpq defaults)"
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except Exception:
        return "(unparsable DSN)"
    if "password" in params:
        params["password"] = "***"
    return " ".join(f"{k}={v}" for k, v in sorted(params.items()) if v is not None)
