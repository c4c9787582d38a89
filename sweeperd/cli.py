"""The ``sweeperd`` command line.

Exit codes (contract): 0 all selected operations succeeded (or were skipped by policy); 1 at least
one failed; 2 usage or configuration error (one line per problem, no traceback); 3 a database
could not be reached at all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from . import __version__
from .config import Config, load_config, resolve_config_path
from .plugins import Plugins
from .problems import ExitCode, Problems, printable

if TYPE_CHECKING:
    from .db import Database


class UsageError(Problems):
    """A command-line problem (an unknown database, a bad --schemas): exit 2 like the others."""


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: --unit passes options on by their exact spelling (--conf would slip by).
    parser = argparse.ArgumentParser(
        prog="sweeperd",
        description="PostgreSQL maintenance for multi-tenant databases.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"sweeperd {__version__}")
    parser.add_argument(
        "--unit",
        metavar="UNIT",
        help="run the command as the systemd unit UNIT runs (its user, credentials and config), "
        "in a transient unit: for check-config, status, sweep, discover, pause and resume "
        "beside the service",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, allow_abbrev=False, **kwargs)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "-c",
            "--config",
            metavar="FILE",
            help="configuration file, or a directory holding sweeperd.toml and conf.d/ (default: "
            "$SWEEPERD_CONFIG, then /etc/sweeperd/sweeperd.toml); conf.d/*.toml beside the file "
            "are merged into it",
        )
        return p

    run = with_config(add("run", help="the daemon, foreground (systemd runs this)"))
    run.set_defaults(func=cmd_run)

    sweep = with_config(add("sweep", help="run one sweep now, in the foreground"))
    sweep.add_argument(
        "sweep",
        nargs="?",
        metavar="SWEEP",
        help="the [sweeps.<name>] to run (default: every operation of every sweep once)",
    )
    sweep.add_argument(
        "--tenant",
        action="append",
        default=[],
        metavar="GLOB",
        help="only tenants whose name matches (repeatable)",
    )
    sweep.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="GLOB",
        help="only operations whose name matches, e.g. 'retention.*' (repeatable)",
    )
    sweep.add_argument(
        "--dry-run", action="store_true", help="change nothing; report what would be done"
    )
    sweep.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    sweep.set_defaults(func=cmd_sweep)

    status = with_config(add("status", help="recent runs from the run history"))
    status.add_argument("--sweep", metavar="NAME", help="only this sweep")
    status.add_argument("--tenant", metavar="GLOB", help="only failures of matching tenants")
    status.add_argument("--failed", action="store_true", help="only runs with failures")
    status.add_argument("--json", action="store_true", help="print JSON on stdout")
    status.set_defaults(func=cmd_status)

    discover = with_config(add("discover", help="print [[tenants]] TOML for the schemas found"))
    discover.add_argument(
        "--database", required=True, metavar="NAME", help="the [databases.<name>] to look in"
    )
    discover.add_argument(
        "--schemas",
        default="tenant_%",
        metavar="LIKE",
        help="LIKE pattern for tenant schemas (default: tenant_%%)",
    )
    discover.set_defaults(func=cmd_discover)

    pause = with_config(
        add(
            "pause",
            help="pause databases: no new operation or retention batch starts there, "
            "for every sweeperd instance",
            description="Pause databases: no sweeperd instance, on any host, starts a new "
            "operation or retention batch there until the pause is resumed or ends (statements "
            "already running finish). The pause is kept in the database (table sweeperd.pause) "
            "and honoured within each instance's check_every. Pausing a paused database replaces "
            "its pause (who, reason and end).",
        )
    )
    pause.add_argument(
        "--database",
        action="append",
        default=[],
        metavar="NAME",
        help="the [databases.<name>] to pause (repeatable; default: every configured database)",
    )
    pause.add_argument(
        "--for",
        dest="duration",
        metavar="DURATION",
        help='end the pause by itself after DURATION, e.g. "30m", "2h", "1h30m" '
        "(default: until sweeperd resume)",
    )
    pause.add_argument(
        "--reason",
        metavar="TEXT",
        help="why, shown by sweeperd status and in the logs of every instance (one line)",
    )
    pause.set_defaults(func=cmd_pause)

    resume = with_config(
        add(
            "resume",
            help="end the pause of databases",
            description="End the pause of databases (sweeperd pause): every sweeperd instance "
            "starts work there again within its check_every. Says who had paused each one.",
        )
    )
    resume.add_argument(
        "--database",
        action="append",
        default=[],
        metavar="NAME",
        help="the [databases.<name>] to resume (repeatable; default: every configured database)",
    )
    resume.set_defaults(func=cmd_resume)

    check = with_config(add("check-config", help="validate the configuration (never connects)"))
    check.set_defaults(func=cmd_check_config)

    plugins = with_config(add("plugins", help="list plugins and their operations"))
    plugins.set_defaults(func=cmd_plugins)
    demo = add("demo", help="embedded PostgreSQL, demo tenants, one sweep, a summary")
    demo.add_argument(
        "--tenants",
        type=_positive_int,
        default=50,
        metavar="N",
        help="how many demo tenants (default 50)",
    )
    demo.add_argument(
        "--rows",
        type=_positive_int,
        default=2000,
        metavar="N",
        help="rows per demo table (default 2000)",
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        if args.unit:
            return _in_unit(args, argv)
        code: int = args.func(args)
        return code
    except Problems as exc:
        # The one place outcomes become exit codes (config, plugins, usage, plans, --unit).
        for problem in exc.problems:
            _error(problem)
        return ExitCode.USAGE
    except KeyboardInterrupt:
        print("sweeperd: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED


def _error(problem: str) -> None:
    # Under systemd the journal stores stderr lines at the unit's default priority (info):
    # the sd-daemon prefix makes `journalctl -p err` show why the service did not start.
    from .logs import under_journald

    prefix = "<3>" if under_journald(sys.stderr) else ""
    print(f"{prefix}sweeperd: {printable(problem)}", file=sys.stderr)


def _in_unit(args: argparse.Namespace, argv: list[str]) -> int:
    from .unit import run_as_unit

    if args.command in ("run", "demo"):
        raise UsageError([f"--unit runs commands beside the service, not {args.command!r}"])
    return run_as_unit(args.unit, _command_argv(argv, args.command), args.config)


def _command_argv(argv: list[str], command: str) -> list[str]:
    """``argv`` from the command name on, without ``-c``/``--config`` (passed on separately)."""
    i = 0
    while argv[i] != command:  # global options come first: skip --unit's value too
        i += 2 if argv[i] == "--unit" else 1
    rest, out = argv[i + 1 :], [command]
    skip = False
    for j, arg in enumerate(rest):
        if skip:
            skip = False
        elif arg == "--":  # positionals only from here: pass them on as they are
            out += rest[j:]
            break
        elif arg in ("-c", "--config"):
            skip = True
        elif not arg.startswith("--config=") and not (arg.startswith("-c") and len(arg) > 2):
            out.append(arg)
    return out


def _preflight(config: Config) -> None:
    """What would make every connection fail for a reason the process can name now."""
    from .preflight import os_user_problems

    problems = os_user_problems({n: d.dsn for n, d in config.databases.items()})
    if problems:
        # Each begins with its key, databases.<name>: the file that set that database.
        raise UsageError([f"{config.file_of(p.split(': ', 1)[0])}: {p}" for p in problems])


def _load(args: argparse.Namespace) -> tuple[Config, Plugins]:
    """What check-config checks is what run, sweep and a reload build (sweeperd.startup)."""
    from .startup import prepare

    prepared = prepare(resolve_config_path(args.config))
    return prepared.config, prepared.plugins


def cmd_check_config(args: argparse.Namespace) -> int:
    config, plugins = _load(args)
    _preflight(config)
    n_sweeps, n_tenants = len(config.sweeps), len(config.tenants)
    print(
        f"{config.path}: OK ({len(config.databases)} databases, {n_tenants} tenants, "
        f"{len(config.tenant_sources)} tenant sources, {n_sweeps} sweeps, "
        f"{len(plugins.operations)} operations, {len(config.dropins)} drop-ins)"
    )
    return ExitCode.OK


def cmd_plugins(args: argparse.Namespace) -> int:
    _config, plugins = _load(args)
    by_plugin = plugins.by_plugin()
    for info in plugins.infos:
        version = f" {info.version}" if info.version else ""
        print(f"{info.name}{version}  ({info.source})")
        ops = by_plugin.get(info.name, [])
        if not ops:
            print("    (no operations with the current configuration)")
        for op in ops:
            # A table name may hold anything, a newline included: one operation, one line.
            tables = printable(", ".join(op.tables)) or "-"
            desc = f"  {op.description}" if op.description else ""
            print(f"    {op.name}  [scope {op.scope}; tables {tables}]{desc}")
    return ExitCode.OK


def _observability(config: Config) -> None:
    """Logs and telemetry as configured; a bad OTEL_* variable is a usage error (exit 2)."""
    from .logs import setup_logging
    from .telemetry import TelemetryError, setup_telemetry

    setup_logging(config.log)
    try:
        setup_telemetry(tenant_metrics=config.telemetry.tenant_metrics)
    except TelemetryError as exc:
        raise UsageError([str(exc)]) from None


def cmd_discover(args: argparse.Namespace) -> int:
    from .discover import discover
    from .logs import setup_logging

    config = load_config(resolve_config_path(args.config))
    _preflight(config)
    setup_logging(config.log)
    if args.database not in config.databases:
        known = ", ".join(sorted(config.databases)) or "none configured"
        raise UsageError([f"no database named {args.database!r} in {config.path} (known: {known})"])
    from .like import problem as like_problem

    if bad := like_problem(args.schemas):
        raise UsageError([f"--schemas: expected a LIKE pattern: {bad}"])
    text, problem = asyncio.run(discover(config, args.database, args.schemas))
    if text is None:
        print(f"sweeperd: database {args.database!r} unreachable: {problem}", file=sys.stderr)
        return ExitCode.UNREACHABLE
    sys.stdout.write(text)
    return ExitCode.OK


def cmd_run(args: argparse.Namespace) -> int:
    import signal

    from .daemon import run_daemon

    # "Stop now" before the daemon's own handlers exist (while the config loads): a plain exit,
    # not SIGQUIT's core dump, which Restart=on-failure would answer with a restart.
    signal.signal(signal.SIGQUIT, lambda _signo, _frame: sys.exit(ExitCode.OK))

    path = resolve_config_path(args.config)
    config, plugins = _load(args)
    _preflight(config)
    _observability(config)
    return run_daemon(path, config, plugins)


def cmd_status(args: argparse.Namespace) -> int:
    from .logs import setup_logging
    from .planner import require_sweep
    from .status import collect, render, to_json

    config = load_config(resolve_config_path(args.config))
    _preflight(config)
    setup_logging(config.log)
    if args.sweep is not None:
        require_sweep(config, args.sweep)
    got = asyncio.run(
        collect(
            config, sweep=args.sweep, tenant=args.tenant, failed_only=args.failed, full=args.json
        )
    )
    if args.json:
        doc = to_json(
            got.runs,
            got.last_ok,
            got.unreachable,
            got.paused,
            got.pause_unknown,
            got.gates,
            got.claims,
        )
        json.dump(doc, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(
            render(
                got.runs,
                got.last_ok,
                got.unreachable,
                config.history.enabled,
                args.failed,
                databases=len(config.databases),
                paused=got.paused,
                pause_unknown=got.pause_unknown,
                gates=got.gates,
                claims=got.claims,
            )
        )
    return ExitCode.UNREACHABLE if got.unreachable else ExitCode.OK


def _chosen_databases(config: Config, names: Sequence[str]) -> list[str]:
    """``--database`` names in the order given, once each (none: every configured database)."""
    if not config.databases:
        raise UsageError([f"no databases configured in {config.path}"])
    if not names:
        return list(config.databases)
    known = ", ".join(sorted(config.databases))
    unknown = [n for n in dict.fromkeys(names) if n not in config.databases]
    if unknown:
        raise UsageError(
            [f"no database named {n!r} in {config.path} (known: {known})" for n in unknown]
        )
    return list(dict.fromkeys(names))


def cmd_pause(args: argparse.Namespace) -> int:
    from .durations import parse_duration
    from .pause import one_line, pause, who

    # The configuration only, not the plugins: a plugin that fails to load must not keep
    # anyone from stopping the work on a database.
    config = load_config(resolve_config_path(args.config))
    names = _chosen_databases(config, args.database)
    problems = []
    duration = None
    if args.duration is not None:
        try:
            duration = parse_duration(args.duration)
        except ValueError as exc:
            problems.append(f"--for: {exc}")
        else:
            if duration <= 0:
                problems.append(f"--for: expected a duration longer than 0, got {args.duration!r}")
    reason = None
    if args.reason is not None:
        try:
            reason = one_line(args.reason)
        except ValueError as exc:
            problems.append(f"--reason: {exc}")
    if problems:
        raise UsageError(problems)
    _preflight(config)
    from .logs import setup_logging

    setup_logging(config.log)
    by = who()

    async def act(database: Database) -> str:
        now, replaced = await pause(database, by=by, reason=reason, duration=duration)
        line = now.describe()
        if replaced is not None:
            line += f" (replaces: {replaced.describe(open_end=False)})"
        return line

    return asyncio.run(_each_database(config, names, "pause", act))


def cmd_resume(args: argparse.Namespace) -> int:
    from .logs import setup_logging
    from .pause import resume

    config = load_config(resolve_config_path(args.config))
    names = _chosen_databases(config, args.database)
    _preflight(config)
    setup_logging(config.log)

    async def act(database: Database) -> str:
        ended = await resume(database)
        if ended is None:
            return "was not paused"
        return f"resumed (was {ended.describe(open_end=False)})"

    return asyncio.run(_each_database(config, names, "resume", act))


async def _each_database(
    config: Config,
    names: list[str],
    verb: str,
    act: Callable[[Database], Awaitable[str]],
) -> int:
    """``act`` on each named database, each as soon as it is open (one that is down and waited
    for does not hold up the others); one line per database, in the order given: stdout for
    those done, stderr for the others. Exit 3 if one was unreachable, else 1 if one failed."""
    from .databases import open_databases
    from .db import STANDBY
    from .errors import DatabaseUnreachable, describe_error
    from .pause import NoPrivilege

    async def one(name: str) -> tuple[int, str]:
        opened, unreachable = await open_databases(config, [name])
        if name in unreachable:
            return ExitCode.UNREACHABLE, f"{name}: unreachable: {unreachable[name]}"
        database = opened[name]
        try:
            if database.in_recovery:  # nothing is written on a standby (its primary replicates)
                return ExitCode.FAILED, f"{name}: cannot {verb}: {STANDBY}"
            return ExitCode.OK, f"{name}: {await act(database)}"
        except DatabaseUnreachable as exc:
            return ExitCode.UNREACHABLE, f"{name}: unreachable: {exc.reason}"
        except NoPrivilege as exc:
            return ExitCode.FAILED, f"{name}: cannot {verb}: missing privileges: {exc}"
        except Exception as exc:
            return ExitCode.FAILED, f"{name}: cannot {verb}: {describe_error(exc)}"
        finally:
            await database.close()

    outcomes = await asyncio.gather(*(one(name) for name in names))
    for code, line in outcomes:
        if code == ExitCode.OK:
            print(printable(line))
        else:
            _error(line)
    codes = {code for code, _line in outcomes}
    for worst in (ExitCode.UNREACHABLE, ExitCode.FAILED):
        if worst in codes:
            return worst
    return ExitCode.OK


def cmd_sweep(args: argparse.Namespace) -> int:
    from .report import render_text
    from .sweep import sweep_once
    from .telemetry import telemetry

    config, plugins = _load(args)
    _preflight(config)
    _observability(config)
    report = asyncio.run(
        sweep_once(
            config,
            plugins,
            sweep=args.sweep,
            tenant_globs=args.tenant,
            only_globs=args.only,
            dry_run=args.dry_run,
        )
    )
    telemetry().shutdown()  # flush spans and metrics before exiting
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=None)
        sys.stdout.write("\n")
    else:
        print(render_text(report))
    return report.exit_code()


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.tenants, args.rows)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
