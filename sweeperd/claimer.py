"""Claim as you go: one run's share of a firing, a few tenants at a time, under renewed leases.

The firing's tenants are rows of ``sweeperd.claims`` (in their own database), inserted in urgency
order by whichever instance comes first. Per database one keeper task makes every round trip,
one statement each round: mark finished the tenants whose work ended, release those cut short
(a stop), renew the leases due, take the next tenants nobody holds (``FOR UPDATE SKIP LOCKED``,
by rank) or whose lease ran out, and count what is still open elsewhere. It takes tenants while
it holds fewer than the database's slots (so instances split a firing by their capacity),
renews every third of the lease, and while others hold unfinished tenants polls, so the tenants
of an instance that died are taken over within a lease and a poll. A run ends once nothing of
its firing is open anywhere; the tenants others finished are not in its report.

Fencing. A lease is known here to hold until its renewal was sent plus ``claim_lease`` (the
server's end is later, so the local view is never optimistic; a SIGSTOPped process sees the time
it was stopped on its monotonic clock). Before an operation starts the runner asks
:meth:`FiringClaims.lost`. Inside every :meth:`~sweeperd.Context.transaction` (each retention
batch) the fence statement locks the tenant's claim row if the lease still holds on the server,
so nobody takes the tenant over until the transaction ends, or raises :class:`LeaseLost` and the
batch rolls back; the same statement sets ``idle_in_transaction_session_timeout`` to the lease,
so the server ends a transaction its instance stopped in the middle of.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from .db import AsyncConn, Database
from .durations import format_duration
from .errors import describe_error, is_insufficient_privilege
from .model import LeaseLost, Result

if TYPE_CHECKING:
    from .coordination import Claims
    from .planner import Plan, WorkItem

log = structlog.get_logger("sweeperd.claimer")

DATABASE_SCOPE = ""  # the "tenant" under which database-scope work is claimed
MAX_POLL_S = 2.0  # while others hold open tenants: how often to look for expired leases
GIVE_UP_AFTER_ROUNDS = 3  # failed rounds in a row before undecided tenants are failed
ANALYZE_AFTER_ROWS = 1000  # a seed this big gets the table analyzed (see _analyze)

Fence = Callable[[AsyncConn], Awaitable[None]]
# What the runner learns of an item's tenant: True it is this instance's, False another one's
# (the item is not reported here), a str: claiming failed (the item fails with it).
Decision = bool | str

_SEED = """
INSERT INTO sweeperd.claims (sweep, firing, tenant, rank)
SELECT %(sweep)s, %(firing)s, w.tenant, w.rank::integer
FROM unnest(%(tenants)s::text[]) WITH ORDINALITY AS w(tenant, rank)
ON CONFLICT DO NOTHING
"""
# The CTEs touch disjoint rows (mine and finished; mine and held; not mine), so no row is
# updated twice. Rows of the first version (an instance, no lease) count as finished.
_ROUND = """
WITH finish AS (
    UPDATE sweeperd.claims SET finished_at = coalesce(finished_at, now()), lease_until = NULL
    WHERE sweep = %(sweep)s AND firing = %(firing)s AND instance = %(me)s
        AND cardinality(%(finished)s::text[]) > 0 AND tenant = ANY(%(finished)s::text[])
    RETURNING tenant
), release AS (
    UPDATE sweeperd.claims SET released_at = now(), lease_until = now()
    WHERE sweep = %(sweep)s AND firing = %(firing)s AND instance = %(me)s
        AND cardinality(%(released)s::text[]) > 0 AND tenant = ANY(%(released)s::text[])
        AND finished_at IS NULL
    RETURNING tenant
), renew AS (
    UPDATE sweeperd.claims SET lease_until = now() + %(lease)s * interval '1 second'
    WHERE sweep = %(sweep)s AND firing = %(firing)s AND instance = %(me)s
        AND cardinality(%(renew)s::text[]) > 0 AND tenant = ANY(%(renew)s::text[])
        AND finished_at IS NULL AND lease_until > now()
    RETURNING tenant
), pick AS (
    SELECT tenant, instance, released_at FROM sweeperd.claims
    WHERE sweep = %(sweep)s AND firing = %(firing)s AND finished_at IS NULL
        AND instance IS DISTINCT FROM %(me)s AND (instance IS NULL OR lease_until < now())
        AND tenant <> ALL(%(skip)s::text[])
    ORDER BY rank
    LIMIT %(want)s
    FOR UPDATE SKIP LOCKED
), took AS (
    UPDATE sweeperd.claims c
    SET instance = %(me)s, lease_until = now() + %(lease)s * interval '1 second',
        started_at = now(), released_at = NULL, attempts = c.attempts + 1,
        taken_from = p.instance,
        taken_why = CASE
            WHEN p.instance IS NULL THEN NULL
            WHEN p.released_at IS NOT NULL THEN 'released'
            ELSE 'lease expired' END
    FROM pick p
    -- The ANY gives the primary key the tenants to look up (not a scan of the firing's rows).
    WHERE c.sweep = %(sweep)s AND c.firing = %(firing)s AND c.tenant = p.tenant
        AND c.tenant = ANY(ARRAY(SELECT tenant FROM pick))
    RETURNING c.tenant
), open_elsewhere AS (
    -- Only when there was less to take than wanted (a one-time filter: no scan otherwise).
    SELECT count(*) AS n FROM sweeperd.claims
    WHERE (SELECT count(*) FROM took) < %(want)s
        AND sweep = %(sweep)s AND firing = %(firing)s AND finished_at IS NULL
        AND instance IS DISTINCT FROM %(me)s AND (instance IS NULL OR lease_until IS NOT NULL)
        AND tenant <> ALL(%(skip)s::text[])
)
SELECT 'took', tenant FROM took
UNION ALL SELECT 'renewed', tenant FROM renew
UNION ALL SELECT 'finished', tenant FROM finish
UNION ALL SELECT 'open', n::text FROM open_elsewhere
"""
_FINISH_ONE = """
UPDATE sweeperd.claims SET finished_at = coalesce(finished_at, now()), lease_until = NULL
WHERE sweep = %(sweep)s AND firing = %(firing)s AND tenant = %(tenant)s AND instance = %(me)s
RETURNING 1
"""
_FENCE_WHERE = """
WHERE sweep = %(sweep)s AND firing = %(firing)s AND tenant = %(tenant)s AND instance = %(me)s
    AND finished_at IS NULL AND lease_until > now()
"""
_FENCE = (
    "SELECT pg_catalog.set_config('idle_in_transaction_session_timeout', %(idle)s, true)"
    " FROM sweeperd.claims" + _FENCE_WHERE + " FOR SHARE"
)
_FENCE_RENEW = (
    "UPDATE sweeperd.claims SET lease_until = now() + %(lease)s * interval '1 second'"
    + _FENCE_WHERE
    + " RETURNING pg_catalog.set_config('idle_in_transaction_session_timeout', %(idle)s, true)"
)


async def _analyze(conn: AsyncConn) -> None:
    """Fresh statistics after a big seed: without them the planner takes the new table for
    empty and each round scans the whole firing (seen: 47 ms a round at 10 000 tenants)."""
    try:
        await conn.execute("ANALYZE sweeperd.claims")
    except Exception as exc:  # not the owner, say: slower rounds, nothing worse
        log.info("could not analyze sweeperd.claims", error=describe_error(exc))


def tenant_key(item: WorkItem) -> str:
    return item.tenant.name if item.tenant is not None else DATABASE_SCOPE


@dataclass(slots=True)
class _Lease:
    renewed_at: float  # monotonic, when the statement that renewed it was sent
    valid_until: float  # renewed_at + the lease: the server's end is never earlier


class FiringClaims:
    """One run's claims of a firing, across its databases (see the module's docstring)."""

    def __init__(
        self,
        claims: Claims,
        databases: Mapping[str, Database],
        sweep: str,
        firing: dt.datetime,
        *,
        lease: float,
    ) -> None:
        self.claims = claims
        self.databases = databases
        self.sweep = sweep
        self.firing = firing
        self.lease = lease
        self._per_db: dict[str, _DatabaseClaims] = {}

    @property
    def instance(self) -> str:
        return self.claims.instance

    async def begin(self, plan: Plan, capacity: Mapping[str, int]) -> None:
        """Seed the firing's rows and take the first tenants, in every database at once."""
        ranked: dict[str, dict[str, float]] = {}
        counts: dict[str, Counter[str]] = {}
        for item in plan.items:
            key = tenant_key(item)
            best = ranked.setdefault(item.database, {})
            # Database-scope work first, then by the most urgent item of each tenant.
            priority = float("inf") if key == DATABASE_SCOPE else item.priority
            if key not in best or priority > best[key]:
                best[key] = priority
            counts.setdefault(item.database, Counter())[key] += 1
        for name, best in ranked.items():
            order = sorted(best, key=best.__getitem__, reverse=True)  # stable: plan order
            self._per_db[name] = _DatabaseClaims(
                self, name, self.databases.get(name), order, counts[name], capacity.get(name, 1)
            )
        await asyncio.gather(*(db.begin() for db in self._per_db.values()))

    async def decide(self, item: WorkItem) -> Decision:
        return await self._per_db[item.database].decide(tenant_key(item))

    def lost(self, item: WorkItem) -> str | None:
        """Why the item's tenant is no longer this instance's (its lease ran out), or None."""
        return self._per_db[item.database].lost_why(tenant_key(item))

    def fence(self, item: WorkItem) -> Fence | None:
        """The statement that opens every transaction of the item's operation, None if the
        database is not coordinated."""
        return self._per_db[item.database].fence(tenant_key(item))

    def item_done(self, item: WorkItem, result: Result) -> None:
        self._per_db[item.database].item_done(tenant_key(item), result)

    async def finished_on(self, item: WorkItem, conn: AsyncConn) -> None:
        """The item's operation ended well, its connection still in hand: if it was its
        tenant's last, mark the tenant finished right now, on that connection. The keeper's
        next round would too, but an instance stopped in between would leave done work to be
        done again by the one that takes the tenant over."""
        await self._per_db[item.database].finished_on(tenant_key(item), conn)

    async def end(self) -> None:
        """Report what ended (finished, released) and stop the keepers."""
        await asyncio.gather(*(db.end() for db in self._per_db.values()))


class _DatabaseClaims:
    def __init__(
        self,
        owner: FiringClaims,
        name: str,
        database: Database | None,
        order: list[str],
        items: Counter[str],
        capacity: int,
    ) -> None:
        self.owner = owner
        self.name = name
        self.database = database
        self.order = order
        self.known = set(order)
        self.remaining = items  # per tenant: its items without a result
        self.capacity = max(1, capacity)
        self.coordinated = False
        self.failure: str | None = None
        loop = asyncio.get_running_loop()
        self.decisions: dict[str, asyncio.Future[Decision]] = {
            t: loop.create_future() for t in order
        }
        self.held: dict[str, _Lease] = {}
        self.lost: dict[str, str] = {}
        self.cut_short: set[str] = set()
        self.to_finish: set[str] = set()
        self.to_release: set[str] = set()
        self.skip: set[str] = set()  # never take: not in this run's plan, or lost here
        self.open_elsewhere = 0
        self.exhausted_at: float | None = None  # the last round found less to take than wanted
        self.last_round = 0.0
        self.wake = asyncio.Event()
        self.keeper: asyncio.Task[None] | None = None
        self.closing = False  # end(): the keeper stops after its current round
        self.marked: set[str] = set()  # marked finished by finished_on()

    # The runner's side.

    async def decide(self, key: str) -> Decision:
        return await self.decisions[key]

    def lost_why(self, key: str) -> str | None:
        if not self.coordinated:
            return None
        if key in self.lost:
            return self.lost[key]
        lease = self.held.get(key)
        if lease is not None and time.monotonic() >= lease.valid_until:
            self._lose(key, f"lease lost: not renewed within {format_duration(self.owner.lease)}")
            return self.lost[key]
        return None

    def fence(self, key: str) -> Fence | None:
        if not self.coordinated:
            return None

        async def fence(conn: AsyncConn) -> None:
            why = self.lost_why(key)
            if why is not None:
                raise LeaseLost(why)
            lease = self.held.get(key)
            if lease is None:
                raise LeaseLost("lease lost")
            sent = time.monotonic()
            renew = sent - lease.renewed_at >= self.owner.lease / 2
            cur = await conn.execute(_FENCE_RENEW if renew else _FENCE, self._fence_params(key))
            if await cur.fetchone() is None:
                self._lose(key, "lease lost: the tenant was taken over by another instance")
                raise LeaseLost(self.lost[key])
            if renew and key in self.held:
                self.held[key] = _Lease(sent, sent + self.owner.lease)

        return fence

    async def finished_on(self, key: str, conn: AsyncConn) -> None:
        if (
            not self.coordinated
            or self.remaining[key] != 1
            or key in self.cut_short
            or key not in self.held
            or self.lost_why(key) is not None
        ):
            return
        try:
            cur = await conn.execute(_FINISH_ONE, self._params(tenant=key))
            if await cur.fetchone() is not None:
                self.marked.add(key)
        except Exception as exc:  # the keeper marks it instead
            log.info(
                "could not mark the tenant finished yet",
                tenant=key or None,
                error=describe_error(exc),
            )

    def item_done(self, key: str, result: Result) -> None:
        if result.status == "cancelled":
            self.cut_short.add(key)
        self.remaining[key] -= 1
        if self.remaining[key] > 0 or not self.coordinated or self.lost_why(key) is not None:
            return  # not finished here when the lease ran out meanwhile: its taker finishes it
        if key in self.marked:
            self.held.pop(key, None)
            self.wake.set()  # room for another tenant
            return
        if self.held.pop(key, None) is not None:
            # Cut short (a stop, the window): another instance may take it at once.
            (self.to_release if key in self.cut_short else self.to_finish).add(key)
            self.wake.set()

    # The keeper.

    async def begin(self) -> None:
        database = self.database
        if database is None or database.in_recovery or not database.is_open:
            # Unreachable or a standby: nothing runs there (its items say why), and a standby
            # cannot be written to.
            self._decide_all(True)
            return
        try:
            await self.owner.claims.prepare(database)
            async with database.housekeeping("claim") as conn:
                cur = await conn.execute(_SEED, self._params(tenants=self.order))
                if cur.rowcount >= ANALYZE_AFTER_ROWS:
                    await _analyze(conn)
            self.coordinated = True
            await self._round()
        except Exception as exc:
            if self.coordinated:
                # Seeded but the first round failed: the keeper retries.
                log.warning(
                    "claiming failed; retrying", database=self.name, error=describe_error(exc)
                )
            elif is_insufficient_privilege(exc):
                if self.name not in self.owner.claims.unavailable:
                    self.owner.claims.unavailable.add(self.name)
                    log.error(
                        "cannot coordinate with other instances; running every tenant",
                        database=self.name,
                        error=describe_error(exc),
                        fix=f"GRANT CREATE ON DATABASE {database.dbname} TO {database.user} "
                        "(or create schema sweeperd for it)",
                    )
                self._decide_all(True)
                return
            else:
                # A transient error must not let two instances do the same work.
                self._decide_all(f"could not claim tenants for this firing: {describe_error(exc)}")
                return
        self.owner.claims.unavailable.discard(self.name)
        self.keeper = asyncio.create_task(self._keep(), name=f"sweeperd claims {self.name}")

    async def end(self) -> None:
        keeper, self.keeper = self.keeper, None
        if keeper is not None:
            # Not cancelled in the middle of a round: its statement may have run on the server
            # and what it took or finished would be lost here.
            self.closing = True
            self.wake.set()
            try:
                async with asyncio.timeout(10):
                    await asyncio.shield(keeper)
            except TimeoutError:
                keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        if not self.coordinated or not (self.to_finish or self.to_release or self.held):
            return
        # Whatever is still held was cut short: give it back so a survivor need not wait.
        self.to_release |= set(self.held)
        try:
            async with asyncio.timeout(10):
                await self._round(take=False)
        except Exception as exc:
            log.warning(
                "could not report the end of claimed tenants; their leases will run out",
                database=self.name,
                error=describe_error(exc),
            )

    async def _keep(self) -> None:
        failures = 0
        while not self.closing:
            delay = self._next_round_in()
            if delay is None:
                return
            if delay > 0:
                self.wake.clear()
                try:
                    async with asyncio.timeout(delay):
                        await self.wake.wait()
                except TimeoutError:
                    pass
                continue
            try:
                await self._round()
                failures = 0
            except Exception as exc:
                failures += 1
                log.warning(
                    "claiming round failed; retrying",
                    database=self.name,
                    error=describe_error(exc),
                    failures=failures,
                )
                if failures >= GIVE_UP_AFTER_ROUNDS and self._undecided():
                    self._decide_all(
                        f"could not claim tenants for this firing: {describe_error(exc)}"
                    )
                await asyncio.sleep(min(self._poll(), 1.0))

    def _next_round_in(self) -> float | None:
        """Seconds until the next round is due (0: now); None: nothing left to do here."""
        now = time.monotonic()
        undecided = self._undecided()
        if not undecided and not self.held and not self.to_finish and not self.to_release:
            return None
        if self.to_finish or self.to_release:
            return 0.0
        due: list[float] = [
            lease.renewed_at + self.owner.lease / 3 - now for lease in self.held.values()
        ]
        if undecided:
            if len(self.held) < self.capacity and self.exhausted_at is None:
                return 0.0
            # Nothing to take last time: look again for expired leases (or, with capacity,
            # for a tenant another instance released).
            due.append(self.last_round + self._poll() - now)
        return max(0.0, min(due)) if due else None

    def _poll(self) -> float:
        return min(self.owner.lease / 3, MAX_POLL_S)

    def _undecided(self) -> list[str]:
        return [t for t in self.order if not self.decisions[t].done()]

    async def _round(self, *, take: bool = True) -> None:
        assert self.database is not None
        now = time.monotonic()
        finished, released = sorted(self.to_finish), sorted(self.to_release)
        renew = [
            t for t, lease in self.held.items() if now - lease.renewed_at >= self.owner.lease / 4
        ]
        # Up to a database's worth of tenants ahead, so its slots never wait for a round trip.
        want = max(0, 2 * self.capacity - len(self.held)) if take and self._undecided() else 0
        async with self.database.housekeeping("claim") as conn:
            sent = time.monotonic()
            cur = await conn.execute(
                _ROUND,
                self._params(
                    finished=finished,
                    released=released,
                    renew=renew,
                    skip=sorted(self.skip),
                    want=want,
                    lease=self.owner.lease,
                ),
            )
            rows = await cur.fetchall()
        self.last_round = sent
        self.to_finish.difference_update(finished)
        self.to_release.difference_update(released)
        took: list[str] = []
        renewed: set[str] = set()
        marked: set[str] = set()
        open_before = 0
        for kind, value in rows:
            if kind == "took":
                took.append(value)
            elif kind == "renewed":
                renewed.add(value)
            elif kind == "finished":
                marked.add(value)
            else:
                open_before = int(value)
        for tenant in set(finished) - marked:
            log.warning(
                "tenant finished after its lease was lost; another instance may run it again",
                database=self.name,
                tenant=tenant or None,
            )
        for tenant in renew:
            if tenant in self.held:
                if tenant in renewed:
                    self.held[tenant] = _Lease(sent, sent + self.owner.lease)
                else:
                    self._lose(tenant, "lease lost: the tenant was taken over by another instance")
        for tenant in took:
            future = self.decisions.get(tenant)
            if future is None or future.done():
                # Not in this run's plan (the other instance's config differs): give it back.
                self.skip.add(tenant)
                self.to_release.add(tenant)
                continue
            self.held[tenant] = _Lease(sent, sent + self.owner.lease)
            future.set_result(True)
        self.exhausted_at = sent if len(took) < want else None
        if self.exhausted_at is None:
            return  # took all it asked for: more may be left, not counted
        self.open_elsewhere = open_before - len(took)
        if self.open_elsewhere <= 0:
            # Nothing of the firing is open anywhere else: every tenant not decided here was
            # finished by another instance.
            self._decide_all(False)

    def _lose(self, key: str, why: str) -> None:
        if key in self.lost:
            return
        self.held.pop(key, None)
        self.lost[key] = why
        self.skip.add(key)
        log.warning(why, database=self.name, tenant=key or None)

    def _decide_all(self, decision: Decision) -> None:
        for future in self.decisions.values():
            if not future.done():
                future.set_result(decision)

    def _params(self, **extra: Any) -> dict[str, Any]:
        return {
            "sweep": self.owner.sweep,
            "firing": self.owner.firing,
            "me": self.owner.instance,
        } | extra

    def _fence_params(self, key: str) -> dict[str, Any]:
        return self._params(
            tenant=key, lease=self.owner.lease, idle=f"{round(self.owner.lease * 1000)}ms"
        )
