import sweeperd


async def record(ctx):
    await ctx.conn.execute(
        "INSERT INTO public.runs (tenant, at) VALUES (%s, clock_timestamp())", (ctx.tenant.name,)
    )


def sweeperd_operations(config):
    return [sweeperd.Operation(name="rec.record", run=record, tables=("x",))]
