"""The ``orchester`` command line: serve, submit, status, watch, demo.

Every flag can also come from a TOML file given with ``--config`` (a table per
command: ``[serve]``, ``[submit]``, ``[status]``, ``[watch]``, ``[demo]``; a
``[client]`` table applies to every client command) and from environment
variables ``ORCHESTER_<COMMAND>_<FLAG>``; the endpoint also from
``ORCHESTER_CONNECT``. Exit codes (docs/cli.rst): 0 ok, 1 a task or fit failed, 2 usage or
bad input (one ``error:`` line), 3 orchestrator unreachable, 130 interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from typing import Any, NoReturn

import click

from orchester.cli.common import (  # noqa: F401  (re-exported: the commands and cli_jobs use them from here)
    CLIENT_COMMANDS,
    CONFIG_TABLES,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TASK_FAILED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    OneLineErrors,
    OneLineUsageError,
    check_connect,
    config_default_map,
    setup_logging,
)
from orchester.config import ConfigError, OrchestratorConfig, from_mapping


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        assert isinstance(ctx.command, click.Group)
        try:
            ctx.default_map = config_default_map(value, ctx.command,
                                                 {c: c for c in (*CLIENT_COMMANDS, "serve", "demo")})
        except ConfigError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


@click.group(cls=OneLineErrors,
             context_settings={"auto_envvar_prefix": "ORCHESTER", "help_option_names": ["-h", "--help"]})
@click.option("--config", type=click.Path(dir_okay=False), callback=_load_config, is_eager=True,
              expose_value=False, help="TOML file with a table of flags per command.")
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


connect_option = click.option("--connect", "connect", multiple=True, envvar="ORCHESTER_CONNECT",
                              default=("tcp://127.0.0.1:5555",), show_default=True, callback=check_connect,
                              help="Orchestrator endpoint (repeat for a failover pair; @FILE: from an endpoint file).")
timeout_option = click.option("--timeout", type=click.FloatRange(0.0, min_open=True), default=10.0,
                              show_default=True,
                              help="Seconds to wait for the orchestrator before exit code 3.")


@main.command()
@click.option("--bind", multiple=True, default=("tcp://127.0.0.1:5555",), show_default=True,
              help="Endpoint for clients (and satellites); repeatable.")
@click.option("--satellite-bind", multiple=True, help="Separate endpoint for satellites; repeatable.")
@click.option("--pub", multiple=True, default=("tcp://127.0.0.1:5556",), show_default=True,
              help="Endpoint for the event stream; repeatable.")
@click.option("--heartbeat-interval", type=float, default=1.0, show_default=True,
              help="Seconds between heartbeats to and from satellites.")
@click.option("--liveness", type=int, default=3, show_default=True,
              help="Heartbeats missed before a satellite is lost.")
@click.option("--strategy", default="least_loaded", show_default=True,
              help="least_loaded, round_robin, tags, or module:Class.")
@click.option("--allow-strategy", "strategies", multiple=True, metavar="MODULE:CLASS",
              help="A strategy class a CONTROL request may switch to at run time (repeatable; the built-in "
              "ones and --strategy always may).")
@click.option("--allow-pickle", is_flag=True,
              help="Accept pickle-coded tasks (they run code on the satellites, which need --allow-pickle too).")
@click.option("--max-message", type=int, default=OrchestratorConfig.max_message, show_default=True,
              help="Largest message accepted, in bytes (also ZMQ_MAXMSGSIZE per frame).")
@click.option("--max-queue", type=int, default=OrchestratorConfig.max_queue, show_default=True,
              help="Most tasks queued; further submits are refused as busy.")
@click.option("--retries", type=int, default=OrchestratorConfig.retries, show_default=True,
              help="Crashes (satellite lost, stalled, worker killed) before a task is quarantined.")
@click.option("--retry-backoff", type=float, default=OrchestratorConfig.retry_backoff, show_default=True,
              help="First back-off in seconds before a retry, doubled per crash.")
@click.option("--queue-ttl", type=float, default=0.0, show_default=True,
              help="Seconds a task may wait in the queue before it expires (0: forever).")
@click.option("--dispatch-timeout", type=float, default=OrchestratorConfig.dispatch_timeout, show_default=True,
              help="Seconds a dispatched task may wait to be started before it stalls (0: forever).")
@click.option("--stall-timeout", type=float, default=0.0, show_default=True,
              help="Seconds without progress before a progress-reporting task stalls (0: the kind's own).")
@click.option("--max-run-time", type=float, default=0.0, show_default=True,
              help="Seconds a task may run before its worker is killed (0: no limit).")
@click.option("--probation-after", type=int, default=OrchestratorConfig.probation_after, show_default=True,
              help="Consecutive failed tasks that put a satellite on probation (half credit).")
@click.option("--drain-after", type=int, default=OrchestratorConfig.drain_after, show_default=True,
              help="Consecutive failed tasks that drain a satellite on probation (no credit).")
@click.option("--max-client-tasks", type=int, default=OrchestratorConfig.max_client_tasks, show_default=True,
              help="Most unfinished tasks one client may have; further submits get the 'limit' error.")
@click.option("--max-client-bytes", type=int, default=OrchestratorConfig.max_client_bytes, show_default=True,
              help="Most bytes (payload, header, id) of one client's unfinished tasks held by the orchestrator.")
@click.option("--max-unread-bytes", type=int, default=OrchestratorConfig.max_unread_bytes, show_default=True,
              help="Result bytes sent to one connection and not yet acknowledged, at most (then results wait).")
@click.option("--max-slots", type=int, default=OrchestratorConfig.max_slots, show_default=True,
              help="Most task slots one satellite may announce (more are cut to this).")
@click.option("--probation-cooldown", type=float, default=OrchestratorConfig.probation_cooldown, show_default=True,
              help="Seconds a satellite drained for failing waits before it gets tasks again, on probation.")
@click.option("--max-key-connections", type=int, default=OrchestratorConfig.max_key_connections,
              show_default=True, help="CurveZMQ: most connections one key may hold.")
@click.option("--max-subscriptions", type=int, default=OrchestratorConfig.max_subscriptions, show_default=True,
              help="Most event subscriptions one key (without keys: everyone together) may hold.")
@click.option("--max-topic", type=int, default=OrchestratorConfig.max_topic, show_default=True,
              help="Longest event subscription topic, in bytes.")
@click.option("--request-rate", type=float, default=OrchestratorConfig.request_rate, show_default=True,
              help="Requests (status, history, ...) per second one key may make beyond a burst (0: no limit).")
@click.option("--result-retention", type=int, default=OrchestratorConfig.result_retention, show_default=True,
              help="Finished results kept for fetch by task id.")
@click.option("--hwm", type=int, default=OrchestratorConfig.hwm, show_default=True,
              help="Messages ZeroMQ queues per peer before sends to it fail (memory bound).")
@click.option("--endpoint-file", type=click.Path(dir_okay=False),
              help="Write the bound endpoints (JSON) here once listening.")
@click.option("--journal", type=click.Path(file_okay=False), default=None,
              help="Journal folder: tasks survive a crash and are replayed at start.")
@click.option("--durability", type=click.Choice(["full", "batch", "off"]), default="full", show_default=True,
              help="full: acknowledge after fsync; batch: after the write; off: do not wait.")
@click.option("--carbon", default=None, help="Send metrics to this carbon daemon (HOST:PORT).")
@click.option("--metrics-prefix", default="orchester", show_default=True, help="Metric names start with this.")
@click.option("--metrics-interval", type=float, default=10.0, show_default=True,
              help="Seconds between two metric reports.")
@click.option("--carbon-protocol", type=click.Choice(["pickle", "plaintext"]), default="pickle", show_default=True,
              help="How metrics reach carbon: pickled batches, or one plaintext line per metric.")
@click.option("--spill-bytes", type=int, default=0, show_default=True,
              help="With --journal: queued payloads beyond this many bytes wait on disk, not in memory (0: never).")
@click.option("--curve-secret", type=click.Path(dir_okay=False), default=None,
              help="CurveZMQ: this server's secret key file; needs --authorized-keys.")
@click.option("--authorized-keys", type=click.Path(file_okay=False), default=None,
              help="CurveZMQ: directory of authorised public keys (NAME.key), re-read on SIGHUP.")
@click.option("--insecure", is_flag=True,
              help="Allow binding a non-loopback address without CurveZMQ (a warning is logged).")
@click.option("--primary", "ha", flag_value="primary", default=None,
              help="Binary star: run as the primary of a pair (with --state-bind and --peer).")
@click.option("--backup", "ha", flag_value="backup", help="Binary star: run as the backup of a pair.")
@click.option("--state-bind", default=None, help="Binary star: this server's state endpoint (bound).")
@click.option("--peer", default=None, help="Binary star: the other server's state endpoint.")
@click.option("--replication", type=click.Choice(["sync", "async"]), default="sync", show_default=True,
              help="Binary star: acknowledge a task once the passive has it (sync), or without waiting.")
@click.option("--ha-heartbeat", type=float, default=1.0, show_default=True,
              help="Binary star: seconds between state messages; the peer expires after two.")
def serve(**kw: Any) -> None:
    """Run an orchestrator until SIGTERM or Ctrl-C."""
    from orchester.server.broker import Broker

    for key in ("bind", "satellite_bind", "pub", "strategies"):
        kw[key] = list(kw[key])
    try:
        config = from_mapping(OrchestratorConfig, kw, "serve")
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    from orchester.journal.wal import JournalError
    from orchester.security.auth import SecurityError

    try:
        broker = Broker(config)
    except (JournalError, SecurityError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    signal.signal(signal.SIGTERM, lambda *_: broker.stop())
    signal.signal(signal.SIGINT, lambda *_: broker.stop())
    signal.signal(signal.SIGHUP, lambda *_: _reload_keys(broker))
    broker.run()
    if broker.exit_code:
        sys.exit(broker.exit_code)


def _reload_keys(broker: Any) -> None:
    from orchester.security.auth import SecurityError

    try:
        broker.reload_keys()
    except SecurityError as exc:  # the directory went away: the previous keys stay
        logging.getLogger("orchester").error("cannot re-read the authorised keys: %s", exc)


@main.group()
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


def _ask(connect: tuple[str, ...], timeout: float, request: Any, **client_options: Any) -> Any:
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


def _parse_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


@main.command()
@click.argument("kind")
@click.argument("args", nargs=-1)
@connect_option
@click.option("--priority", type=int, default=0, show_default=True,
              help="Higher runs first among queued tasks of the same kind (negative: later).")
@click.option("--tags", default="", help="Comma-separated tags a satellite must have.")
@click.option("--task-timeout", type=float, default=None, help="Fail the task after this many seconds.")
@timeout_option
@click.option("--no-wait", is_flag=True, help="Print the task id and exit once accepted.")
def submit(kind: str, args: tuple[str, ...], connect: tuple[str, ...], priority: int, tags: str,
           task_timeout: float | None, timeout: float, no_wait: bool) -> None:
    """Submit one task; print its result as JSON. ARGS are JSON values (or plain strings)."""
    from orchester.errors import RemoteError, TaskFailed, Unreachable
    from orchester.render import clean_block, clean_text

    with open_client(connect) as client:
        try:
            st = client.status(timeout=timeout)
        except Unreachable:
            unreachable(connect, timeout)
        if not st.get("satellites"):  # said once; the task waits in the queue for the first one
            click.echo(f"warning: no satellite is connected to the orchestrator at {', '.join(connect)}: the task "
                       + ("waits in its queue until one connects" if no_wait else
                          "waits until one connects (Ctrl-C stops waiting; the task stays queued)"), err=True)
        tid = client.core.task_id()
        show = not no_wait and sys.stderr.isatty()
        stream = client.subscribe([f"progress:{tid}", f"task:{tid}"], timeout=timeout) if show else None
        fut = client.submit(kind, *[_parse_arg(a) for a in args], priority=priority,
                            tags=[t for t in tags.split(",") if t], timeout=task_timeout, task_id=tid)
        try:
            if no_wait:
                # requests on one socket are handled in order: once this status is answered the
                # orchestrator has accepted (or refused) the submit
                client.status(timeout=timeout)
                if fut.done():
                    fut.result()
                click.echo(fut.task_id)
                return
            if stream is not None:
                with stream:
                    _show_progress(fut, stream)
            value = wait_for(fut)
        except TaskFailed as exc:  # type, message and traceback come from the satellite: cleaned
            click.echo(f"task failed: {clean_text(exc.type, 100)}: {clean_text(exc.message, 1000)}", err=True)
            if exc.remote_traceback:
                click.echo(clean_block(exc.remote_traceback), err=True)
            sys.exit(EXIT_TASK_FAILED)
        except RemoteError as exc:
            click.echo(f"refused: {clean_text(str(exc), 1000)}", err=True)
            sys.exit(EXIT_TASK_FAILED)
        click.echo(json.dumps(value, default=_jsonable))


def wait_for(fut: Any) -> Any:
    """``fut.result()``, woken twice a second so that Ctrl-C is seen at once.

    A blocked wait is only interrupted by a signal the kernel delivers to the main thread; one
    that lands on the client's I/O thread would go unnoticed until the result came.
    """
    import concurrent.futures as cf

    while True:
        try:
            return fut.result(timeout=0.5)
        except cf.TimeoutError:
            continue


def _show_progress(fut: Any, stream: Any) -> None:
    """A live bar on stderr from the task's events until its future is done.

    Only the events of this task (the exact topic, not a prefix) are shown; every field is
    checked and cleaned (:mod:`orchester.render`) before it reaches the bar.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from orchester.render import event_fields, markup, progress_bar

    mine = {f"progress:{fut.task_id}", f"task:{fut.task_id}"}
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        row = bar.add_task(markup(fut.task_id), total=None, info="pending")
        while not fut.done():
            ev = stream.recv(timeout=0.2)
            if ev is None or ev.topic not in mine:
                continue
            if ev.category == "task":
                bar.update(row, info=markup(ev.data.get("state"), 40))
                continue
            done, total = progress_bar(ev.data)
            if done is not None:
                bar.update(row, completed=done, total=total)
            bar.update(row, info=markup(event_fields(ev.data, ("id", "a", "sat", "t"), 40, 8), 160))


def _jsonable(o: Any) -> Any:
    tolist = getattr(o, "tolist", None)
    if tolist is not None:
        return tolist()
    if isinstance(o, bytes):
        return o.decode(errors="replace")
    return repr(o)


@main.command()
@connect_option
@timeout_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
def status(connect: tuple[str, ...], timeout: float, as_json: bool) -> None:
    """Show tasks per state, queues and satellites."""
    st = _ask(connect, timeout, lambda c: c.status(timeout=timeout))
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    from orchester.render import render_status

    render_status(st)


@main.command()
@click.argument("satellite")
@connect_option
@timeout_option
def drain(satellite: str, connect: tuple[str, ...], timeout: float) -> None:
    """Send no more tasks to SATELLITE (its running tasks finish); stop it afterwards."""
    answer = _ask(connect, timeout, lambda c: c.drain(satellite, timeout=timeout))
    click.echo(f"{answer['sid']}: {answer['state']}, {answer['inflight']} task(s) still running")


@main.command()
@click.option("--connect", required=True, callback=check_connect,
              help="The binary-star server to promote (one endpoint).")
@timeout_option
@click.option("--force", is_flag=True, help="Promote even while its peer says it is active.")
def promote(connect: str, timeout: float, force: bool) -> None:
    """Make one server of a binary-star pair ACTIVE (manual recovery)."""
    answer = _ask((connect,), timeout, lambda c: c.promote(force, timeout=timeout))
    click.echo(f"{connect}: {answer['state']}" + ("" if answer.get("changed") else " (already)"))


@main.command()
@click.argument("task_id")
@connect_option
@timeout_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw answer as JSON.")
def show(task_id: str, connect: tuple[str, ...], timeout: float, as_json: bool) -> None:
    """Show one task: its state, attempts and history of transitions."""
    task = _ask(connect, timeout, lambda c: c.show(task_id, timeout=timeout))
    if as_json:
        click.echo(json.dumps(task, indent=2, sort_keys=True))
        return
    from orchester.render import render_task

    render_task(task)


@main.command()
@connect_option
@click.option("--pub", default=None, callback=check_connect,
              help="Event endpoint (asked of the orchestrator if omitted).")
@click.option("--topic", "topics", multiple=True, default=("",), help="Topic prefix; repeatable.")
@click.option("--count", type=int, default=0, help="Stop after this many events (0: never).")
@timeout_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def watch(connect: tuple[str, ...], pub: str | None, topics: tuple[str, ...], count: int,
          timeout: float, as_json: bool) -> None:
    """Print the event stream (peers' text cleaned of control characters)."""
    from orchester.render import clean_text, clock, event_fields, json_safe

    stream = _ask(connect, timeout, lambda c: c.subscribe(topics, timeout=timeout), pub=pub)
    n = 0
    with stream:
        try:
            for ev in stream:
                if as_json:  # json.dumps escapes control characters; NaN and infinities become null
                    click.echo(json.dumps(json_safe({**ev.data, "topic": ev.topic}), default=_jsonable))
                else:  # peers' text, cleaned of control characters (no escape sequence reaches the terminal)
                    click.echo(f"{clock(ev.data.get('t'))} {clean_text(ev.topic)} {event_fields(ev.data)}")
                n += 1
                if count and n >= count:
                    break
        except KeyboardInterrupt:
            pass


@main.command()
@click.option("--satellites", type=click.IntRange(min=1), default=2, show_default=True,
              help="Satellite processes of the local cluster.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Worker processes per satellite.")
@click.option("--tasks", "n_tasks", type=click.IntRange(min=1), default=200, show_default=True,
              help="Tasks in the batch.")
@click.option("--seconds", type=click.FloatRange(min=0.0), default=0.02, show_default=True,
              help="Duration of each sleep task.")
def demo(satellites: int, workers: int, n_tasks: int, seconds: float) -> None:
    """Start a local cluster and run a batch of built-in tasks with a progress bar."""
    from orchester.cli.demo import run_demo

    sys.exit(run_demo(satellites, workers, n_tasks, seconds))


from orchester.cli import jobs as _jobs  # noqa: E402,F401  (registers fit, history, replay, journal)

if __name__ == "__main__":  # pragma: no cover
    main()
