"""``orchester web``: the web interface (pages, JSON API, live events) as a process of its own."""

from __future__ import annotations

import sys

import click

from orchester.cli.common import EXIT_USAGE, check_connect


def _size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    """``100MB``, ``5 GB``, ``2048`` (bytes): a size, at least one byte."""
    text = value.strip().upper().replace(" ", "")
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            number, scale = text[: -len(unit)], factor
            break
    else:
        number, scale = text, 1
    try:
        size = int(float(number) * scale)
    except (ValueError, OverflowError):
        raise click.BadParameter(f"{value[:40]!r} is not a size (e.g. 100MB)") from None
    if not 1 <= size <= 2**40:
        raise click.BadParameter(f"{value[:40]!r} is out of range (1 byte to 1 TiB)")
    return size


@click.command()
@click.option("--connect", "connect", multiple=True, envvar="ORCHESTER_CONNECT", callback=check_connect,
              help="Orchestrator endpoint (repeat for a failover pair); without it, a local cluster is started.")
@click.option("--bind", default="127.0.0.1:8080", show_default=True,
              help="HOST:PORT to serve on (port 0: any free one). Another host than loopback needs TLS or --insecure.")
@click.option("--certfile", type=click.Path(dir_okay=False, exists=True), default=None,
              help="TLS certificate (PEM), with --keyfile.")
@click.option("--keyfile", type=click.Path(dir_okay=False, exists=True), default=None, help="TLS private key (PEM).")
@click.option("--insecure", is_flag=True, help="Serve plain HTTP on a non-loopback address (a network you trust).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Where fits and their files are kept (default ~/.local/share/orchester/web).")
@click.option("--max-upload", default="100MB", show_default=True, callback=_size,
              help="Largest upload (413 beyond it).")
@click.option("--token", envvar="ORCHESTER_WEB_TOKEN", default=None,
              help="Access token (default: a new random one, printed with the link).")
@click.option("--local", type=click.IntRange(min=0), default=0,
              help="Satellites of the local cluster without --connect (default: one per core).")
@click.option("--idle-timeout", type=click.FloatRange(min=0.1, max=3600.0), default=15.0, show_default=True,
              help="Seconds a connection may stay idle, or take to send a request's headers, before it is closed.")
def web(connect: tuple[str, ...], bind: str, certfile: str | None, keyfile: str | None, insecure: bool,
        data_dir: str | None, max_upload: int, token: str | None, local: int, idle_timeout: float) -> None:
    """Serve the web interface: fit GenX models from the browser, watch the bus, browse every task."""
    from orchester.web.server import WebConfigError, WebOptions, serve_web

    if token is not None and not 16 <= len(token) <= 256:
        raise click.BadParameter("the token must have 16 to 256 characters", param_hint="--token")
    options = WebOptions(connect=list(connect), bind=bind, certfile=certfile, keyfile=keyfile, insecure=insecure,
                         data_dir=data_dir, max_upload=max_upload, token=token, local=local,
                         idle_timeout=idle_timeout)
    try:
        code = serve_web(options)
    except WebConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    sys.exit(code)
