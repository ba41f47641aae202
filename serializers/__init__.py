"""Orchester's wire format: protocol constants, headers and payload codecs.

This package imports nothing from the rest of Orchester.
"""

from . import protocol
from .codecs import (
    DEFAULT_CODEC,
    Codec,
    allow_pickle,
    codec_names,
    decode,
    encode,
    get_codec,
    pickle_allowed,
    register_codec,
)
from .header import ProtocolError, check_signature, error_frames, pack, unpack

__all__ = [
    "DEFAULT_CODEC",
    "Codec",
    "ProtocolError",
    "allow_pickle",
    "check_signature",
    "codec_names",
    "decode",
    "encode",
    "error_frames",
    "get_codec",
    "pack",
    "pickle_allowed",
    "protocol",
    "register_codec",
    "unpack",
]
