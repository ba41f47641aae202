"""``orchester serve``'s flags are :class:`OrchestratorConfig`'s fields (one table), and the command
line's modules form no import cycle."""

from __future__ import annotations

import ast
import dataclasses
import signal
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from orchester.cli.common import field_default
from orchester.cli.main import main
from orchester.cli.serve import serve
from orchester.config import NOT_FLAGS, OrchestratorConfig, field_flags

FIELDS = {f.name: f for f in dataclasses.fields(OrchestratorConfig)}
HINTS = typing.get_type_hints(OrchestratorConfig)
#: The click parameter type a field's value type becomes (``str`` may also be a choice or a path).
PARAM_TYPES: dict[Any, tuple[type[click.ParamType], ...]] = {
    int: (click.types.IntParamType,), float: (click.types.FloatParamType,), bool: (click.types.BoolParamType,),
    str: (click.types.StringParamType, click.Choice, click.Path)}


def _value_type(hint: Any) -> tuple[Any, bool]:
    """(the type of one value, whether the field is a list) of a field annotated ``hint``."""
    if isinstance(hint, types.UnionType):
        (hint,) = [k for k in typing.get_args(hint) if k is not type(None)]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def test_every_serve_option_is_a_config_field_with_its_default_and_type() -> None:
    options = [p for p in serve.params if isinstance(p, click.Option)]
    assert len(options) == len(serve.params) > 40
    for option in options:
        assert option.name in FIELDS, f"{option.opts} is no field of OrchestratorConfig"
        default = field_default(FIELDS[option.name])
        kind, is_list = _value_type(HINTS[option.name])
        assert option.multiple == is_list, option.opts
        assert isinstance(option.type, PARAM_TYPES[kind]), (option.opts, option.type)
        if option.flag_value is not None and not option.is_bool_flag:  # --primary/--backup: set ha to a value
            assert isinstance(option.flag_value, kind) and option.default in (default, click.core.UNSET)
            continue
        assert option.is_bool_flag == (kind is bool), option.opts
        assert option.default == (tuple(default) if is_list else default), option.opts
    assert [p.name for p in options if p.name == "ha"] == ["ha", "ha"]  # the one field with two flags


def test_every_config_field_is_a_serve_flag_or_deliberately_not_one() -> None:
    flags = {p.name for p in serve.params}
    for name, f in FIELDS.items():
        assert (name in flags) != (name in NOT_FLAGS), f"{name}: a flag, or on NOT_FLAGS with a reason (not both)"
        assert bool(field_flags(f)) == (name in flags)
    assert set(NOT_FLAGS) <= set(FIELDS) and all(reason.strip() for reason in NOT_FLAGS.values())


def test_serve_options_follow_the_order_of_the_fields() -> None:
    order = list(dict.fromkeys(p.name for p in serve.params))
    assert order == [name for name in FIELDS if name not in NOT_FLAGS]


class _FakeBroker:
    """Records the config ``serve`` built, and runs nothing."""

    configs: list[OrchestratorConfig] = []
    exit_code = 0

    def __init__(self, config: OrchestratorConfig) -> None:
        self.configs.append(config)

    def run(self) -> None:
        """Return at once."""


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[OrchestratorConfig]:
    """The configs ``orchester serve`` would run, with no broker started and no signal handler installed."""
    import orchester.server.broker

    monkeypatch.setattr(orchester.server.broker, "Broker", _FakeBroker)
    monkeypatch.setattr(signal, "signal", lambda *_: None)
    _FakeBroker.configs = []
    return _FakeBroker.configs


def test_flags_a_config_table_and_the_environment_reach_the_config(served: list[OrchestratorConfig],
                                                                    tmp_path: Path) -> None:
    config = tmp_path / "bus.toml"
    config.write_text('[serve]\nliveness = 5\nmax-queue = 7\nstrategies = ["mylab.routing:A"]\n')
    r = CliRunner().invoke(main, ["--config", str(config), "serve", "--bind", "tcp://127.0.0.1:7001",
                                  "--bind", "tcp://127.0.0.1:7002", "--durability", "batch", "--max-queue", "9"],
                           env={"ORCHESTER_SERVE_RETRIES": "4"})
    assert r.exit_code == 0, r.output
    (cfg,) = served
    assert cfg.bind == ["tcp://127.0.0.1:7001", "tcp://127.0.0.1:7002"] and cfg.pub == ["tcp://127.0.0.1:5556"]
    assert (cfg.liveness, cfg.max_queue, cfg.retries, cfg.durability) == (5, 9, 4, "batch")
    assert cfg.strategies == ["mylab.routing:A"] and cfg.satellite_bind == [] and cfg.ha is None
    defaults = OrchestratorConfig()
    untouched = set(FIELDS) - {"bind", "liveness", "max_queue", "retries", "durability", "strategies"}
    assert {n: getattr(cfg, n) for n in untouched} == {n: getattr(defaults, n) for n in untouched}


def test_the_binary_star_switches_set_one_field(served: list[OrchestratorConfig]) -> None:
    for switch in ("primary", "backup"):
        r = CliRunner().invoke(main, ["serve", f"--{switch}", "--state-bind", "tcp://127.0.0.1:7003",
                                      "--peer", "tcp://127.0.0.1:7004", "--replication", "async"])
        assert r.exit_code == 0, r.output
        assert (served[-1].ha, served[-1].replication) == (switch, "async")


@pytest.mark.parametrize(("args", "complaint"), [
    (["--liveness", "0"], "error: liveness must be a positive integer, not 0"),
    (["--spill-bytes", "10"], "error: spilling queued payloads to disk needs a journal"),
    (["--primary"], "error: a binary-star server needs --state-bind"),
    (["--durability", "never"], "error: Invalid value for '--durability': 'never' is not one of"),
    (["--max-queue", "many"], "error: Invalid value for '--max-queue': 'many' is not a valid integer"),
])
def test_a_bad_serve_setting_is_one_line_and_exit_2(served: list[OrchestratorConfig], args: list[str],
                                                    complaint: str) -> None:
    r = CliRunner().invoke(main, ["serve", *args])
    assert r.exit_code == 2 and r.output.startswith(complaint) and r.output.count("\n") == 1, r.output
    assert served == []


def test_an_unknown_serve_setting_in_a_config_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "bus.toml"
    config.write_text("[serve]\nbatch = 64\n")  # a field, but deliberately no flag
    r = CliRunner().invoke(main, ["--config", str(config), "serve"])
    assert r.exit_code == 2 and "[serve] has unknown setting 'batch'" in r.output, r.output


# -- the modules of the command line ----------------------------------------------------------------------

CLI = Path(__file__).resolve().parents[1] / "orchester" / "cli"


def _cli_imports(path: Path) -> set[str]:
    """The ``orchester.cli`` modules ``path`` imports, at its top or inside a function."""
    def ours(name: str) -> bool:
        return name == "orchester.cli" or name.startswith("orchester.cli.")

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and ours(node.module):
            found.add(node.module)
            found.update(f"orchester.cli.{a.name}" for a in node.names if node.module == "orchester.cli")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if ours(a.name))
    return found


def test_command_families_import_common_never_the_group() -> None:
    modules = sorted(p for p in CLI.glob("*.py") if p.stem not in ("__init__", "main"))
    assert {p.stem for p in modules} >= {"common", "serve", "keys", "tasks", "control", "fit", "history", "journal",
                                         "cluster", "top", "demo"}
    for path in modules:
        imports = _cli_imports(path)
        assert "orchester.cli.main" not in imports, path.name
        allowed = {"orchester.cli.common"}
        assert imports <= allowed, f"{path.name} imports {imports - allowed}"
    assert "orchester.cli.main" not in _cli_imports(CLI.parent.parent / "satellites" / "cli.py")


def test_every_command_is_registered_on_the_group() -> None:
    assert sorted(main.commands) == ["autoscale", "cluster", "demo", "drain", "fit", "history", "journal", "keys",
                                     "promote", "replay", "serve", "show", "status", "submit", "top", "watch", "web"]


def test_the_command_line_starts_without_its_heavy_modules() -> None:
    # (orchester.genx's package holds only the fit settings' ranges: the command line checks flags with them)
    heavy = ("orchester.server", "orchester.journal", "orchester.genx.fits", "orchester.genx.job",
             "orchester.genx.inspect", "orchester.metrics", "orchester.web", "rich.live", "rich.progress", "tables",
             "genx", "tornado", "bokeh")
    code = ("import sys\nfrom orchester.cli.main import main\n"
            "print(' '.join(sorted(m for m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    loaded = [m for m in out.stdout.split() if any(m == h or m.startswith(h + ".") for h in heavy)]
    assert loaded == []
