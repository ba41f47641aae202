"""The ``orchester`` command group: its global flags, and every command registered from its family module.

Every flag can also come from a TOML file given with ``--config`` (a table per
command: ``[serve]``, ``[submit]``, ``[status]``, ``[watch]``, ``[demo]``, ``[autoscale]``; a
``[client]`` table applies to every client command) and from environment
variables ``ORCHESTER_<COMMAND>_<FLAG>``; the endpoint also from
``ORCHESTER_CONNECT``. Exit codes (docs/cli.rst): 0 ok, 1 a task or fit failed, 2 usage or
bad input (one ``error:`` line), 3 orchestrator unreachable, 130 interrupted.

The families (``serve``, ``keys``, ``tasks``, ``control``, ``fit``, ``history``, ``journal``,
``cluster``, ``top``, ``demo``) import :mod:`orchester.cli.common`, never this module.
"""

from __future__ import annotations

import os

import click

from orchester.cli.cluster import autoscale, cluster
from orchester.cli.common import CLIENT_COMMANDS, OneLineErrors, config_option, setup_logging
from orchester.cli.control import drain, promote
from orchester.cli.demo import demo
from orchester.cli.fit import fit
from orchester.cli.history import history, replay
from orchester.cli.journal import journal
from orchester.cli.keys import keys
from orchester.cli.serve import serve
from orchester.cli.tasks import show, status, submit, watch
from orchester.cli.top import top
from orchester.cli.web import web


@click.group(cls=OneLineErrors,
             context_settings={"auto_envvar_prefix": "ORCHESTER", "help_option_names": ["-h", "--help"]})
@config_option({c: c for c in (*CLIENT_COMMANDS, "serve", "demo", "autoscale")},
               "TOML file with a table of flags per command.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="Least important log messages written to stderr.")
@click.option("--curve-secret", type=click.Path(dir_okay=False), default=None,
              help="CurveZMQ for client commands: your secret key file (also ORCHESTER_CURVE_SECRET).")
@click.option("--server-key", type=click.Path(dir_okay=False), default=None,
              help="CurveZMQ for client commands: the orchestrator's public key file (also ORCHESTER_SERVER_KEY).")
@click.version_option(package_name="orchester")
def main(log_level: str, curve_secret: str | None, server_key: str | None) -> None:
    """Orchester: a ZeroMQ message bus for scientific tasks on satellites."""

    setup_logging(log_level)
    if curve_secret:  # every Client of this process picks them up (orchester.security.keys.client_curve)
        os.environ["ORCHESTER_CURVE_SECRET"] = curve_secret
    if server_key:
        os.environ["ORCHESTER_SERVER_KEY"] = server_key


for _command in (serve, keys, submit, status, show, watch, drain, promote, fit, history, replay, journal, cluster,
                 autoscale, top, demo, web):
    main.add_command(_command)

if __name__ == "__main__":  # pragma: no cover
    main()
