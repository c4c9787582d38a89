"""The objects plugins and the runner share: operations, tenants, the run context, results.

Plugins see :class:`Operation`, :class:`Context`, :class:`Tenant`, :class:`Phase` and
:class:`Skip` (re-exported from :mod:`sweeperd`). The runner produces :class:`Result` objects,
which the CLI renders as the contract JSON report. Operation names derived from database names
(``vacuum.<table>``) spell them with :func:`quote_name` / :func:`operation_name`, whose
docstrings say how such names look and how ``sweep --only`` selects them.
"""

from __future__ import annotations

import enum
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from psycopg import sql

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from structlog.typing import FilteringBoundLogger

Scope = Literal["tenant", "database"]
Status = Literal["ok", "failed", "skipped", "cancelled", "dry-run"]
STATUSES: tuple[Status, ...] = ("ok", "failed", "skipped", "cancelled", "dry-run")

# A table key that conflicts with every table of the tenant (or database): for operations whose
# tables are only known when they run (e.g. "vacuum every bloated table").
ALL_TABLES = "*"

# The plugin part of an operation name, and what a name part may be without quotes.
_PLUGIN_NAME = r"[A-Za-z0-9_-]+"
_SIMPLE_PART = re.compile(_PLUGIN_NAME)
# "<plugin>.<what>": <what> has no whitespace outside double-quoted segments, and every quote
# opens or closes such a segment ("" inside stands for one quote), so a quoted name cannot run
# into what follows it. Printability (no control characters) is checked separately.
# (?!") makes a quoted part end at its last quote: '"a""a"' is one part, never two, so a name
# that does not match fails fast instead of backtracking through every split.
_OPERATION_NAME = re.compile(rf'{_PLUGIN_NAME}\.(?:[^\s"]|"(?:[^"]|"")+"(?!"))+')
_GLOB_SPECIAL = re.compile(r"([*?\[])")


class OperationError(ValueError):
    """An :class:`Operation` was built with invalid values (a plugin bug, not a settings error)."""


def quote_name(name: str, *, always: bool = False) -> str:
    r'''How a name (a table, a schema, a rule…) is spelled as one part of an operation name.

    - A *simple* name — ASCII letters, digits, ``_`` and ``-`` only — is kept as it is:
      ``events`` → ``events``, ``Events_2024`` → ``Events_2024``. (PostgreSQL's quote_ident
      would also quote upper case and ``-``; they stay plain here so that the names existing
      configs, scripts and history use keep their spelling, and nothing folds the case of an
      operation name anyway.)
    - Anything else is double-quoted the way PostgreSQL quotes an identifier, every ``"`` in it
      doubled: ``Events "x"`` → ``"Events ""x"""``, ``ÜBER tab`` → ``"ÜBER tab"``,
      ``a.b`` → ``"a.b"``, ``back\`` → ``"back\"`` (a backslash is an ordinary character).
    - A name with characters that do not print (tab, newline, other control or invisible
      characters) gets PostgreSQL's Unicode escape form, so an operation name is always one
      visible line: ``a<TAB>b`` → ``U&"a\0009b"`` (a backslash is then written ``\\``).

    Different names never get the same spelling, and a quoted spelling is never mistaken for
    two parts: ``vacuum."a.b"`` (table ``a.b``) is not ``vacuum.a.b`` (table ``b`` of schema
    ``a``). ``always=True`` quotes a simple name too (``"auto"``): for a plugin whose own
    operation names would otherwise collide with a derived one (``vacuum.auto``).
    '''
    if not always and _SIMPLE_PART.fullmatch(name):
        return name
    if name.isprintable():
        return '"' + name.replace('"', '""') + '"'
    return 'U&"' + "".join(_unicode_escape(ch) for ch in name) + '"'


def _unicode_escape(ch: str) -> str:
    if ch == "\\":
        return "\\\\"
    if ch == '"':
        return '""'
    if ch.isprintable():
        return ch
    code = ord(ch)
    return f"\\{code:04X}" if code <= 0xFFFF else f"\\+{code:06X}"


def operation_name(plugin: str, *parts: str) -> str:
    r'''The operation name ``<plugin>.<part>[.<part>…]``, each part spelled by :func:`quote_name`.

    ``operation_name("vacuum", "events")`` is ``vacuum.events``;
    ``operation_name("vacuum", 'Events "x"')`` is ``vacuum."Events ""x"""``; a schema-qualified
    name is two parts: ``operation_name("retention", "Sales 2024", "orders")`` is
    ``retention."Sales 2024".orders``, never to be confused with ``retention."Sales 2024.orders"``
    (one table whose name holds a dot).

    That one spelling is used everywhere: the operation's name in ``sweeperd plugins``, the
    ``operation`` field of the JSON report (that very string, its quotes JSON-escaped:
    ``"vacuum.\"Events \"\"x\"\"\""``), logs, traces and metrics, and what ``sweep --only``,
    a sweep's ``operations`` and ``Operation.after`` match their globs against. The globs are
    fnmatch-style, so ``--only 'vacuum.*'`` selects every table's vacuum, quoted or not.
    A pattern that is exactly an operation's name — copied from the report, single-quoted for
    the shell: ``--only 'vacuum."Events ""x"""'`` — selects that operation and no other, even
    when the name holds ``*``, ``?`` or ``[`` (``vacuum."x[1] y"`` does not also select
    ``vacuum."x1 y"``). To match those three characters literally inside a wider glob, write
    them ``[*]``, ``[?]`` and ``[[]`` (:func:`escape_glob`): ``--only 'vacuum."x[[]*'``.
    '''
    if not _SIMPLE_PART.fullmatch(plugin):
        raise OperationError(f"plugin name {plugin!r} must be letters, digits, '_' or '-'")
    if not parts:
        raise OperationError("an operation name needs at least one part after the plugin")
    return ".".join([plugin, *(quote_name(p) for p in parts)])


def escape_glob(name: str) -> str:
    """A glob that matches exactly ``name`` (``*``, ``?`` and ``[`` bracketed, as fnmatch wants).

    ``escape_glob('vacuum."a*b"')`` is ``vacuum."a[*]b"``: for ``sweep --only`` or ``after``.
    """
    return _GLOB_SPECIAL.sub(r"[\1]", name)


class Phase(enum.IntEnum):
    """When an operation runs relative to others that touch the same table of the same tenant.

    Operations sharing a table never overlap; among them, lower phases run first. Pruning rows
    (retention) comes before maintenance (VACUUM) so that the vacuum reclaims what was deleted.
    """

    PRUNE = 100
    DEFAULT = 500
    MAINTAIN = 900


class Skip(Exception):
    """Raise from an operation to report it as ``skipped`` with a reason (e.g. table locked)."""


class LeaseLost(Exception):
    """This instance no longer holds the tenant's claim (another instance took it over): raised
    by :meth:`Context.transaction` before anything in it runs. Let it propagate: the operation
    is reported ``cancelled`` and the instance that holds the tenant now does its work."""


@dataclass(frozen=True, slots=True)
class Tenant:
    """One tenant: a schema in a database."""

    name: str
    database: str
    schema: str


RunFn = Callable[["Context"], Awaitable[int | None]]


@dataclass(frozen=True, slots=True)
class Target:
    """One work item that an expanding operation (``Operation.expand``) found at plan time.

    :param tenant: the tenant it belongs to (None for scope ``database``).
    :param name: what it works on (a table's name): the item's label in ``application_name``,
        logs and spans, and the run history's ``target``; ``ctx.target.name`` when it runs.
    :param tables: the tables it touches, as ``Operation.tables`` (same-table ordering, the
        exclusion between sweeps, prune-before-vacuum all hold per target).
    :param score: how urgent it is: items start in descending score across every tenant and
        database of the sweep (static operations have 0).
    :param details: what its result's ``details`` start with (why it was chosen, its score).
    :param params: anything ``run`` needs to know about it (``ctx.target.params``).
    :param expected_s: how long it is expected to take (seconds; None: unknown). With a
        maintenance window, an item that would not finish before the window closes is skipped.
    """

    tenant: Tenant | None
    name: str
    tables: tuple[str, ...] = ()
    score: float = 0.0
    details: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    expected_s: float | None = None


@dataclass(slots=True)
class PlanContext:
    """What ``Operation.expand`` receives, once per database per sweep.

    ``conn`` is a connection to the database (autocommit; the same rules as ``Context.conn``),
    ``tenants`` every tenant of this database the sweep selected for the operation (empty for
    scope ``database``), ``settings`` the plugin's own table. Count what was looked at and
    found not to need work in ``not_needed``: the report sums it per operation instead of one
    result line each.
    """

    conn: AsyncConnection[Any]
    operation: Operation
    database: str
    tenants: Sequence[Tenant]
    settings: Mapping[str, Any]
    log: FilteringBoundLogger
    sweep: str = ""
    server_version: int = 0
    dry_run: bool = False
    not_needed: int = 0


ExpandFn = Callable[[PlanContext], Awaitable[Iterable[Target]]]


@dataclass(frozen=True, slots=True)
class Operation:
    """A cleanup step a plugin contributes.

    :param name: ``<plugin>.<what>``, unique across all plugins (selected by glob in sweeps).
        Build a name from a table or other database name with :func:`operation_name`, which
        quotes it when needed (``vacuum."a.b"`` for table ``a.b``): a raw name may hold spaces,
        quotes, dots or control characters, which a plain ``f"vacuum.{table}"`` gets wrong.
    :param run: ``async def run(ctx) -> int | None`` returning rows affected (None: not meaningful).
    :param tables: the tables it touches; relative to the tenant's schema for scope ``tenant``,
        schema-qualified (``"public.sessions"``) for scope ``database``. ``"*"`` means "any table":
        it then conflicts with every other operation of the same tenant (or database).
    :param scope: ``"tenant"`` (once per tenant) or ``"database"`` (once per database).
    :param phase: ordering among operations sharing a table (:class:`Phase`; any int works).
    :param timeout: seconds before the runner cancels it (its query is cancelled on the server);
        None: the sweep's ``operation_timeout`` applies.
    :param db_operation: the SQL verb it runs (``DELETE``, ``VACUUM``): the span's
        ``db.operation.name`` and name (``VACUUM tenant_acme.notifications``).
    :param after: globs of operation names that must all finish before this one starts: in the
        same tenant for scope ``tenant``, in the same database (any scope) for scope
        ``database`` (e.g. a once-per-database step after every tenant's vacuum).
    :param dry_run: True if ``run`` honours ``ctx.dry_run`` (changes nothing and returns how many
        rows it would affect). Operations that do not promise this are not run at all in a dry
        run, so a plugin that forgot to check the flag cannot delete anything.
    :param description: one line for ``sweeperd plugins``.
    :param expand: ``async def expand(plan_ctx) -> Iterable[Target]``: the operation's work items
        are found when the sweep is planned, by one call per database (one catalog query, say,
        for every tenant at once) rather than fixed per tenant: each :class:`Target` becomes an
        item of its own (its own result, span, tables and ordering), named like the operation.
        An expansion that raises fails that database's items of the operation with the reason.
    """

    name: str
    run: RunFn
    tables: tuple[str, ...] = ()
    scope: Scope = "tenant"
    phase: int = Phase.DEFAULT
    timeout: float | None = None
    db_operation: str | None = None
    after: tuple[str, ...] = ()
    dry_run: bool = False
    description: str = ""
    expand: ExpandFn | None = field(default=None, compare=False)
    plugin: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not (
            self.name.isprintable() and _OPERATION_NAME.fullmatch(self.name)
        ):
            raise OperationError(
                f"operation name {self.name!r} must look like '<plugin>.<what>': the plugin in "
                "letters, digits, '_' or '-', then no control characters, and spaces or '\"' "
                'only inside a double-quoted part (\'vacuum."Events ""x"""\'; '
                "sweeperd.model.operation_name builds such names)"
            )
        if self.scope not in ("tenant", "database"):
            raise OperationError(f"operation {self.name}: scope must be 'tenant' or 'database'")
        # A bare string would be iterated per character: a classic slip, forgiven here.
        object.__setattr__(self, "tables", _as_tuple(self.tables))
        object.__setattr__(self, "after", _as_tuple(self.after))
        if self.scope == "database":
            for table in self.tables:
                if table != ALL_TABLES and "." not in table:
                    raise OperationError(
                        f"operation {self.name}: scope 'database' needs schema-qualified tables "
                        f"('public.sessions'), got {table!r}"
                    )


def _as_tuple(value: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value)


_SET_LOCAL_TIMEOUTS = (
    "SELECT pg_catalog.set_config('lock_timeout', %s, true),"
    " pg_catalog.set_config('statement_timeout', %s, true)"
)


@asynccontextmanager
async def timed_transaction(
    conn: AsyncConnection[Any], *, lock_timeout: float, statement_timeout: float
) -> AsyncIterator[AsyncConnection[Any]]:
    """A transaction on ``conn`` with ``SET LOCAL`` timeouts (seconds, 0 = off).

    Transaction-scoped settings are the only ones a transaction pooler keeps with the statements
    they are meant for; they also end with the transaction, so a per-rule timeout never reaches
    another operation.
    """
    async with conn.transaction():
        await conn.execute(
            _SET_LOCAL_TIMEOUTS, (f"{_ms(lock_timeout)}ms", f"{_ms(statement_timeout)}ms")
        )
        yield conn


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def split_qualified(name: str) -> tuple[str, str]:
    """``"public.sessions"`` → ``("public", "sessions")`` (first dot splits)."""
    schema, _, table = name.partition(".")
    return schema, table


@dataclass(slots=True)
class Context:
    """What an operation's ``run`` receives.

    ``conn`` is an autocommit :class:`psycopg.AsyncConnection`. With a direct connection or a
    session pooler its ``application_name``, ``lock_timeout`` and ``statement_timeout`` are set
    for the session; behind a transaction pooler (``pooler = "transaction"``) each statement may
    run on a different server session, which has the role's defaults only. A statement that must
    run under the configured timeouts, whatever the pooler, runs inside :meth:`transaction`.
    Never change session state on ``conn`` (``SET``, session advisory locks, temporary tables,
    ``PREPARE``): behind a transaction pooler it lands on other clients' sessions. ``tenant`` is
    None for scope ``database``. ``details`` is a dict the operation may fill (e.g. dead tuples
    before/after); it appears in the JSON report under ``details``. ``shared`` is one dict for
    every operation of the same sweep run in the same database: what a plugin asks of the
    database once per sweep (its xmin horizon, say) it keeps there, under a key of its own
    plugin's name (``"vacuum.horizon"``).

    An operation that works in steps (retention's batches) calls :meth:`throttle` between them,
    so it yields to the database's health gates and pauses (``[databases.<name>.throttle]``,
    ``sweeperd pause``) like a new operation does before it starts.
    """

    conn: AsyncConnection[Any]
    operation: Operation
    tenant: Tenant | None
    database: str
    dry_run: bool
    settings: Mapping[str, Any]
    log: FilteringBoundLogger
    sweep: str = ""
    server_version: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    # The database's configured timeouts (seconds; 0 = off), applied by transaction().
    lock_timeout: float = 0.0
    statement_timeout: float = 0.0
    shared: dict[str, Any] = field(default_factory=dict)
    # The plan-time target this item works on (Operation.expand), None for static operations.
    target: Target | None = None
    # Set by the runner: waits while the database is throttled or paused, records the wait in
    # details and returns its seconds (see throttle()).
    pacer: Callable[[Context], Awaitable[float]] | None = None
    # Set by the runner where several instances share the firing (sweeperd.claimer): the first
    # statement of every transaction(), which raises LeaseLost if the tenant is no longer ours.
    fence: Callable[[AsyncConnection[Any]], Awaitable[None]] | None = None

    async def throttle(self) -> float:
        """Wait while the database is throttled or paused; the seconds waited (0.0: it was not).

        Call it between steps, never inside a transaction (a transaction held open across a
        wait is what a throttle is meant to avoid). Costs nothing most of the time: the health
        gates are sampled once per ``check_every`` per database, by whichever operation asks
        first. A dry run is never throttled. The wait is added to ``details["throttled_s"]``.
        """
        if self.pacer is None or self.dry_run:
            return 0.0
        return await self.pacer(self)

    def transaction(
        self, *, lock_timeout: float | None = None, statement_timeout: float | None = None
    ) -> AbstractAsyncContextManager[AsyncConnection[Any]]:
        """A transaction on :attr:`conn` whose timeouts are set with ``SET LOCAL``.

        The database's ``lock_timeout``/``statement_timeout``, or the given overrides (seconds),
        hold for exactly this transaction on whatever server session runs it, and never for
        anything after it: safe behind every pooler. Committed when the block ends.

        With several instances sharing the firing, the transaction first checks that this
        instance still holds the tenant and locks its claim so nobody takes it over before the
        commit; if not, it raises :class:`LeaseLost` and nothing in the block runs. Writes that
        must never happen for a tenant another instance took over belong in here.
        """
        timed = timed_transaction(
            self.conn,
            lock_timeout=self.lock_timeout if lock_timeout is None else lock_timeout,
            statement_timeout=(
                self.statement_timeout if statement_timeout is None else statement_timeout
            ),
        )
        return timed if self.fence is None else _fenced(timed, self.fence)

    @property
    def schema(self) -> str | None:
        """The tenant's schema (None for scope ``database``)."""
        return self.tenant.schema if self.tenant else None

    def table(self, name: str) -> sql.Identifier:
        """A safely quoted, schema-qualified identifier for ``name``.

        For scope ``tenant`` the name is relative to the tenant's schema (dots are part of the
        name); for scope ``database`` it is ``"schema.table"``.
        """
        if self.tenant is not None:
            return sql.Identifier(self.tenant.schema, name)
        schema, table = split_qualified(name)
        if not table:
            raise ValueError(f"scope 'database' needs a schema-qualified table, got {name!r}")
        return sql.Identifier(schema, table)


@asynccontextmanager
async def _fenced(
    timed: AbstractAsyncContextManager[AsyncConnection[Any]],
    fence: Callable[[AsyncConnection[Any]], Awaitable[None]],
) -> AsyncIterator[AsyncConnection[Any]]:
    async with timed as conn:
        await fence(conn)
        yield conn


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one (tenant, operation) work item: one entry of the JSON report."""

    tenant: str | None
    database: str
    schema: str | None
    operation: str
    status: Status
    rows: int | None
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None
    error: str | None
    details: Mapping[str, Any] = field(default_factory=dict)
    # For traces and metrics, not in the JSON report: the exception class and the SQLSTATE.
    error_type: str | None = None
    sqlstate: str | None = None
    # For the run history, not in the JSON report (details say it the operation's way): the
    # plan-time target's name (Target.name) of an expanding operation's item.
    target: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "tenant": self.tenant,
            "database": self.database,
            "schema": self.schema,
            "operation": self.operation,
            "status": self.status,
            "rows": self.rows,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "duration_s": round(self.duration_s, 6) if self.duration_s is not None else None,
            "error": self.error,
        }
        if self.details:
            doc["details"] = dict(self.details)
        return doc
