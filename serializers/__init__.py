"""Orchester's wire format: protocol constants, headers, typed messages and payload codecs.

This package imports nothing from the rest of Orchester. :mod:`serializers.messages` names every
command's header fields (the reference of ``docs/protocol.rst``).
"""

from . import messages, protocol
from .codecs import (
    DEFAULT_CODEC,
    ERR_CODEC_REFUSED,
    PICKLE_CONSENT,
    Codec,
    Ref,
    allow_pickle,
    check_run_codec,
    check_submit_codec,
    codec_names,
    decode,
    dispatch_consent,
    encode,
    get_codec,
    header_codec,
    pickle_allowed,
    register_codec,
)
from .header import ProtocolError, check_signature, error_frames, pack, unpack

__all__ = [
    "DEFAULT_CODEC",
    "ERR_CODEC_REFUSED",
    "PICKLE_CONSENT",
    "Codec",
    "ProtocolError",
    "Ref",
    "allow_pickle",
    "check_run_codec",
    "check_signature",
    "check_submit_codec",
    "codec_names",
    "decode",
    "dispatch_consent",
    "encode",
    "error_frames",
    "get_codec",
    "header_codec",
    "messages",
    "pack",
    "pickle_allowed",
    "protocol",
    "register_codec",
    "unpack",
]
