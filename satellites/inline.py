"""Light tasks run in the satellite's own thread, without the worker-process hop.

A kind registered with ``@task(..., inline=True)`` is light: it returns in microseconds to
milliseconds and holds no resource a kill would have to free (a lookup, a small transform, a
no-op). Sending it to a worker process costs two more messages and two more process wake-ups
than running it; :class:`InlineRunner` runs such tasks one after the other in one thread of the
satellite, handed over in order, with the same :func:`~satellites.worker.run_task` as a worker.

Answers come back to the I/O loop in a queue it takes them from all at once (:meth:`InlineRunner.drain`);
an ``inproc://`` PAIR socket it polls wakes it, one empty message for however many answers wait (the thread
sends one only when the loop has taken everything before): tasks answered while the loop was busy cost
it one wake-up together, not a message each.

What a thread cannot do: be killed. A cancelled or timed-out inline task is answered at once
(``Cancelled``), its result dropped when it comes. While it still runs, or while any inline task
runs longer than :data:`PATIENCE` (a light task that is not), the runner is *wedged*
(:meth:`InlineRunner.wedged`): the satellite takes back the tasks handed over behind it
(:meth:`InlineRunner.reclaim`) and sends them, and the inline kinds that come meanwhile, to worker
processes. A task that needs more than one core always runs in a worker.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from typing import Any

import zmq

from serializers.protocol import BATCH_ALONE
from serializers.zmqframes import readable

from .worker import DONE, PROGRESS, Decoded, error_header, run_task

log = logging.getLogger("satellites")

_ids = itertools.count()

#: Seconds an inline task may run before the runner counts as wedged (light means micro- to milliseconds).
PATIENCE = 1.0


class InlineRunner:
    """One thread that runs light tasks in order; :attr:`results` (polled by the I/O loop) wakes the loop for
    its answers.

    Made and used by the I/O thread: :meth:`run` hands a task over, :meth:`drain` takes what the
    thread answered, :meth:`abort` gives up on a task, :meth:`close` stops the thread.
    """

    def __init__(self, ctx: zmq.Context[Any], sid: str) -> None:
        self.sid = sid
        self.endpoint = f"inproc://orchester-inline-{next(_ids)}"
        #: what wakes the I/O loop for the thread's answers (it polls it)
        self.results = ctx.socket(zmq.PAIR)
        self.results.linger = 0
        self.results.bind(self.endpoint)
        self._ctx = ctx
        self._tasks: queue.SimpleQueue[tuple[str, int, list[Any], Decoded | None] | None] = queue.SimpleQueue()
        #: the thread's answers, in order: ``(DONE, task id, attempt, done frames)`` or ``(PROGRESS, header)``
        self._answers: collections.deque[tuple[Any, ...]] = collections.deque()
        #: a wake-up is on its way to the loop, which has not taken the answers yet (set by the thread)
        self._signalled = False
        #: tasks handed over and not answered yet, in order: (task id, attempt)
        self.pending: dict[tuple[str, int], None] = {}
        #: tasks given up on (cancelled, timed out) that the thread has not finished yet
        self.abandoned: set[tuple[str, int]] = set()
        #: the task the thread runs now, and since when (monotonic; set by the thread, read by the I/O loop)
        self.current: tuple[str, int] | None = None
        self.since = 0.0
        self._thread = threading.Thread(target=self._main, name=f"satellite-{sid}-inline", daemon=True)
        self._ready = threading.Event()
        self._thread.start()
        self._ready.wait(10)

    def wedged(self, now: float, patience: float = PATIENCE) -> bool:
        """The thread runs a task given up on, or one that has run longer than ``patience`` seconds: inline
        kinds go to worker processes meanwhile."""
        current = self.current
        return current is not None and (current in self.abandoned or now - self.since > patience)

    def reclaim(self) -> list[tuple[str, int]]:
        """Take back the tasks handed over and not begun (the thread will skip them): ``(task id, attempt)``,
        in order, for a worker process to run."""
        current = self.current
        out = [key for key in self.pending if key != current]
        for key in out:
            del self.pending[key]
            self.abandoned.add(key)
        return out

    def run(self, task_id: str, attempt: int, frames: list[Any], decoded: Decoded | None = None) -> None:
        """Hand a task over (``frames``: from its DISPATCH header on, as a worker gets them; ``decoded``: its
        DISPATCH and task headers as the satellite's loop decoded them, not decoded again)."""
        self.pending[(task_id, attempt)] = None
        self._tasks.put((task_id, attempt, frames, decoded))

    def abort(self, task_id: str, attempt: int) -> bool:
        """Give up on a task handed over (its result, if it comes, is dropped); False if it was not here."""
        key = (task_id, attempt)
        if key not in self.pending:
            return False
        del self.pending[key]
        self.abandoned.add(key)
        return True

    def drain(self) -> list[tuple[Any, ...]]:
        """Every answer of the thread waiting now, in order: ``(DONE, task id, attempt, done frames)`` (as a
        worker's ``[result header, body, *buffers]``) or ``(PROGRESS, header)``. An answer for a task given up
        on is dropped here. Call it when :attr:`results` is readable."""
        while readable(self.results):  # the wake-ups first, then the flag, then the answers: one that comes
            self.results.recv(zmq.NOBLOCK)  # later wakes us again
        self._signalled = False
        answers = self._answers
        out: list[tuple[Any, ...]] = []
        while answers:
            answer = answers.popleft()
            if answer[0] == DONE:
                key = (answer[1], answer[2])
                if key in self.abandoned:
                    self.abandoned.discard(key)
                    continue
                self.pending.pop(key, None)
            out.append(answer)
        return out

    def close(self, timeout: float = 2.0) -> None:
        """Stop the thread after the task it runs (waited for at most ``timeout`` seconds: it is a daemon)."""
        self._tasks.put(None)
        self._thread.join(timeout)
        self.results.close(0)

    def _answer(self, answer: tuple[Any, ...], wake: zmq.Socket[Any]) -> None:
        """(The thread) queue an answer; wake the loop unless a wake-up is already on its way."""
        self._answers.append(answer)
        if not self._signalled:
            self._signalled = True
            wake.send(b"")

    def _main(self) -> None:
        out = self._ctx.socket(zmq.PAIR)
        out.linger = 0
        out.connect(self.endpoint)
        self._ready.set()
        answer = self._answer
        try:
            while True:
                item = self._tasks.get()
                if item is None:
                    return
                tid, attempt, frames, decoded = item
                if (tid, attempt) in self.abandoned:  # given up on before it began
                    answer((DONE, tid, attempt, []), out)
                    continue
                self.since = time.monotonic()
                self.current = (tid, attempt)
                try:
                    done = run_task(frames, self.sid, lambda h: answer((PROGRESS, h), out), pools=None,
                                    decoded=decoded)
                except Exception as exc:  # a bug of ours: this task fails, the thread goes on
                    log.exception("inline task %s failed in the runner", tid)
                    done = [error_header(tid, attempt, self.sid, exc)]
                self.current = None
                # (as a worker's answer is: frames under BATCH_ALONE copied now, so the result kept for a
                # resend is the one sent even if the task changes an array it returned)
                done = [bytes(f) if type(f) is memoryview and f.nbytes < BATCH_ALONE else f for f in done]
                answer((DONE, tid, attempt, done), out)
        finally:
            out.close(0)
