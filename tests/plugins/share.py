"""A test plugin for shared firings: each tenant's work sleeps, then records who did it.

The record is written inside ctx.transaction(): the fence there is what keeps an instance that
lost its lease (stopped, say) from writing for a tenant another instance took over.
"""

import os

import sweeperd


async def work(ctx):
    seconds = float(ctx.settings.get("seconds", 0.05))
    async with ctx.transaction():
        await ctx.conn.execute("SELECT pg_sleep(%s)", (seconds,))
        await ctx.conn.execute(
            "INSERT INTO public.done (tenant, pid) VALUES (%s, %s)",
            (ctx.tenant.name, os.getpid()),
        )
    return 1


@sweeperd.hookimpl
def sweeperd_operations(settings):
    return [sweeperd.Operation(name="share.work", run=work, tables=("t",))]
