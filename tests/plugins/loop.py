import sweeperd


async def noop(ctx):
    return None


@sweeperd.hookimpl
def sweeperd_operations(settings):
    return [
        sweeperd.Operation(name="loop.a", run=noop, tables=("t",), after=("loop.b",)),
        sweeperd.Operation(name="loop.b", run=noop, tables=("u",), after=("loop.a",)),
    ]
