"""Header encoding and validation: msgpack maps with short keys, checked on arrival.

Headers are the only frames the orchestrator decodes. Every check raises
:class:`ProtocolError` with a structured error code from
:mod:`serializers.protocol`, so the receiver can answer the sender with an
``ERROR`` message instead of crashing.
"""

from __future__ import annotations

from typing import Any, Final

import msgpack

from . import protocol as P

#: Largest header frame accepted (headers are small by design).
MAX_HEADER: Final = 64 * 1024

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
    return obj


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


def error_frames(code: str, detail: str, **extra: Any) -> list[bytes]:
    """Build the ``[SIGNATURE, ERROR, header]`` frames of a structured error."""
    hdr: dict[str, Any] = {"code": code, "msg": detail}
    hdr.update(extra)
    return [P.SIGNATURE, P.ERROR, pack(hdr)]
