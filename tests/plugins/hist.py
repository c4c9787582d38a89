import sweeperd


async def ok(ctx):
    cur = await ctx.conn.execute("SELECT length(%s)", (ctx.tenant.name,))
    return (await cur.fetchone())[0]


async def flaky(ctx):
    if ctx.tenant.name in ctx.settings.get("fail", []):
        await ctx.conn.execute("SELECT 1/0")
    await ctx.conn.execute("SELECT 1")
    return None


async def per_db(ctx):
    cur = await ctx.conn.execute("SELECT 7")
    return (await cur.fetchone())[0]


@sweeperd.hookimpl
def sweeperd_operations(config):
    return [
        sweeperd.Operation(name="hist.ok", run=ok, dry_run=True),
        sweeperd.Operation(name="hist.flaky", run=flaky),
        sweeperd.Operation(name="hist.db", run=per_db, scope="database", dry_run=True),
    ]
