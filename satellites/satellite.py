"""A satellite: the I/O loop that owns the orchestrator socket, and its worker pool.

The I/O loop never runs a task itself: tasks run in worker processes (see
:mod:`satellites.pool`), so a CPU-bound task never delays a heartbeat; a kind
declared light (``inline=True``) runs in the one inline thread
(:mod:`satellites.inline`), which cannot be killed. The loop polls the
orchestrator DEALER, the workers' ROUTER, the inline thread's PAIR and every
worker's process sentinel; after each wake-up it sends heartbeats when due,
notices a silent orchestrator (and reconnects, to the next endpoint if several
are given), and hands queued tasks to idle workers (light ones to the thread).

Example::

    from satellites import Satellite

    sat = Satellite(["tcp://127.0.0.1:5555"], workers=2, tags=["genx"])
    sat.run()           # until sat.stop(), SIGTERM (CLI) or the process ends
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import shutil
import socket as _socket
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any, TypeAlias

import zmq

from orchester.client.uplink import Uplink
from orchester.logutil import warn_limited
from serializers import ProtocolError, check_signature, unpack
from serializers import messages as M
from serializers import protocol as P
from serializers.zmqframes import NOBLOCK, frames_size, readable, recv_frames, send_frames

from . import genx_numba
from . import worker as W
from .inline import InlineRunner
from .pool import WorkerPool
from .registry import load_task_modules, registry

log = logging.getLogger("satellites")
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def physical_memory() -> int:
    """Bytes of memory of this machine (0 when unknown)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except (OSError, IndexError, ValueError):
        return 0.0


#: A task received and not started yet: id, attempt, frames from its DISPATCH header on, cores, and for a light
#: task its DISPATCH and task headers as the I/O loop decoded them (``None``: a task for a worker).
Queued: TypeAlias = tuple[str, int, list[Any], int, W.Decoded | None]

#: Most UTF-8 bytes of a satellite id: with ``s:`` before it and ``:`` and 32 hex digits after, the routing
#: id stays within ZeroMQ's 255 bytes.
MAX_SID_BYTES = 200
#: Most results sent lately that a satellite keeps to send again after a failover.
RESEND_RESULTS = 10_000
#: Bytes of results sent lately that a satellite keeps by default (``satellite run --resend-memory``).
RESEND_MEMORY = 16 << 20
#: Seconds a satellite waits before it tells the orchestrator which tasks started (``STARTED``): a task that
#: ends sooner is told by its ``DONE`` alone, which starts it too (one message less each way, and one wake-up
#: less of the orchestrator while the task runs); a longer one shows as running this much later.
STARTED_DELAY = 0.02


def batch_job(environ: Mapping[str, str] | None = None) -> str:
    """The batch job this process runs in: Slurm's ``SLURM_JOB_ID`` or PBS's ``PBS_JOBID`` ("" outside one,
    or when the variable holds something that is no job id)."""
    env = os.environ if environ is None else environ
    for name in ("SLURM_JOB_ID", "PBS_JOBID"):
        value = env.get(name, "").strip()
        if value and len(value) <= M.MAX_JOB and value.isprintable():
            return value
    return ""


class Satellite:
    """Connect to an orchestrator, announce credit, run dispatched tasks in worker processes.

    ``connect``: one endpoint or several (both servers of a binary-star pair; ``@FILE`` reads an
    endpoint file), checked here: a malformed one is a :class:`ValueError`. A silent
    orchestrator is left, with a vote, for the next endpoint (with a single endpoint: connected
    to again, and the satellite registers anew); a passive one that refuses the satellite, for
    the other. The connection is an :class:`~orchester.client.uplink.Uplink`, as a client's.
    """

    def __init__(self, connect: list[str] | str, *, workers: int = 2, tags: list[str] | tuple[str, ...] = (),
                 tasks: list[str] | tuple[str, ...] = (), sid: str | None = None,
                 heartbeat_interval: float = 1.0, liveness: int = 3, prefetch: int = 1,
                 allow_pickle: bool = False, max_message: int = P.DEFAULT_MAX_MESSAGE,
                 walltime: float | None = None, leave_before: float = 60.0, curve_secret: str | None = None,
                 server_key: str | None = None, numba: bool = True, numba_threads: int | None = None,
                 cores: int | None = None, memory: int | None = None, job: str | None = None,
                 light_credit: int = M.LIGHT_CREDIT, resend_memory: int = RESEND_MEMORY) -> None:
        self.sid = sid or f"{_socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        if not (0 < len(self.sid) <= M.MAX_SID and self.sid.isprintable() and len(self.sid.encode()) <= MAX_SID_BYTES):
            raise ValueError(f"a satellite id is 1 to {M.MAX_SID} printable characters ({MAX_SID_BYTES} bytes "
                             f"in UTF-8: it is part of the socket's routing id), not {self.sid[:40]!r}…")
        #: the batch job it runs in, announced (an autoscaler gives back a job by its satellites): by
        #: default the scheduler's (``SLURM_JOB_ID``, ``PBS_JOBID``), "" outside one
        self.job = batch_job() if job is None else job
        if len(self.job) > M.MAX_JOB or not self.job.isprintable():
            raise ValueError(f"a job id is at most {M.MAX_JOB} printable characters")
        #: the endpoints (checked here, not by a connect that never comes; ``@FILE`` read), the
        #: failover rule, the heartbeat clock and (in :meth:`run`) the orchestrator socket and its monitor
        self._uplink: Uplink[zmq.Socket[Any]] = Uplink(
            connect, who="satellite", identity=f"s:{self.sid}:", hwm=10_000, max_message=max_message,
            curve_secret=curve_secret, server_key=server_key, heartbeat_interval=heartbeat_interval,
            liveness=liveness, reconnect_alone=True)
        self.endpoints = self._uplink.endpoints
        if workers < 1 or prefetch < 0:
            raise ValueError("workers must be >= 1 and prefetch >= 0")
        if not 0 <= light_credit <= M.MAX_LIGHT:
            raise ValueError(f"the light credit must be from 0 to {M.MAX_LIGHT}")
        #: light tasks (of its light kinds) it takes in flight beside its slots (announced when it has light kinds)
        self.light_credit = light_credit
        if not 0 <= resend_memory <= M.MAX_MEMORY:
            raise ValueError(f"the resend memory must be from 0 to {M.MAX_MEMORY} bytes")
        #: bytes of results sent lately that it keeps to send again after a failover (older ones beyond it are
        #: let go: their tasks run again if the orchestrator never got them)
        self.resend_memory = resend_memory
        if cores is not None and not 1 <= cores <= M.MAX_CORES:
            raise ValueError(f"cores must be from 1 to {M.MAX_CORES}")
        if memory is not None and not 0 <= memory <= M.MAX_MEMORY:
            raise ValueError(f"memory must be from 0 to {M.MAX_MEMORY} bytes")
        #: cores its tasks may use together (announced; the orchestrator counts credit in cores): by
        #: default its usable cores (CPU affinity), or its workers if there are more of them
        self.cores = cores if cores is not None else max(workers, genx_numba.usable_cores())
        #: bytes of memory its tasks may use together (announced): by default the machine's
        self.memory = memory if memory is not None else physical_memory()
        self._peak_cores = 0  #: the most cores its running tasks held together since the last report
        #: CurveZMQ keys (public, secret, server public), from the arguments or ORCHESTER_CURVE_SECRET
        #: and ORCHESTER_SERVER_KEY; None without CurveZMQ
        self.curve = self._uplink.curve
        self.workers = workers
        #: GenX's kernels with numba (when installed): on or off, threads per worker (default: the
        #: cores over the workers); set up by :meth:`run` (:mod:`satellites.genx_numba`)
        self.use_numba = numba
        self.numba_threads = numba_threads
        self.numba_state: genx_numba.NumbaState | None = None
        self.tags = sorted(set(tags))
        self.modules = list(tasks)
        self.heartbeat_interval = heartbeat_interval
        self.liveness = liveness
        self.slots = workers + prefetch
        self.allow_pickle = allow_pickle
        self.max_message = max_message
        self.registered = False
        #: the orchestrator epoch whose RECONNECT we answered last, and when (a burst is answered once)
        self._answered_epoch: object = None
        self._answered_at = float("-inf")
        #: when the allocation ends (monotonic), if known: tasks that would not finish are not sent
        #: here, and the satellite leaves ``leave_before`` seconds before it
        self.deadline = time.monotonic() + walltime if walltime else None
        self.leave_before = leave_before
        #: seconds between two reports of CPU, memory and task durations to the orchestrator
        self.report_every = max(5 * heartbeat_interval, 1.0)
        self._next_report = 0.0
        self._cpu_mark = (time.monotonic(), 0.0)
        self._durations: list[float] = []
        self.counters: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        #: messages for the orchestrator produced by this wake-up, sent together at its end (:meth:`_flush`)
        self._out: list[list[Any]] = []
        #: dispatched here, not yet running (:data:`Queued`; a light task, of an inline kind, runs in this
        #: process's own thread)
        self._queue: collections.deque[Queued] = collections.deque()
        self._running: dict[str, Any] = {}  # task id -> Worker
        #: results sent lately, (sent at, task id, attempt, DONE frames, their bytes): after a failover they are
        #: announced and sent again, so the new orchestrator neither loses nor reruns them
        self._recent: collections.deque[tuple[float, str, int, list[Any], int]] = collections.deque()
        self._recent_bytes = 0  #: the bytes of :attr:`_recent`'s frames
        load_task_modules(self.modules)  # fail fast, in this process, on a bad --tasks module
        self.kinds = registry.kinds()
        #: kinds that report progress, with the stall timeout they declare
        self.progress_kinds = {k.name: float(k.stall_timeout or 0) for k in map(registry.get, self.kinds)
                               if k.reports_progress and k.stall_timeout}
        self.versions = {k.name: k.version for k in map(registry.get, self.kinds) if k.version}
        #: light kinds (``@task(..., inline=True)``): run in :attr:`inline`'s thread, not in a worker process
        self.inline_kinds = frozenset(k.name for k in map(registry.get, self.kinds) if k.inline)
        self.inline: InlineRunner | None = None  #: made by :meth:`run` when there are inline kinds
        #: light tasks handed to :attr:`inline`: task id -> (attempt, when, frames from the dispatch header on)
        self._inline_running: dict[str, tuple[int, float, list[Any]]] = {}
        #: tasks begun and not yet told (``STARTED``, :data:`STARTED_DELAY`): (task id, attempt) -> when, in order
        self._starting: dict[tuple[str, int], float] = {}

    def stop(self) -> None:
        """Ask the loop to leave cleanly (thread-safe)."""
        self._stop.set()

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        """Run until :meth:`stop`: start workers, connect, serve, then leave and clean up."""
        ctx = zmq.Context()
        tmpdir = tempfile.mkdtemp(prefix="orchester-sat-")
        wsock = ctx.socket(zmq.ROUTER)
        wsock.linger = 0
        wsock.bind(f"ipc://{tmpdir}/workers")
        self._wsock = wsock
        self.pool = WorkerPool(self.workers, f"ipc://{tmpdir}/workers", self.sid, self.modules,
                               self.allow_pickle, scratch=tmpdir)
        if "genx.fit" in self.kinds:  # before the forkserver starts: the workers inherit numba's environment
            self.numba_state = genx_numba.setup(self.workers, enabled=self.use_numba, threads=self.numba_threads,
                                                stopped=self._stop.is_set, pool=self.cores)
            log.info("satellite %s: GenX with %s", self.sid, self.numba_state.describe())
        if self.inline_kinds:
            self.inline = InlineRunner(ctx, self.sid)
        try:
            self.pool.start()
            self._connect(ctx)
            self._loop(ctx)
        finally:
            if self._uplink.sock is not None:
                try:
                    self._flush(time.monotonic())  # (the results of the last wake-up, then LEAVE)
                    self._uplink.sock.send_multipart(M.Leave(self.sid).frames(), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            self._uplink.close(linger=200)  # the LEAVE gets its chance
            self.pool.close()
            if self.inline is not None:
                self.inline.close()
            wsock.close(0)
            ctx.term()
            shutil.rmtree(tmpdir, ignore_errors=True)
            log.info("satellite %s stopped", self.sid)

    def _connect(self, ctx: zmq.Context[Any], vote: bool = False) -> None:
        """(Re)create the orchestrator socket, to the uplink's current endpoint, and register.

        ``vote``: we left the previous orchestrator because it went silent; a passive
        binary-star server takes over on such a vote.
        """
        self._uplink.open(ctx)
        self.registered = False
        self._queue.clear()  # the orchestrator requeues whatever was only queued here
        self._starting.clear()  # (the registration names every task that runs)
        now = time.monotonic()
        self._uplink.restart(now)
        self._announce(now, vote)
        log.info("satellite %s connecting to %s (%d workers, %d cores, kinds %s)", self.sid, self._uplink.current,
                 self.workers, self.cores, self.kinds)

    def _announce(self, now: float, vote: bool = False) -> None:
        """Register, then send again the results of the last liveness period (the orchestrator
        may have restarted or failed over without them: it takes them back, see ``adopt``)."""
        self._trim_recent(now)
        self._register(now, vote)
        for _, _, _, frames, _ in self._recent:
            self._send(frames, now)
        self.counters["results_resent"] += len(self._recent)

    def _register(self, now: float, vote: bool = False) -> None:
        self._tell(M.Register(
            sid=self.sid, slots=self.slots, workers=self.workers, kinds=tuple(self.kinds),
            progress=self.progress_kinds, versions=self.versions,
            walltime=None if self.deadline is None else max(0.0, self.deadline - now),
            tags=tuple(self.tags), host=_socket.gethostname(), pid=os.getpid(),
            running=tuple((tid, w.task[1]) for tid, w in self._running.items() if w.task)
            + tuple((tid, attempt) for tid, (attempt, _, _) in self._inline_running.items()),
            recent=tuple((tid, attempt) for _, tid, attempt, _, _ in self._recent), vote=vote,
            cores=self.cores, memory=self.memory, job=self.job,
            inline=tuple(sorted(self.inline_kinds)) if self.light_credit else (),
            light=self.light_credit if self.inline_kinds else 0), now)

    def _tell(self, message: M.Wire, now: float) -> None:
        """Send a message of :mod:`serializers.messages` (no payload) to the orchestrator."""
        self._send([message.command, message.encode()], now)

    def _send(self, frames: list[Any], now: float) -> None:
        """Queue a message (``[COMMAND, HEADER, PAYLOAD...]``) for the orchestrator: what one wake-up
        produces goes out together (:meth:`_flush`), several as one BATCH."""
        self._out.append(frames)

    def _flush(self, now: float) -> None:
        """Send what this wake-up produced, in order: a run of messages as one BATCH."""
        if not self._out:
            return
        out, self._out = self._out, []
        sock = self._uplink.sock
        assert sock is not None
        for run, frames in M.grouped(out):
            try:
                send_frames(sock, frames, NOBLOCK)
                self._uplink.sent(now)  # every message counts as a heartbeat
            except zmq.Again:  # (results come back with the next registration's resend: see _recent)
                self.counters["send_dropped"] += run.stop - run.start

    def _poller(self) -> zmq.Poller:
        """A poller over the orchestrator socket, the workers' socket and every worker's sentinel."""
        poller = zmq.Poller()
        assert self._uplink.sock is not None
        poller.register(self._uplink.sock, zmq.POLLIN)
        poller.register(self._wsock, zmq.POLLIN)
        if self.inline is not None:
            poller.register(self.inline.results, zmq.POLLIN)
        if self._uplink.monitor is not None:  # made with the orchestrator socket: rebuilt with it
            poller.register(self._uplink.monitor, zmq.POLLIN)
        for fd in self.pool.sentinels():
            poller.register(fd, zmq.POLLIN)
        self._poll_key = (self._uplink.sock, tuple(self.pool.sentinels()))
        return poller

    def _loop(self, ctx: zmq.Context[Any]) -> None:
        uplink = self._uplink
        timeout_ms = int(min(self.heartbeat_interval / 2, 0.25) * 1000)
        poller = self._poller()
        while not self._stop.is_set():
            if self._poll_key != (uplink.sock, tuple(self.pool.sentinels())):
                poller = self._poller()  # a worker was replaced or we reconnected
            orch, monitor = uplink.sock, uplink.monitor
            self._flush(time.monotonic())  # what the last wake-up produced, together
            wait, due = timeout_ms, self._started_due()
            if due is not None:  # (until the oldest task begun is to be told)
                wait = min(wait, max(0, math.ceil((due - time.monotonic()) * 1000)))
            ready = poller.poll(wait)
            now = time.monotonic()
            for item, _ in ready:
                if item is orch:
                    self._drain_orchestrator(orch, now)
                elif item is self._wsock:
                    self._drain_workers(now)
                elif self.inline is not None and item is self.inline.results:
                    self._drain_inline(now)
                elif monitor is not None and item is monitor:
                    monitor.recv_multipart()
                    self.counters["key_refused"] += 1
                    log.error("%s; retrying every %.0fs", uplink.refusal(), uplink.silent_after)
                else:
                    self._worker_died(int(item), now)  # type: ignore[arg-type]
            # housekeeping after every wake-up: a silent orchestrator, or a passive one that refused us
            self._tell_started(now)
            self._flush(now)  # (results go to the orchestrator they were dispatched by, before any move)
            move = uplink.check(now)
            if move is not None:
                if move.vote:
                    log.warning("orchestrator silent for %.1fs: reconnecting to %s", move.silent_for, move.endpoint)
                self.counters["reconnects" if move.vote else "redirects"] += 1
                self._connect(ctx, vote=move.vote)
                continue
            if now >= self._next_report:  # what it knows of itself, for the operators' metrics
                self._next_report = now + self.report_every
                self._tell(M.Heartbeat(sid=self.sid, report=self._self_report(now)), now)
            elif uplink.heartbeat_due(now):
                self._tell(M.Heartbeat(sid=self.sid), now)
            if self.deadline is not None and now >= self.deadline - self.leave_before:
                log.warning("satellite %s: the allocation ends in %.0fs: leaving", self.sid, self.deadline - now)
                self.stop()
            if len(self.pool.workers) < self.pool.size:
                for index in self.pool.missing():
                    self.pool.replace(index)
            if self._queue or (self.inline is not None and self.inline.pending):
                self._assign(now)

    def _self_report(self, now: float) -> dict[str, float]:
        """CPU (%, this process and its workers), resident memory (MB) and task durations since last time."""
        cpu = _cpu_seconds(os.getpid()) + sum(_cpu_seconds(w.process.pid) for w in self.pool.workers.values())
        t0, c0 = self._cpu_mark
        self._cpu_mark = (now, cpu)
        rss = _rss_mb(os.getpid()) + sum(_rss_mb(w.process.pid) for w in self.pool.workers.values())
        durations, self._durations = self._durations, []
        peak, self._peak_cores = self._peak_cores, self.busy_cores
        return {"cpu_percent": round(100.0 * max(0.0, cpu - c0) / max(now - t0, 1e-9), 1), "rss_mb": round(rss, 1),
                "tasks_done": float(len(durations)),
                "task_seconds_avg": round(sum(durations) / len(durations), 6) if durations else 0.0,
                "workers": float(len(self.pool.workers)), "queued_here": float(len(self._queue)),
                "cores": float(self.cores), "cores_busy_max": float(peak)}

    @property
    def busy_cores(self) -> int:
        """Cores held by the tasks its workers run now."""
        return sum(w.cores for w in self._running.values())

    # ------------------------------------------------------- orchestrator side
    def _drain_orchestrator(self, orch: zmq.Socket[Any], now: float) -> None:
        for i in range(256):
            if i and not readable(orch):  # (cheaper than a receive that fails)
                return
            try:
                frames = recv_frames(orch, NOBLOCK, 3)
            except zmq.Again:
                return
            self._uplink.heard(now)
            messages = [frames]
            if len(frames) > 2 and bytes(frames[1]) == P.BATCH:  # several in one: each as if it came alone
                try:
                    messages = M.unbatch(frames, 1)
                except ProtocolError as exc:
                    self._refused(frames, exc, now)
                    continue
            for message in messages:
                try:
                    self._handle(message, now)
                except ProtocolError as exc:
                    self._refused(message, exc, now)
                except Exception as exc:  # a field of a shape nothing foresaw: this message only is dropped
                    self.counters["handler_errors"] += 1
                    log.exception("satellite %s could not handle a message from the orchestrator", self.sid)
                    self._refused(message, ProtocolError(P.E_MALFORMED, f"cannot handle it: {type(exc).__name__}"),
                                  now)

    def _refused(self, frames: list[Any], exc: ProtocolError, now: float) -> None:
        """A message from the orchestrator that is not valid: counted, logged (rate-limited), answered."""
        self.counters["bad_messages"] += 1
        warn_limited(log, "bad message from orchestrator: %s", exc)
        if len(frames) > 1 and bytes(frames[1]) != P.ERROR:  # never answer an error with one
            self._tell(M.PeerError(exc.code, exc.detail, self.sid), now)

    def _handle(self, frames: list[Any], now: float) -> None:
        if len(frames) < 3:
            raise ProtocolError(P.E_MALFORMED, f"expected at least 3 frames, got {len(frames)}")
        check_signature(bytes(frames[0]))
        msg = M.decode_for_satellite(bytes(frames[1]), bytes(frames[2]))
        if isinstance(msg, M.Dispatch):
            if len(frames) < 5:
                raise ProtocolError(P.E_MALFORMED, "DISPATCH needs a task header and a body")
            light: W.Decoded | None = None
            if self.inline_kinds and msg.cores == 1:  # a light kind runs in this process (one core at most)
                with contextlib.suppress(ProtocolError):  # (a header that does not unpack: a worker says why)
                    task = unpack(bytes(frames[3]), M.MAX_TASK_HEADER)
                    kind = task.get("k")
                    if isinstance(kind, str) and kind in self.inline_kinds:
                        light = (msg, task)  # (its thread decodes neither header again)
            self._queue.append((msg.id, msg.attempt, frames[2:], msg.cores, light))
            self.counters["received"] += 1
        elif isinstance(msg, M.Abort):
            self._abort(msg.id, msg.attempt, now)
        elif isinstance(msg, M.Welcome):
            self.registered = True
            log.info("satellite %s registered with orchestrator %s", self.sid, msg.epoch)
            beat = min(max(msg.heartbeat, 0.01), 3600.0)
            if msg.heartbeat > 0 and beat != self.heartbeat_interval:  # the orchestrator's pace, both ways
                log.info("satellite %s beats every %g s, as the orchestrator asks (not %g s)", self.sid, beat,
                         self.heartbeat_interval)
                self.heartbeat_interval = beat
                self._uplink.set_interval(beat)
        elif isinstance(msg, M.Reconnect):
            if msg.epoch == self._answered_epoch and now - self._answered_at < self.heartbeat_interval * self.liveness:
                # an answer to a message we sent before registering with this orchestrator: a
                # restarted orchestrator answers each of them; one registration per epoch
                self.counters["reconnects_ignored"] += 1
                return
            log.info("orchestrator asks satellite %s to register again", self.sid)
            self._answered_epoch, self._answered_at = msg.epoch, now
            self._queue.clear()
            self._announce(now)
        elif isinstance(msg, M.Error):
            self.counters["errors_received"] += 1
            if msg.code == P.E_NOT_ACTIVE:
                self._uplink.redirected()  # a passive server: the uplink moves to the other one
                return
            log.warning("orchestrator error %s: %s", msg.code, msg.msg)
        # a HEARTBEAT (Beat): any message counts as a heartbeat, and the uplink heard it already

    def _abort(self, tid: str, attempt: int, now: float) -> None:
        """Cancel a task: drop it if only queued here, give it up if in the inline thread (a thread is not
        killed: its result is dropped when it comes), kill its worker if running."""
        for i, queued in enumerate(self._queue):
            if queued[0] == tid:
                del self._queue[i]
                break
        else:
            if self._inline_running.pop(tid, None) is not None:
                assert self.inline is not None
                self.inline.abort(tid, attempt)
            else:
                w = self._running.get(tid)
                if w is None:
                    return
                self.pool.kill(w)  # its sentinel fires; _worker_died reports nothing more for it
                w.task = None
                del self._running[tid]
        self.counters["aborted"] += 1
        self._starting.pop((tid, attempt), None)
        self._send([P.DONE, W.error_header(tid, attempt, self.sid, etype=P.ERR_CANCELLED,
                                           msg="cancelled")], now)

    # ------------------------------------------------------------ worker side
    def _assign(self, now: float) -> None:
        """Hand queued tasks to idle workers, in order, while their cores are free (a wide task waits for
        its cores: none is ever oversubscribed); tell the orchestrator which started (one message)."""
        started: list[tuple[str, int]] = []
        busy = self.busy_cores
        inline = self.inline
        if inline is not None and inline.pending and inline.wedged(now):
            # a light task that is not: those handed over behind it go to workers, in order, first
            for tid, attempt in reversed(inline.reclaim()):
                _, _, frames = self._inline_running.pop(tid)
                self._queue.appendleft((tid, attempt, frames, 1, None))
                self.counters["inline_reclaimed"] += 1
        light_ok = inline is not None and not inline.wedged(now)
        while self._queue:
            decoded = self._queue[0][4]
            if decoded is not None and light_ok and inline is not None:  # light: this process's thread
                tid, attempt, frames, _, _ = self._queue.popleft()
                self._run_inline(inline, tid, attempt, frames, decoded, now)
                started.append((tid, attempt))
                continue
            cores = self._queue[0][3]
            if busy and busy + cores > self.cores:
                break
            w = self.pool.idle()
            if w is None:
                break
            tid, attempt, frames, cores, _ = self._queue.popleft()
            w.task = (tid, attempt)
            w.cores = cores
            w.started = now
            self._running[tid] = w
            busy += cores
            send_frames(self._wsock, [w.ident, W.RUN, *frames])
            started.append((tid, attempt))
        if light_ok and inline is not None and len(self._queue) > 1 and \
                any(item[4] is not None for item in self._queue):
            # light tasks never wait behind one that waits for a worker: they took no slot of the
            # orchestrator's (their own credit), and they run in this process's thread
            waiting: collections.deque[Queued] = collections.deque()
            for item in self._queue:
                if item[4] is not None:
                    self._run_inline(inline, item[0], item[1], item[2], item[4], now)
                    started.append((item[0], item[1]))
                else:
                    waiting.append(item)
            self._queue = waiting
        if started:
            self._peak_cores = max(self._peak_cores, busy)
            self._starting.update(dict.fromkeys(started, now))

    def _started_due(self) -> float | None:
        """When the tasks begun and not yet told are to be told (the oldest's start and :data:`STARTED_DELAY`)."""
        return next(iter(self._starting.values())) + STARTED_DELAY if self._starting else None

    def _tell_started(self, now: float) -> None:
        """Tell the orchestrator which tasks began (one ``STARTED``), once the oldest of them began
        :data:`STARTED_DELAY` ago: those that ended meanwhile were told by their ``DONE``."""
        due = self._started_due()
        if due is None or now < due:
            return
        started = list(self._starting)
        self._starting.clear()
        for header in M.started_parts(started):  # (each well within what a header may be)
            self._send([P.STARTED, header], now)

    def _run_inline(self, inline: InlineRunner, tid: str, attempt: int, frames: list[Any], decoded: W.Decoded,
                    now: float) -> None:
        """Hand a light task to the inline thread (it runs from now on, as far as the orchestrator is told),
        with its DISPATCH and task headers as this loop decoded them."""
        self._inline_running[tid] = (attempt, now, frames)
        inline.run(tid, attempt, frames, decoded)

    def _drain_workers(self, now: float) -> None:
        for i in range(256):
            if i and not readable(self._wsock):
                return  # (what to assign is looked at once the wake-up's dead workers are known)
            try:
                frames = recv_frames(self._wsock, NOBLOCK, 3)
            except zmq.Again:
                return
            ident, tag = bytes(frames[0]), bytes(frames[1])
            w = self.pool.workers.get(ident)
            if w is None:
                continue  # a killed worker's last words
            if tag == W.DONE:
                if w.task is not None:
                    tid, attempt = w.task
                    self._durations.append(now - w.started)
                    self._running.pop(tid, None)
                    w.task = None
                    self.counters["done"] += 1
                    self._starting.pop((tid, attempt), None)
                    done = [P.DONE, *frames[2:]]
                    self._send(done, now)
                    self._keep_recent(now, tid, attempt, done)
                    self._trim_recent(now)
            elif tag == W.PROGRESS:
                if w.task is not None:
                    self._send([P.PROGRESS, frames[2]], now)
            elif tag == W.READY:
                w.ready = True
        self._assign(now)

    def _drain_inline(self, now: float) -> None:
        """Results (and progress) of light tasks from the inline thread: all that wait, at once."""
        assert self.inline is not None
        for answer in self.inline.drain():
            if answer[0] == W.PROGRESS:
                self._send([P.PROGRESS, answer[1]], now)
                continue
            tid = answer[1]
            started = self._inline_running.pop(tid, None)
            if started is None:
                continue
            self._durations.append(now - started[1])
            self.counters["done"] += 1
            self.counters["inline_done"] += 1
            self._starting.pop((tid, started[0]), None)
            done = [P.DONE, *answer[3]]
            self._send(done, now)
            self._keep_recent(now, tid, started[0], done)
        self._trim_recent(now)
        self._assign(now)

    def _keep_recent(self, now: float, tid: str, attempt: int, done: list[Any]) -> None:
        """Keep a result just sent, to send it again after a failover (see :meth:`_trim_recent`)."""
        size = frames_size(done)
        self._recent.append((now, tid, attempt, done, size))
        self._recent_bytes += size

    def _trim_recent(self, now: float) -> None:
        """Keep the results of the longest silence a connection may wait out, and one interval more (at most
        :data:`RESEND_RESULTS` of them, :attr:`resend_memory` bytes): a satellite that reconnects sends again
        every result an orchestrator may have missed.

        The bound in bytes matters for large results: kept for seconds, they would hold hundreds of MiB (and
        every new message would come into fresh memory); the tasks of results let go run again after a
        failover if the orchestrator never got them."""
        recent = self._recent
        horizon = now - self._uplink.longest_silence - self.heartbeat_interval
        while recent and (recent[0][0] < horizon or len(recent) > RESEND_RESULTS
                          or self._recent_bytes > self.resend_memory):
            sent_at, *_, size = recent.popleft()
            self._recent_bytes -= size
            if sent_at >= horizon:  # (let go early: a failover now would run its task again)
                self.counters["resend_let_go"] += 1

    def _worker_died(self, sentinel: int, now: float) -> None:
        w = self.pool.reap(sentinel)
        if w is None:
            return
        if w.task is not None:
            tid, attempt = w.task
            self._running.pop(tid, None)
            code = w.process.exitcode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            self.counters["worker_deaths"] += 1
            self._starting.pop((tid, attempt), None)
            self._send([P.DONE, W.error_header(tid, attempt, self.sid, etype=P.ERR_WORKER_DIED,
                                               msg=f"worker process died ({how}) while running the task")], now)
        self.pool.replace(w.index)
