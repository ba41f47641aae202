"""What the command lines share: exit codes, logging, TOML config tables, one-line usage errors,
the endpoint check of every ``--connect``, the options of a config dataclass's flags
(:func:`config_options`: ``serve``, ``autoscale``); and what the ``orchester`` client commands share:
``--connect`` and ``--timeout``, opening a client, asking it, waiting for a task.

Every command family (:mod:`orchester.cli.tasks`, :mod:`orchester.cli.fit`, …) imports this,
never :mod:`orchester.cli.main` (the group, which imports them); ``satellites`` imports this
too. Heavier modules (the client) are imported inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import time
import types
import typing
from typing import Any, NoReturn

import click

from orchester.config import ConfigError, Flag, field_flags, load_toml

EXIT_OK, EXIT_TASK_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
#: Interrupted (Ctrl-C, SIGINT): 128 + the signal's number, as shells report it.
EXIT_INTERRUPTED = 130
CLIENT_COMMANDS = ("submit", "status", "watch", "show", "fit", "history", "top")
#: The tables one deployment-wide config file may hold (each process reads its own).
CONFIG_TABLES = frozenset({"client", "serve", "submit", "status", "watch", "show", "fit", "history", "top",
                           "demo", "satellite", "autoscale"})


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}


class ByteSize(click.ParamType):
    """A number of bytes: ``4096``, ``512M``, ``64G``, ``1.5T`` (binary units; ``GiB``, ``GB`` alike)."""

    name = "bytes"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            number, unit = float(value), ""
        else:
            match = re.fullmatch(r"\s*([0-9]{1,20}(?:\.[0-9]{1,9})?)\s*([KMGTP]?)(?:i?B)?\s*", str(value)[:64],
                                 re.IGNORECASE)
            if match is None:
                self.fail(f"{value!r} is not a size (bytes, or a number with K, M, G, T or P)", param, ctx)
            number, unit = float(match.group(1)), match.group(2).upper()
        scaled = number * _UNITS[unit]
        if not 0 <= scaled <= 2**50:  # (a finite float: at most 20 digits)
            self.fail(f"{str(value)[:64]!r} is out of range (at most 1P)", param, ctx)
        return int(scaled)


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


def config_option(commands: dict[str, str], help: str) -> Any:
    """The group's ``--config FILE`` option: each command's flags get their defaults from its table
    (``commands``: command name → table), read before any other flag; a bad file is a usage error."""

    def load(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
        if value:
            assert isinstance(ctx.command, click.Group)
            try:
                ctx.default_map = config_default_map(value, ctx.command, commands)
            except ConfigError as exc:
                raise click.BadParameter(str(exc), ctx=ctx, param=param) from None

    return click.option("--config", type=click.Path(dir_okay=False), callback=load, is_eager=True,
                        expose_value=False, help=help)


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
    from orchester.client.uplink import resolve_endpoint
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


connect_option = click.option("--connect", "connect", multiple=True, envvar="ORCHESTER_CONNECT",
                              default=("tcp://127.0.0.1:5555",), show_default=True, callback=check_connect,
                              help="Orchestrator endpoint (repeat for a failover pair; @FILE: from an endpoint file).")
timeout_option = click.option("--timeout", type=click.FloatRange(0.0, min_open=True), default=10.0,
                              show_default=True,
                              help="Seconds to wait for the orchestrator before exit code 3.")


def reachable_endpoint(endpoint: str, host: str) -> str:
    """``endpoint`` as another process connects to it: a wildcard address (``*``, ``0.0.0.0``, ``[::]``) → ``host``."""
    for wild in ("://*:", "://0.0.0.0:", "://[::]:"):
        if wild in endpoint:
            return endpoint.replace(wild, f"://{host}:", 1)
    return endpoint


def is_loopback(endpoint: str) -> bool:
    """Whether only this host can connect to ``endpoint`` (a TCP loopback address, or ``ipc://``)."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = endpoint.partition("://")[2].rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def open_client(connect: list[str] | tuple[str, ...], **client_options: Any) -> Any:
    """A :class:`~orchester.Client` of ``connect``; exit 2 with one line if an endpoint is malformed."""
    from orchester.client.sync import Client

    try:
        return Client(list(connect), **client_options)
    except ValueError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)


def unreachable(connect: list[str] | tuple[str, ...], timeout: float) -> NoReturn:
    """Say that no orchestrator answered (and that one wanting keys looks just like that); exit 3."""
    from orchester.client.sync import unreachable_message

    keys = bool(os.environ.get("ORCHESTER_CURVE_SECRET") and os.environ.get("ORCHESTER_SERVER_KEY"))
    click.echo(f"error: {unreachable_message(', '.join(connect), timeout, keys=keys)}", err=True)
    sys.exit(EXIT_UNREACHABLE)


def ask(connect: tuple[str, ...], timeout: float, request: Any, **client_options: Any) -> Any:
    """Open a client, return ``request(client)``; exit 3 when unreachable, 1 when refused or failed."""
    from orchester.errors import OrchesterError, RemoteError, Unreachable
    from orchester.render import clean_text

    with open_client(connect, **client_options) as client:
        try:
            return request(client)
        except Unreachable:
            unreachable(connect, timeout)
        except RemoteError as exc:
            click.echo(f"error: {clean_text(exc.message, 1000)}", err=True)
            sys.exit(EXIT_TASK_FAILED)
        except OrchesterError as exc:  # the client itself failed (its I/O thread stopped)
            click.echo(f"error: {clean_text(str(exc), 1000)}", err=True)
            sys.exit(EXIT_TASK_FAILED)


#: Seconds between two looks of :func:`wait_for` at its future.
WAIT_POLL = 0.02


def wait_for(fut: Any) -> Any:
    """``fut.result()``, looked for every :data:`WAIT_POLL` seconds in a sleep, so that Ctrl-C is seen at once
    and ends the command cleanly.

    Not a blocked ``fut.result(timeout)``: a signal the kernel delivers to the client's I/O thread would go
    unnoticed until it woke, and a ``KeyboardInterrupt`` raised inside a condition's wait can leave its lock
    released under the ``with`` that then releases it again (``RuntimeError: cannot release un-acquired
    lock``: a traceback and exit 1 instead of exit 130). A sleep holds no lock.
    """
    while not fut.done():
        time.sleep(WAIT_POLL)
    return fut.result()


def config_options(cls: type) -> list[click.Option]:
    """One click option per :class:`~orchester.config.Flag` of dataclass ``cls``'s fields, in field order.

    The option's parameter is the field's name (so ``--config`` tables and the
    ``ORCHESTER_<COMMAND>_<FIELD>`` environment variables use it), its default the field's.
    """
    hints = typing.get_type_hints(cls)
    return [_option(f, hints[f.name], spec, first=i == 0)
            for f in dataclasses.fields(cls) for i, spec in enumerate(field_flags(f))]


def field_default(f: dataclasses.Field[Any]) -> Any:
    """The default of field ``f`` (a fresh one from its factory, if it has one)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _option(f: dataclasses.Field[Any], hint: Any, spec: Flag, first: bool) -> click.Option:
    """The option of one flag of field ``f`` (annotated ``hint``); ``first``: the field's first flag."""
    default = field_default(f)
    kind = _value_type(hint)
    name = spec.name or "--" + f.name.replace("_", "-")
    extra: dict[str, Any]
    if spec.value is not None:  # one of the value-less flags that set this field; the first one holds the default
        extra = {"flag_value": spec.value, **({"default": default} if first else {})}
    elif kind is bool:
        extra = {"is_flag": True, "default": default}
    else:
        multiple = typing.get_origin(kind) is list
        item = typing.get_args(kind)[0] if multiple else kind
        extra = {"multiple": multiple, "default": tuple(default) if multiple else default,
                 "type": _click_type(spec, item)}
        if default is not None and default != []:  # no "[default: None]" nor an empty one
            extra["show_default"] = True
    return click.Option([name, f.name], help=spec.help, metavar=spec.metavar, **extra)


def _click_type(spec: Flag, item: Any) -> Any:
    """The click type of one value of a flag: its choices, a kind of path, or the field's own type."""
    if spec.choices:
        return click.Choice(spec.choices)
    if spec.path == "file":
        return click.Path(dir_okay=False)
    if spec.path == "dir":
        return click.Path(file_okay=False)
    return item


def _value_type(hint: Any) -> Any:
    """``X`` for ``X | None``, else ``hint`` itself."""
    if isinstance(hint, types.UnionType):
        kinds = [k for k in typing.get_args(hint) if k is not type(None)]
        if len(kinds) == 1:
            return kinds[0]
    return hint
