"""Stop signals for every process of ours: SIGINT, SIGTERM and SIGHUP stop it cleanly.

Commands that run work with children (``orchester fit``, ``orchester demo``, ``orchester serve``
with a journal) wrap it in :func:`stop_on_signals`, which turns the stop signals into
:class:`Interrupted` in the main thread, so that ``finally`` blocks stop every child; short work
that must not be left half done runs :func:`shielded`. :func:`parent_death_signal` makes a child
receive SIGTERM when its parent dies, even by ``kill -9`` (Linux).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import Any

log = logging.getLogger("orchester.signals")


#: The signals that stop a command running a local cluster: Ctrl-C, ``kill``/``timeout``/batch
#: schedulers/systemd, and a closed terminal.
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A stop signal, raised in the main thread under :func:`stop_on_signals`.

    A :class:`KeyboardInterrupt`, so code that already cleans up after Ctrl-C does the same for
    SIGTERM and SIGHUP. :attr:`exit_code` is the shell's convention, 128 + the signal number.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal_name(signum)}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """128 + the signal number: 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP."""
        return 128 + self.signum


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15 (the number itself for a signal Python does not name)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def interrupt_exit_code(exc: BaseException) -> int:
    """The exit code after ``exc``: :attr:`Interrupted.exit_code`, else 130 (a plain Ctrl-C)."""
    return exc.exit_code if isinstance(exc, Interrupted) else 128 + signal.SIGINT


class _SignalState:
    """What the handler of :func:`stop_on_signals` has seen (main thread only)."""

    def __init__(self) -> None:
        self.received: int | None = None  #: the first stop signal
        self.pending: int | None = None  #: a signal held back by :func:`shielded`
        self.shield = 0  #: depth of nested :func:`shielded` blocks


_state = _SignalState()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    if _state.received is not None:  # the shutdown is under way (and bounded): let it finish
        log.warning("%s received while stopping: still stopping", signal_name(signum))
        return
    _state.received = signum
    if _state.shield:
        _state.pending = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals(signals: Sequence[int] = STOP_SIGNALS) -> Iterator[None]:
    """Raise :class:`Interrupted` in the main thread at the first of ``signals``; later ones are ignored.

    The first signal starts a clean shutdown (``finally`` blocks and context managers run, a
    :class:`LocalCluster` closes); signals that follow are logged and ignored, so that the
    shutdown, which is bounded, is not cut short. A signal this process ignores when the block is
    entered (``nohup``, a background job of a script) stays ignored. The previous handlers come
    back when the block ends. Outside the main thread this does nothing.
    """
    if not _main_thread():
        yield
        return
    previous: dict[int, Any] = {}
    for sig in signals:
        old = signal.getsignal(sig)
        if old == signal.SIG_IGN:
            continue
        previous[sig] = old
        signal.signal(sig, _on_stop_signal)
    saved = (_state.received, _state.pending)
    _state.received = _state.pending = None
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _state.received, _state.pending = saved


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Hold back a stop signal of :func:`stop_on_signals` until the block is done, then raise it.

    For short work that must not be left half done (stopping processes, renaming files into
    place). Only the handler of :func:`stop_on_signals` is held back: Python's default SIGINT
    handler still raises at once. Outside the main thread this does nothing.
    """
    if not _main_thread():
        yield
        return
    _state.shield += 1
    try:
        yield
    finally:
        _state.shield -= 1
        if not _state.shield and _state.pending is not None:
            signum, _state.pending = _state.pending, None
            raise Interrupted(signum)


# ---------------------------------------------------------- parent death
_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Any:
    """libc's ``prctl`` (Linux), resolved once at import so that no child has to look it up."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_prctl = _load_prctl()


def parent_death_signal(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` making the child receive ``sig`` when this process dies, even by ``kill -9``.

    ``None`` where it cannot work: not Linux, or not in the main thread (the kernel signals the
    child when the *thread* that started it ends, and only the main thread lasts as long as the
    process). The function only makes one system call (``prctl`` is resolved beforehand), as
    code run between ``fork`` and ``exec`` must.
    """
    if _prctl is None or not _main_thread():
        return None
    parent = os.getpid()

    def preexec() -> None:
        if _prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0 and os.getppid() != parent:
            os._exit(1)  # the parent died between fork and prctl: nobody wants this child

    return preexec
