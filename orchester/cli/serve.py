"""``orchester serve``: run an orchestrator until SIGTERM or Ctrl-C; SIGHUP re-reads the authorised keys.

Its flags are the fields of :class:`~orchester.config.OrchestratorConfig`: each field that
carries a :class:`~orchester.config.Flag` becomes one option, with the field's default and a
type from the field's annotation (:func:`config_options`). Nothing about a flag is said here.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import types
import typing
from typing import Any

import click

from orchester.cli.common import EXIT_USAGE
from orchester.config import ConfigError, Flag, OrchestratorConfig, field_flags, from_mapping


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


@click.command(params=config_options(OrchestratorConfig))
def serve(**kw: Any) -> None:
    """Run an orchestrator until SIGTERM or Ctrl-C."""
    from orchester.server.broker import Broker

    settings = {key: list(value) if isinstance(value, tuple) else value for key, value in kw.items()}
    try:
        config = from_mapping(OrchestratorConfig, settings, "serve")
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    from orchester.journal.folder import JournalError
    from orchester.security.auth import SecurityError

    try:
        broker = Broker(config)
    except (JournalError, SecurityError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    signal.signal(signal.SIGTERM, lambda *_: broker.stop())
    signal.signal(signal.SIGINT, lambda *_: broker.stop())
    signal.signal(signal.SIGHUP, lambda *_: reload_keys(broker))
    broker.run()
    if broker.exit_code:
        sys.exit(broker.exit_code)


def reload_keys(broker: Any) -> None:
    """Re-read ``broker``'s authorised keys (on SIGHUP); if they cannot be read, the previous ones stay."""
    from orchester.security.auth import SecurityError

    try:
        broker.reload_keys()
    except SecurityError as exc:  # the directory went away: the previous keys stay
        logging.getLogger("orchester").error("cannot re-read the authorised keys: %s", exc)
