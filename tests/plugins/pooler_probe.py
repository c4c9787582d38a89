"""Records the timeouts an operation sees, inside ctx.transaction() and outside it."""

import sweeperd


async def probe(ctx):
    async with ctx.transaction():
        cur = await ctx.conn.execute(
            "SELECT current_setting('lock_timeout'), current_setting('statement_timeout')"
        )
        inside = await cur.fetchone()
        await ctx.conn.execute(
            "INSERT INTO public.seen (tenant, lock_timeout, statement_timeout) VALUES (%s, %s, %s)",
            (ctx.tenant.name, *inside),
        )
    return None


@sweeperd.hookimpl
def sweeperd_operations(settings):
    return [
        sweeperd.Operation(
            name="probe.timeouts", run=probe, tables=("ev7",), after=("retention.*",)
        )
    ]
