import sweeperd


async def work(ctx):
    await ctx.conn.execute("SELECT pg_sleep(0.05)")
    return 0


@sweeperd.hookimpl
def sweeperd_operations(settings):
    return [
        sweeperd.Operation(name="work.a", run=work, tables=("a",)),
        sweeperd.Operation(name="work.b", run=work, tables=("b",)),
    ]
