"""The plugin manager: bundled plugins, drop-ins, entry points, load errors, clashes, settings.

Nothing here connects to a database except the one test that runs the DESIGN.md example
operation against a real PostgreSQL (a fresh database from the ``pg_dsn`` fixture).
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import structlog
import support
from support import REPO, write_config

import sweeperd
from sweeperd.config import Config, ConfigError, load_config
from sweeperd.plugins import PluginError, Plugins, load_plugins

# The DESIGN.md "Plugin API" example, verbatim.
DESIGN_EXAMPLE = """\
import sweeperd

async def purge(ctx: sweeperd.Context) -> int | None:      # returns rows affected, or None
    cur = await ctx.conn.execute(
        sweeperd.sql.SQL("DELETE FROM {} WHERE done").format(ctx.table("jobs")))
    return cur.rowcount

@sweeperd.hookimpl
def sweeperd_operations(config):
    return [sweeperd.Operation(name="myapp.purge_done_jobs", run=purge, tables=("jobs",))]
"""

DROP_IN_PREFIX = "_sweeperd_plugin_"


# -- helpers ---------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _clean_plugin_modules() -> Iterator[None]:
    """Drop-ins and fake entry-point modules stay in sys.modules; forget them after each test."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith((DROP_IN_PREFIX, "mydist_")):
            del sys.modules[name]
    importlib.invalidate_caches()


def plugin_source(body: str) -> str:
    return textwrap.dedent(body).lstrip()


def write_plugin(directory: Path, name: str, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.py"
    path.write_text(plugin_source(body), encoding="utf-8")
    return path


def op_plugin(*names: str, extra: str = "") -> str:
    """Source of a drop-in contributing no-op tenant operations with the given names."""
    ops = ", ".join(f"sweeperd.Operation(name={n!r}, run=run, tables=('t',))" for n in names)
    return plugin_source(f"""
        import sweeperd

        async def run(ctx):
            return None

        @sweeperd.hookimpl
        def sweeperd_operations(config):
            return [{ops}]
        """) + textwrap.dedent(extra)


def make_config(tmp_path: Path, *, plugin_dirs: list[str] | None = None, extra: str = "") -> Config:
    dirs = ", ".join(support.toml_str(d) for d in (plugin_dirs or []))
    text = f"""
        [daemon]
        plugin_dirs = [{dirs}]

        [databases.main]
        dsn = "postgresql:///nothing_connects"
        """
    path = write_config(tmp_path, textwrap.dedent(text) + textwrap.dedent(extra))
    return load_config(path)


def load_drop_ins(tmp_path: Path, extra: str = "", directory: str = "plugins.d") -> Plugins:
    """Load with the drop-in directory ``tmp_path/plugins.d``, ignoring installed entry points."""
    return load_plugins(
        make_config(tmp_path, plugin_dirs=[directory], extra=extra), entry_points=False
    )


def plugin_problems(tmp_path: Path, extra: str = "") -> list[str]:
    with pytest.raises(PluginError) as excinfo:
        load_drop_ins(tmp_path, extra)
    return excinfo.value.problems


def bundled_module_names() -> set[str]:
    """What the top-level plugins/ directory offers as plugins (modules or packages, no '_')."""
    names: set[str] = set()
    for entry in (REPO / "plugins").iterdir():
        if entry.name.startswith("_"):
            continue
        if entry.is_file() and entry.suffix == ".py":
            names.add(entry.stem)
        elif entry.is_dir() and (entry / "__init__.py").is_file():
            names.add(entry.name)
    return names


def make_distribution(
    root: Path,
    module: str,
    body: str,
    *,
    entry_name: str = "myep",
    dist: str = "mydist",
    version: str = "1.2.3",
) -> None:
    """A minimal installed distribution on ``root`` declaring a ``sweeperd`` entry point."""
    info = root / f"{dist}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8"
    )
    (info / "entry_points.txt").write_text(
        f"[sweeperd]\n{entry_name} = {module}\n", encoding="utf-8"
    )
    (root / f"{module}.py").write_text(plugin_source(body), encoding="utf-8")


# -- bundled plugins -------------------------------------------------------------------------------


def test_bundled_package_is_the_top_level_plugins_directory() -> None:
    package = importlib.import_module("sweeperd.bundled")
    assert [Path(p).resolve() for p in package.__path__] == [(REPO / "plugins").resolve()]


def test_bundled_plugins_are_the_modules_of_the_plugins_directory(tmp_path: Path) -> None:
    plugins = load_plugins(make_config(tmp_path), entry_points=False)
    bundled = {info.name for info in plugins.infos if info.source == "bundled"}
    assert bundled == bundled_module_names()
    for info in plugins.infos:
        if info.source == "bundled":
            assert info.version == sweeperd.__version__
            assert plugins.pm.has_plugin(info.name)
    # Without plugin_dirs and entry points, the bundled plugins are all there is.
    assert all(info.source == "bundled" for info in plugins.infos)
    # Every operation is attributed to a loaded plugin.
    names = {info.name for info in plugins.infos}
    assert {op.plugin for op in plugins.operations.values()} <= names


# -- drop-in plugins -------------------------------------------------------------------------------


def test_drop_in_registers_under_its_file_name(tmp_path: Path) -> None:
    path = write_plugin(tmp_path / "plugins.d", "nap", op_plugin("nap.sleep"))
    plugins = load_drop_ins(tmp_path)
    infos = {info.name: info for info in plugins.infos}
    assert "nap" in infos
    assert Path(infos["nap"].source).resolve() == path.resolve()
    assert plugins.pm.has_plugin("nap")
    op = plugins.operations["nap.sleep"]
    assert op.plugin == "nap"
    assert op.tables == ("t",)
    assert op.scope == "tenant"
    assert [o.name for o in plugins.by_plugin()["nap"]] == ["nap.sleep"]


def test_drop_in_version_comes_from_dunder_version(tmp_path: Path) -> None:
    write_plugin(
        tmp_path / "plugins.d", "versioned", op_plugin("versioned.x", extra="__version__ = '4.5'\n")
    )
    write_plugin(tmp_path / "plugins.d", "unversioned", op_plugin("unversioned.x"))
    infos = {info.name: info for info in load_drop_ins(tmp_path).infos}
    assert infos["versioned"].version == "4.5"
    assert infos["unversioned"].version is None


def test_design_md_example_loads_unchanged(tmp_path: Path) -> None:
    (tmp_path / "plugins.d").mkdir()
    (tmp_path / "plugins.d" / "myapp.py").write_text(DESIGN_EXAMPLE, encoding="utf-8")
    plugins = load_drop_ins(tmp_path)
    op = plugins.operations["myapp.purge_done_jobs"]
    assert op.plugin == "myapp"
    assert op.tables == ("jobs",)
    assert op.scope == "tenant"
    assert asyncio.iscoroutinefunction(op.run)


def test_design_md_example_purges_done_jobs_in_the_tenant_schema(
    tmp_path: Path, pg_dsn: str
) -> None:
    """The example operation really runs: it deletes in the tenant's schema, and only there."""
    (tmp_path / "plugins.d").mkdir()
    (tmp_path / "plugins.d" / "myapp.py").write_text(DESIGN_EXAMPLE, encoding="utf-8")
    op = load_drop_ins(tmp_path).operations["myapp.purge_done_jobs"]
    support.run_sql(
        pg_dsn,
        'CREATE SCHEMA "tenant a"',
        'CREATE TABLE "tenant a".jobs (id int, done bool)',
        'INSERT INTO "tenant a".jobs VALUES (1, true), (2, false), (3, true)',
        "CREATE SCHEMA other",
        "CREATE TABLE other.jobs (id int, done bool)",
        "INSERT INTO other.jobs VALUES (1, true)",
    )

    async def run() -> int | None:
        conn = await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True)
        async with conn:
            ctx = sweeperd.Context(
                conn=conn,
                operation=op,
                tenant=sweeperd.Tenant(name="a", database="main", schema="tenant a"),
                database="main",
                dry_run=False,
                settings={},
                log=structlog.get_logger(),
            )
            return await op.run(ctx)

    assert asyncio.run(run()) == 2
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute('SELECT id FROM "tenant a".jobs').fetchall() == [(2,)]
        assert conn.execute("SELECT count(*) FROM other.jobs").fetchone() == (1,)


def test_per_plugin_settings(tmp_path: Path) -> None:
    body = """
        import sweeperd

        async def run(ctx):
            return None

        @sweeperd.hookimpl
        def sweeperd_operations(settings):
            label = settings.get("label", "<none>")
            return [sweeperd.Operation(name=__name__.removeprefix("_sweeperd_plugin_") + ".op",
                                       run=run, description=label)]
        """
    for name in ("alpha", "beta", "gamma"):
        write_plugin(tmp_path / "plugins.d", name, body)
    plugins = load_drop_ins(
        tmp_path,
        extra="""
        [plugins.alpha]
        label = "A"

        [plugins.beta]
        label = "B"
        """,
    )
    assert plugins.operations["alpha.op"].description == "A"
    assert plugins.operations["beta.op"].description == "B"
    assert plugins.operations["gamma.op"].description == "<none>"


def test_hook_receives_config_and_settings_by_name(tmp_path: Path) -> None:
    write_plugin(
        tmp_path / "plugins.d",
        "both",
        """
        import sweeperd
        from sweeperd.config import Config

        async def run(ctx):
            return None

        @sweeperd.hookimpl
        def sweeperd_operations(config, settings):
            assert isinstance(config, Config)
            return [sweeperd.Operation(name="both.op", run=run,
                                       description=f"{settings['n']} {sorted(config.databases)}")]
        """,
    )
    plugins = load_drop_ins(
        tmp_path,
        extra="""
        [plugins.both]
        n = 7
        """,
    )
    assert plugins.operations["both.op"].description == "7 ['main']"


def test_files_starting_with_underscore_are_ignored(tmp_path: Path) -> None:
    write_plugin(tmp_path / "plugins.d", "_helper", "raise RuntimeError('must not be imported')\n")
    write_plugin(tmp_path / "plugins.d", "_private", op_plugin("private.op"))
    write_plugin(tmp_path / "plugins.d", "visible", op_plugin("visible.op"))
    (tmp_path / "plugins.d" / "notes.txt").write_text("not python", encoding="utf-8")
    plugins = load_drop_ins(tmp_path)
    names = {info.name for info in plugins.infos}
    assert "visible" in names
    assert not {"_helper", "_private", "notes"} & names
    assert "private.op" not in plugins.operations
    assert f"{DROP_IN_PREFIX}_helper" not in sys.modules


def test_relative_plugin_dir_is_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    write_plugin(conf_dir / "plugins.d", "reldir", op_plugin("reldir.op"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    plugins = load_drop_ins(conf_dir)
    assert "reldir.op" in plugins.operations


def test_several_plugin_dirs(tmp_path: Path) -> None:
    write_plugin(tmp_path / "one", "first", op_plugin("first.op"))
    write_plugin(tmp_path / "two", "second", op_plugin("second.op"))
    config = make_config(tmp_path, plugin_dirs=["one", str(tmp_path / "two")])
    plugins = load_plugins(config, entry_points=False)
    assert {"first.op", "second.op"} <= set(plugins.operations)


def test_missing_plugin_dir_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    config = make_config(tmp_path, plugin_dirs=[str(missing)])
    with pytest.raises(PluginError) as excinfo:
        load_plugins(config, entry_points=False)
    assert len(excinfo.value.problems) == 1
    assert str(missing) in excinfo.value.problems[0]


def test_plugin_dir_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("", encoding="utf-8")
    config = make_config(tmp_path, plugin_dirs=["afile"])
    with pytest.raises(PluginError) as excinfo:
        load_plugins(config, entry_points=False)
    assert "afile" in excinfo.value.problems[0]


def test_same_plugin_name_in_two_dirs_is_an_error_naming_both(tmp_path: Path) -> None:
    first = write_plugin(tmp_path / "one", "twin", op_plugin("twin.a"))
    second = write_plugin(tmp_path / "two", "twin", op_plugin("twin.b"))
    config = make_config(tmp_path, plugin_dirs=["one", "two"])
    with pytest.raises(PluginError) as excinfo:
        load_plugins(config, entry_points=False)
    [problem] = excinfo.value.problems
    assert "'twin'" in problem
    assert str(first.parent) in problem
    assert str(second.parent) in problem


def test_drop_in_named_like_a_stdlib_module_does_not_shadow_it(tmp_path: Path) -> None:
    write_plugin(tmp_path / "plugins.d", "json", op_plugin("json.op"))
    import json

    plugins = load_drop_ins(tmp_path)
    assert "json.op" in plugins.operations
    assert sys.modules["json"] is json
    assert f"{DROP_IN_PREFIX}json" in sys.modules


def test_loading_twice_builds_independent_managers(tmp_path: Path) -> None:
    """A reload builds a fresh manager: loading again must not clash with the previous load."""
    write_plugin(tmp_path / "plugins.d", "again", op_plugin("again.op"))
    first = load_drop_ins(tmp_path)
    second = load_drop_ins(tmp_path)
    assert first.pm is not second.pm
    assert "again.op" in first.operations and "again.op" in second.operations


# -- entry points ----------------------------------------------------------------------------------


def test_entry_point_plugin_loads_with_distribution_and_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_distribution(tmp_path, "mydist_plugin", op_plugin("myep.clean"))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    plugins = load_plugins(make_config(tmp_path))
    infos = {info.name: info for info in plugins.infos}
    assert "myep" in infos
    assert "mydist" in infos["myep"].source
    assert infos["myep"].source.startswith("entry point")
    assert infos["myep"].version == "1.2.3"
    assert plugins.operations["myep.clean"].plugin == "myep"


def test_entry_points_can_be_disabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_distribution(tmp_path, "mydist_off", op_plugin("myep.off"))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    plugins = load_plugins(make_config(tmp_path), entry_points=False)
    assert "myep" not in {info.name for info in plugins.infos}
    assert "myep.off" not in plugins.operations


def test_broken_entry_point_is_reported_with_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_distribution(
        tmp_path, "mydist_broken", "import mydist_nonexistent_dependency\n", entry_name="brokenep"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    with pytest.raises(PluginError) as excinfo:
        load_plugins(make_config(tmp_path))
    [problem] = excinfo.value.problems
    assert "brokenep" in problem
    assert "mydist" in problem
    assert "ModuleNotFoundError" in problem
    assert "mydist_nonexistent_dependency" in problem


def test_entry_point_and_drop_in_with_the_same_name_clash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_distribution(tmp_path, "mydist_dup", op_plugin("dup.a"), entry_name="dup")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    drop_in = write_plugin(tmp_path / "plugins.d", "dup", op_plugin("dup.b"))
    with pytest.raises(PluginError) as excinfo:
        load_plugins(make_config(tmp_path, plugin_dirs=["plugins.d"]))
    [problem] = excinfo.value.problems
    assert "'dup'" in problem
    assert "mydist" in problem
    assert str(drop_in) in problem


# -- load errors -----------------------------------------------------------------------------------


def test_import_error_names_plugin_and_cause(tmp_path: Path) -> None:
    write_plugin(tmp_path / "plugins.d", "needsdep", "import sweeperd_no_such_module_xyz\n")
    [problem] = plugin_problems(tmp_path)
    assert "'needsdep'" in problem
    assert "ModuleNotFoundError: No module named 'sweeperd_no_such_module_xyz'" in problem
    # A failed import leaves no half-initialised module behind.
    assert f"{DROP_IN_PREFIX}needsdep" not in sys.modules


def test_syntax_error_names_plugin_and_cause(tmp_path: Path) -> None:
    write_plugin(tmp_path / "plugins.d", "badsyntax", "def broken(:\n    pass\n")
    [problem] = plugin_problems(tmp_path)
    assert "'badsyntax'" in problem
    assert "SyntaxError" in problem
    assert "badsyntax.py" in problem


def test_exception_at_import_names_plugin_and_cause(tmp_path: Path) -> None:
    write_plugin(
        tmp_path / "plugins.d",
        "explodes",
        """
        import sweeperd

        raise RuntimeError("kaboom at import")
        """,
    )
    [problem] = plugin_problems(tmp_path)
    assert "'explodes'" in problem
    assert "RuntimeError: kaboom at import" in problem


def test_several_broken_plugins_are_all_reported_at_once(tmp_path: Path) -> None:
    write_plugin(tmp_path / "plugins.d", "broken_a", "import sweeperd_no_such_module_a\n")
    write_plugin(tmp_path / "plugins.d", "broken_b", "x = (\n")
    write_plugin(tmp_path / "plugins.d", "broken_c", "raise ValueError('bad c')\n")
    write_plugin(tmp_path / "plugins.d", "fine", op_plugin("fine.op"))
    problems = plugin_problems(tmp_path)
    assert len(problems) == 3
    joined = "\n".join(problems)
    for name in ("broken_a", "broken_b", "broken_c"):
        assert f"'{name}'" in joined
    assert "'fine'" not in joined
    assert "ModuleNotFoundError" in joined
    assert "SyntaxError" in joined
    assert "ValueError: bad c" in joined


def test_load_errors_of_all_sources_reported_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_distribution(
        tmp_path, "mydist_broken2", "raise ImportError('ep is broken')\n", entry_name="brokenep2"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    write_plugin(tmp_path / "plugins.d", "brokendrop", "raise OSError('drop-in is broken')\n")
    with pytest.raises(PluginError) as excinfo:
        load_plugins(make_config(tmp_path, plugin_dirs=["plugins.d", "missing.d"]))
    joined = "\n".join(excinfo.value.problems)
    assert len(excinfo.value.problems) == 3
    assert "'brokenep2'" in joined and "ImportError: ep is broken" in joined
    assert "'brokendrop'" in joined and "OSError: drop-in is broken" in joined
    assert "missing.d" in joined


def test_multi_line_exception_message_stays_one_problem_line(tmp_path: Path) -> None:
    """Contract: one line per problem. Exception messages can span lines (psycopg errors,
    ImportErrors of C extensions); the problem must still be one line."""
    write_plugin(
        tmp_path / "plugins.d", "multiline", "raise RuntimeError('first line\\nsecond line')\n"
    )
    [problem] = plugin_problems(tmp_path)
    assert "'multiline'" in problem
    assert "first line" in problem and "second line" in problem
    assert "\n" not in problem


# -- misspelled hooks ------------------------------------------------------------------------------


def test_misspelled_hook_fails_naming_the_plugin(tmp_path: Path) -> None:
    write_plugin(
        tmp_path / "plugins.d",
        "typo",
        """
        import sweeperd

        @sweeperd.hookimpl
        def sweeperd_operation(config):
            return []
        """,
    )
    [problem] = plugin_problems(tmp_path)
    assert "'typo'" in problem
    assert "sweeperd_operation" in problem


def test_misspelled_hook_reported_together_with_load_errors(tmp_path: Path) -> None:
    write_plugin(
        tmp_path / "plugins.d",
        "typo2",
        """
        import sweeperd

        @sweeperd.hookimpl
        def sweeperd_validate_setting(settings):
            return []
        """,
    )
    write_plugin(tmp_path / "plugins.d", "wontload", "import sweeperd_no_such_module_w\n")
    problems = plugin_problems(tmp_path)
    joined = "\n".join(problems)
    assert len(problems) == 2
    assert "'typo2'" in joined and "sweeperd_validate_setting" in joined
    assert "'wontload'" in joined


def test_every_misspelled_hook_is_reported_at_once(tmp_path: Path) -> None:
    for name in ("typo_a", "typo_b"):
        write_plugin(
            tmp_path / "plugins.d",
            name,
            """
            import sweeperd

            @sweeperd.hookimpl
            def sweeperd_operation(config):
                return []
            """,
        )
    problems = plugin_problems(tmp_path)
    joined = "\n".join(problems)
    assert "'typo_a'" in joined
    assert "'typo_b'" in joined


def test_hookimpl_with_unknown_argument_is_an_error(tmp_path: Path) -> None:
    write_plugin(
        tmp_path / "plugins.d",
        "badarg",
        """
        import sweeperd

        @sweeperd.hookimpl
        def sweeperd_operations(settings, tenant):
            return []
        """,
    )
    [problem] = plugin_problems(tmp_path)
    assert "'badarg'" in problem
    assert "tenant" in problem


# -- operations: clashes, bad returns, raising hooks, Operation validation ------------------------


def test_same_operation_name_from_two_plugins_names_both(tmp_path: Path) -> None:
    write_plugin(tmp_path / "plugins.d", "owner_one", op_plugin("shared.op"))
    write_plugin(tmp_path / "plugins.d", "owner_two", op_plugin("shared.op"))
    [problem] = plugin_problems(tmp_path)
    assert "'shared.op'" in problem
    assert "'owner_one'" in problem
    assert "'owner_two'" in problem


def test_non_operation_returned_is_an_error(tmp_path: Path) -> None:
    write_plugin(
        tmp_path / "plugins.d",
        "wrongtype",
        """
        import sweeperd

        @sweeperd.hookimpl
        def sweeperd_operations():
            return [{"name": "wrongtype.op"}]
        """,
    )
    [problem] = plugin_problems(tmp_path)
    assert ": plugins.wrongtype: sweeperd_operations returned {'name': 'wrongtype.op'}" in problem
    assert "expected sweeperd.Operation" in problem


def test_single_operation_instead_of_a_list_is_an_error(tmp_path: Path) -> None:
    write_plugin(
        tmp_path / "plugins.d",
        "notalist",
        """
        import sweeperd

        async def run(ctx):
            return None

        @sweeperd.hookimpl
        def sweeperd_operations():
            return sweeperd.Operation(name="notalist.op", run=run)
        """,
    )
    [problem] = plugin_problems(tmp_path)
    assert ": plugins.notalist: sweeperd_operations must return a list" in problem


def test_returning_none_contributes_nothing(tmp_path: Path) -> None:
    write_plugin(
        tmp_path / "plugins.d",
        "quiet",
        """
        import sweeperd

        @sweeperd.hookimpl
        def sweeperd_operations():
            return None
        """,
    )
    plugins = load_drop_ins(tmp_path)
    assert "quiet" in {info.name for info in plugins.infos}
    assert plugins.by_plugin()["quiet"] == []


def test_raising_operations_hook_names_the_plugin(tmp_path: Path) -> None:
    write_plugin(
        tmp_path / "plugins.d",
        "raiser",
        """
        import sweeperd

        @sweeperd.hookimpl
        def sweeperd_operations(settings):
            raise KeyError("rules")
        """,
    )
    write_plugin(
        tmp_path / "plugins.d",
        "raiser2",
        """
        import sweeperd

        @sweeperd.hookimpl
        def sweeperd_operations(settings):
            return [sweeperd.Operation(name="raiser2", run=None)]
        """,
    )
    config = make_config(tmp_path, plugin_dirs=["plugins.d"])
    with pytest.raises(PluginError) as excinfo:
        load_plugins(config, entry_points=False)
    [raised] = [p for p in excinfo.value.problems if ": plugins.raiser: " in p]
    [invalid] = [p for p in excinfo.value.problems if ": plugins.raiser2: " in p]
    assert len(excinfo.value.problems) == 2
    assert raised.startswith(
        f"{config.path}: plugins.raiser: sweeperd_operations raised KeyError: 'rules' ["
    )
    assert raised.endswith(f"{tmp_path / 'plugins.d' / 'raiser.py'}:5]")
    # An invalid Operation built inside the hook names the plugin and the plugin's own line,
    # not the line of sweeperd/model.py that rejected it.
    assert invalid.startswith(
        f"{config.path}: plugins.raiser2: sweeperd_operations built an invalid operation: "
        "operation name 'raiser2' must look like '<plugin>.<what>'"
    )
    assert invalid.endswith(f"{tmp_path / 'plugins.d' / 'raiser2.py'}:5]")
    assert "model.py" not in invalid
    assert "Traceback" not in raised + invalid


def test_raising_validate_settings_hook_names_the_plugin(tmp_path: Path) -> None:
    write_plugin(
        tmp_path / "plugins.d",
        "vraiser",
        """
        import sweeperd

        @sweeperd.hookimpl
        def sweeperd_validate_settings(settings):
            raise TypeError("validator bug")
        """,
    )
    with pytest.raises((ConfigError, PluginError)) as excinfo:
        load_drop_ins(tmp_path)
    [problem] = excinfo.value.problems
    assert ": plugins.vraiser: sweeperd_validate_settings raised TypeError: validator bug [" in (
        problem
    )


async def _noop(ctx: sweeperd.Context) -> int | None:
    return None


@pytest.mark.parametrize("name", ["purge", "", ".purge", "myapp.", "my app.purge", "myapp.a b"])
def test_operation_rejects_bad_names(name: str) -> None:
    with pytest.raises(ValueError, match="name"):
        sweeperd.Operation(name=name, run=_noop)


def test_invalid_operation_from_a_helper_points_at_the_plugin_line(tmp_path: Path) -> None:
    """Built through sweeperd.model.operation_name, or in a helper function of the plugin: the
    location is still the plugin's innermost line, never sweeperd's own."""
    write_plugin(
        tmp_path / "plugins.d",
        "helper",
        """
        import sweeperd
        from sweeperd.model import operation_name

        def build(table):
            return sweeperd.Operation(name=operation_name("bad plugin", table), run=None)

        @sweeperd.hookimpl
        def sweeperd_operations(settings):
            return [build(t) for t in settings.get("tables", ["x"])]
        """,
    )
    [problem] = plugin_problems(tmp_path)
    assert ": plugins.helper: sweeperd_operations built an invalid operation: plugin name " in (
        problem
    )
    assert problem.endswith(f"{tmp_path / 'plugins.d' / 'helper.py'}:5]")


def test_same_operation_twice_from_one_plugin_names_the_plugin_once(tmp_path: Path) -> None:
    write_plugin(tmp_path / "plugins.d", "twice", op_plugin("twice.op", "twice.op"))
    [problem] = plugin_problems(tmp_path)
    assert problem.endswith(
        ": plugins.twice: sweeperd_operations returned operation 'twice.op' twice"
    )


@pytest.mark.parametrize(
    "returned", ["'rules: expected a list'", "{'rules': 'expected a list'}", "[('rules',)]", "42"]
)
def test_malformed_validate_settings_result_is_a_problem_not_a_traceback(
    tmp_path: Path, returned: str
) -> None:
    write_plugin(
        tmp_path / "plugins.d",
        "sloppy",
        f"""
        import sweeperd

        @sweeperd.hookimpl
        def sweeperd_validate_settings(settings):
            return {returned}
        """,
    )
    with pytest.raises(ConfigError) as excinfo:
        load_drop_ins(tmp_path)
    [problem] = excinfo.value.problems
    assert ": plugins.sloppy: sweeperd_validate_settings returned " in problem
    assert problem.endswith("expected a list of (key, expectation) pairs")


def test_settings_key_with_a_line_break_stays_one_problem_line(tmp_path: Path) -> None:
    write_plugin(
        tmp_path / "plugins.d",
        "picky",
        """
        import sweeperd

        @sweeperd.hookimpl
        def sweeperd_validate_settings(settings):
            return [(key, "unknown key\\nreally") for key in settings]
        """,
    )
    with pytest.raises(ConfigError) as excinfo:
        load_drop_ins(tmp_path, extra='[plugins.picky]\n"two\\nlines" = 1\n')
    [problem] = excinfo.value.problems
    assert problem.endswith(": plugins.picky.two\\nlines: unknown key really")


def test_operation_rejects_unknown_scope() -> None:
    with pytest.raises(ValueError, match="scope"):
        sweeperd.Operation(name="x.y", run=_noop, scope="cluster")  # type: ignore[arg-type]


def test_database_scope_needs_qualified_tables() -> None:
    with pytest.raises(ValueError, match="schema-qualified"):
        sweeperd.Operation(name="x.y", run=_noop, tables=("sessions",), scope="database")
    ok = sweeperd.Operation(
        name="x.y", run=_noop, tables=("public.sessions", sweeperd.ALL_TABLES), scope="database"
    )
    assert ok.tables == ("public.sessions", "*")


def test_operation_tables_normalised_to_a_tuple() -> None:
    assert sweeperd.Operation(name="x.y", run=_noop, tables="jobs").tables == ("jobs",)
    assert sweeperd.Operation(name="x.y", run=_noop, tables=["a", "b"]).tables == ("a", "b")  # type: ignore[arg-type]


# -- settings validation ---------------------------------------------------------------------------


def test_settings_for_an_unknown_plugin_are_a_config_error(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        extra="""
        [plugins.unknown]
        x = 1
        """,
    )
    with pytest.raises(ConfigError) as excinfo:
        load_plugins(config, entry_points=False)
    [problem] = excinfo.value.problems
    assert "plugins.unknown" in problem
    assert str(config.path) in problem


def test_validate_settings_problems_name_the_full_key(tmp_path: Path) -> None:
    write_plugin(
        tmp_path / "plugins.d",
        "strict",
        """
        import sweeperd

        @sweeperd.hookimpl
        def sweeperd_validate_settings(settings):
            if not isinstance(settings["rules"][0].get("table"), str):
                return [("rules[0].table", "expected a string")]
            return []

        @sweeperd.hookimpl
        def sweeperd_operations(settings):
            raise AssertionError("must not be called when validation failed")
        """,
    )
    config_extra = """
        [[plugins.strict.rules]]
        table = 42
        """
    with pytest.raises(ConfigError) as excinfo:
        load_drop_ins(tmp_path, extra=config_extra)
    [problem] = excinfo.value.problems
    assert "plugins.strict.rules[0].table" in problem
    assert "expected a string" in problem
    assert "sweeperd.toml" in problem


def test_validate_settings_gets_own_settings_and_all_problems_reported(tmp_path: Path) -> None:
    body = """
        import sweeperd

        @sweeperd.hookimpl
        def sweeperd_validate_settings(settings):
            return [(f"{key}", "expected nothing") for key in sorted(settings)]
        """
    write_plugin(tmp_path / "plugins.d", "v_one", body)
    write_plugin(tmp_path / "plugins.d", "v_two", body)
    with pytest.raises(ConfigError) as excinfo:
        load_drop_ins(
            tmp_path,
            extra="""
            [plugins.v_one]
            a = 1

            [plugins.v_two]
            b = 2

            [plugins.nobody]
            c = 3
            """,
        )
    problems = excinfo.value.problems
    assert len(problems) == 3
    joined = "\n".join(problems)
    assert "plugins.v_one.a: expected nothing" in joined
    assert "plugins.v_two.b: expected nothing" in joined
    assert "plugins.nobody" in joined
    assert "plugins.v_one.b" not in joined and "plugins.v_two.a" not in joined


def test_valid_settings_pass(tmp_path: Path) -> None:
    write_plugin(
        tmp_path / "plugins.d",
        "lenient",
        """
        import sweeperd

        @sweeperd.hookimpl
        def sweeperd_validate_settings(settings):
            return [] if settings.get("ok") else [("ok", "expected true")]
        """,
    )
    plugins = load_drop_ins(
        tmp_path,
        extra="""
        [plugins.lenient]
        ok = true
        """,
    )
    assert "lenient" in {info.name for info in plugins.infos}


# -- the CLI ---------------------------------------------------------------------------------------


def test_cli_plugins_lists_plugins_sources_and_operations(tmp_path: Path) -> None:
    nap = write_plugin(tmp_path / "plugins.d", "nap", op_plugin("nap.sleep", "nap.snore"))
    (tmp_path / "plugins.d" / "myapp.py").write_text(DESIGN_EXAMPLE, encoding="utf-8")
    write_plugin(
        tmp_path / "plugins.d",
        "empty",
        """
        import sweeperd

        @sweeperd.hookimpl
        def sweeperd_operations():
            return []
        """,
    )
    path = write_config(
        tmp_path,
        """
        [daemon]
        plugin_dirs = ["plugins.d"]

        [databases.main]
        dsn = "postgresql:///nothing_connects"
        """,
    )
    proc = support.run_cli("plugins", "-c", str(path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    lines = out.splitlines()

    def block(plugin: str) -> list[str]:
        start = next(
            i
            for i, line in enumerate(lines)
            if line.startswith(f"{plugin} ") or line.startswith(f"{plugin}\t") or line == plugin
        )
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()),
            len(lines),
        )
        return lines[start:end]

    nap_block = block("nap")
    assert "nap.py" in nap_block[0] and str(nap.parent.name) in nap_block[0]
    assert any("nap.sleep" in line for line in nap_block[1:])
    assert any("nap.snore" in line for line in nap_block[1:])
    myapp_block = block("myapp")
    assert "myapp.py" in myapp_block[0]
    assert any("myapp.purge_done_jobs" in line and "jobs" in line for line in myapp_block[1:])
    assert len(block("empty")) >= 1
    for name in bundled_module_names():
        assert "bundled" in block(name)[0]
    assert "Traceback" not in proc.stderr


def test_cli_plugins_with_broken_plugins_exits_2_one_line_per_problem(tmp_path: Path) -> None:
    write_plugin(tmp_path / "plugins.d", "cli_broken_a", "import sweeperd_no_such_module_cli\n")
    write_plugin(tmp_path / "plugins.d", "cli_broken_b", "def f(:\n")
    write_plugin(tmp_path / "plugins.d", "cli_fine", op_plugin("cli_fine.op"))
    path = write_config(
        tmp_path,
        """
        [daemon]
        plugin_dirs = ["plugins.d"]

        [databases.main]
        dsn = "postgresql:///nothing_connects"
        """,
    )
    proc = support.run_cli("plugins", "-c", str(path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr
    assert any(
        "cli_broken_a" in line
        and "ModuleNotFoundError" in line
        and "sweeperd_no_such_module_cli" in line
        for line in lines
    )
    assert any("cli_broken_b" in line and "SyntaxError" in line for line in lines)
    assert proc.stdout == ""


def test_cli_plugins_with_unknown_settings_table_exits_2(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        [databases.main]
        dsn = "postgresql:///nothing_connects"

        [plugins.unknown]
        x = 1
        """,
    )
    proc = support.run_cli("plugins", "-c", str(path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "plugins.unknown" in line


def test_cli_plugins_with_missing_plugin_dir_exits_2(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        [daemon]
        plugin_dirs = ["gone.d"]

        [databases.main]
        dsn = "postgresql:///nothing_connects"
        """,
    )
    proc = support.run_cli("plugins", "-c", str(path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "gone.d" in line


def test_cli_plugins_with_raising_operations_hook_exits_2_naming_the_plugin_key(
    tmp_path: Path,
) -> None:
    write_plugin(
        tmp_path / "plugins.d",
        "cli_raiser",
        """
        import sweeperd

        @sweeperd.hookimpl
        def sweeperd_operations(settings):
            raise RuntimeError("first line\\nsecond line")
        """,
    )
    write_plugin(
        tmp_path / "plugins.d",
        "cli_invalid",
        """
        import sweeperd

        @sweeperd.hookimpl
        def sweeperd_operations(settings):
            return [sweeperd.Operation(name="cli_invalid.a\\tb", run=None)]
        """,
    )
    path = write_config(
        tmp_path,
        """
        [daemon]
        plugin_dirs = ["plugins.d"]

        [databases.main]
        dsn = "postgresql:///nothing_connects"
        """,
    )
    proc = support.run_cli("plugins", "-c", str(path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = sorted(proc.stderr.strip().splitlines())
    assert len(lines) == 2, proc.stderr
    invalid, raised = lines
    assert invalid.startswith(f"sweeperd: {path}: plugins.cli_invalid: sweeperd_operations built")
    assert "'cli_invalid.a\\tb'" in invalid  # the tab shown escaped, on the same line
    assert "model.py" not in invalid
    assert raised.startswith(
        f"sweeperd: {path}: plugins.cli_raiser: sweeperd_operations raised RuntimeError: "
        "first line second line ["
    )
    assert proc.stdout == ""
