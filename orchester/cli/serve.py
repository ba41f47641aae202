"""``orchester serve``: run an orchestrator until SIGTERM or Ctrl-C; SIGHUP re-reads the authorised keys.

Its flags are the fields of :class:`~orchester.config.OrchestratorConfig`: each field that
carries a :class:`~orchester.config.Flag` becomes one option, with the field's default and a
type from the field's annotation (:func:`~orchester.cli.common.config_options`). Nothing about a
flag is said here.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
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

    table = autoscale_table(config.autoscale) if config.autoscale else None  # checked before anything starts
    try:
        broker = Broker(config)
    except (JournalError, SecurityError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    signal.signal(signal.SIGTERM, lambda *_: broker.stop())
    signal.signal(signal.SIGINT, lambda *_: broker.stop())
    signal.signal(signal.SIGHUP, lambda *_: reload_keys(broker))
    child = start_autoscaler(config.autoscale, table, broker.endpoints) if config.autoscale and table else None
    try:
        broker.run()
    finally:
        if child is not None:
            stop_child(child)
    if broker.exit_code:
        sys.exit(broker.exit_code)


def autoscale_table(path: str) -> dict[str, Any]:
    """The ``[autoscale]`` table of ``path``, checked (exit 2 with one line if it cannot be used)."""
    from orchester.config import AutoscaleConfig, load_toml

    try:
        data = load_toml(path)
        table = data.get("autoscale")
        if not isinstance(table, dict):
            raise ConfigError(f"{path} has no [autoscale] table")
        from_mapping(AutoscaleConfig, table, f"{path} [autoscale]")
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    return table


def _reachable(endpoint: str, host: str) -> str:
    """``endpoint`` as another process connects to it: a wildcard address (``*``, ``0.0.0.0``, ``[::]``) → ``host``."""
    for wild in ("://*:", "://0.0.0.0:", "://[::]:"):
        if wild in endpoint:
            return endpoint.replace(wild, f"://{host}:", 1)
    return endpoint


def start_autoscaler(path: str, table: dict[str, Any], endpoints: dict[str, list[str]]) -> subprocess.Popen[bytes]:
    """``orchester autoscale --config PATH`` as a child process, told this server's endpoints unless the table
    names them (the satellites get the satellite endpoint, and this host's name for a wildcard address)."""
    from orchester.signals import parent_death_signal

    argv = [sys.executable, "-m", "orchester", "--log-level", logging.getLevelName(logging.getLogger().level),
            "--config", path, "autoscale"]
    if "connect" not in table:
        argv += ["--connect", _reachable(endpoints["bind"][0], "127.0.0.1")]
    if "satellite_connect" not in table and "satellite-connect" not in table:
        for ep in endpoints.get("satellite_bind") or endpoints["bind"]:
            argv += ["--satellite-connect", _reachable(ep, socket.getfqdn())]
    logging.getLogger("orchester").info("starting the autoscaler of %s", path)
    return subprocess.Popen(argv, preexec_fn=parent_death_signal())  # noqa: PLW1509 (one prctl call)


def stop_child(child: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Stop a child process: SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if child.poll() is None:
        child.terminate()
    try:
        child.wait(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(5)


def reload_keys(broker: Any) -> None:
    """Re-read ``broker``'s authorised keys (on SIGHUP); if they cannot be read, the previous ones stay."""
    from orchester.security.auth import SecurityError

    try:
        broker.reload_keys()
    except SecurityError as exc:  # the directory went away: the previous keys stay
        logging.getLogger("orchester").error("cannot re-read the authorised keys: %s", exc)
