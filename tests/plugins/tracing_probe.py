import asyncio

import sweeperd


async def nested(ctx):
    await ctx.conn.execute("SELECT 1")
    ctx.log.info("probe: after a query")

    async def child(n):
        await asyncio.sleep(0)
        ctx.log.info("probe: in a child task", child=n)

    await asyncio.gather(asyncio.create_task(child(1)), child(2))
    return 0


async def nap(ctx):
    await ctx.conn.execute("SELECT pg_sleep(30)")
    return None


async def leak(ctx):
    await ctx.conn.execute("SELECT 1")
    raise RuntimeError("archive unreachable: host=archive user=app password=LeakyPw-42")


@sweeperd.hookimpl
def sweeperd_operations(settings):
    return [
        sweeperd.Operation(name="probe.leak", run=leak, tables=("notifications",)),
        sweeperd.Operation(
            name="probe.nested", run=nested, tables=("notifications",), db_operation="SELECT"
        ),
        sweeperd.Operation(
            name="probe.nap", run=nap, tables=("notifications",), db_operation="SELECT"
        ),
    ]
