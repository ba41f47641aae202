"""The worker process: runs one task at a time for its satellite's I/O thread.

Internal transport (never seen by the orchestrator): the worker's DEALER talks
to the satellite's ROUTER over ``ipc://``. Messages, first frame a tag:

* worker → satellite: ``[READY, pid]``, ``[DONE, result_header, body, *buffers]``
  (``result_header`` is the wire DONE header, forwarded as is), ``[PROGRESS, header]`` (the wire
  PROGRESS header); both are built with :mod:`serializers.messages`
* satellite → worker: ``[RUN, dispatch_header, task_header, body, *buffers, *results]``: ``results`` are
  the frames of the dependencies' results the task takes by reference (``rs`` of the DISPATCH header
  says whose, and how many frames each), forwarded by the orchestrator as the satellites sent them
"""

from __future__ import annotations

import os
import select
import signal
import tempfile
import threading
import time
import traceback
from typing import Any, TypeAlias

import zmq

from orchester.errors import TaskFailed
from serializers import ProtocolError, codecs, unpack
from serializers import messages as M
from serializers import protocol as P
from serializers.zmqframes import recv_frames, send_frames

from . import context
from .registry import UnknownKind, load_task_modules, registry
from .threads import TaskThreads

READY = b"R"
RUN = b"T"
DONE = b"D"
PROGRESS = b"P"

#: Minimum seconds between two progress messages of one task (extra reports are dropped).
PROGRESS_MIN_INTERVAL = 0.05


#: Characters of a failed task's message and traceback sent (their beginning and end): a DONE header is at
#: most 64 KiB (``MAX_HEADER``), and one the orchestrator refuses would never end its task.
MAX_ERROR_MESSAGE, MAX_TRACEBACK = 4_000, 8_000


def bounded(text: str, limit: int) -> str:
    """``text``, or its beginning and its end with what was cut said between them."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n… [{len(text) - 2 * half:,} characters cut] …\n{text[-half:]}"


def error_header(task_id: str, attempt: int, sid: str, exc: BaseException | None = None, *,
                 etype: str | None = None, msg: str | None = None, tb: str = "") -> bytes:
    """The RESULT header of a failed task: ``err`` holds type, message and traceback (bounded)."""
    if exc is not None:
        etype = type(exc).__name__
        msg = str(exc)
        tb = "".join(traceback.format_exception(exc))
    err = {"type": (etype or "Error")[:256], "msg": bounded(msg or "", MAX_ERROR_MESSAGE),
           "tb": bounded(tb, MAX_TRACEBACK)}
    return M.Done(task_id, attempt, False, err=err, sat=sid).encode()


def result_value(task_id: str, frames: list[Any], consent: dict[str, Any]) -> Any:
    """The value a reference to task ``task_id`` stands for, from that task's RESULT frames (``[header,
    body, *buffers]``, as its satellite sent them): its result, or the :class:`~orchester.TaskFailed`
    of a task that did not succeed (a dependent that runs on failure gets it). A pickle-coded result
    is decoded only with ``consent`` (the DISPATCH header of a pickle-coded dependent; ``{}`` for any other)."""
    hdr = unpack(frames[0])
    res = M.Result.decode(hdr)
    if res.id != task_id:
        raise ProtocolError(P.E_MALFORMED, f"the result sent for {task_id!r} is the result of {res.id!r}")
    if not res.ok:
        err = res.error or {}
        return TaskFailed(task_id, str(err.get("type", "Error"))[:256], str(err.get("msg", ""))[:100_000],
                          str(err.get("tb", ""))[:1_000_000], res.sat)
    return codecs.decode(codecs.check_run_codec(hdr, consent), list(res.arrays), frames[1:])


def _inputs(frames: list[Any], order: M.Dispatch, task: M.TaskHeader,
            consent: dict[str, Any]) -> tuple[list[Any], dict[str, Any] | None]:
    """The task's payload frames, and the values of the results that follow them (by task id); ``consent``:
    to pickle, for a pickle-coded task only (a result is trusted no more than the task that takes it)."""
    if not order.results:
        return frames[2:], None
    end = 3 + len(task.arrays)
    values: dict[str, Any] = {}
    for tid, count in order.results:
        chunk = frames[end:end + count]
        if len(chunk) != count:
            raise ProtocolError(P.E_MALFORMED, "the DISPATCH carries fewer result frames than its 'rs' says")
        values[tid] = result_value(tid, chunk, consent)
        end += count
    if end != len(frames):
        raise ProtocolError(P.E_MALFORMED, "the DISPATCH carries more frames than its payload and results")
    return frames[2:3 + len(task.arrays)], values


#: This worker's thread pools, set for each task's cores.
THREADS = TaskThreads()


#: A task's DISPATCH header as its receiver decoded it, and its task header unpacked (checked no further).
Decoded: TypeAlias = tuple[M.Dispatch, dict[str, Any]]


def run_task(frames: list[Any], sid: str, send_progress: Any, pools: TaskThreads | None = THREADS,
             decoded: Decoded | None = None) -> list[Any]:
    """Run the task in ``frames`` (``[dispatch_header, task_header, body, *buffers, *results]``).

    Returns the DONE frames without the tag: ``[result_header, body, *buffers]``. Never raises
    for a handler's failure: it becomes a structured error header. The payload is decoded with
    the codec its header names, pickle only with every party's consent
    (:func:`serializers.codecs.check_run_codec`); otherwise the task fails with
    :data:`~serializers.codecs.ERR_CODEC_REFUSED` before anything is decoded. Each reference
    in the payload is replaced by the result the DISPATCH carries for it (:func:`result_value`).
    The worker's thread pools get the task's cores (:class:`~satellites.threads.TaskThreads`; ``pools=None``:
    left as they are, for a light task run in the satellite's own thread, :mod:`satellites.inline`).
    ``decoded``: the DISPATCH header as the satellite's loop checked it and the task header as it unpacked it
    (a light task: neither is decoded twice); the task header is checked here all the same.
    """
    if decoded is not None:
        order, hdr = decoded
        dispatch = codecs.dispatch_consent(order.pickle)  # (all the checks below read of it)
    else:
        try:
            dispatch = unpack(bytes(frames[0]), M.MAX_TASK_HEADER)
            order = M.Dispatch.decode(dispatch)
        except ProtocolError as exc:  # never let a bad message kill the worker
            return [error_header("", 0, sid, exc)]
    tid, attempt = order.id, order.attempt
    t0 = time.perf_counter()
    try:
        if decoded is None:
            hdr = unpack(frames[1], M.MAX_TASK_HEADER)
        task = M.TaskHeader.decode(hdr)
        kind = registry.get(task.kind)
        try:  # pickle only with the submitter's, the orchestrator's and this satellite's consent
            codec = codecs.check_run_codec(hdr, dispatch)
            payload, values = _inputs(frames, order, task, dispatch if codec == codecs.PickleCodec.name else {})
        except ProtocolError as exc:
            if exc.code != P.E_CODEC:
                raise
            return [error_header(tid, attempt, sid, etype=codecs.ERR_CODEC_REFUSED, msg=exc.detail)]
        call = codecs.decode(codec, list(task.arrays), payload, refs=values)
        if not (isinstance(call, list) and len(call) == 2 and isinstance(call[0], list)
                and isinstance(call[1], dict)):
            raise ProtocolError(P.E_MALFORMED, "task body must be [args, kwargs]")
        last = [0.0]

        def progress(info: dict[str, Any]) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_MIN_INTERVAL:
                last[0] = now
                send_progress(M.Progress(tid, attempt, sid, info).encode())

        if pools is not None:
            pools.use(order.cores)
        context.set_current(context.TaskContext(tid, attempt, kind.name, sid, progress, order.cores))
        try:
            value = kind.fn(*call[0], **call[1])
        finally:
            context.set_current(None)
        meta, out = codecs.encode(value, codec)
    except UnknownKind as exc:
        return [error_header(tid, attempt, sid, etype=P.ERR_UNKNOWN_KIND, msg=str(exc))]
    except Exception as exc:
        return [error_header(tid, attempt, sid, exc)]
    return [M.done(tid, attempt, sid, codec, round(time.perf_counter() - t0, 6), M.arrays_of(meta) if meta else ()),
            *out]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: Seconds between two checks of the satellite where it cannot be waited for (no pidfd).
WATCH_INTERVAL = 0.5


def watch_satellite(satellite_pid: int) -> threading.Thread:
    """End this worker at once when its satellite ends, whatever it is doing (a daemon thread).

    A worker's parent is the satellite's forkserver, not the satellite, and the forkserver only
    exits once every worker has (they hold its "alive" pipe): neither notices a satellite killed
    with ``kill -9``. The thread waits on a pidfd of the satellite (Linux 5.3+; elsewhere it
    checks every :data:`WATCH_INTERVAL` seconds) and then ends the process with ``os._exit``
    (at once if the satellite is already gone). Returns the thread.
    """
    try:
        fd: int | None = os.pidfd_open(satellite_pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd here: poll
        fd = None

    def wait() -> None:
        if fd is not None:
            select.select([fd], [], [])
        else:
            while _alive(satellite_pid):
                time.sleep(WATCH_INTERVAL)
        os._exit(1)  # orphaned: nobody will read this task's result

    t = threading.Thread(target=wait, name="satellite-watch", daemon=True)
    t.start()
    return t


def worker_main(endpoint: str, sid: str, index: int, modules: list[str], allow_pickle: bool,
                satellite_pid: int = 0, scratch: str = "") -> None:
    """Entry point of a worker process: connect, announce, run tasks until the socket closes.

    A worker whose satellite died without stopping it (``kill -9``) does not outlive it, even in
    the middle of a task: see :func:`watch_satellite`. ``scratch``: the worker's own temporary
    folder (its tasks' ``tempfile`` and ``TMPDIR``), which the satellite removes when it ends.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the satellite decides when workers stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if scratch:
        os.environ["TMPDIR"] = tempfile.tempdir = scratch
    if satellite_pid:
        watch_satellite(satellite_pid)
    codecs.allow_pickle(allow_pickle)
    load_task_modules(modules)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.routing_id = f"w{index}-{os.getpid()}".encode()
    sock.connect(endpoint)
    try:
        sock.send_multipart([READY, str(os.getpid()).encode()])
        while True:
            while not sock.poll(1000):
                if satellite_pid and not _alive(satellite_pid):
                    return  # orphaned: nobody will ever send us a task
            frames = recv_frames(sock, 0, 3)
            if bytes(frames[0]) != RUN:
                continue
            try:
                out = run_task(frames[1:], sid, lambda h: sock.send_multipart([PROGRESS, h]))
            except Exception as exc:  # a bug of ours must not cost the satellite a worker per task
                out = [error_header("", 0, sid, exc)]
            send_frames(sock, [DONE, *out])
    finally:
        sock.close(0)
        ctx.term()
