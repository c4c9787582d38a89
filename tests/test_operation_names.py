"""How names from the database are spelled in operation names, and what Operation accepts.

Pure logic: no database. ``decode_part`` below is an independent reading of the spelling (the
PostgreSQL rules for ``"..."`` and ``U&"..."`` identifiers), so the round trip checks the
spelling against its documentation rather than against itself.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import sweeperd
from sweeperd.model import OperationError, escape_glob, operation_name, quote_name
from sweeperd.planner import exact_names, matches


async def _noop(ctx: Any) -> None:
    return None


_UNICODE_ESCAPE = re.compile(r"\\(\\|\+[0-9A-Fa-f]{6}|[0-9A-Fa-f]{4})")


def decode_part(part: str) -> str:
    """The name a spelled part stands for, read the way PostgreSQL reads an identifier."""
    if part.startswith('U&"') and part.endswith('"'):
        body = part[3:-1].replace('""', '"')
        return _UNICODE_ESCAPE.sub(
            lambda m: "\\" if m[1] == "\\" else chr(int(m[1].lstrip("+"), 16)), body
        )
    if part.startswith('"') and part.endswith('"'):
        return part[1:-1].replace('""', '"')
    return part


def split_parts(what: str) -> list[str]:
    """``a."b.c"."d""e"`` → ``['a', '"b.c"', '"d""e"']``: dots outside quotes separate parts."""
    parts, current, quoted = [], "", False
    for ch in what:
        if ch == '"':
            quoted = not quoted  # a doubled quote flips twice: still inside
        if ch == "." and not quoted:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


HOSTILE = [
    'Events "x"',
    "ÜBER tab",
    "a.b",
    "back\\",
    "50%_off",
    "%s %(x)s",
    "a*b?[c]",
    '"',
    '""',
    'x"; DROP TABLE public.canary; --',
    "é" * 31 + "z",  # 63 bytes
    'U&"x"',
    "with\ttab",
    "new\nline",
    "zero\u200bwidth",
    "no\u00a0break",
    "back\\\tslash",
    "😀",
    " ",
]


# -- quote_name / operation_name ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "spelled"),
    [
        ("events", "events"),
        ("Events_2024", "Events_2024"),
        ("user-events", "user-events"),
        ('Events "x"', '"Events ""x"""'),
        ("ÜBER tab", '"ÜBER tab"'),
        ("a.b", '"a.b"'),
        ("back\\", '"back\\"'),
        ("50%_off", '"50%_off"'),
        ("a*b", '"a*b"'),
        ("with\ttab", 'U&"with\\0009tab"'),
        ("back\\\tslash", 'U&"back\\\\\\0009slash"'),
        ("emoji\U000e0001", 'U&"emoji\\+0E0001"'),
    ],
)
def test_quote_name_keeps_simple_names_and_quotes_the_rest(name: str, spelled: str) -> None:
    assert quote_name(name) == spelled
    assert decode_part(spelled) == name


def test_quote_name_always_quotes_on_request() -> None:
    assert quote_name("auto", always=True) == '"auto"'


def test_operation_name_joins_quoted_parts() -> None:
    assert operation_name("vacuum", "events") == "vacuum.events"
    assert operation_name("vacuum", 'Events "x"') == 'vacuum."Events ""x"""'
    # Schema-qualified: two parts, never confused with one name holding a dot.
    assert operation_name("retention", "Sales 2024", "orders") == 'retention."Sales 2024".orders'
    assert operation_name("retention", "Sales 2024.orders") == 'retention."Sales 2024.orders"'
    assert operation_name("p", "a", "b") != operation_name("p", "a.b")


@pytest.mark.parametrize("plugin", ["", "my plugin", "a.b", 'x"'])
def test_operation_name_rejects_a_bad_plugin_name(plugin: str) -> None:
    with pytest.raises(OperationError, match="plugin name"):
        operation_name(plugin, "t")
    with pytest.raises(OperationError, match="part"):
        operation_name("p")


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_make_valid_distinct_operation_names(name: str) -> None:
    spelled = operation_name("vacuum", name)
    op = sweeperd.Operation(name=spelled, run=_noop)
    assert op.name.isprintable()
    assert fnmatchcase(spelled, "vacuum.*")
    assert [decode_part(p) for p in split_parts(spelled.removeprefix("vacuum."))] == [name]


def test_hostile_names_never_share_a_spelling() -> None:
    names = [*HOSTILE, "events", "a", "b", "Events", "events "]
    spelled = {operation_name("vacuum", n) for n in names}
    assert len(spelled) == len(set(names))


@given(
    st.lists(
        st.text(
            st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
            min_size=1,
            max_size=20,
        ),
        min_size=1,
        max_size=3,
    )
)
def test_any_name_round_trips_through_its_operation_name(parts: list[str]) -> None:
    spelled = operation_name("plug", *parts)
    sweeperd.Operation(name=spelled, run=_noop)  # always a valid operation name
    assert spelled.isprintable()
    assert [decode_part(p) for p in split_parts(spelled.removeprefix("plug."))] == parts
    assert fnmatchcase(spelled, "plug.*")
    assert fnmatchcase(spelled, escape_glob(spelled))


# -- globs --------------------------------------------------------------------------------------


def test_escape_glob_matches_only_the_name() -> None:
    names = [
        'vacuum."a*b"',
        'vacuum."aXb"',
        'vacuum."x[1] y"',
        'vacuum."x1 y"',
        'vacuum."a?"',
        'vacuum."ab"',
    ]
    for name in names:
        glob = escape_glob(name)
        assert [n for n in names if fnmatchcase(n, glob)] == [name], glob
    assert escape_glob('vacuum."x[1]*?"') == 'vacuum."x[[]1][*][?]"'


def test_a_glob_that_is_exactly_a_name_selects_that_name_only() -> None:
    names = ['vacuum."x[1] y"', 'vacuum."x1 y"', 'vacuum."a*b"', 'vacuum."a b"']
    # fnmatch alone gets these wrong: "[1]" is a character set and "*" a wildcard.
    assert not fnmatchcase('vacuum."x[1] y"', 'vacuum."x[1] y"')
    assert fnmatchcase('vacuum."a b"', 'vacuum."a*b"')
    for name in names:
        assert matches(name, [name])
        globs = exact_names([name], names)
        assert [n for n in names if matches(n, globs)] == [name]
    # Globs that are not names stay globs.
    assert exact_names(["vacuum.*", 'vacuum."x[[]*'], names) == ("vacuum.*", 'vacuum."x[[]*')
    assert [n for n in names if matches(n, ['vacuum."x[[]*'])] == ['vacuum."x[1] y"']


# -- Operation's validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "x.y",
        "vacuum.Events",
        'vacuum."Events ""x"""',
        'vacuum."a.b"',
        'retention."Sales 2024".orders',
        'vacuum.U&"a\\0009b"',
        'vacuum.""""',
        "x.a*b",
        "x.über",
    ],
)
def test_operation_accepts_quoted_and_plain_names(name: str) -> None:
    assert sweeperd.Operation(name=name, run=_noop).name == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "purge",
        ".purge",
        "myapp.",
        "my app.purge",
        "myapp.a b",
        " x.y",
        "x.y ",
        "x.a\tb",
        'x."a\tb"',
        'x."a\nb"',
        "x.zero\u200bwidth",
        'x."no\u00a0break"',
        'x."unterminated',
        'x.""',
        'x.a"b',
        'x."a" b',
        'x."a""',
    ],
)
def test_operation_rejects_malformed_names(name: str) -> None:
    with pytest.raises(OperationError, match="must look like") as excinfo:
        sweeperd.Operation(name=name, run=_noop)
    assert isinstance(excinfo.value, ValueError)  # what plugins written before it catch
    assert "\n" not in str(excinfo.value)
