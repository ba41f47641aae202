"""What both command lines (``orchester`` and ``satellite``) share: exit codes, logging, TOML
config tables, one-line usage errors, the endpoint check of every ``--connect``.

``satellites`` imports this, never :mod:`orchester.cli.main` (which holds the commands).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click

from orchester.config import ConfigError, load_toml

EXIT_OK, EXIT_TASK_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
#: Interrupted (Ctrl-C, SIGINT): 128 + the signal's number, as shells report it.
EXIT_INTERRUPTED = 130
CLIENT_COMMANDS = ("submit", "status", "watch", "show", "fit", "history", "top")
#: The tables one deployment-wide config file may hold (each process reads its own).
CONFIG_TABLES = frozenset({"client", "serve", "submit", "status", "watch", "show", "fit", "history", "top",
                           "demo", "satellite"})


def setup_logging(level: str) -> None:
    """Log to stderr at ``level``."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)


def config_default_map(path: str, group: click.Group, commands: dict[str, str]) -> dict[str, Any]:
    """Read a TOML config into click's ``default_map`` ({command: {flag: value}}).

    ``commands`` maps each command name to its table in the file. Unknown tables and
    unknown settings are errors (:class:`ConfigError`), never silently ignored.
    """
    data = load_toml(path)
    for name in data:
        if name not in CONFIG_TABLES:
            raise ConfigError(f"{path}: unknown table [{name}]; known: {sorted(CONFIG_TABLES)}")
    out: dict[str, Any] = {}
    client = data.get("client", {})
    for cmd, section in commands.items():
        table = dict(client) if cmd in CLIENT_COMMANDS else {}
        table.update(data.get(section, {}))
        if not table:
            continue
        command = group.commands[cmd]
        names = {p.name for p in command.params}
        settings = {k.replace("-", "_"): v for k, v in table.items()}
        for key in settings:
            if key not in names:
                raise ConfigError(f"{path}: [{section}] has unknown setting {key!r}; "
                                  f"known: {sorted(n for n in names if n)}")
        out[cmd] = settings
    return out


class OneLineErrors(click.Group):
    """A command group whose usage errors (a bad flag or value, a missing argument) are one line on stderr.

    ``error: Invalid value for '--connect': ...`` and exit code 2, instead of click's usage
    block; ``--help`` still shows the whole usage. A command interrupted by Ctrl-C (SIGINT)
    that does not handle it itself exits 130 (click's default would be 1, a failed task's code).
    """

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        """Parse this group's own flags; a usage error becomes one line."""
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            raise _one_line(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        """Run the chosen command; a usage error (its flags, or raised by it) becomes one line; Ctrl-C exits 130."""
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _one_line(exc) from None
        except KeyboardInterrupt as exc:
            if ctx.parent is not None:  # a nested group: the outermost one says it
                raise
            code = getattr(exc, "exit_code", EXIT_INTERRUPTED)  # a stop signal other than SIGINT: 128 + its number
            click.echo(f"\n{str(exc) or 'interrupted'}", err=True)
            raise click.exceptions.Exit(code if isinstance(code, int) else EXIT_INTERRUPTED) from None


class OneLineUsageError(click.UsageError):
    """A usage error shown as a single ``error: ...`` line (exit code 2)."""

    def show(self, file: Any = None) -> None:
        """Print the one line on stderr."""
        click.echo(f"error: {self.format_message()}", err=True)


def _one_line(exc: click.UsageError) -> OneLineUsageError:
    if isinstance(exc, OneLineUsageError):
        return exc
    message = exc.format_message()
    if (type(exc) is not click.BadParameter) and exc.ctx is not None:  # not a value: say where help is
        message += f" (try '{exc.ctx.command_path} --help')"
    return OneLineUsageError(" ".join(message.split()), ctx=exc.ctx)


def check_connect(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Click callback of every ``--connect``/``--pub`` flag: each endpoint must be one (``@FILE``: read it).

    A malformed endpoint, from the flag, ``ORCHESTER_CONNECT`` or a config file, is a usage
    error (exit 2) with the message ``orchester serve`` gives for a bad bind.
    """
    from orchester.client.sync import resolve_endpoint
    from orchester.config import check_endpoint

    for endpoint in (value,) if isinstance(value, str) else (value or ()):
        try:
            check_endpoint(resolve_endpoint(endpoint))
        except ValueError as exc:
            envvars = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
            named = [v for v in envvars if endpoint in os.environ.get(v, "").split()]
            where = f" ({named[0]} names it)" if named else ""
            raise click.BadParameter(f"{exc}{where}", ctx=ctx, param=param) from None
    return value
