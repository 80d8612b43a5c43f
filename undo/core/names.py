"""Table names as a user types them: one quote-aware parser, resolved the way PostgreSQL does.

``accounts``, ``public.accounts``, ``"Odd Schema"."we""ird.x]"``: unquoted parts fold to lower
case, quoted parts keep their case and may hold dots and doubled quotes. Every option and
argument that names a table (``--table``, ``history S.T``, ``sessions --table``, ``init
--table``) goes through :func:`parse`, then :func:`resolve` against the tables the store (or the
catalog) knows.
"""

from __future__ import annotations

from collections.abc import Iterable

from undo.core.errors import BadInput, NotFound

QualifiedName = tuple[str, str]


def parse(text: str) -> tuple[str | None, str]:
    """'s.t' -> ('s', 't'); 't' -> (None, 't'); quoted parts as PostgreSQL reads them.

    >>> parse('Public.Accounts')
    ('public', 'accounts')
    >>> parse('"Odd Schema"."we""ird.x]"')
    ('Odd Schema', 'we"ird.x]')
    >>> parse('t')
    (None, 't')
    >>> parse('billing."Tax Rates"')
    ('billing', 'Tax Rates')
    """
    parts: list[str] = []
    i, n = 0, len(text)
    while True:
        if i < n and text[i] == '"':
            j, buf = i + 1, []
            while True:
                if j >= n:
                    raise BadInput(f"unterminated quote in table name {text!r}")
                if text[j] == '"':
                    if j + 1 < n and text[j + 1] == '"':
                        buf.append('"')
                        j += 2
                        continue
                    break
                buf.append(text[j])
                j += 1
            part, i = "".join(buf), j + 1
        else:
            j = i
            while j < n and text[j] not in '."':
                j += 1
            part, i = text[i:j].strip().lower(), j
            if any(c.isspace() for c in part):  # PostgreSQL: invalid name syntax (42602)
                raise BadInput(
                    f"malformed table name {text!r}: a name with spaces is written in double"
                    f" quotes, as in SQL: {_quoted_as_typed(text)}"
                )
        if not part:
            raise BadInput(f"malformed table name {text!r}: write schema.table")
        parts.append(part)
        if i >= n:
            break
        if text[i] != ".":
            raise BadInput(f"malformed table name {text!r}: write schema.table")
        i += 1
    if len(parts) > 2:
        raise BadInput(f"malformed table name {text!r}: write schema.table")
    return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])


def _quoted_as_typed(text: str) -> str:
    """How a name typed without quotes is written with them, each part's case kept.

    >>> _quoted_as_typed('billing.Tax Rates')
    'billing."Tax Rates"'
    """
    return ".".join(_quote_part(p.strip()) for p in text.split("."))


def quote(schema: str, name: str) -> str:
    """The name as PostgreSQL prints a qualified identifier (quotes only where needed).

    >>> quote('public', 'accounts'), quote('Odd Schema', 'we"ird')
    ('public.accounts', '"Odd Schema"."we""ird"')
    """
    return f"{_quote_part(schema)}.{_quote_part(name)}"


def _quote_part(part: str) -> str:
    plain = part and (part[0].isalpha() or part[0] == "_") and part.isascii()
    plain = plain and all(c.islower() or c.isdigit() or c == "_" for c in part)
    return part if plain else '"' + part.replace('"', '""') + '"'


def resolve(text: str, known: Iterable[QualifiedName]) -> QualifiedName:
    """Find the table a name means among ``known``; unknown or ambiguous is bad input.

    An unqualified name means the one schema holding a table of that name.

    >>> resolve('t', [('public', 't'), ('x', 'u')])
    ('public', 't')
    """
    schema, name = parse(text)
    known = set(known)
    if schema is not None:
        if (schema, name) not in known:
            raise NotFound(f"no table {quote(schema, name)} in the audit trail")
        return schema, name
    matches = sorted(k for k in known if k[1] == name)
    if not matches:
        raise NotFound(f"no table {text!r} in the audit trail: give it as schema.table")
    if len(matches) > 1:
        raise BadInput(
            f"table name {text!r} is ambiguous: "
            + ", ".join(quote(*m) for m in matches)
            + " (qualify it with its schema)"
        )
    return matches[0]
