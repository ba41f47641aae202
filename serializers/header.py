"""Header encoding and validation: msgpack maps with short keys, checked on arrival.

Headers are the only frames the orchestrator decodes. Every check raises
:class:`ProtocolError` with a structured error code from
:mod:`serializers.protocol`, so the receiver can answer the sender with an
``ERROR`` message instead of crashing.
"""

from __future__ import annotations

import math
from typing import Any, Final

import msgpack

from . import protocol as P

#: Largest header frame accepted (headers are small by design).
MAX_HEADER: Final = 64 * 1024
#: Deepest nesting of lists and maps a header may have (a 1,000-deep list turns into a
#: RecursionError wherever it is printed or compared).
MAX_DEPTH: Final = 32

_packb = msgpack.Packer(use_bin_type=True).pack


class ProtocolError(Exception):
    """A message that breaks the wire protocol.

    ``code`` is one of the ``E_*`` constants of :mod:`serializers.protocol`;
    ``detail`` is a human-readable explanation sent back to the peer.
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def pack(header: dict[str, Any]) -> bytes:
    """Encode a header map to msgpack bytes."""
    return _packb(header)


def unpack(raw: bytes | memoryview, limit: int = MAX_HEADER) -> dict[str, Any]:
    """Decode and validate a header frame: it must be a msgpack map with str keys, at most ``limit`` bytes.

    (A reply from the orchester — a status of a large fleet, rows of history — may be larger:
    clients pass a larger ``limit`` for those.)
    """
    if len(raw) > limit:
        raise ProtocolError(P.E_TOO_LARGE, f"header of {len(raw)} bytes exceeds {limit}")
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises a zoo of exception types on garbage
        raise ProtocolError(P.E_MALFORMED, f"header is not valid msgpack: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(P.E_MALFORMED, f"header must be a map, not {type(obj).__name__}")
    if len(raw) > MAX_DEPTH and not _CONTAINERS.isdisjoint(map(type, obj.values())) and not _shallow(obj):
        raise ProtocolError(P.E_MALFORMED, f"header nests lists and maps deeper than {MAX_DEPTH}")
    return obj


#: The types msgpack decodes a map or an array to.
_CONTAINERS: Final = frozenset((dict, list))


def _shallow(obj: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether ``obj`` nests lists and maps at most ``limit`` deep (level by level: never recursion).

    msgpack decodes to exact ``dict`` and ``list`` (never subclasses), so the type tests are exact
    ones: this runs on every header, and most have no container below the top map.
    """
    level = [obj]
    depth = 1
    while level:
        if depth > limit:
            return False
        below = []
        for item in level:
            for value in (item.values() if type(item) is dict else item):
                if type(value) is dict or type(value) is list:
                    below.append(value)
        level = below
        depth += 1
    return True


def check_signature(sig: bytes) -> None:
    """Refuse a message whose first frame is not this protocol's signature."""
    if sig == P.SIGNATURE:
        return
    if sig.startswith(P.FAMILY):
        raise ProtocolError(
            P.E_VERSION,
            f"protocol {sig[len(P.FAMILY):].decode(errors='replace')!r} is not supported; "
            f"this peer speaks version {P.VERSION} ({P.SIGNATURE.decode()})",
        )
    raise ProtocolError(P.E_MALFORMED, "first frame is not a protocol signature")


def field(header: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """Return ``header[key]`` checked against ``kind``; a missing key without default is an error.

    ``bool`` is not accepted where ``int`` is asked for.
    """
    if key not in header:
        if default is ...:
            raise ProtocolError(P.E_MALFORMED, f"header field {key!r} is missing")
        return default
    value = header[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ProtocolError(P.E_MALFORMED, f"header field {key!r} has type {type(value).__name__}")
    return value


#: Longest duration a header may name, in seconds (ten years): timeouts, time-to-live, run times.
MAX_SECONDS: Final = 10 * 366 * 86400.0
#: Range of a task priority.
MAX_PRIORITY: Final = 1_000_000
#: Longest string a header field may hold where no tighter limit applies (ids, kinds, tags, names).
MAX_NAME: Final = 256
#: Longest list a header field may hold where no tighter limit applies (tags, kinds).
MAX_ITEMS: Final = 256


def number(header: dict[str, Any], key: str, lo: float, hi: float, default: Any = ...,
           integer: bool = False) -> Any:
    """Return the number ``header[key]``, checked to be finite and within ``[lo, hi]``.

    ``integer``: only an ``int`` is accepted (never a ``bool``); otherwise an ``int`` or a ``float``.
    Every number of a header goes through here before it changes any state (``1e308``, ``nan``,
    ``inf`` or ``2**63`` in a time-to-live must be refused, not overflow a timer later).
    """
    value = field(header, key, int if integer else (int, float), default)
    if value is default and key not in header:
        return value
    if isinstance(value, bool):
        raise ProtocolError(P.E_MALFORMED, f"header field {key!r} must be a number, not a boolean")
    if isinstance(value, float) and not math.isfinite(value):
        raise ProtocolError(P.E_MALFORMED, f"header field {key!r} must be finite, not {value!r}")
    if not lo <= value <= hi:
        raise ProtocolError(P.E_MALFORMED, f"header field {key!r} must be from {lo:g} to {hi:g}, not {value:g}")
    return value


def text(header: dict[str, Any], key: str, default: Any = ..., limit: int = MAX_NAME) -> Any:
    """Return the string ``header[key]``: 1 to ``limit`` printable characters (no line breaks or
    other control characters: ids and names end up in logs and terminals)."""
    value = field(header, key, str, default)
    if value is default and key not in header:
        return value
    if not value or len(value) > limit:
        raise ProtocolError(P.E_MALFORMED, f"header field {key!r} must hold 1 to {limit} characters, "
                            f"not {len(value)}")
    if not value.isprintable():
        raise ProtocolError(P.E_MALFORMED, f"header field {key!r} must hold printable characters only")
    return value


def names(header: dict[str, Any], key: str, default: Any = ..., limit: int = MAX_ITEMS,
          length: int = MAX_NAME) -> Any:
    """Return ``header[key]`` as a list of at most ``limit`` strings of 1 to ``length`` characters."""
    value = field(header, key, list, default)
    if value is default and key not in header:
        return value
    if len(value) > limit:
        raise ProtocolError(P.E_MALFORMED, f"header field {key!r} lists {len(value)} items; at most {limit}")
    for item in value:
        if not isinstance(item, str) or not item or len(item) > length or not item.isprintable():
            raise ProtocolError(P.E_MALFORMED, f"header field {key!r} must list strings of 1 to {length} "
                                "printable characters")
    return value


def error_frames(code: str, detail: str, **extra: Any) -> list[bytes]:
    """Build the ``[SIGNATURE, ERROR, header]`` frames of a structured error."""
    hdr: dict[str, Any] = {"code": code, "msg": detail}
    hdr.update(extra)
    return [P.SIGNATURE, P.ERROR, pack(hdr)]
