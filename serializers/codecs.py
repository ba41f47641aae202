"""Pluggable payload codecs; numpy arrays travel as their own zero-copy frames.

A payload is ``[body, buffer0, buffer1, ...]``: ``body`` is the value encoded by
the named codec with every numpy array replaced by a reference to a buffer
frame, and the header carries the codec name (``"c"``) and, for each buffer,
its dtype and shape (``"arr"``). Receivers rebuild arrays with
:func:`numpy.frombuffer` on the received frame, without a copy.

Built-in codecs: ``msgpack`` (default), ``json`` (for debugging) and
``pickle``, which executes code on load and is therefore refused unless the
process opts in with :func:`allow_pickle` (or ``ORCHESTER_ALLOW_PICKLE=1``).

A value may hold *references* to other tasks' results: a :class:`Ref` (``orchester.ref(task_id)``)
or any object with an ``__orchester_ref__`` attribute naming a task id (a client's future). Each
codec writes a reference as the task id alone (msgpack: extension type :data:`EXT_REF`; JSON:
``{"__ref__": id}``; pickle: a persistent id), :func:`encode` lists the ids it wrote, and
:func:`decode` replaces each by the value its ``refs`` map gives (a satellite decodes the
results that the DISPATCH carries after the payload into that map).

A pickle-coded *task* runs code on the satellite that decodes it, and a submitter's own
opt-in cannot be checked (it is whatever its header says), so a task is decoded as pickle
only when every party that can refuse has agreed: the submitter named it (``"c": "pickle"``,
never guessed from the bytes), the orchestrator accepts pickle tasks (:func:`check_submit_codec`
at submit; :func:`dispatch_consent` in each DISPATCH) and the satellite allows pickle
(:func:`check_run_codec`).
"""

from __future__ import annotations

import base64
import inspect
import io
import json
import os
import pickle
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Protocol

import msgpack
import numpy as np

from . import protocol as P
from .header import ProtocolError

#: msgpack extension type used for a reference to an array buffer frame.
EXT_ARRAY = 1
#: msgpack extension type used for a reference to another task's result (its task id, UTF-8).
EXT_REF = 2
#: Default codec name.
DEFAULT_CODEC = "msgpack"

Buffer = bytes | memoryview
ArrayMeta = list[Any]  # [dtype.str, [shape...]]


class Ref:
    """A reference to the result of task ``task_id``: passed as a task's argument (``orchester.ref(id)``),
    the satellite that runs the task replaces it by that result. The task waits for ``task_id``."""

    __slots__ = ("task_id",)

    def __init__(self, task_id: str) -> None:
        if not isinstance(task_id, str) or not task_id or not task_id.isprintable():
            raise ValueError(f"a reference names a task id (printable text), not {task_id!r}")
        self.task_id = task_id

    @property
    def __orchester_ref__(self) -> str:
        """The task id this reference names (what a codec writes)."""
        return self.task_id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ref) and other.task_id == self.task_id

    def __hash__(self) -> int:
        return hash(("orchester.ref", self.task_id))

    def __repr__(self) -> str:
        return f"orchester.ref({self.task_id!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Ref, (self.task_id,))


def ref_id(obj: Any) -> str | None:
    """The task id ``obj`` refers to (a :class:`Ref`, a client's future), or ``None``."""
    tid = getattr(obj, "__orchester_ref__", None)
    return tid if isinstance(tid, str) and tid else None


class Refs:
    """The references one encoding wrote (ids in first-seen order) or one decoding resolves."""

    __slots__ = ("ids", "values")

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        self.ids: dict[str, None] = {}
        self.values = values

    def write(self, obj: Any) -> str | None:
        """The task id of ``obj`` if it is a reference (noted), else ``None``."""
        tid = ref_id(obj)
        if tid is not None:
            self.ids[tid] = None
        return tid

    def read(self, tid: str) -> Any:
        """The value of the reference to ``tid``: the result given for it, or (nothing given: a client
        reading a value that holds references) the :class:`Ref` itself."""
        if self.values is None:
            return Ref(tid)
        try:
            return self.values[tid]
        except KeyError:
            raise ProtocolError(P.E_MALFORMED, f"the payload refers to the result of task {tid!r}, which was not "
                                "sent with it (a reference must be one of the task's dependencies)") from None


class Codec(Protocol):
    """What a codec implements. Register new ones with :func:`register_codec`.

    ``refs`` (keyword, optional): the references met (:meth:`Refs.write` while encoding, :meth:`Refs.read`
    while decoding); a codec without it cannot carry references.
    """

    name: str

    def dumps(self, obj: Any, arrays: list[np.ndarray]) -> bytes:
        """Encode ``obj``; append each numpy array found to ``arrays`` and reference it by index."""

    def loads(self, body: Buffer, arrays: Sequence[np.ndarray]) -> Any:
        """Decode ``body``, resolving array references into ``arrays``."""


class MsgpackCodec:
    """The default codec: msgpack with numpy arrays and task references as extension types."""

    name = "msgpack"

    def dumps(self, obj: Any, arrays: list[np.ndarray], refs: Refs | None = None) -> bytes:
        def default(o: Any) -> Any:
            if isinstance(o, np.ndarray):
                arrays.append(o)
                return msgpack.ExtType(EXT_ARRAY, (len(arrays) - 1).to_bytes(4, "big"))
            if isinstance(o, np.generic):
                return o.item()
            if isinstance(o, (set, frozenset)):
                return list(o)
            tid = (refs or Refs()).write(o)
            if tid is not None:
                return msgpack.ExtType(EXT_REF, tid.encode())
            raise TypeError(f"cannot encode object of type {type(o).__name__} with msgpack")

        return msgpack.packb(obj, default=default, use_bin_type=True)

    def loads(self, body: Buffer, arrays: Sequence[np.ndarray], refs: Refs | None = None) -> Any:
        def ext_hook(code: int, data: bytes) -> Any:
            if code == EXT_ARRAY:
                return arrays[int.from_bytes(data, "big")]
            if code == EXT_REF:
                return (refs or Refs()).read(data.decode())
            return msgpack.ExtType(code, data)

        return msgpack.unpackb(body, raw=False, ext_hook=ext_hook, strict_map_key=False)


class JsonCodec:
    """Human-readable JSON; arrays and bytes become tagged objects."""

    name = "json"

    def dumps(self, obj: Any, arrays: list[np.ndarray], refs: Refs | None = None) -> bytes:
        def default(o: Any) -> Any:
            if isinstance(o, np.ndarray):
                arrays.append(o)
                return {"__ndarray__": len(arrays) - 1}
            if isinstance(o, np.generic):
                return o.item()
            if isinstance(o, (bytes, bytearray, memoryview)):
                return {"__bytes__": base64.b64encode(bytes(o)).decode()}
            if isinstance(o, (set, frozenset)):
                return list(o)
            tid = (refs or Refs()).write(o)
            if tid is not None:
                return {"__ref__": tid}
            raise TypeError(f"cannot encode object of type {type(o).__name__} as JSON")

        return json.dumps(obj, default=default, separators=(",", ":")).encode()

    def loads(self, body: Buffer, arrays: Sequence[np.ndarray], refs: Refs | None = None) -> Any:
        def hook(d: dict[str, Any]) -> Any:
            if len(d) == 1:
                if "__ndarray__" in d:
                    return arrays[d["__ndarray__"]]
                if "__bytes__" in d:
                    return base64.b64decode(d["__bytes__"])
                if "__ref__" in d and isinstance(d["__ref__"], str):
                    return (refs or Refs()).read(d["__ref__"])
            return d

        return json.loads(bytes(body), object_hook=hook)


class PickleCodec:
    """Pickle protocol 5 with out-of-band buffers. Executes code on load: opt-in only."""

    name = "pickle"

    def dumps(self, obj: Any, arrays: list[np.ndarray], refs: Refs | None = None) -> bytes:
        _require_pickle()
        noted = refs or Refs()

        def callback(buf: pickle.PickleBuffer) -> None:
            arrays.append(np.frombuffer(buf.raw(), dtype=np.uint8))

        class Pickler(pickle.Pickler):
            def persistent_id(self, o: Any) -> Any:
                if getattr(type(o), "__orchester_ref__", None) is None:
                    return None
                tid = noted.write(o)
                return None if tid is None else ("orchester.ref", tid)

        out = io.BytesIO()
        Pickler(out, protocol=5, buffer_callback=callback).dump(obj)
        return out.getvalue()

    def loads(self, body: Buffer, arrays: Sequence[np.ndarray], refs: Refs | None = None) -> Any:
        _require_pickle()
        given = refs or Refs()

        class Unpickler(pickle.Unpickler):
            def persistent_load(self, pid: Any) -> Any:
                if isinstance(pid, tuple) and len(pid) == 2 and pid[0] == "orchester.ref" and isinstance(pid[1], str):
                    return given.read(pid[1])
                raise pickle.UnpicklingError("unknown persistent id")

        return Unpickler(io.BytesIO(bytes(body)), buffers=[memoryview(a) for a in arrays]).load()  # type: ignore[arg-type]


_CODECS: dict[str, Codec] = {}
_WITH_REFS: dict[str, bool] = {}  #: whether a codec carries references (its methods take ``refs``)
_pickle_allowed = os.environ.get("ORCHESTER_ALLOW_PICKLE", "") not in ("", "0", "false", "no")


def allow_pickle(enabled: bool = True) -> None:
    """Opt this process in (or out) of the pickle codec, which runs code on load."""
    global _pickle_allowed
    _pickle_allowed = enabled


def pickle_allowed() -> bool:
    """Whether this process accepts the pickle codec."""
    return _pickle_allowed


def _require_pickle() -> None:
    if not _pickle_allowed:
        raise ProtocolError(
            P.E_CODEC,
            "the pickle codec is disabled: it executes code on load "
            "(opt in with serializers.allow_pickle() or ORCHESTER_ALLOW_PICKLE=1)",
        )


#: DISPATCH header field: ``True`` when the orchestrator accepts pickle-coded tasks (``serve --allow-pickle``).
PICKLE_CONSENT = "pk"
#: The error type (``err.type`` of a RESULT) of a task a satellite refuses to decode for lack of consent.
ERR_CODEC_REFUSED = "CodecRefused"
#: Longest codec name accepted in a header.
MAX_CODEC_NAME = 64


def header_codec(header: Mapping[str, Any]) -> str:
    """The codec a task or result header names (``"c"``; the default when absent).

    Raises :class:`ProtocolError` (``malformed``) when it is not a short string.
    """
    codec = header.get("c", DEFAULT_CODEC)
    if not isinstance(codec, str) or not 0 < len(codec) <= MAX_CODEC_NAME:
        raise ProtocolError(P.E_MALFORMED, f"field 'c' (codec) must be a name of at most {MAX_CODEC_NAME} "
                            f"characters, not {str(codec)[:80]!r}")
    return codec


def check_submit_codec(header: Mapping[str, Any], *, allow_pickle: bool,
                       roles: Collection[str] | None = None) -> str:
    """The orchestrator's check of a SUBMIT header's codec, before any state changes; returns it.

    A pickle-coded task runs code on whichever satellite decodes it, so the orchestrator (the
    party that authenticates submitters) accepts one only when it was started with
    ``--allow-pickle`` and, when ``roles`` is given (CurveZMQ: the submitting key's roles), the
    key holds the ``pickle`` role. Raises :class:`ProtocolError`: ``codec`` when pickle is off,
    ``forbidden`` when the key may not, ``malformed`` when ``c`` is not a codec name.
    """
    return check_codec_consent(header_codec(header), allow_pickle=allow_pickle, roles=roles)


def check_codec_consent(codec: str, *, allow_pickle: bool, roles: Collection[str] | None = None) -> str:
    """The consent part of :func:`check_submit_codec`, for a codec name already checked."""
    if codec == PickleCodec.name:
        if not allow_pickle:
            raise ProtocolError(P.E_CODEC, "this orchestrator does not accept pickle-coded tasks: they run code "
                                "on the satellites (start it with --allow-pickle to accept them)")
        if roles is not None and "pickle" not in roles:
            raise ProtocolError(P.E_FORBIDDEN, "this key may not submit pickle-coded tasks (it needs the "
                                "'pickle' role)")
    return codec


def dispatch_consent(allow_pickle: bool) -> dict[str, bool]:
    """The fields the orchestrator adds to every DISPATCH header: its consent to pickle tasks, if given."""
    return {PICKLE_CONSENT: True} if allow_pickle else {}


def check_run_codec(task_header: Mapping[str, Any], dispatch_header: Mapping[str, Any],
                    allow_pickle: bool | None = None) -> str:
    """The satellite's check before it decodes a dispatched task; returns the codec to decode with.

    The codec is the one the task header names, never guessed from the payload. A pickle-coded
    task is decoded only when the submitter named pickle, the orchestrator's DISPATCH header
    carries its consent (:data:`PICKLE_CONSENT`) and this process allows pickle
    (``allow_pickle``; default: :func:`pickle_allowed`). Raises :class:`ProtocolError`
    (``codec``) naming the party that did not consent, or ``malformed`` for a bad ``c``.
    """
    codec = header_codec(task_header)
    if codec == PickleCodec.name:
        if dispatch_header.get(PICKLE_CONSENT) is not True:
            raise ProtocolError(P.E_CODEC, "pickle-coded task refused: the orchestrator did not accept pickle "
                                "for it (orchester serve --allow-pickle); pickle runs code on load")
        if not (_pickle_allowed if allow_pickle is None else allow_pickle):
            raise ProtocolError(P.E_CODEC, "pickle-coded task refused: this satellite does not accept pickle "
                                "(satellite run --allow-pickle); pickle runs code on load")
    return codec


def register_codec(codec: Codec) -> None:
    """Make ``codec`` available under ``codec.name`` for encoding and decoding."""
    _CODECS[codec.name] = codec
    try:
        _WITH_REFS[codec.name] = "refs" in inspect.signature(codec.dumps).parameters \
            and "refs" in inspect.signature(codec.loads).parameters
    except (TypeError, ValueError):
        _WITH_REFS[codec.name] = False


def get_codec(name: str) -> Codec:
    """Return the codec registered under ``name``; :class:`ProtocolError` if unknown."""
    try:
        return _CODECS[name]
    except (KeyError, TypeError):
        raise ProtocolError(P.E_CODEC, f"unknown codec {name!r}; known: {sorted(_CODECS)}") from None


def codec_names() -> list[str]:
    """Names of the registered codecs."""
    return sorted(_CODECS)


for _c in (MsgpackCodec(), JsonCodec(), PickleCodec()):
    register_codec(_c)


def encode(obj: Any, codec: str = DEFAULT_CODEC, refs: Refs | None = None) -> tuple[list[ArrayMeta], list[Buffer]]:
    """Encode ``obj`` into ``(array_meta, frames)`` where ``frames = [body, *buffers]``.

    Array buffers are memoryviews of the (C-contiguous) arrays: send them with
    ``copy=False`` to avoid any copy. ``refs``: notes the task ids of the references written.
    """
    arrays: list[np.ndarray] = []
    try:
        c = get_codec(codec)
        body = c.dumps(obj, arrays, refs=refs) if _WITH_REFS.get(codec) else c.dumps(obj, arrays)  # type: ignore[call-arg]
    except ProtocolError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(P.E_CODEC, f"cannot encode with {codec}: {exc}") from None
    meta: list[ArrayMeta] = []
    frames: list[Buffer] = [body]
    for a in arrays:
        if a.dtype.hasobject:
            raise ProtocolError(P.E_CODEC, "arrays of Python objects need the pickle codec")
        if not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)
        meta.append([a.dtype.str, list(a.shape)])
        frames.append(memoryview(a).cast("B") if a.size else b"")  # type: ignore[arg-type]
    return meta, frames


def decode(codec: str, meta: Any, frames: Sequence[Any], refs: Mapping[str, Any] | None = None) -> Any:
    """Decode ``frames = [body, *buffers]`` (bytes, memoryviews or zmq Frames).

    Arrays are rebuilt with :func:`numpy.frombuffer` on the frames (read-only, no copy).
    ``refs``: the value of each task id a reference may name (a reference to any other is a
    :class:`ProtocolError`); without it, references decode to :class:`Ref` objects.
    """
    if not frames:
        raise ProtocolError(P.E_MALFORMED, "payload body frame is missing")
    meta = meta or []
    if not isinstance(meta, list) or len(meta) != len(frames) - 1:
        raise ProtocolError(P.E_MALFORMED, f"header announces {len(meta) if isinstance(meta, list) else '?'} "
                            f"array frames, message has {len(frames) - 1}")
    arrays: list[np.ndarray] = []
    for m, f in zip(meta, frames[1:], strict=True):
        try:
            dtype, shape = np.dtype(m[0]), tuple(int(s) for s in m[1])
            if dtype.hasobject:
                raise ValueError("object arrays are not accepted")
            arrays.append(np.frombuffer(_buffer(f), dtype=dtype).reshape(shape))
        except (TypeError, ValueError, IndexError) as exc:
            raise ProtocolError(P.E_MALFORMED, f"bad array frame {m!r}: {exc}") from None
    try:
        c = get_codec(codec)
        if _WITH_REFS.get(codec):
            return c.loads(_buffer(frames[0]), arrays, refs=Refs(refs))  # type: ignore[call-arg]
        return c.loads(_buffer(frames[0]), arrays)
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(P.E_CODEC, f"cannot decode {codec} payload: {exc}") from None


def _buffer(f: Any) -> Buffer:
    """The bytes-like view of a frame: zmq.Frame exposes ``.buffer``."""
    buf = getattr(f, "buffer", None)
    return buf if buf is not None else f
