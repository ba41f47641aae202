"""Hardening (issue 14): routing strategies by allow-list (15), pickle needs every party's consent (17),
clients sanitise what peers send before they print it (11)."""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest

from orchester.config import ConfigError, OrchestratorConfig
from orchester.server.routing import LeastLoaded, TagAffinity, make_strategy

# ------------------------------------------------------------------ 15: routing strategies


class Recorder:
    """A zero-argument callable that records each call (what ``sys:exit`` was to the old code)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        return self


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """A module ``h14probe`` with a recording callable, a strategy class and a class without choose."""
    mod = types.ModuleType("h14probe")
    mod.boom = Recorder()  # type: ignore[attr-defined]
    built: list[object] = []

    class Strategy:
        def __init__(self) -> None:
            built.append(self)

        def choose(self, task: Any, candidates: Any) -> Any:
            return candidates[0]

    class NoChoose:
        def __init__(self) -> None:
            built.append(self)

    class Explodes:
        def __init__(self) -> None:
            raise RuntimeError("no")

        def choose(self, task: Any, candidates: Any) -> Any:
            return candidates[0]

    mod.Strategy, mod.NoChoose, mod.Explodes, mod.built = Strategy, NoChoose, Explodes, built  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "h14probe", mod)
    yield mod


def test_sys_exit_is_refused_and_never_called(monkeypatch: pytest.MonkeyPatch) -> None:
    exit_calls = Recorder()
    monkeypatch.setattr(sys, "exit", exit_calls)
    with pytest.raises(ValueError, match="not allowed"):
        make_strategy("sys:exit")
    with pytest.raises(ValueError, match="not a class"):  # even when an operator allowed it by mistake
        make_strategy("sys:exit", allowed=["sys:exit"])
    assert exit_calls.calls == 0


def test_a_path_off_the_allow_list_is_not_imported_nor_called(probe: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="not allowed.*--allow-strategy h14probe:boom"):
        make_strategy("h14probe:boom")
    with pytest.raises(ValueError, match="not allowed"):
        make_strategy("h14probe:Strategy", allowed=["h14probe:Other"])
    imported: list[str] = []
    monkeypatch.setattr("importlib.import_module", lambda name: imported.append(name))
    with pytest.raises(ValueError, match="not allowed"):
        make_strategy("antigravity:Anything")
    assert probe.boom.calls == 0 and probe.built == [] and imported == []


def test_an_allowed_path_must_name_a_strategy_class_checked_before_it_is_built(probe: Any) -> None:
    with pytest.raises(ValueError, match="is a Recorder, not a class"):
        make_strategy("h14probe:boom", allowed=["h14probe:boom"])
    with pytest.raises(ValueError, match="without a choose"):
        make_strategy("h14probe:NoChoose", allowed=["h14probe:NoChoose"])
    assert probe.boom.calls == 0 and probe.built == []
    with pytest.raises(ValueError, match="cannot instantiate.*RuntimeError: no"):
        make_strategy("h14probe:Explodes", allowed=["h14probe:Explodes"])
    with pytest.raises(ValueError, match="cannot import"):
        make_strategy("h14probe:Missing", allowed=["h14probe:Missing"])
    s = make_strategy("h14probe:Strategy", allowed=["h14probe:Strategy"])
    assert s.name == "h14probe:Strategy" and probe.built == [s]


def test_builtins_are_always_allowed_and_bad_names_are_refused() -> None:
    assert isinstance(make_strategy("least_loaded"), LeastLoaded)
    assert isinstance(make_strategy("orchester.server.routing:TagAffinity"), TagAffinity)
    for bad in ("nope", "os.system", ":x", "a:b:c", "a b:C", "mod:Class()", "x" * 10_000):
        with pytest.raises(ValueError, match="unknown routing strategy"):
            make_strategy(bad, allowed=[bad])
    with pytest.raises(ValueError):
        make_strategy(12, allowed=[12])  # type: ignore[arg-type, list-item]


def test_the_config_allows_its_start_strategy_and_the_listed_ones() -> None:
    cfg = OrchestratorConfig(strategy="mylab.routing:A", strategies=["mylab.routing:B"]).validate()
    assert cfg.allowed_strategies == {"mylab.routing:A", "mylab.routing:B"}
    assert OrchestratorConfig().validate().allowed_strategies == {"least_loaded"}
    for bad in ({"strategy": "sys.exit"}, {"strategies": ["os:system()"]}, {"strategies": "mylab:A"}):
        with pytest.raises(ConfigError):
            OrchestratorConfig(**bad).validate()  # type: ignore[arg-type]


# ------------------------------------------------------------------ 17: pickle needs every party's consent

def _hit() -> str:
    """What a pickle payload calls on load (records the call)."""
    HITS.append(1)
    return "ran"


HITS: list[int] = []


class _Evil:
    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_hit, ())


@pytest.fixture
def pickle_on() -> Iterator[None]:
    """This process allows pickle (as a worker of ``satellite run --allow-pickle`` does)."""
    from serializers import codecs

    HITS.clear()
    codecs.allow_pickle(True)
    yield
    codecs.allow_pickle(False)


def _run(task_header: dict[str, Any], body: bytes, dispatch: dict[str, Any]) -> dict[str, Any]:
    """Run the task as a worker does (every header decoded from its bytes) and as the inline thread does
    (the headers as the satellite's loop decoded them): both must come to the same answer, and call the task
    alike (``HITS``)."""
    import satellites.builtins  # noqa: F401  (registers echo)
    from satellites.worker import run_task
    from serializers import messages as M
    from serializers import pack, unpack

    frames = [pack({"id": "t-1", "a": 1, **dispatch}), pack(task_header), body]
    before = len(HITS)
    order = M.Dispatch.decode(unpack(frames[0]))
    inline = unpack(run_task(frames, "sat-1", lambda h: None, pools=None, decoded=(order, unpack(frames[1])))[0])
    inline_hits = HITS[before:]
    del HITS[before:]
    out = unpack(run_task(frames, "sat-1", lambda h: None)[0])
    assert HITS[before:] == inline_hits
    assert {k: v for k, v in inline.items() if k != "dt"} == {k: v for k, v in out.items() if k != "dt"}
    return out


def test_the_orchestrator_accepts_pickle_submits_only_when_started_with_allow_pickle() -> None:
    from serializers import ProtocolError, check_submit_codec, dispatch_consent
    from serializers import protocol as P

    assert check_submit_codec({"id": "x"}, allow_pickle=False) == "msgpack"
    assert check_submit_codec({"c": "json"}, allow_pickle=False) == "json"
    with pytest.raises(ProtocolError) as e:
        check_submit_codec({"c": "pickle"}, allow_pickle=False)
    assert e.value.code == P.E_CODEC and "--allow-pickle" in e.value.detail
    assert check_submit_codec({"c": "pickle"}, allow_pickle=True) == "pickle"
    with pytest.raises(ProtocolError) as e:  # CurveZMQ: the key needs the pickle role too
        check_submit_codec({"c": "pickle"}, allow_pickle=True, roles={"submit"})
    assert e.value.code == P.E_FORBIDDEN
    assert check_submit_codec({"c": "pickle"}, allow_pickle=True, roles={"submit", "pickle"}) == "pickle"
    for bad in (5, None, "", "x" * 65, ["pickle"]):
        with pytest.raises(ProtocolError) as e:
            check_submit_codec({"c": bad}, allow_pickle=True)
        assert e.value.code == P.E_MALFORMED
    assert dispatch_consent(False) == {} and dispatch_consent(True) == {"pk": True}


def test_a_satellite_allowing_pickle_refuses_a_pickle_task_the_orchestrator_did_not_accept(pickle_on: None) -> None:
    import pickle

    from serializers import ERR_CODEC_REFUSED

    body = pickle.dumps([[_Evil()], {}])
    r = _run({"k": "echo", "c": "pickle"}, body, {})
    assert r["ok"] is False and r["err"]["type"] == ERR_CODEC_REFUSED
    assert "orchestrator did not accept pickle" in r["err"]["msg"] and HITS == []
    r = _run({"k": "echo", "c": "pickle"}, body, {"pk": 1})  # consent is exactly True
    assert r["err"]["type"] == ERR_CODEC_REFUSED and HITS == []
    for codec in ("msgpack", "json"):  # never guessed from the bytes
        r = _run({"k": "echo", "c": codec}, body, {"pk": True})
        assert r["ok"] is False and HITS == []
    r = _run({"k": "echo", "c": "pickle"}, body, {"pk": True})  # every party agreed: it runs
    assert r["ok"] is True and HITS == [1]


def test_a_satellite_without_allow_pickle_refuses_even_with_the_orchestrators_consent() -> None:
    import pickle

    from serializers import ERR_CODEC_REFUSED, check_run_codec, codecs

    HITS.clear()
    assert not codecs.pickle_allowed()
    r = _run({"k": "echo", "c": "pickle"}, pickle.dumps([[_Evil()], {}]), {"pk": True})
    assert r["err"]["type"] == ERR_CODEC_REFUSED and "satellite run --allow-pickle" in r["err"]["msg"]
    assert HITS == []
    assert check_run_codec({"c": "pickle"}, {"pk": True}, allow_pickle=True) == "pickle"
    assert check_run_codec({}, {}) == "msgpack"


# ------------------------------------------------------------------ 11: clients sanitise what peers send

FORGED: dict[str, Any] = {
    "id": "t-1", "a": 1, "sat": "[/]\x1b[2J", "t": "boom", "fom": "boom", "generation": "x",
    "evals_per_s": float("nan"), "done": "many", "total": 0,
    "msg": "line\nforged \x1b]0;title\x07 \x9b31m [bold red]x[/] \u202eevil", "\x1b[31m": 1,
}


def test_clean_text_strips_every_control_character_and_bounds_the_length() -> None:
    from orchester.render import clean_text

    out = clean_text("a\x1b[31mb\x9b2Jc\nd\re\tf\x00g\x7fh\u202ei\u2028j\ud800k")
    assert out == "a\ufffd[31mb\ufffd2Jc\ufffdd\ufffde\ufffdf\ufffdg\ufffdh\ufffdi\ufffdj\ufffdk"
    assert clean_text("x" * 1000, 10) == "x" * 9 + "…" and len(clean_text("é" * 10**6)) == 200
    assert clean_text(None) == "" and clean_text(1.5) == "1.5" and clean_text(True) == "True"
    assert clean_text(b"\x1b[2J") == "b'\\x1b[2J'" and clean_text(2**200) == "1.607e+60"
    assert "\x1b" not in clean_text(["\x1b"]) and clean_text("ok [bold]") == "ok [bold]"


def test_finite_accepts_only_real_finite_numbers() -> None:
    from orchester.render import clock, finite, fmt

    assert finite(3) == 3.0 and finite(-2.5) == -2.5 and finite(1e308) == 1e308
    for bad in ("boom", "3", True, None, float("nan"), float("inf"), -float("inf"), 10**400, [1], {"a": 1}):
        assert finite(bad) is None and finite(bad, 7.0) == 7.0
    assert finite(5, None, 0, 4) is None and finite(-1, 0.0, 0.0) == 0.0
    assert fmt("boom", ".4g", "?") == "?" and fmt(0.123456, ".2f") == "0.12"
    assert clock("boom") == clock(1e308) == clock(-5) == clock(float("nan")) == "--:--:--"
    assert len(clock(1_700_000_000)) == 8


def test_markup_and_cells_keep_peer_text_literal() -> None:
    import io

    from rich.console import Console
    from rich.table import Table

    from orchester.render import cell, markup

    buf = io.StringIO()
    console = Console(file=buf, width=200)
    peer = "[/]x[bold red]y\\"
    console.print(f"[bold]task[/] {markup(peer)}")
    table = Table()
    table.add_column("id")
    table.add_row(cell("[/][link=file:///etc/passwd]z\x1b[2J"))
    console.print(table)
    text = buf.getvalue()
    assert "[/]x[bold red]y" in text and "[/][link=file:///etc/passwd]z" in text and "\x1b" not in text


def test_progress_helpers_survive_forged_fields() -> None:
    from orchester.render import event_fields, fit_progress, json_safe, progress_bar

    assert progress_bar(FORGED) == (None, None)
    assert progress_bar({"done": 3, "total": 5}) == (3.0, 5.0) and progress_bar({"step": 9, "of": 5}) == (None, None)
    tid, generation, info = fit_progress(FORGED, 100) or ("", -1.0, "")
    assert tid == "t-1" and generation == 0.0 and info == "fom ?  ? ev/s"
    assert fit_progress({"id": "t", "generation": 1e9, "fom": 0.5}, 100) == ("t", 100.0, "fom 0.5  ? ev/s")
    assert fit_progress({"id": ["t"]}, 100) is None and fit_progress({"id": "x" * 1000}, 100) is None
    line = event_fields(FORGED)
    assert "\x1b" not in line and "\n" not in line and "\x9b" not in line and "\u202e" not in line
    assert "fom=boom" in line and "t=" not in line.split()  # t is skipped
    assert len(event_fields({f"k{i}": "v" * 500 for i in range(100)})) < 16 * 90 + 20
    assert json_safe({"a": [float("nan"), 1.0, {"b": float("inf")}]}) == {"a": [None, 1.0, {"b": None}]}


class _Stream:
    """Events for ``_show_progress``, then the future is done."""

    def __init__(self, events: list[Any], fut: Any) -> None:
        self.events, self.fut = events, fut

    def recv(self, timeout: float | None = None) -> Any:
        time.sleep(0.15)  # the bar refreshes (renders each field) in between
        if not self.events:
            self.fut.finished = True
            return None
        return self.events.pop(0)


class _Future:
    task_id = "t-1"
    finished = False

    def done(self) -> bool:
        return self.finished


def test_the_submit_progress_bar_survives_forged_progress(capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from orchester.cli.tasks import _show_progress
    from orchester.client.events import Event

    monkeypatch.setenv("FORCE_COLOR", "1")  # render as on a terminal
    monkeypatch.setenv("COLUMNS", "200")
    died: list[Any] = []  # the bar is drawn by rich's refresh thread: markup errors kill it there
    monkeypatch.setattr(threading, "excepthook", died.append)

    fut = _Future()
    events = [Event("progress:t-1", dict(FORGED)), Event("task:t-1", {"id": "t-1", "state": "[/]\x1b[2J"}),
              Event("progress:t-1", {"id": "t-1", "done": float("inf"), "total": "[/]"}),
              Event("progress:t-10", {"id": "t-10", "done": 1, "total": 2}),  # another task: not shown
              Event("progress:t-1", {"id": "t-1", "done": 2, "total": 5, "note": "[bold]"})]
    _show_progress(fut, _Stream(events, fut))
    err = capsys.readouterr().err
    assert died == [] and "fom=boom" in err
    assert "\x1b]0;title" not in err and "\x1b[2J" not in err and "\x9b" not in err and "\u202e" not in err


def test_top_survives_forged_events_and_status() -> None:
    import io

    from rich.console import Console

    from orchester.cli.top import TopModel

    model = TopModel()
    for data in ({"id": "t", "state": "pending", "t": "boom"}, {"id": "t", "state": "running", "sat": ["x"]},
                 {"id": ["t"], "state": "done"}, {"id": "t", "state": "done", "t": float("nan")},
                 {"id": "u", "state": "running", "sat": "[/]\x1b[2J"}, {"id": "t", "state": 5}):
        model.on_event("task:x", data)
    model.on_status({"epoch": "\x1b[2J", "strategy": "[/]", "counters": {"done": "boom"},
                     "satellites": [{"id": "[/]\x1b[2J", "state": "[bold]", "inflight": "x", "slots": None,
                                     "reported": {"cpu_percent": "boom", "rss_mb": float("inf")}}, "junk"],
                     "tasks": {"[/]": "boom"}, "queued": {"\x1b[2J": 1}}, 0.0)
    buf = io.StringIO()
    Console(file=buf, width=200).print(model.render())
    assert "\x1b[2J" not in buf.getvalue() and "[/]" in buf.getvalue()


def test_status_show_and_history_tables_survive_forged_text() -> None:
    import io

    from rich.console import Console

    from orchester.render import render_history, render_status, render_task

    evil = "[/]\x1b[2J\x9b1m"
    buf = io.StringIO()
    console = Console(file=buf, width=300)
    render_status({"epoch": evil, "uptime": "boom", "strategy": evil, "ha": {"role": evil, "alarms": {evil: "x"}},
                   "tasks": {evil: 1}, "satellites": [{"id": evil, "state": evil, "host": evil, "inflight": 1,
                                                       "slots": 2, "tags": [evil], "heartbeat_age": "x"}]}, console)
    render_task({"id": evil, "kind": evil, "state": evil, "history": [{"t": "boom", "state": evil, "reason": evil}]},
                console)
    render_history([{"id": evil, "kind": evil, "state": evil, "attempts": 1, "satellite": evil, "submitted": 1e308,
                     "finished": "x", "error": evil}], console)
    text = buf.getvalue()
    assert "\x1b" not in text and "\x9b" not in text and "[/]" in text


def test_events_give_checked_fields() -> None:
    from orchester.client.events import Event

    ev = Event("progress:t", dict(FORGED))
    assert ev.number("fom") is None and ev.number("fom", 0.0) == 0.0 and ev.number("a") == 1.0
    assert "\x1b" not in ev.text("msg") and len(ev.text("msg", 10)) == 10


def test_a_result_for_a_future_cancelled_meanwhile_is_dropped_without_an_error() -> None:
    """The I/O thread checks ``done()`` then sets the result; a caller's ``cancel()`` in between must not
    raise in the I/O thread (it would stop it, failing every pending future)."""
    import asyncio

    from orchester.client.core import reject_future, resolve_future
    from orchester.client.sync import TaskFuture

    class SeenPending(TaskFuture):
        def done(self) -> bool:
            return False  # (what the I/O thread saw, just before the caller cancelled)

    for make_condition in (False, True):
        fut = SeenPending()
        if make_condition:
            assert not fut.running()  # (a condition made: the slow path)
        assert fut.cancel()
        resolve_future(fut, 1)
        reject_future(fut, ValueError("late"))
        assert fut.cancelled()

    class SeenPendingAio(asyncio.Future):  # type: ignore[type-arg]
        def done(self) -> bool:
            return False

    loop = asyncio.new_event_loop()
    try:
        aio = SeenPendingAio(loop=loop)
        aio.cancel()
        resolve_future(aio, 1)
        reject_future(aio, ValueError("late"))
        assert aio.cancelled()
    finally:
        loop.close()


def test_a_finished_future_answers_result_at_once_and_every_other_state_as_a_future_does() -> None:
    """``result()`` of a future that has its result returns it without a lock or a condition; one that failed
    raises its exception, one cancelled raises CancelledError, one still pending waits (and times out)."""
    import concurrent.futures as cf

    from orchester.client.core import reject_future, resolve_future
    from orchester.client.sync import TaskFuture

    done = TaskFuture()
    resolve_future(done, {"x": 1})
    assert done.result() == {"x": 1} and done.result(0) == {"x": 1}
    assert "_cond" not in done.__dict__ and done._wanted  # (the fast path made nothing; the wait is recorded)
    asked: list[int] = []
    done._demand(lambda: asked.append(1))  # passed by reference after a wait: asked for at once, as before
    assert asked == [1]

    failed = TaskFuture()
    reject_future(failed, ValueError("bad"))
    with pytest.raises(ValueError, match="bad"):
        failed.result()

    cancelled = TaskFuture()
    assert cancelled.cancel()
    with pytest.raises(cf.CancelledError):
        cancelled.result()

    pending = TaskFuture()
    with pytest.raises(TimeoutError):
        pending.result(0.01)
    resolve_future(pending, 2)
    assert pending.result() == 2
