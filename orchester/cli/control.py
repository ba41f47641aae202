"""``orchester`` commands that steer a running bus: drain a satellite, promote a binary-star server."""

from __future__ import annotations

import click

from orchester.cli.common import ask, check_connect, connect_option, timeout_option


@click.command()
@click.argument("satellite")
@connect_option
@timeout_option
def drain(satellite: str, connect: tuple[str, ...], timeout: float) -> None:
    """Send no more tasks to SATELLITE (its running tasks finish); stop it afterwards."""
    answer = ask(connect, timeout, lambda c: c.drain(satellite, timeout=timeout))
    click.echo(f"{answer['sid']}: {answer['state']}, {answer['inflight']} task(s) still running")


@click.command()
@click.option("--connect", required=True, callback=check_connect,
              help="The binary-star server to promote (one endpoint).")
@timeout_option
@click.option("--force", is_flag=True, help="Promote even while its peer says it is active.")
def promote(connect: str, timeout: float, force: bool) -> None:
    """Make one server of a binary-star pair ACTIVE (manual recovery)."""
    answer = ask((connect,), timeout, lambda c: c.promote(force, timeout=timeout))
    click.echo(f"{connect}: {answer['state']}" + ("" if answer.get("changed") else " (already)"))
