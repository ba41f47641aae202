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
import threading
from typing import Any

import click

from orchester.cli.common import EXIT_USAGE, config_options, reachable_endpoint
from orchester.config import ConfigError, OrchestratorConfig, from_mapping
from orchester.signals import parent_death_signal


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
            child.stop()
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


class AutoscalerChild:
    """``orchester autoscale --config PATH`` as a child of ``serve`` (see :func:`start_autoscaler`)."""

    def __init__(self, argv: list[str]) -> None:
        self.stopping = threading.Event()
        # a session of its own: a terminal's SIGHUP or Ctrl-C reaches the server only (whose SIGHUP re-reads
        # the keys), which stops the autoscaler itself; the kernel stops it if the server dies
        self.proc = subprocess.Popen(argv, preexec_fn=parent_death_signal(), start_new_session=True)  # noqa: PLW1509
        threading.Thread(target=self._watch, daemon=True, name="orchester-autoscale-watch").start()

    def _watch(self) -> None:
        """Say so when the autoscaler ends by itself (the server goes on without it: nothing depends on it)."""
        code = self.proc.wait()
        if not self.stopping.is_set():
            logging.getLogger("orchester").error("the autoscaler stopped (exit %s): the bus goes on without it; "
                                                 "its jobs keep running until it is started again", code)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        self.stopping.set()
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def start_autoscaler(path: str, table: dict[str, Any], endpoints: dict[str, list[str]]) -> AutoscalerChild:
    """``orchester autoscale --config PATH`` as a child process, told this server's endpoints unless the table
    names them (the satellites get the satellite endpoint, and this host's name for a wildcard address)."""
    argv = [sys.executable, "-m", "orchester", "--log-level", logging.getLevelName(logging.getLogger().level),
            "--config", path, "autoscale"]
    named = {key.replace("-", "_") for key in table}
    if "connect" not in named:
        argv += ["--connect", reachable_endpoint(endpoints["bind"][0], "127.0.0.1")]
        if "satellite_connect" not in named:  # (a table naming connect: its satellites connect there too)
            for ep in endpoints.get("satellite_bind") or endpoints["bind"]:
                argv += ["--satellite-connect", reachable_endpoint(ep, socket.getfqdn())]
    logging.getLogger("orchester").info("starting the autoscaler of %s", path)
    return AutoscalerChild(argv)


def reload_keys(broker: Any) -> None:
    """Re-read ``broker``'s authorised keys (on SIGHUP); if they cannot be read, the previous ones stay."""
    from orchester.security.auth import SecurityError

    try:
        broker.reload_keys()
    except SecurityError as exc:  # the directory went away: the previous keys stay
        logging.getLogger("orchester").error("cannot re-read the authorised keys: %s", exc)
