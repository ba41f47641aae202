"""Fast multipart send/receive on pyzmq's backend socket methods.

pyzmq's ``send_multipart``/``recv_multipart`` pay for flag enums and
per-frame checks on every part; on the hot path these helpers call the
backend directly. :func:`recv_frames` returns the first ``head`` parts as
``bytes`` (envelope, signature, command, header: small, decoded) and the rest
as zero-copy :class:`zmq.Frame` objects (payloads, forwarded or wrapped by
numpy without a copy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zmq
from zmq.backend import Socket as _Base

_send = _Base.send
_recv = _Base.recv
_get = _Base.get
SNDMORE = int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
#: Frames at least this large are sent without a copy (smaller ones are cheaper to copy).
ZERO_COPY_MIN = 64 * 1024


def frames_size(frames: Sequence[Any]) -> int:
    """Bytes of a message's frames (bytes, Frames, or memoryviews cast to bytes, as the codecs make them)."""
    return sum(map(len, frames))


def send_frames(sock: zmq.Socket[Any], frames: Sequence[Any], flags: int = 0) -> None:
    """Send a multipart message; large buffers go out without a copy."""
    last = len(frames) - 1
    more = flags | SNDMORE
    for i, f in enumerate(frames):
        copy = not (isinstance(f, (memoryview, zmq.Frame)) and len(f) >= ZERO_COPY_MIN)
        _send(sock, f, flags if i == last else more, copy, False)


def readable(sock: zmq.Socket[Any]) -> bool:
    """Whether a message waits to be read from ``sock`` now (``ZMQ_EVENTS``).

    A loop that drains a socket after a wake-up asks this before its second receive: most wake-ups
    bring one message, and a receive that finds none costs three times as much (pyzmq builds an
    ``Again`` exception each time: 7 µs against 2 µs here). For sockets polled with :class:`zmq.Poller`
    only: it reads the option through pyzmq's backend, past what ``zmq.asyncio`` keeps track of."""
    return bool(int(_get(sock, _EVENTS)) & _POLLIN)


#: A payload frame smaller than this is kept as ``bytes``, not as a :class:`zmq.Frame` (a queued task's small
#: body costs some 150 bytes less so: a Frame object holds a ZeroMQ message besides the bytes).
SMALL_FRAME = 4096


def recv_frames(sock: zmq.Socket[Any], flags: int = 0, head: int = 4) -> list[Any]:
    """Receive a multipart message: ``head`` leading parts as bytes, the rest as zmq Frames (those smaller
    than :data:`SMALL_FRAME` as bytes too).

    Each part is received as a Frame, which says whether more follow (``Frame.more``, set by the receive
    itself): no separate ``RCVMORE`` option read from Python per part, which cost as much as the receive.
    (pyzmq's cffi backend never sets ``Frame.more``: there, the option is read.)"""
    if not _FRAME_MORE:
        return _recv_frames_rcvmore(sock, flags, head)
    frame = _recv(sock, flags, False, False)
    parts: list[Any] = [frame.bytes]
    n = 1
    while frame.more:
        frame = _recv(sock, flags, False, False)
        parts.append(frame.bytes if n < head or len(frame) < SMALL_FRAME else frame)
        n += 1
    return parts


def _recv_frames_rcvmore(sock: zmq.Socket[Any], flags: int, head: int) -> list[Any]:
    parts: list[Any] = [_recv(sock, flags, True, False)]
    n = 1
    while sock.get(zmq.RCVMORE):
        if n < head:
            parts.append(_recv(sock, flags, True, False))
        else:
            frame = _recv(sock, flags, False, False)
            parts.append(frame.bytes if len(frame) < SMALL_FRAME else frame)
        n += 1
    return parts


#: Whether a received Frame says if more parts follow (pyzmq's Cython backend; its cffi backend does not).
_FRAME_MORE = "cffi" not in _Base.__module__
