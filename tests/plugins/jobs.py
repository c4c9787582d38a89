import sweeperd
from sweeperd import sql


async def purge_done(ctx):
    if ctx.dry_run:
        cur = await ctx.conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE done").format(ctx.table("jobs"))
        )
        return (await cur.fetchone())[0]
    cur = await ctx.conn.execute(sql.SQL("DELETE FROM {} WHERE done").format(ctx.table("jobs")))
    return cur.rowcount


async def flaky(ctx):
    await ctx.conn.execute(
        sql.SQL("INSERT INTO {} (what) VALUES ('flaky ran')").format(ctx.table("audit"))
    )
    if ctx.tenant.name == "globex":
        await ctx.conn.execute("SELECT 1/0")
    return 1


async def expire_sessions(ctx):
    table = ctx.table("public.sessions")
    if ctx.dry_run:
        cur = await ctx.conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE expires_at < now()").format(table)
        )
        return (await cur.fetchone())[0]
    cur = await ctx.conn.execute(sql.SQL("DELETE FROM {} WHERE expires_at < now()").format(table))
    return cur.rowcount


@sweeperd.hookimpl
def sweeperd_operations(config):
    return [
        sweeperd.Operation(name="jobs.purge_done", run=purge_done, tables=("jobs",), dry_run=True),
        sweeperd.Operation(name="jobs.flaky", run=flaky, tables=("audit",)),
        sweeperd.Operation(
            name="jobs.expire_sessions",
            run=expire_sessions,
            scope="database",
            tables=("public.sessions",),
            dry_run=True,
        ),
    ]
