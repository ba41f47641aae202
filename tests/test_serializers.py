"""The wire format: headers, signatures, codecs and zero-copy numpy frames."""

from __future__ import annotations

import numpy as np
import pytest

import serializers
from serializers import ProtocolError, check_signature, codecs, decode, encode, pack, unpack
from serializers import protocol as P
from serializers.header import field

VALUES = [None, 1, -2**40, 1.5, "text", b"\x00bytes", [1, [2, "x"]], {"a": {"b": [1.0, None]}}, True]


@pytest.mark.parametrize("codec", ["msgpack", "json"])
@pytest.mark.parametrize("value", VALUES)
def test_roundtrip_plain_values(codec: str, value: object) -> None:
    meta, frames = encode(value, codec)
    assert meta == []
    assert decode(codec, meta, frames) == value


@pytest.mark.parametrize("codec", ["msgpack", "json"])
@pytest.mark.parametrize("dtype", ["f8", "f4", "i8", "u1", "c16", "bool", ">i4"])
def test_arrays_travel_as_frames(codec: str, dtype: str) -> None:
    arr = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
    meta, frames = encode({"a": arr, "n": 3}, codec)
    assert meta == [[arr.dtype.str, [2, 3, 4]]]
    assert len(frames) == 2 and bytes(frames[1]) == arr.tobytes()
    out = decode(codec, meta, [bytes(frames[0]), bytes(frames[1])])
    np.testing.assert_array_equal(out["a"], arr)
    assert out["a"].dtype == arr.dtype and out["n"] == 3


def test_decoded_arrays_share_the_received_buffer() -> None:
    arr = np.linspace(0, 1, 1000)
    meta, frames = encode(arr)
    received = bytearray(bytes(frames[1]))  # what a socket would hand us
    out = decode("msgpack", meta, [frames[0], memoryview(received)])
    assert np.shares_memory(out, np.frombuffer(received, dtype=arr.dtype))


def test_encoding_does_not_copy_contiguous_arrays() -> None:
    arr = np.arange(100_000, dtype=np.float64)
    _, frames = encode(arr)
    assert isinstance(frames[1], memoryview)
    assert np.shares_memory(np.frombuffer(frames[1], dtype=arr.dtype), arr)


def test_non_contiguous_and_empty_arrays() -> None:
    base = np.arange(20.0).reshape(4, 5)
    for arr in (base[:, ::2], base.T, np.zeros((0, 3)), np.float64(2.5) * np.ones(())):
        meta, frames = encode([arr])
        np.testing.assert_array_equal(decode("msgpack", meta, frames)[0], arr)


def test_numpy_scalars_become_python_numbers() -> None:
    meta, frames = encode({"x": np.float32(1.5), "i": np.int64(7)})
    assert decode("msgpack", meta, frames) == {"x": 1.5, "i": 7}


def test_object_arrays_need_pickle() -> None:
    with pytest.raises(ProtocolError) as e:
        encode(np.array([object()], dtype=object))
    assert e.value.code == P.E_CODEC


def test_pickle_is_refused_unless_opted_in() -> None:
    assert not codecs.pickle_allowed()
    with pytest.raises(ProtocolError) as e:
        encode({1, 2}, "pickle")
    assert e.value.code == P.E_CODEC and "disabled" in e.value.detail
    codecs.allow_pickle(True)
    try:
        meta, frames = encode({"s": {1, 2}, "a": np.arange(3)}, "pickle")
        codecs.allow_pickle(False)
        with pytest.raises(ProtocolError):
            decode("pickle", meta, frames)  # the receiving side must opt in too
        codecs.allow_pickle(True)
        out = decode("pickle", meta, frames)
        assert out["s"] == {1, 2}
        np.testing.assert_array_equal(out["a"], np.arange(3))
    finally:
        codecs.allow_pickle(False)


def test_unknown_codec_and_unencodable_values() -> None:
    with pytest.raises(ProtocolError) as e:
        encode(1, "nope")
    assert e.value.code == P.E_CODEC
    with pytest.raises(ProtocolError):
        encode(object())
    with pytest.raises(ProtocolError):
        decode("nope", [], [b""])


class Reversed:
    """A user codec: msgpack with the bytes reversed (proves codecs are pluggable)."""

    name = "reversed"

    def dumps(self, obj: object, arrays: list[np.ndarray]) -> bytes:
        return codecs.MsgpackCodec().dumps(obj, arrays)[::-1]

    def loads(self, body: object, arrays: list[np.ndarray]) -> object:
        return codecs.MsgpackCodec().loads(bytes(body)[::-1], arrays)  # type: ignore[arg-type]


def test_custom_codec_registration() -> None:
    serializers.register_codec(Reversed())
    meta, frames = encode({"k": np.arange(4)}, "reversed")
    assert "reversed" in serializers.codec_names()
    np.testing.assert_array_equal(decode("reversed", meta, frames)["k"], np.arange(4))


@pytest.mark.parametrize("meta,frames", [
    ([["<f8", [3]]], [b"\x90"]),  # announced array frame missing
    ([], [b"\x90", b"extra"]),  # frame not announced
    ([["<f8", [3]]], [b"\x90", b"short"]),  # wrong buffer size
    ([["|O", [1]]], [b"\x90", b"x" * 8]),  # object dtype refused
    ([["not a dtype", [1]]], [b"\x90", b"x"]),
    ("garbage", [b"\x90"]),
    (None, []),
])
def test_bad_payloads_are_protocol_errors(meta: object, frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        decode("msgpack", meta, frames)


def test_garbage_body_is_a_codec_error() -> None:
    with pytest.raises(ProtocolError) as e:
        decode("msgpack", [], [b"\xc1\xc1"])
    assert e.value.code == P.E_CODEC
    with pytest.raises(ProtocolError):
        decode("json", [], [b"{not json"])


def test_headers() -> None:
    assert unpack(pack({"id": "x", "n": 1})) == {"id": "x", "n": 1}
    for bad in (b"", b"\xc1", pack([1, 2]), pack({1: 2}), b"\x81" + b"\xa1k"):
        with pytest.raises(ProtocolError) as e:
            unpack(bad)
        assert e.value.code == P.E_MALFORMED
    with pytest.raises(ProtocolError) as e:
        unpack(b"\x80" * (70 * 1024))
    assert e.value.code == P.E_TOO_LARGE


def test_fields_are_type_checked() -> None:
    hdr = {"id": "t", "n": 3, "b": True}
    assert field(hdr, "id", str) == "t"
    assert field(hdr, "missing", int, 7) == 7
    for key, kind in (("id", int), ("b", int), ("missing", str)):
        with pytest.raises(ProtocolError):
            field(hdr, key, kind)


def test_signature_versions() -> None:
    check_signature(P.SIGNATURE)
    with pytest.raises(ProtocolError) as e:
        check_signature(b"ORCH/1")
    assert e.value.code == P.E_VERSION and f"version {P.VERSION}" in e.value.detail
    with pytest.raises(ProtocolError) as e:
        check_signature(b"MDPC01")
    assert e.value.code == P.E_MALFORMED


def test_command_names() -> None:
    assert P.command_name(P.SUBMIT) == "SUBMIT"
    assert P.command_name(b"\x7f") == "0x7f"
    assert P.command_name(b"") == "<empty>"
    assert len(set(P.COMMAND_NAMES)) == len(P.COMMAND_NAMES)
