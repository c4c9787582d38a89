"""LIKE patterns as PostgreSQL reads them (``[[tenant_sources]] schemas``, ``discover --schemas``).

``%`` matches any run of characters, ``_`` any one character, and a backslash (LIKE's default
escape) makes the next character literal: ``'tenant\\_%'`` matches ``tenant_acme`` but not
``tenantXacme``. A pattern may not end with a lone backslash (PostgreSQL refuses it).

The *prefix* of a pattern is its text up to the first unescaped ``%``, escapes resolved. It is
stripped from schema names to make tenant names, and a schema the pattern matches that does not
start with it is not a tenant: ``tenant_%`` also matches ``tenants_archive`` (``_`` matched
``s``), whose rows are not a tenant's to prune.
"""

from __future__ import annotations


def problem(pattern: str) -> str | None:
    """Why PostgreSQL would refuse ``pattern``, or None."""
    escaped = False
    for char in pattern:
        escaped = not escaped and char == "\\"
    if escaped:
        return "a LIKE pattern must not end with the escape character '\\' (write '\\\\')"
    return None


def prefix(pattern: str) -> str:
    """The literal start of every schema name the pattern is meant to match."""
    out: list[str] = []
    escaped = False
    for char in pattern:
        if escaped:
            out.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "%":
            break
        else:
            out.append(char)  # "_" included: the rule above drops what it matched otherwise
    return "".join(out)


def split(schemas: list[str], the_prefix: str) -> tuple[list[str], list[str]]:
    """``schemas`` (matched by a pattern) divided into those starting with its prefix and not."""
    kept = [s for s in schemas if s.startswith(the_prefix)]
    dropped = [s for s in schemas if not s.startswith(the_prefix)]
    return kept, dropped


def tenant_name(schema: str, the_prefix: str) -> str:
    """The tenant a schema is: its name without the prefix (the whole name if that is all)."""
    return schema[len(the_prefix) :] or schema
