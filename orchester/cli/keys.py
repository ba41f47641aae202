"""``orchester keys generate``: CurveZMQ key pairs, and where each file goes."""

from __future__ import annotations

import sys
from typing import Any

import click

from orchester.cli.common import EXIT_USAGE


@click.group()
def keys() -> None:
    """CurveZMQ key pairs for orchestrators, satellites and clients."""


@keys.command("generate")
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Where to write NAME.key (public) and NAME.key_secret (secret, mode 0600).")
@click.option("--role", "roles", multiple=True, type=click.Choice(["satellite", "submit", "admin", "pickle"]),
              help="A role the key holds (repeatable; default: submit).")
@click.option("--kind", "kinds", multiple=True, metavar="KIND",
              help="A task kind a satellite with this key may offer (repeatable; default: any).")
@click.option("--server", is_flag=True,
              help="The orchestrator's own key pair (for serve --curve-secret): no roles, never authorised.")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def keys_generate(name: str, directory: str, roles: tuple[str, ...], kinds: tuple[str, ...], server: bool,
                  force: bool) -> None:
    """Write a key pair NAME.key / NAME.key_secret (pyzmq's certificate format) and say where each goes.

    A client's or satellite's key (``--role``): its public key goes into the orchestrator's
    ``--authorized-keys`` directory. The orchestrator's own key (``--server``): its public key
    goes to every client and satellite (``--server-key``), its secret key to ``serve --curve-secret``.
    """
    from orchester.security.keys import generate_keys

    if server and (roles or kinds):
        raise click.UsageError("--server makes the orchestrator's own key: it takes no --role or --kind")
    try:
        public, secret = generate_keys(name, directory, roles or ("submit",), force=force, kinds=kinds, server=server)
    except (ValueError, FileExistsError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    for line in key_advice(public, secret, roles or ("submit",), server):
        click.echo(line)


def key_advice(public: Any, secret: Any, roles: tuple[str, ...], server: bool) -> list[str]:
    """Where each file of a new key pair goes: it depends on whose key it is."""
    if server:
        return [f"public key: {public}  (give it to clients and satellites: --server-key {public}; "
                "do not put it into --authorized-keys)",
                f"secret key: {secret}  (for orchester serve --curve-secret {secret}; keep it on the "
                "orchestrator's machine: mode 0600)"]
    user = ("satellite run" if set(roles) == {"satellite"} else
            "satellite run or orchester" if "satellite" in roles else "orchester")
    return [f"public key: {public}  (copy it into the orchestrator's --authorized-keys directory: "
            f"roles {', '.join(roles)})",
            f"secret key: {secret}  (for {user} --curve-secret {secret}; keep it on that machine: mode 0600)"]
