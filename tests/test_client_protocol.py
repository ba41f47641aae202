"""What the clients do with what they receive, read through :mod:`serializers.messages`: each kind of
answer reaches its future; a malformed one is refused with a ProtocolError (logged by the adapter),
fails at most the one future it names, and never stops the I/O thread or the reading task. The
requests the clients' methods send are the bytes they sent before the typed messages."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import time
from typing import Any

import pytest
import zmq

from orchester import AsyncClient, Client
from orchester import ref as orchester_ref
from orchester.client.core import ClientCore
from orchester.errors import RemoteError, TaskFailed
from serializers import ProtocolError, encode, pack, unpack
from serializers import messages as M
from serializers import protocol as P

E = "0f3c2a9b1d4e5f60"

#: Messages a client cannot read (after the routing envelope), and the error code each gets.
GARBAGE: list[tuple[list[bytes], str]] = [
    ([b"junk"], P.E_MALFORMED),
    ([b"ORCH/1", P.ACK, pack({"ids": [], "e": E})], P.E_VERSION),
    ([P.SIGNATURE, P.ACK, b"\xc1"], P.E_MALFORMED),
    ([P.SIGNATURE, P.ACK, pack({"ids": "t", "e": E})], P.E_MALFORMED),
    ([P.SIGNATURE, P.ACK, pack({"ids": [1], "e": E})], P.E_MALFORMED),
    ([P.SIGNATURE, P.REPLY, pack({"rid": 1.5})], P.E_MALFORMED),
    ([P.SIGNATURE, P.ERROR, pack({"code": 5, "msg": "x"})], P.E_MALFORMED),
    ([P.SIGNATURE, P.HEARTBEAT, pack({})], P.E_MALFORMED),
    ([P.SIGNATURE, P.HEARTBEAT, pack({"e": float("nan")})], P.E_MALFORMED),
    ([P.SIGNATURE, P.DISPATCH, pack({"id": "t", "a": 1})], P.E_UNKNOWN_COMMAND),
    ([P.SIGNATURE, b"\xff", pack({})], P.E_UNKNOWN_COMMAND),
    ([P.SIGNATURE, P.RESULT, pack({"id": "nobody", "a": 1, "ok": True, "arr": "x"})], P.E_MALFORMED),
    ([P.SIGNATURE, P.RESULT, pack([1, 2])], P.E_MALFORMED),
]


class Recorder:
    """A ClientCore whose futures are plain strings: what each was resolved or rejected with."""

    def __init__(self) -> None:
        self.outcomes: dict[Any, Any] = {}
        self.accepted: list[Any] = []
        self.core = ClientCore(self.outcomes.__setitem__, self.outcomes.__setitem__, accepted=self.accepted.append)


def test_each_answer_reaches_its_future() -> None:
    r = Recorder()
    core = r.core
    _, body = encode([1, 2])
    core.submit("ok", "echo", (), {}, task_id="t-ok")
    core.submit("fails", "echo", (), {}, task_id="t-fails")
    core.submit("refused", "echo", (), {}, task_id="t-refused")
    status = core.ask("status", M.Status())
    rid = unpack(status[2])["rid"]
    assert core.handle(M.ack(["t-ok", "t-fails", "unknown"], E)) is False and r.accepted == ["ok", "fails"]
    assert core.epoch == E
    assert core.handle([*M.Result("t-ok", 1, True, sat="s1", codec="msgpack").frames(), *body]) is False
    assert r.outcomes["ok"] == [1, 2] and core.rx == 1
    err = {"type": "ValueError", "msg": "bad", "tb": "Traceback"}
    core.handle(M.Result("t-fails", 2, False, err=err, sat="s1").frames())
    failed = r.outcomes["fails"]
    assert isinstance(failed, TaskFailed) and failed.satellite == "s1" and "ValueError" in str(failed)
    core.handle(M.Error("unknown_kind", "no satellite offers it", id="t-refused").frames())
    assert isinstance(r.outcomes["refused"], RemoteError) and r.outcomes["refused"].code == P.E_UNKNOWN_KIND
    core.handle(M.reply(rid, {"uptime": 3.0, "tasks": {}}))
    assert r.outcomes["status"] == {"uptime": 3.0, "tasks": {}}
    assert core.tasks == {} and core.requests == {}


def test_an_error_naming_a_request_fails_that_request() -> None:
    r = Recorder()
    frames = r.core.ask("cancel", M.Cancel("t1"))
    rid = unpack(frames[2])["rid"]
    r.core.handle(M.Error("unknown_task", "no task 't1'", rid=rid).frames())
    assert isinstance(r.outcomes["cancel"], RemoteError) and r.outcomes["cancel"].code == P.E_UNKNOWN_TASK
    r.core.handle(M.Error("busy", "later", id=5, rid="x").frames())  # names nothing we wait for: dropped
    assert len(r.outcomes) == 1


def test_a_new_epoch_comes_with_an_ack_or_a_heartbeat_only() -> None:
    r = Recorder()
    core = r.core
    assert core.handle(M.beat(P.HEARTBEAT, E)) is False and core.epoch == E  # the first: news, not a restart
    assert core.handle(M.beat(P.HEARTBEAT, E)) is False
    assert core.handle(M.ack([], "another")) is True and core.epoch == "another"
    core.submit("f", "echo", (), {}, task_id="t1")
    # a satellite's DONE header is forwarded as the RESULT's: an "e" there is no epoch
    core.handle([P.SIGNATURE, P.RESULT, pack({"id": "t1", "a": 1, "ok": False, "e": "forged",
                                              "err": {"type": "X", "msg": "", "tb": ""}})])
    assert core.epoch == "another"
    core.handle(M.reply(None, {"e": "forged"}))
    assert core.epoch == "another"


@pytest.mark.parametrize(("frames", "code"), GARBAGE, ids=range(len(GARBAGE)))
def test_a_malformed_message_is_a_protocol_error_and_changes_nothing(frames: list[bytes], code: str) -> None:
    r = Recorder()
    r.core.submit("f", "echo", (), {}, task_id="t1")
    r.core.ask("status", M.Status())
    r.core.handle(M.beat(P.HEARTBEAT, E))
    with pytest.raises(ProtocolError) as e:
        r.core.handle(frames)
    assert e.value.code == code
    assert r.outcomes == {} and set(r.core.tasks) == {"t1"} and len(r.core.requests) == 1
    assert r.core.epoch == E and not r.core.redirect


def test_a_result_that_does_not_decode_fails_its_future_only() -> None:
    r = Recorder()
    for tid in ("t1", "t2", "t3"):
        r.core.submit(tid, "echo", (), {}, task_id=tid)
    for bad in ({"id": "t1", "a": 1, "ok": "yes"}, {"id": "t2", "a": "1", "ok": True},
                {"id": "t3", "a": 1, "ok": True, "dt": float("inf")}):
        with pytest.raises(ProtocolError):
            r.core.handle([P.SIGNATURE, P.RESULT, pack(bad)])
        failure = r.outcomes[bad["id"]]
        assert isinstance(failure, RemoteError) and failure.code == P.E_MALFORMED
        assert "bad result from the orchestrator" in str(failure)
    assert r.core.tasks == {} and r.core.rx == 3  # counted as received all the same (the orchestrator counts them)


def test_a_failed_result_with_an_error_of_the_wrong_shape_is_a_bad_result() -> None:
    r = Recorder()
    r.core.submit("f", "echo", (), {}, task_id="t1")
    r.core.handle([P.SIGNATURE, P.RESULT, pack({"id": "t1", "a": 1, "ok": False, "err": ["x"], "sat": None})])
    failed = r.outcomes["f"]
    assert isinstance(failed, TaskFailed) and "BadResult" in str(failed) and failed.satellite is None


def test_a_pickled_result_is_refused_unless_the_task_was_pickled() -> None:
    r = Recorder()
    r.core.submit("f", "echo", (), {}, task_id="t1")
    r.core.handle([*M.Result("t1", 1, True, codec="pickle").frames(), b"\x80\x05N."])
    assert isinstance(r.outcomes["f"], RemoteError) and r.outcomes["f"].code == P.E_CODEC


def test_a_passive_server_redirects_a_client_that_has_another() -> None:
    r = Recorder()
    r.core.alternatives = True
    r.core.ask("status", M.Status())
    r.core.handle(M.reply(1, {"uptime": 1.0, "ha": {"state": "passive"}}))
    assert r.core.redirect and r.outcomes == {} and len(r.core.requests) == 1  # resent to the other server
    r.core.redirect = False
    r.core.handle(M.Error(P.E_NOT_ACTIVE, "ask its peer", rid=1).frames())
    assert r.core.redirect and r.outcomes == {}


# ------------------------------------------------------------------ over a socket

class FakeOrchestrator:
    """A ROUTER the test answers from by hand."""

    def __init__(self, router: zmq.Socket[Any]) -> None:
        self.router = router
        self.endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
        self.heartbeats: list[dict[str, Any]] = []

    def expect(self, command: bytes, timeout: float = 5.0) -> tuple[bytes, bytes, list[bytes]]:
        """The next message of ``command`` (heartbeats on the way are kept): ``(identity, header, payload)``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.router.poll(100):
                continue
            ident, sig, cmd, hdr, *payload = self.router.recv_multipart()
            assert sig == P.SIGNATURE
            if cmd == P.HEARTBEAT and command != P.HEARTBEAT:
                self.heartbeats.append(unpack(hdr))
                continue
            assert cmd == command, (P.command_name(cmd), unpack(hdr))
            return ident, hdr, payload
        raise AssertionError(f"no {P.command_name(command)} within {timeout}s")

    def send(self, ident: bytes, frames: list[bytes]) -> None:
        self.router.send_multipart([ident, *frames])


#: Each request method of the clients, and the header it sends (the bytes of before, but for the rid).
REQUESTS: list[tuple[str, tuple[Any, ...], dict[str, Any], bytes, dict[str, Any]]] = [
    ("status", (), {}, P.STATUS, {}),
    ("show", ("t1",), {}, P.STATUS, {"task": "t1"}),
    ("cancel", ("t1",), {}, P.CANCEL, {"id": "t1"}),
    ("set_strategy", ("round_robin",), {}, P.CONTROL, {"op": "strategy", "name": "round_robin"}),
    ("drain", ("sat-1",), {}, P.CONTROL, {"op": "drain", "sid": "sat-1"}),
    ("promote", (), {"force": True}, P.CONTROL, {"op": "promote", "force": True}),
    ("history", (), {}, P.HISTORY, {}),
    ("history", (), {"state": "failed", "kind": "echo", "since": 1.0, "until": 2, "ids": ["a", "b"], "limit": 5},
     P.HISTORY, {"state": "failed", "kind": "echo", "since": 1.0, "until": 2, "limit": 5, "ids": ["a", "b"]}),
]
#: What the fake answers: the body each method takes its value from.
ANSWER = {"task": {"id": "t1"}, "rows": [{"id": "t1"}], "uptime": 1.0}


def _value(method: str, got: Any) -> None:
    if method == "show":
        assert got == {"id": "t1"}
    elif method == "history":
        assert got == [{"id": "t1"}]
    else:
        assert got == ANSWER


def test_the_client_survives_whatever_the_orchestrator_sends(socket: Any) -> None:
    fake = FakeOrchestrator(socket(zmq.ROUTER))
    with Client(fake.endpoint, heartbeat_interval=0.2) as client, cf.ThreadPoolExecutor(1) as pool:
        fut = client.submit("echo", 1)
        ident, hdr, payload = fake.expect(P.SUBMIT)
        assert unpack(hdr)["id"] == fut.task_id and len(payload) == 1
        for frames, _ in GARBAGE:
            fake.send(ident, frames)
        fake.send(ident, M.ack([fut.task_id], E))
        assert fut.accepted.wait(5)
        fake.send(ident, [P.SIGNATURE, P.RESULT, pack({"id": fut.task_id, "a": 1, "ok": "yes"})])
        with pytest.raises(RemoteError, match="bad result from the orchestrator"):
            fut.result(5)
        for method, args, kwargs, command, expected in REQUESTS:  # the I/O thread goes on, and asks as before
            answer = pool.submit(getattr(client, method), *args, **kwargs)
            ident, hdr, _ = fake.expect(command)
            rid = unpack(hdr)["rid"]
            assert isinstance(rid, int) and hdr == pack({**expected, "rid": rid}), method
            if method == "status":  # a client waiting for an answer pings, saying how many results it received
                assert fake.expect(P.HEARTBEAT)[1] == pack({"rx": 3})  # (every RESULT frame: two were garbage)
            fake.send(ident, M.reply(rid, dict(ANSWER)))
            _value(method, answer.result(5))
        done = client.submit("echo", 2)
        ident, hdr, _ = fake.expect(P.SUBMIT)
        _, body = encode(2)
        fake.send(ident, [*M.Result(done.task_id, 1, True, sat="s1", codec="msgpack").frames(), *body])
        assert done.result(5) == 2
        assert client.failure is None and client._thread.is_alive()
    assert all(set(h) == {"rx"} for h in fake.heartbeats)


def test_the_async_client_survives_whatever_the_orchestrator_sends(socket: Any) -> None:
    fake = FakeOrchestrator(socket(zmq.ROUTER))

    async def expect(command: bytes) -> tuple[bytes, bytes, list[bytes]]:
        return await asyncio.to_thread(fake.expect, command)

    async def main() -> None:
        async with AsyncClient(fake.endpoint, heartbeat_interval=0.2) as client:
            fut = client.submit_nowait("echo", 1)
            ident, hdr, _ = await expect(P.SUBMIT)
            for frames, _ in GARBAGE:
                fake.send(ident, frames)
            fake.send(ident, M.ack([fut.task_id], E))
            await asyncio.wait_for(fut.accepted.wait(), 5)
            fake.send(ident, [P.SIGNATURE, P.RESULT, pack({"id": fut.task_id, "a": 1, "ok": True, "arr": [1]})])
            with pytest.raises(RemoteError, match="bad result from the orchestrator"):
                await asyncio.wait_for(fut, 5)
            for method, args, kwargs, command, expected in REQUESTS:
                answer = asyncio.ensure_future(getattr(client, method)(*args, **kwargs))
                ident, hdr, _ = await expect(command)
                rid = unpack(hdr)["rid"]
                assert hdr == pack({**expected, "rid": rid}), method
                fake.send(ident, M.reply(rid, dict(ANSWER)))
                _value(method, await asyncio.wait_for(answer, 5))
            with pytest.raises(TypeError, match="unknown filters \\['stat'\\]"):
                await client.history(stat="failed")
            assert client.failure is None

    asyncio.run(main())


def test_a_result_passed_by_reference_is_asked_for_when_wanted_and_again_after_a_resend() -> None:
    """A task of this client that another task of it takes by reference: its future asks for its result
    (FETCH) when someone wants it, and asks again with the SUBMIT it resends to a restarted server."""
    asked: list[Any] = []
    core = ClientCore(lambda f, v: None, lambda f, e: None, on_demand=asked.append)
    first, second = cf.Future(), cf.Future()
    tid, _ = core.submit(first, "echo", [1], {})
    _, frames = core.submit(second, "echo", [orchester_ref(tid)], {})
    assert asked == [first]  # passed by reference: its future is told
    hdr = unpack(frames[2])
    assert hdr["af"] == [tid] and hdr["rf"] == [0]
    assert not any(f[1] == P.FETCH for f in core.pending_frames())
    core.fetch(first, tid)  # someone waits for it: asked
    resent = core.pending_frames()
    fetches = [unpack(f[2])["id"] for f in resent if f[1] == P.FETCH]
    assert fetches == [tid] and core.tasks[tid].frames is not None  # the SUBMIT is kept, and sent again too


def test_an_async_future_awaited_before_it_is_passed_by_reference_is_fetched() -> None:
    from orchester.client.aio import AsyncTaskFuture

    async def main() -> list[Any]:
        sent: list[Any] = []
        fut = AsyncTaskFuture(loop=asyncio.get_running_loop())
        fut.task_id = "t1"
        async def wait() -> Any:
            return await fut

        waiter = asyncio.ensure_future(wait())  # someone awaits it first
        await asyncio.sleep(0)
        client = type("C", (), {"_send": sent.append, "core": ClientCore(lambda f, v: None, lambda f, e: None)})()
        AsyncClient._on_demand(client, fut)  # type: ignore[arg-type]
        waiter.cancel()
        return sent

    sent = asyncio.run(main())
    assert len(sent) == 1 and sent[0][1] == P.FETCH


def test_the_fleet_of_a_status_is_read_also_from_an_orchestrator_that_lists_every_satellite() -> None:
    from orchester.client.status import fleet_of

    summed = {"fleet": {"satellites": 3, "states": {"idle": 3}, "kinds": {"echo": 3}, "versions": {}}}
    assert fleet_of(summed) is summed["fleet"]
    older = {"satellites": [{"state": "idle", "kinds": ["echo", "genx.fit"], "versions": {"genx.fit": "3.8.13"}},
                            {"state": "busy", "kinds": ["echo"], "versions": {}}, "junk"]}
    assert fleet_of(older) == {"satellites": 2, "states": {"idle": 1, "busy": 1}, "kinds": {"echo": 2, "genx.fit": 1},
                               "versions": {"genx.fit": ["3.8.13"]}}
