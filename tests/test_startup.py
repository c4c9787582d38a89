"""One start-up path for check-config, run, sweep and reload: what fails at a firing fails here.

A plan error (operations that wait for each other in a cycle) used to pass check-config and then
fail every firing at run time ("sweep failed before running"). The rehearsal builds every
sweep's plan, with stand-ins for discovered tenants that each sweep's tenant globs select.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support import install_plugin, run_cli, write_config

from sweeperd.config import ConfigError
from sweeperd.startup import prepare


@pytest.mark.parametrize("tenants", ["static", "discovered"])
def test_a_plan_that_cannot_be_built_is_a_config_error(tmp_path: Path, tenants: str) -> None:
    (tmp_path / "plugins.d").mkdir()
    install_plugin(tmp_path / "plugins.d", "loop.py")
    who = (
        '[[tenants]]\nname = "acme1"\ndatabase = "main"\nschema = "tenant_acme1"\n'
        if tenants == "static"
        else '[[tenant_sources]]\ndatabase = "main"\nschemas = "tenant_%"\n'
    )
    path = write_config(
        tmp_path,
        f"""
        [daemon]
        plugin_dirs = ["plugins.d"]
        [databases.main]
        dsn = "host=/nonexistent dbname=app"
        {who}
        [sweeps.nightly]
        cron = "0 3 * * *"
        operations = ["loop.*"]
        tenants = ["acme*"]
        """,
    )
    with pytest.raises(ConfigError) as info:
        prepare(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}: sweeps") and "cycle" in problem, problem
    result = run_cli("check-config", "-c", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"sweeperd: {problem}"
