"""Bad input at every entry point (issue 15): the checks themselves, in this process.

The command lines run as real processes in ``tests/integration/test_entry_points_live.py``.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest
import zmq

from orchester import AsyncClient, Client, ClientClosed
from orchester.config import ConfigError, OrchestratorConfig, check_endpoint, endpoint_problem

BAD_ENDPOINTS = ["localhost:5555", "garbage", "tcp://localhost", "tcp://localhost:", "tcp://:5555",
                 "tcp://localhost:abc", "tcp://localhost:0", "tcp://localhost:65536", "ipc://", "udp://h:1",
                 "tcp://127.0.0.1:5555 ", ""]
GOOD_ENDPOINTS = ["tcp://127.0.0.1:5555", "tcp://head:5555", "tcp://[::1]:5555", "tcp://eth0;head:5555",
                  "ipc:///tmp/orchester/bus.sock", "inproc://bus"]


# -- item 3: one check of every endpoint ---------------------------------------------------------

@pytest.mark.parametrize("endpoint", BAD_ENDPOINTS)
def test_a_malformed_endpoint_is_named_with_the_reason(endpoint: str) -> None:
    assert endpoint_problem(endpoint) is not None
    with pytest.raises(ConfigError, match="is not a ZeroMQ endpoint like tcp://127.0.0.1:5555"):
        check_endpoint(endpoint)


@pytest.mark.parametrize("endpoint", GOOD_ENDPOINTS)
def test_a_well_formed_endpoint_passes(endpoint: str) -> None:
    assert check_endpoint(endpoint) == endpoint


def test_binds_may_use_wildcards_and_os_chosen_ports_connects_may_not() -> None:
    for endpoint in ("tcp://*:5555", "tcp://127.0.0.1:*", "tcp://0.0.0.0:0"):
        assert endpoint_problem(endpoint, bind=True) is None
    assert endpoint_problem("tcp://127.0.0.1:*") is not None
    with pytest.raises(ConfigError, match="no port"):
        OrchestratorConfig(bind=["tcp://localhost"]).validate()


@pytest.mark.parametrize("endpoint", ["localhost:5555", "garbage", "tcp://localhost"])
def test_clients_refuse_a_malformed_endpoint_at_once(endpoint: str) -> None:
    started = time.monotonic()
    with pytest.raises(ValueError, match="is not a ZeroMQ endpoint"):
        Client(endpoint)
    with pytest.raises(ValueError, match="is not a ZeroMQ endpoint"):
        Client(["tcp://127.0.0.1:5555", endpoint])
    with pytest.raises(ValueError, match="is not a ZeroMQ endpoint"):
        Client("tcp://127.0.0.1:5555", pub=endpoint)
    with pytest.raises(ValueError, match="is not a ZeroMQ endpoint"):
        AsyncClient(endpoint)
    assert time.monotonic() - started < 1.0


class _DeadOnStart(Client):
    """A client whose I/O thread cannot open its socket."""

    def _connect(self) -> zmq.Socket[Any]:
        raise zmq.ZMQError(zmq.EINVAL, "Invalid argument")


def test_an_io_thread_that_dies_fails_every_pending_future_with_its_error() -> None:
    client = _DeadOnStart("tcp://127.0.0.1:9")
    try:
        started = time.monotonic()
        fut = client.submit("echo", 1)
        with pytest.raises(ClientClosed, match="I/O thread stopped: ZMQError: Invalid argument") as err:
            fut.result(timeout=10)
        assert isinstance(err.value.__cause__, zmq.ZMQError)
        with pytest.raises(ClientClosed, match="Invalid argument"):
            client.status(timeout=10)  # not a 10 s wait and a false "unreachable"
        futures = client.submit_many("echo", [(1,), (2,)])
        for f in futures:
            with pytest.raises(ClientClosed):
                f.result(timeout=10)
        assert time.monotonic() - started < 5
    finally:
        client.close()


def test_an_io_thread_that_dies_mid_run_fails_what_is_pending(broker: Any) -> None:
    client = Client(broker.endpoints["bind"][0])
    try:
        assert client.status(timeout=10)["satellites"] == []
        fut = client.submit("echo", 1)  # no satellite: it stays pending in the orchestrator

        def broken(frames: Any) -> bool:
            raise RuntimeError("a bug in the reply handling")

        client.core.handle = broken  # type: ignore[method-assign]
        with pytest.raises(ClientClosed, match="RuntimeError: a bug in the reply handling"):
            client.status(timeout=10)
        with pytest.raises(ClientClosed, match="a bug"):
            fut.result(timeout=10)
        with pytest.raises(ClientClosed, match="a bug"):
            client.submit("echo", 2).result(timeout=10)
    finally:
        client.close()


def test_an_async_reading_task_that_dies_fails_what_is_pending(broker: Any) -> None:
    async def scenario() -> None:
        client = AsyncClient(broker.endpoints["bind"][0])
        try:
            await client.status(timeout=10)
            fut = client.submit_nowait("echo", 1)

            def broken(frames: Any) -> bool:
                raise RuntimeError("a bug in the reply handling")

            client.core.handle = broken  # type: ignore[method-assign]
            with pytest.raises(ClientClosed, match="RuntimeError: a bug"):
                await client.status(timeout=10)
            with pytest.raises(ClientClosed, match="a bug"):
                await asyncio.wait_for(fut, 10)
            with pytest.raises(ClientClosed, match="a bug"):
                await client.submit("echo", 2)
        finally:
            await client.close()

    asyncio.run(scenario())



# -- item 5: no answer may mean "keys wanted" ------------------------------------------------------

def test_no_answer_says_that_the_server_may_want_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchester import Unreachable

    monkeypatch.delenv("ORCHESTER_CURVE_SECRET", raising=False)
    monkeypatch.delenv("ORCHESTER_SERVER_KEY", raising=False)
    with Client("tcp://127.0.0.1:9") as client, pytest.raises(Unreachable) as err:
        client.status(timeout=0.3)
    assert "no orchestrator answered at tcp://127.0.0.1:9 within 0.3s" in str(err.value)
    assert "CurveZMQ keys" in str(err.value) and "--curve-secret" in str(err.value)

    async def scenario() -> str:
        client = AsyncClient("tcp://127.0.0.1:9")
        try:
            await client.status(timeout=0.3)
        except Unreachable as exc:
            return str(exc)
        finally:
            await client.close()
        return ""

    assert "CurveZMQ keys" in asyncio.run(scenario())


# -- item 6: orchester fit checks its settings before anything is submitted ---------------------------

@pytest.mark.parametrize(("args", "complaint"), [
    (["--generations", "0"], "'--generations': 0 is not in the range x>=1"),
    (["--generations", "-5"], "'--generations': -5 is not in the range x>=1"),
    (["--population", "2"], "'--population': 2 is not in the range x>=5"),
    (["--seed", "-1"], "'--seed': -1 is not in the range"),
    (["--method", "best_2_bin"], "'--method': 'best_2_bin' is not one of"),
    (["--kr", "1.5"], "'--kr': 1.5 is not in the range"),
    (["--max-evaluations", "0"], "'--max-evaluations': 0 is not in the range x>=1"),
    (["--timeout", "0"], "'--timeout': 0.0 is not in the range x>0"),
])
def test_fit_refuses_bad_settings_before_submitting(args: list[str], complaint: str, tmp_path: Any) -> None:
    from click.testing import CliRunner

    from orchester.cli.main import main

    model = tmp_path / "m.hgx"
    model.write_bytes(b"never read")
    r = CliRunner().invoke(main, ["fit", *args, str(model), "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and complaint in r.output, r.output
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_fit_refuses_a_missing_file_and_a_directory(tmp_path: Any) -> None:
    from click.testing import CliRunner

    from orchester.cli.main import main

    for path, complaint in ((tmp_path / "nope.hgx", "does not exist"), (tmp_path, "is a directory")):
        r = CliRunner().invoke(main, ["fit", str(path), "--out", str(tmp_path / "out")])
        assert r.exit_code == 2 and complaint in r.output and r.output.startswith("error: "), r.output


def test_fit_knows_the_trial_methods_of_the_genx_task() -> None:
    pytest.importorskip("genx")
    from orchester.cli.fit import MIN_POPULATION, TRIAL_METHODS
    from satellites.genx_task import TRIAL_METHODS as ON_SATELLITES

    assert TRIAL_METHODS == ON_SATELLITES and MIN_POPULATION == 5


def test_fit_bars_never_pass_the_number_of_generations() -> None:
    from orchester.render import fit_progress

    # GenX reports the initial population and then every generation: N+1 reports for N generations
    assert fit_progress({"id": "t", "generation": 151, "fom": 0.1}, 150) == ("t", 150.0, "fom 0.1  ? ev/s")
    assert fit_progress({"id": "t", "generation": -5}, 150) == ("t", 0.0, "fom ?  ? ev/s")


# -- item 9: ids are never cut ----------------------------------------------------------------------

TASK_IDS = ["8fe34c0b9d5e4a7f1c2b3a4d5e6f7a8b", "a0ace8aa11bb22cc33dd44ee55ff6677"]
SAT_ID = "vm-25717-d3adbe-compute-node-17"


def _history_rows() -> list[dict[str, Any]]:
    now = time.time()
    return [{"id": tid, "kind": "genx.fit", "state": "failed", "attempts": 1, "satellite": SAT_ID,
             "submitted": now, "finished": now, "error": "RuntimeError: kaput, with a message long enough to wrap"}
            for tid in TASK_IDS]


def _status() -> dict[str, Any]:
    return {"epoch": "e1", "uptime": 5, "strategy": "least_loaded", "tasks": {"running": 1},
            "satellites": [{"id": SAT_ID, "state": "busy", "host": "vm-25717", "inflight": 1, "credit": 2,
                            "done": 3, "failed": 0, "heartbeat_age": 0.1, "tags": ["gpu", "big"]}]}


def _printed(render: Any, width: int) -> str:
    from rich.console import Console

    console = Console(record=True, width=width, file=open(os.devnull, "w"))  # noqa: SIM115
    try:
        render(console)
        return console.export_text()
    finally:
        console.file.close()


@pytest.mark.parametrize("width", [80, 100, 200])
def test_history_status_show_and_top_print_whole_ids(width: int) -> None:
    from orchester.cli.top import TopModel
    from orchester.render import render_history, render_status, render_task

    text = _printed(lambda c: render_history(_history_rows(), c), width)
    assert all(tid in text for tid in TASK_IDS) and "…" not in text.split("not shown")[0], text
    assert all(len(line) <= width for line in text.splitlines())
    text = _printed(lambda c: render_status(_status(), c), width)
    assert SAT_ID in text and "…" not in text, text
    text = _printed(lambda c: render_task({"id": TASK_IDS[0], "kind": "echo", "state": "done",
                                           "history": [{"t": time.time(), "state": "dispatched", "attempt": 1,
                                                        "sat": SAT_ID, "reason": ""}]}, c), width)
    assert TASK_IDS[0] in text and SAT_ID in text, text
    model = TopModel()
    model.on_status(_status(), 0.0)
    model.on_event(f"task:{TASK_IDS[1]}", {"id": TASK_IDS[1], "state": "running", "sat": SAT_ID, "t": 1.0})
    text = _printed(lambda c: c.print(model.render()), width)
    assert SAT_ID in text and TASK_IDS[1] in text and "…" not in text, text


def _cells(text: str, index: int, sep: str = " ") -> str:
    """The text of column ``index`` of a printed table's body, its lines joined by ``sep``."""
    body = text.split("satellites")[-1] if "satellites" in text else text  # the last table
    rows = [line.split("│") for line in body.splitlines() if line.startswith("│")]
    return sep.join(row[1:-1][index].strip() for row in rows if row[1:-1][index].strip())


def test_columns_that_do_not_fit_are_left_out_and_named() -> None:
    from orchester.render import render_history

    text = _printed(lambda c: render_history(_history_rows()[:1], c), 80)
    assert "not shown at 80 columns:" in text and "submitted" in text.split("not shown")[1]
    assert _cells(text, 2) == "RuntimeError: kaput, with a message long enough to wrap", text


def test_an_id_wider_than_the_terminal_is_folded_never_cut() -> None:
    from orchester.render import render_status

    status = _status()
    status["satellites"][0]["id"] = long_id = "node-" + "x" * 60 + "-end"
    text = _printed(lambda c: render_status(status, c), 40)
    assert "…" not in text and _cells(text, 0, "") == long_id, text


# -- item 10: history shows a failed task's whole error -------------------------------------------------

def test_history_prints_the_error_type_and_whole_message_wrapped() -> None:
    from orchester.render import render_history

    message = "ValueError: " + " ".join(f"word{i}" for i in range(80))  # about 500 characters
    row = {**_history_rows()[0], "error": message}
    for width in (80, 160):
        text = _printed(lambda c: render_history([row], c), width)
        assert _cells(text, -1) == message, text  # the error is the last column, wrapped, never cut


# -- item 12: help texts, keys advice, top's q, docs that work verbatim ----------------------------------

def _options_without_help() -> list[str]:
    import click

    from orchester.cli.main import main as orchester_main
    from satellites.cli import main as satellite_main

    missing: list[str] = []

    def walk(command: click.Command, path: str) -> None:
        missing.extend(f"{path} {'/'.join(p.opts)}" for p in command.params
                       if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip())
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, f"{path} {name}")

    walk(orchester_main, "orchester")
    walk(satellite_main, "satellite")
    return missing


def test_every_option_of_every_command_has_a_help_text() -> None:
    assert _options_without_help() == []


def test_keys_generate_says_where_each_file_goes(tmp_path: Any) -> None:
    from click.testing import CliRunner

    from orchester.cli.main import main

    r = CliRunner().invoke(main, ["keys", "generate", "head", "--dir", str(tmp_path / "server"), "--server"])
    assert r.exit_code == 0, r.output
    public, secret = r.output.splitlines()
    assert "give it to clients and satellites: --server-key" in public and "do not put it into" in public
    assert "orchester serve --curve-secret" in secret
    r = CliRunner().invoke(main, ["keys", "generate", "node", "--dir", str(tmp_path / "keys"), "--role", "satellite"])
    public, secret = r.output.splitlines()
    assert "copy it into the orchestrator's --authorized-keys directory: roles satellite" in public
    assert "for satellite run --curve-secret" in secret
    r = CliRunner().invoke(main, ["keys", "generate", "x", "--dir", str(tmp_path / "x"), "--server", "--role", "admin"])
    assert r.exit_code == 2 and "takes no --role" in r.output and not (tmp_path / "x").exists()


class _QuietClient:
    """Just enough of a client for run_top: an empty bus."""

    class _Stream:
        def recv(self, timeout: float = 0.0) -> None:
            time.sleep(timeout)

        def close(self) -> None:
            """A fake stream holds nothing to close."""

    def subscribe(self, topics: Any) -> Any:
        return self._Stream()

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        return {"epoch": "e", "satellites": [], "tasks": {}, "counters": {"done": 0}}


def test_top_quits_on_q() -> None:
    from rich.console import Console

    from orchester.cli.top import run_top

    r, w = os.pipe()
    try:
        os.write(w, b"xq")
        started = time.monotonic()
        run_top(_QuietClient(), interval=0.2, console=Console(file=open(os.devnull, "w")), keys=r)  # noqa: SIM115
        assert time.monotonic() - started < 5
    finally:
        os.close(r)
        os.close(w)


def test_docs_examples_work_verbatim() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    quickstart = (root / "docs" / "quickstart.rst").read_text()
    assert "mkdir -p authorized && cp keys/node.key authorized/" in quickstart
    assert "keys generate head --dir server/ --server" in quickstart
    readme = (root / "README.rst").read_text()
    assert "genx3 3.8.13 requires wxpython" in readme and "expected" in readme
    assert "mkdir -p authorized" in readme and "--server" in readme


def test_an_embedded_satellite_refuses_a_malformed_endpoint() -> None:
    from satellites.satellite import Satellite

    with pytest.raises(ValueError, match="not a ZeroMQ endpoint"):
        Satellite(["tcp://127.0.0.1:5555", "garbage"])


def test_the_servers_own_key_holds_no_role(tmp_path: Any) -> None:
    from orchester.security.auth import KeyRing
    from orchester.security.keys import generate_keys

    public, _ = generate_keys("head", tmp_path / "server", server=True)
    (tmp_path / "ring").mkdir()
    (tmp_path / "ring" / public.name).write_bytes(public.read_bytes())
    ring = KeyRing(tmp_path / "ring")
    who = ring.by_name("head")
    assert who is not None and who.roles == frozenset()  # even if authorised by mistake: it may do nothing


@pytest.mark.parametrize("value", ["0", "-1", "nan", "5000", "soon"])
def test_web_refuses_an_idle_timeout_out_of_range_in_one_line(value: str) -> None:
    from click.testing import CliRunner

    from orchester.cli.main import main

    r = CliRunner().invoke(main, ["web", "--idle-timeout", value, "--bind", "127.0.0.1:0"])
    assert r.exit_code == 2 and "--idle-timeout" in r.output and len(r.output.strip().splitlines()) == 1, r.output
