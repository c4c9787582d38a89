"""Settings tables read into frozen, typed dataclasses: the reader of the core config and plugins.

A settings class is a dataclass whose fields are the keys of one TOML table; :func:`read` checks a
table against it and builds it::

    from dataclasses import dataclass
    from typing import Literal

    import sweeperd
    from sweeperd.settings import Duration, PositiveInt, read

    @dataclass(frozen=True)
    class Jobs:
        table: str                               # required: a non-empty string
        older_than: Duration = 7 * 86400.0       # "7d", "36h", "1h30m": seconds
        batch_size: PositiveInt = 1000
        mode: Literal["fast", "careful"] = "careful"
        vacuum: bool = True

    @sweeperd.hookimpl
    def sweeperd_validate_settings(settings):
        return read(Jobs, settings)[1] if settings else []  # no [plugins.jobs]: nothing to check

    @sweeperd.hookimpl
    def sweeperd_operations(settings):
        jobs, _problems = read(Jobs, settings)  # validated: None only when not configured
        return [] if jobs is None else [sweeperd.Operation(name="jobs.purge", ...)]

``read(cls, raw, where="")`` returns ``(value, problems)``: the instance, or None when anything is
wrong, and *every* problem found, as ``(key, expectation)`` pairs such as
``("older_than", 'expected a duration such as "500ms", …, got an integer')``: what
``sweeperd_validate_settings`` returns. Keys are TOML key paths (segments quoted with
:func:`toml_key`, ``[i]`` for array items), prefixed with ``where``: read each entry of an array
with ``read(Rule, raw, where=f"rules[{i}]")``. ``context`` reaches readers and rules as
``at.context``; ``given`` supplies fields that are no keys of the table (the core gives each
``[databases.<name>]`` its name so).

**Fields.** Each field is the key of its name. Absent, it takes the field's default (or
``default_factory()``); without one it is the problem ``required: <expectation>``. Keys that are no
field are problems (``unknown key (expected one of: …)``): a typo must not go unnoticed. Fields
declared with ``init=False`` are no settings. A value given goes through the field's *reader*,
the first of:

* ``setting(reader=…)`` as the field's definition (which also takes ``default``,
  ``default_factory``, ``repr`` and ``compare``, as :func:`dataclasses.field` does);
* ``Annotated[T, reader]`` as its type, such as :data:`Duration`, :data:`PositiveDuration`,
  :data:`PositiveInt` and :data:`Identifier`;
* its type: ``str`` (non-empty), ``bool``, ``int``, ``float`` (finite; an integer is fine),
  ``Literal["a", "b"]`` (one of them), ``X | None`` (absent: None), ``tuple[X, ...]`` (an array of
  X), another settings dataclass (a table), ``Mapping[str, X]`` with X a dataclass (tables by name).

The standard readers are :func:`text`, :func:`flag`, :func:`integer`, :func:`number`,
:func:`choice`, :func:`duration` (:func:`sweeperd.durations.parse_duration`: capped at 36500d),
:func:`size` (:func:`sweeperd.sizes.parse_size`),
:func:`identifier` (a PostgreSQL name), :func:`zone` (an IANA time zone), :func:`array`,
:func:`table` and :func:`tables`. Their problems read ``expected <what>, got <what it was>``; given
``message=`` (a string, or a function of the value as written) they say that instead.

**Readers** of one's own are functions ``(value, at) -> T`` made a :class:`Reader` by
:func:`reader`, whose argument completes ``required: …``::

    @reader('a size such as "256MB"')
    def size(value: Any, at: At) -> str:
        if not isinstance(value, str) or not SIZE.fullmatch(value):
            raise Invalid(f'expected a size such as "256MB", got {value!r}')
        return value

    buffer: Annotated[str, size] = "256MB"

Raise :class:`Invalid` for a problem at the value's own key, or report as many as there are with
``at.at(segment).problem(expectation)`` (``at.at(2)``: an array item); a field whose reader
reported anything is left out. ``setting(reader=…, keys=(…))`` hands the reader the whole table
instead, for a field read from one of several keys or with a default that depends on another.
Readers work outside :func:`read` too: ``at = At("rules", raw)``, ``value = reader(raw, at)``,
then ``at.problems``; ``at.get(key, reader)`` reads one key of the table ``at.raw``.

**Rules** across fields are functions ``(values, at)`` listed on the class with ``@rules(…)`` (above
``@dataclass``). They run after the fields, ``values`` holding every field that was read well
(defaults included, bad ones left out) and ``at.raw`` the table as written, and report with
``at.at(key).problem(…)`` (or ``raise Invalid(…)``, for the table itself). Their problems keep the
class from being built, not the other rules from seeing ``values``::

    def _column_when_careful(values: Mapping[str, Any], at: At) -> None:
        if values.get("mode") == "careful" and "column" not in at.raw:
            at.at("column").problem('required with mode = "careful"')

Across the items of an array of tables (names unique, say), ``array(table(Cls), each=…)``.

Annotations must resolve when :func:`read` first meets the class (module level, no
``TYPE_CHECKING``-only names): each class's plan is built once, then every table is one pass.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Annotated, Any, Final, Generic, Literal, TypeVar, get_args, get_origin
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .durations import EXPECTATION as DURATION_EXPECTATION
from .durations import parse_duration
from .sizes import EXPECTATION as SIZE_EXPECTATION
from .sizes import parse_size

__all__ = [
    "At",
    "Bytes",
    "Duration",
    "Identifier",
    "Invalid",
    "PositiveDuration",
    "PositiveInt",
    "Problem",
    "Reader",
    "array",
    "choice",
    "duration",
    "flag",
    "identifier",
    "integer",
    "kind_of",
    "number",
    "read",
    "reader",
    "rules",
    "setting",
    "size",
    "table",
    "tables",
    "text",
    "toml_key",
    "zone",
]

T = TypeVar("T")
Problem = tuple[str, str]
"""``(key path, expectation)``: what ``sweeperd_validate_settings`` returns a list of."""
Rule = Callable[[Mapping[str, Any], "At"], None]

NAMEDATALEN: Final = 63  # PostgreSQL truncates longer identifiers; a truncated name is another one
_BARE_KEY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_SPEC = "sweeperd.settings"  # the key of a field's metadata
_RULES = "__sweeperd_rules__"  # the attribute @rules sets on a class
_PLANS = "__sweeperd_plans__"  # a class's plans (by the fields given), kept and freed with it


def toml_key(key: str) -> str:
    """``key`` as TOML writes it in a dotted key path: bare, or quoted (``daemon."my key"``)."""
    if key and _BARE_KEY.issuperset(key):
        return key
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


_KINDS: Final[Mapping[type, str]] = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "a table",
}


def kind_of(value: Any) -> str:
    """What a TOML value is, for "got …": ``a boolean``, ``an array``, ``a table``…"""
    return _KINDS.get(type(value), type(value).__name__)


class _Failed(enum.Enum):
    """What :meth:`At.read` returns when the value was not read (None may be a value)."""

    FAILED = 0


class Invalid(Exception):
    """A value (or, from a rule, a table) is not what was expected; ``expectation`` says what was.

    The text is the whole problem after the key: ``expected a positive integer, got 0``.
    """

    def __init__(self, expectation: str) -> None:
        super().__init__(expectation)
        self.expectation = expectation


class At:
    """Where a value is read: its key path, the value as written, the context, where problems go.

    ``At(where, raw, context=…)`` starts a reading of its own (its ``problems`` are empty);
    ``at.at(segment)`` is a key below (a string) or an array item (an int).
    """

    __slots__ = ("_parent", "_problems", "_segment", "context", "raw")

    def __init__(self, where: str = "", raw: Any = None, *, context: Any = None) -> None:
        self._parent: At | None = None
        self._segment: str | int = where
        self._problems: list[Problem] = []
        self.raw = raw
        self.context = context

    def at(self, segment: str | int, raw: Any = None) -> At:
        child = _new_at(At)
        child._parent, child._segment, child._problems = self, segment, self._problems
        child.raw, child.context = raw, self.context
        return child

    @property
    def key(self) -> str:
        """The key path: ``rules[0].match.status``, ``databases."bad name"``."""
        parent, segment = self._parent, self._segment
        if parent is None:
            return str(segment)
        base = parent.key
        if isinstance(segment, int):
            return f"{base}[{segment}]"
        return f"{base}.{toml_key(segment)}" if base else toml_key(segment)

    def get(self, key: str, reader: Reader[T]) -> T | None:
        """Key ``key`` of this table (``raw``) read by ``reader``; None if absent or reported."""
        if key not in self.raw:
            return None
        value = self.raw[key]
        got = self.at(key, value).read(reader, value)
        return None if got is _Failed.FAILED else got

    def read(self, reader: Callable[[Any, At], T], value: Any) -> T | Literal[_Failed.FAILED]:
        """``value`` read by ``reader`` here; ``_Failed.FAILED`` if it raised :class:`Invalid`
        (recorded at this key) or reported a problem itself."""
        before = len(self._problems)
        try:
            got = reader(value, self)
        except Invalid as exc:
            self.problem(exc.expectation)
            return _Failed.FAILED
        return got if len(self._problems) == before else _Failed.FAILED

    def problem(self, expectation: str) -> None:
        """Record a problem at this key."""
        self._problems.append((self.key, expectation))

    @property
    def problems(self) -> list[Problem]:
        """Every problem of this reading so far (shared by all its keys)."""
        return self._problems


_new_at = object.__new__


class Reader(Generic[T]):
    """Turns one value as written into a typed one (see the module docstring).

    ``expectation`` is what a missing required key is told: ``required: <expectation>``.
    """

    __slots__ = ("_leaf", "_read", "expectation")

    def __init__(self, read: Callable[[Any, At], T], expectation: str = "a value") -> None:
        self._read = read
        self.expectation = expectation
        self._leaf = False  # the standard readers of one value: they never use `at`

    def __call__(self, value: Any, at: At) -> T:
        return self._read(value, at)


def reader(expectation: str) -> Callable[[Callable[[Any, At], T]], Reader[T]]:
    """Decorate ``fn(value, at) -> T`` into a :class:`Reader` expecting ``expectation``."""

    def wrap(fn: Callable[[Any, At], T]) -> Reader[T]:
        return Reader(fn, expectation)

    return wrap


def setting(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    reader: Reader[Any] | None = None,
    keys: Sequence[str] | None = None,
    repr: bool = True,
    compare: bool = True,
) -> Any:
    """A dataclass field with its reader; with ``keys``, the reader reads the whole table."""
    spec = _Spec(reader, tuple(keys) if keys is not None else None)
    # Any: a field stands for its value in the class body, as dataclasses.field does.
    return dataclasses.field(
        default=default,
        default_factory=default_factory,
        repr=repr,
        compare=compare,
        metadata={_SPEC: spec},
    )


def rules(*checks: Rule) -> Callable[[type[T]], type[T]]:
    """Class decorator (above ``@dataclass``): cross-field rules, run in order after the fields."""

    def wrap(cls: type[T]) -> type[T]:
        setattr(cls, _RULES, (*getattr(cls, _RULES, ()), *checks))
        return cls

    return wrap


def read(
    cls: type[T],
    raw: Any,
    where: str = "",
    *,
    context: Any = None,
    given: Mapping[str, Any] | None = None,
    not_a_table: str | None = None,
) -> tuple[T | None, list[Problem]]:
    """Read the table ``raw`` into ``cls``; ``(instance or None, every problem)``.

    ``not_a_table`` is the problem when ``raw`` is no table (default ``expected a table, got …``).
    """
    at = At(where, raw, context=context)
    given = given or {}
    value = _TableReader(cls, not_a_table, frozenset(given)).read_with(raw, at, given)[0]
    return value, at.problems


# -- the standard readers --------------------------------------------------------------------------
# Each takes ``message``: the problem on any failure instead of the reader's own words (a string,
# or a function of the value as written), for settings whose wording is their own.

Message = str | Callable[[Any], str] | None


def _worded(read_as: Reader[T], message: Message) -> Reader[T]:
    """``read_as`` in ``message``'s words; a leaf (see _TableReader.read_with)."""
    if message is not None:
        read_plain = read_as

        def read_worded(value: Any, at: At) -> T:
            try:
                return read_plain(value, at)
            except Invalid:
                raise Invalid(message if isinstance(message, str) else message(value)) from None

        read_as = Reader(read_worded, read_as.expectation)
    read_as._leaf = True
    return read_as


def text(
    expectation: str = "a non-empty string", *, empty: bool = False, message: Message = None
) -> Reader[str]:
    """A string; not an empty one unless ``empty``."""

    def read_text(value: Any, at: At) -> str:
        if not isinstance(value, str):
            raise Invalid(f"expected {expectation}, got {kind_of(value)}")
        if not value and not empty:
            raise Invalid(f"expected {expectation}, got an empty string")
        return value

    return _worded(Reader(read_text, expectation), message)


def flag(*, message: Message = None) -> Reader[bool]:
    """``true`` or ``false``."""

    def read_flag(value: Any, at: At) -> bool:
        if not isinstance(value, bool):
            raise Invalid(f"expected true or false, got {kind_of(value)}")
        return value

    return _worded(Reader(read_flag, "true or false"), message)


def _bounds(noun: str, minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f"{noun} between {minimum} and {maximum}"
    if minimum is not None:
        return f"{noun} of at least {minimum}"
    return f"{noun} of at most {maximum}" if maximum is not None else noun


def integer(
    *, minimum: int | None = None, maximum: int | None = None, message: Message = None
) -> Reader[int]:
    """An integer (a boolean is none) from ``minimum`` to ``maximum``."""
    if minimum in (0, 1):
        expectation = "a non-negative integer" if minimum == 0 else "a positive integer"
        if maximum is not None:
            expectation += f" up to {maximum}"
    else:
        expectation = _bounds("an integer", minimum, maximum)

    def read_integer(value: Any, at: At) -> int:
        # TOML booleans are no integers here, whatever Python thinks.
        if not isinstance(value, int) or isinstance(value, bool):
            raise Invalid(f"expected {expectation}, got {kind_of(value)}")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise Invalid(f"expected {expectation}, got {value}")
        return value

    return _worded(Reader(read_integer, expectation), message)


def number(
    *, minimum: float | None = None, maximum: float | None = None, message: Message = None
) -> Reader[float]:
    """A finite number (an integer is one) from ``minimum`` to ``maximum``, as a float."""
    expectation = _bounds("a number", minimum, maximum)

    def read_number(value: Any, at: At) -> float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise Invalid(f"expected {expectation}, got {kind_of(value)}")
        if (
            not math.isfinite(value)
            or (minimum is not None and value < minimum)
            or (maximum is not None and value > maximum)
        ):
            raise Invalid(f"expected {expectation}, got {value}")
        return float(value)

    return _worded(Reader(read_number, expectation), message)


def choice(*options: str, fold: bool = False, message: Message = None) -> Reader[str]:
    """One of ``options``; with ``fold``, in any case (and read in lower case)."""
    expectation = "one of " + ", ".join(f'"{o}"' for o in options)
    as_text = text(expectation)

    def read_choice(value: Any, at: At) -> str:
        written = as_text(value, at)
        chosen = written.lower() if fold else written
        if chosen not in options:
            raise Invalid(f"expected {expectation}, got {written!r}")
        return chosen

    return _worded(Reader(read_choice, expectation), message)


def duration(*, zero: bool = True, message: Message = None) -> Reader[float]:
    """A duration string (``"500ms"``, ``"1h30m"``, at most 36500d) in seconds; 0 if ``zero``."""

    def read_duration(value: Any, at: At) -> float:
        if not isinstance(value, str):
            raise Invalid(f"expected {DURATION_EXPECTATION}, got {kind_of(value)}")
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise Invalid(str(exc)) from None  # the form, or the range (durations.MAX_SECONDS)
        if not zero and seconds == 0:
            raise Invalid("expected a duration greater than zero")
        return seconds

    return _worded(Reader(read_duration, DURATION_EXPECTATION), message)


def size(*, message: Message = None) -> Reader[int]:
    """A size in bytes: ``"64MB"``, ``"1GB"``, ``"512kB"`` (:mod:`sweeperd.sizes`) or an integer."""

    def read_size(value: Any, at: At) -> int:
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise Invalid(f"expected {SIZE_EXPECTATION}, got {kind_of(value)}")
        try:
            return parse_size(value)
        except ValueError as exc:
            raise Invalid(str(exc)) from None

    return _worded(Reader(read_size, SIZE_EXPECTATION), message)


def identifier(*, message: Message = None) -> Reader[str]:
    """A PostgreSQL name: a non-empty string the server keeps whole (at most 63 bytes)."""
    as_text = text()._read

    def read_identifier(value: Any, at: At) -> str:
        name = as_text(value, at)
        if len(name.encode("utf-8")) > NAMEDATALEN:
            raise Invalid(
                f"expected a PostgreSQL name of at most {NAMEDATALEN} bytes "
                f"(longer names are silently truncated by the server)"
            )
        return name

    return _worded(Reader(read_identifier, "a non-empty string"), message)


def zone(*, message: Message = None) -> Reader[str]:
    """An IANA time zone name the system knows (``"UTC"``, ``"Europe/Berlin"``)."""
    as_text = text('an IANA time zone such as "UTC"')

    def read_zone(value: Any, at: At) -> str:
        name = as_text(value, at)
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise Invalid(
                f'expected an IANA time zone such as "Europe/Berlin", got {name!r}'
            ) from None
        return name

    return _worded(Reader(read_zone, as_text.expectation), message)


def array(
    item: Reader[T],
    *,
    message: str | None = None,
    each: Callable[[], Callable[[int, Mapping[str, Any], At], None]] | None = None,
) -> Reader[tuple[T, ...]]:
    """An array, each item read by ``item`` (problems at ``key[i]``), as a tuple.

    ``message`` is the problem when the value is no array (default ``expected an array, got …``).
    For an array of :func:`table` items, ``each()`` is called once per array for a function that
    then sees every item as it is read: ``(i, the fields it read well, the array's At)``, reporting
    at ``at.at(i)``. Uniqueness across items goes there.
    """
    tables_of = item if isinstance(item, _TableReader) else None

    def read_array(value: Any, at: At) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise Invalid(message or f"expected an array, got {kind_of(value)}")
        out: list[T] = []
        seen = each() if each is not None else None
        for i, raw in enumerate(value):
            item_at = at.at(i, raw)
            if tables_of is not None:
                got, values = tables_of.read_with(raw, item_at, {})
                if seen is not None:
                    seen(i, values, at)
                if got is not None:
                    out.append(got)
                continue
            got_item = item_at.read(item, raw)
            if got_item is not _Failed.FAILED:
                out.append(got_item)
        return tuple(out)

    return Reader(read_array, "an array")


def table(cls: type[T], *, message: str | None = None) -> Reader[T]:
    """A table read into the settings dataclass ``cls`` (what a dataclass-typed field gets).

    ``message`` is the problem when the value is no table (default ``expected a table, got …``).
    """
    return _TableReader(cls, message)


def tables(
    cls: type[T],
    *,
    key: str | None = None,
    name: Reader[Any] | None = None,
    message: str | None = None,
) -> Reader[Mapping[str, T]]:
    """Tables by name (``[databases.<name>]``), each read into ``cls``; a read-only mapping.

    ``key`` names the field of ``cls`` that receives each table's name (it is no key of the
    table); ``name`` checks each name first (its problems at the table's key). ``message``: the
    problem when the value is no table (default ``expected tables [<key>.<name>]``).
    """
    each = _TableReader(cls, None, frozenset({key} if key else ()))

    def read_tables(value: Any, at: At) -> Mapping[str, T]:
        if not isinstance(value, Mapping):
            raise Invalid(message or f"expected tables [{at.key}.<name>]")
        out: dict[str, T] = {}
        for table_name, raw in value.items():
            table_at = at.at(table_name, raw)
            if name is not None and isinstance(raw, Mapping):
                try:
                    name(table_name, table_at)
                except Invalid as exc:
                    table_at.problem(exc.expectation)
            got = each.read_with(raw, table_at, {key: table_name} if key else {})[0]
            if got is not None:
                out[table_name] = got
        return MappingProxyType(out)

    return Reader(read_tables, "tables")


Duration = Annotated[float, duration()]
"""Seconds, written as a duration: ``"30s"``, ``"1h30m"``, ``"0s"``."""
PositiveDuration = Annotated[float, duration(zero=False)]
"""Seconds, written as a duration greater than zero."""
PositiveInt = Annotated[int, integer(minimum=1)]
"""An integer of at least 1."""
Bytes = Annotated[int, size()]
"""Bytes, written as a size: ``"64MB"``, ``"1GB"``, or an integer."""
Identifier = Annotated[str, identifier()]
"""A PostgreSQL name (schema, table, column): at most 63 bytes."""


# -- the engine -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Spec:
    reader: Reader[Any] | None
    keys: tuple[str, ...] | None


_NO_SPEC: Final = _Spec(None, None)
_REQUIRED: Final = object()


@dataclasses.dataclass(frozen=True, slots=True)
class _Field:
    name: str
    key: str | None  # None: a reader of the whole table
    read: Callable[[Any, At], Any]
    leaf: bool
    expectation: str
    default: Any  # _REQUIRED: none
    factory: Callable[[], Any] | None


@dataclasses.dataclass(frozen=True, slots=True)
class _Plan:
    # (name, key, read, leaf, field) of each field: the loop over 50 000 tenants unpacks them
    rows: tuple[tuple[str, str | None, Callable[[Any, At], Any], bool, _Field], ...]
    allowed: frozenset[str]
    unknown: str  # the problem of a key that is no setting
    rules: tuple[Rule, ...]


def _plan(cls: type, given: frozenset[str]) -> _Plan:
    plans: dict[frozenset[str], _Plan] | None = cls.__dict__.get(_PLANS)  # not a base's
    if plans is not None and given in plans:
        return plans[given]
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if plans is None:
        plans = {}
        setattr(cls, _PLANS, plans)
    hints = typing.get_type_hints(cls, include_extras=True)
    fields: list[_Field] = []
    keys: set[str] = set()
    for f in dataclasses.fields(cls):
        if not f.init or f.name in given:
            continue
        spec: _Spec = f.metadata.get(_SPEC, _NO_SPEC)
        read_with = spec.reader or _reader_for(hints[f.name], f"{cls.__name__}.{f.name}")
        whole = spec.keys is not None
        keys.update(spec.keys if spec.keys is not None else (f.name,))
        fields.append(
            _Field(
                name=f.name,
                key=None if whole else f.name,
                read=read_with._read,
                leaf=read_with._leaf,
                expectation=read_with.expectation,
                default=f.default if f.default is not dataclasses.MISSING else _REQUIRED,
                factory=None if f.default_factory is dataclasses.MISSING else f.default_factory,
            )
        )
    plan = _Plan(
        rows=tuple((f.name, f.key, f.read, f.leaf, f) for f in fields),
        allowed=frozenset(keys),
        unknown=f"unknown key (expected one of: {', '.join(sorted(keys))})",
        rules=tuple(getattr(cls, _RULES, ())),
    )
    plans[given] = plan
    return plan


def _reader_for(tp: Any, where: str) -> Reader[Any]:
    """The reader a type implies (see the module docstring)."""
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is Annotated:
        for extra in args[1:]:
            if inspect.isfunction(extra):  # a reader without its expectation
                raise TypeError(
                    f"{where}: make {extra.__name__} a Reader with @reader(expectation)"
                )
        found = [extra for extra in args[1:] if isinstance(extra, Reader)]
        return found[-1] if found else _reader_for(args[0], where)
    if origin is typing.Union or origin is types.UnionType:
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:
            return _reader_for(others[0], where)
    elif origin is Literal and all(isinstance(a, str) for a in args):
        return choice(*args)
    elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return array(_reader_for(args[0], where))
    elif origin in (Mapping, dict) and args[0] is str and isinstance(args[1], type):
        if dataclasses.is_dataclass(args[1]):
            return tables(args[1])
    elif tp is bool:
        return flag()
    elif tp is str:
        return text()
    elif tp is int:
        return integer()
    elif tp is float:
        return number()
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return table(tp)
    raise TypeError(
        f"{where}: no reader for {tp!r}: give it one (Annotated[T, reader] or setting(reader=…))"
    )


class _TableReader(Reader[T]):
    """Reads a table into a settings dataclass; also hands out the fields it read well.

    ``given`` names the fields the caller supplies (they are no keys of the table).
    """

    __slots__ = ("_plan", "cls", "given", "message")

    def __init__(
        self, cls: type[T], message: str | None, given: frozenset[str] = frozenset()
    ) -> None:
        super().__init__(self._read_value, "a table")
        self.cls = cls
        self.message = message
        self.given = given
        self._plan: _Plan | None = None  # built when first needed: classes may refer ahead

    def _read_value(self, value: Any, at: At) -> T:
        return self.read_with(value, at, {})[0]  # type: ignore[return-value]  # None: reported

    def read_with(
        self, raw: Any, at: At, given: Mapping[str, Any]
    ) -> tuple[T | None, dict[str, Any]]:
        """``(instance, or None if anything in the table was wrong; the fields read well)``."""
        if type(raw) is not dict and not isinstance(raw, Mapping):
            at.problem(self.message or f"expected a table, got {kind_of(raw)}")
            return None, {}
        plan = self._plan or self._build()
        problems = at._problems
        before = len(problems)
        if not plan.allowed.issuperset(raw):
            for key in raw:
                if key not in plan.allowed:
                    at.at(key).problem(plan.unknown)
        values = dict(given) if given else {}
        for name, key, read_value, leaf, f in plan.rows:
            if key is None:
                field_at, value = at, raw
            elif key in raw:
                value = raw[key]
                if leaf:  # no At of its own unless there is a problem: 50 000 tenants are quick
                    try:
                        values[name] = read_value(value, at)
                    except Invalid as exc:
                        at.at(key).problem(exc.expectation)
                    continue
                field_at = at.at(key, value)
            elif f.factory is not None:
                values[name] = f.factory()
                continue
            elif f.default is not _REQUIRED:
                values[name] = f.default
                continue
            else:
                at.at(key).problem(f"required: {f.expectation}")
                continue
            got = field_at.read(read_value, value)
            if got is not _Failed.FAILED:
                values[name] = got
        for rule in plan.rules:
            try:
                rule(values, at)
            except Invalid as exc:
                at.problem(exc.expectation)
        if len(problems) != before:
            return None, values
        return self.cls(**values), values

    def _build(self) -> _Plan:
        self._plan = _plan(self.cls, self.given)
        return self._plan
