"""Wire protocol constants: the one place that names every frame and command.

Every Orchester message is a ZeroMQ multipart message laid out as::

    [routing envelope (ROUTER side only)] SIGNATURE COMMAND HEADER [PAYLOAD ...]

* ``SIGNATURE`` names the protocol and its version (``b"ORCH/3"``). A peer that
  sends another signature is refused with an ``ERROR`` whose code is
  ``"version"`` (same prefix, other version) or ``"malformed"``.
* ``COMMAND`` is one byte (see the constants below).
* ``HEADER`` is a small msgpack map with short keys.
* ``PAYLOAD`` frames are opaque to the orchestrator: a body encoded by the codec
  named in the header, followed by one frame per numpy array buffer.

A ``BATCH`` carries several of these messages in one (``docs/protocol.rst``, Batches): the
signature once, a header giving each message's frame count and each frame's length, then one body
frame with their small frames back to back, then the large payload frames, each alone.

The full specification lives in ``docs/protocol.rst``.
"""

from __future__ import annotations

from typing import Final

#: Protocol family prefix; a signature with this prefix but another version is
#: refused with the ``version`` error code rather than ``malformed``.
FAMILY: Final = b"ORCH/"
#: Protocol version implemented by this package (2: ``BATCH``; 3: a ``BATCH`` packs its small frames into one;
#: a peer of another version is refused with ``version``).
VERSION: Final = 3
#: The first frame of every message.
SIGNATURE: Final = FAMILY + str(VERSION).encode()

# -- commands valid in both directions on every socket ----------------------
HEARTBEAT: Final = b"\x01"
ERROR: Final = b"\x02"
BATCH: Final = b"\x03"  # several messages in one: see BATCH_* below

# -- client -> orchestrator ------------------------------------------------
SUBMIT: Final = b"\x10"
FETCH: Final = b"\x11"
STATUS: Final = b"\x12"
CANCEL: Final = b"\x13"
CONTROL: Final = b"\x14"
HISTORY: Final = b"\x15"

# -- orchestrator -> client ------------------------------------------------
ACK: Final = b"\x18"
RESULT: Final = b"\x19"
REPLY: Final = b"\x1a"

# -- satellite -> orchestrator ---------------------------------------------
REGISTER: Final = b"\x20"
DONE: Final = b"\x21"
PROGRESS: Final = b"\x22"
LEAVE: Final = b"\x23"
STARTED: Final = b"\x24"

# -- orchestrator -> satellite ---------------------------------------------
WELCOME: Final = b"\x28"
DISPATCH: Final = b"\x29"
ABORT: Final = b"\x2a"
RECONNECT: Final = b"\x2b"

#: Human-readable names, for logs and error messages.
COMMAND_NAMES: Final[dict[bytes, str]] = {
    HEARTBEAT: "HEARTBEAT",
    ERROR: "ERROR",
    BATCH: "BATCH",
    SUBMIT: "SUBMIT",
    FETCH: "FETCH",
    STATUS: "STATUS",
    CANCEL: "CANCEL",
    CONTROL: "CONTROL",
    HISTORY: "HISTORY",
    ACK: "ACK",
    RESULT: "RESULT",
    REPLY: "REPLY",
    REGISTER: "REGISTER",
    DONE: "DONE",
    PROGRESS: "PROGRESS",
    LEAVE: "LEAVE",
    STARTED: "STARTED",
    WELCOME: "WELCOME",
    DISPATCH: "DISPATCH",
    ABORT: "ABORT",
    RECONNECT: "RECONNECT",
}

#: Commands a client may send to the orchestrator.
CLIENT_COMMANDS: Final = frozenset({HEARTBEAT, SUBMIT, FETCH, STATUS, CANCEL, CONTROL, HISTORY, BATCH})
#: Commands a satellite may send to the orchestrator.
SATELLITE_COMMANDS: Final = frozenset({HEARTBEAT, REGISTER, DONE, PROGRESS, LEAVE, STARTED, ERROR, BATCH})

#: Most messages one BATCH may carry (a receiver refuses more as ``malformed``).
BATCH_MAX: Final = 1024
#: What a sender puts in one BATCH at most: messages, and bytes of frames (a message larger than
#: this goes alone: batching saves a send per message, which a large message does not notice).
BATCH_MESSAGES: Final = 256
BATCH_BYTES: Final = 1 << 20
#: Most frames a sender puts in one BATCH (its header lists each frame's length: it stays far below
#: :data:`~serializers.header.MAX_HEADER`); a message with more goes alone.
BATCH_FRAMES: Final = 4096
#: A payload frame of at least this many bytes travels in a BATCH as its own frame, without a copy; smaller
#: ones are packed into the BATCH's body (a copy is cheaper than a send and a receive per frame).
BATCH_ALONE: Final = 64 * 1024

# -- structured error codes (ERROR header key "code") ----------------------
E_MALFORMED: Final = "malformed"  # frames missing, header not a msgpack map, bad field
E_VERSION: Final = "version"  # incompatible protocol version
E_UNKNOWN_COMMAND: Final = "unknown_command"
E_UNKNOWN_KIND: Final = "unknown_kind"  # no registered satellite offers the task kind
E_UNKNOWN_TASK: Final = "unknown_task"
E_TOO_LARGE: Final = "too_large"  # message above the configured maximum size
E_BUSY: Final = "busy"  # queue full; retry later
E_BAD_REQUEST: Final = "bad_request"  # well-formed but invalid request (e.g. bad strategy)
E_CODEC: Final = "codec"  # payload cannot be decoded by the named codec
E_LIMIT: Final = "limit"  # a per-client limit (unfinished tasks or their bytes) is reached: wait for results
E_FORBIDDEN: Final = "forbidden"  # the authenticated key lacks the role this command needs
E_INTERNAL: Final = "internal"  # the orchestrator failed on a valid message: our fault, logged with a traceback
E_NOT_ACTIVE: Final = "not_active"  # a passive server of a binary-star pair: ask the other one

# -- task outcome error types (RESULT header "err"."type") -----------------
ERR_CANCELLED: Final = "Cancelled"
ERR_TIMEOUT: Final = "TaskTimeout"
ERR_WORKER_DIED: Final = "WorkerDied"
ERR_UNKNOWN_KIND: Final = "UnknownKind"
ERR_QUARANTINED: Final = "Quarantined"  # stalled or killed its satellites too often
ERR_EXPIRED: Final = "Expired"  # no satellite took it within its time-to-live
ERR_MAX_RUN: Final = "MaxRunTime"  # ran longer than its maximum run time
ERR_REVOKED: Final = "Revoked"  # the key that submitted it was revoked before it finished
ERR_PAYLOAD_LOST: Final = "PayloadLost"  # its payload, spilled to the journal while queued, cannot be read back
ERR_DEPENDENCY: Final = "DependencyFailed"  # a task it waited for did not succeed (failed, cancelled, expired, ...)

#: Default maximum message size accepted by the orchestrator (also ZMQ_MAXMSGSIZE).
DEFAULT_MAX_MESSAGE: Final = 256 * 1024 * 1024


def command_name(cmd: bytes) -> str:
    """Return a printable name for a command byte (``"0x7f"`` when unknown)."""
    name = COMMAND_NAMES.get(cmd)
    if name is not None:
        return name
    return "0x" + cmd.hex() if cmd else "<empty>"
