"""``orchester serve``: run an orchestrator until SIGTERM or Ctrl-C; SIGHUP re-reads the authorised keys.

Its flags are the fields of :class:`~orchester.config.OrchestratorConfig`: each field that
carries a :class:`~orchester.config.Flag` becomes one option, with the field's default and a
type from the field's annotation (:func:`~orchester.cli.common.config_options`). Nothing about a
flag is said here.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

import click

from orchester.cli.common import EXIT_USAGE, config_options
from orchester.config import ConfigError, OrchestratorConfig, from_mapping


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
