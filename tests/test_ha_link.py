"""The peer link's messages (:mod:`orchester.ha.link`): builders, decoders, every field checked."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

import msgpack
import pytest

from orchester.ha import link
from orchester.ha.star import HAState
from serializers import pack

E = "0123456789abcdef"
REC0 = ["S", "t0", b"c", pack({"id": "t0", "k": "echo"}), [b"x"], 1.0, None]
REC1 = ["T", "t0", 3, 1, "sat-1", None, 2.0]


@pytest.mark.parametrize(("frames", "message"), [
    (link.encode_state(HAState.ACTIVE, "primary", E, 7, True),
     link.State(HAState.ACTIVE, "primary", E, 7, True)),
    (link.encode_state(HAState.PASSIVE, "backup", "b" * 16, 0, False, stream=E, acked=5),
     link.State(HAState.PASSIVE, "backup", "b" * 16, 0, False, stream=E, acked=5)),
    (link.encode_records(E, 3, [link.pack_record(REC0), link.pack_record(REC1)]),
     link.Records(E, 3, (REC0, REC1))),
    (link.encode_sync(E), link.Sync(E)),
    (link.encode_ack(E, 41), link.Ack(E, 41)),
    (link.encode_orphans(E, [link.pack_record(REC0)]), link.Orphans(E, (REC0,))),
    (link.encode_orphans(E, []), link.Orphans(E, ())),
    (link.encode_snap(E, 9, 2, True, [link.pack_record(REC1)]), link.SnapChunk(E, 9, 2, True, (REC1,))),
], ids=["state-active", "state-passive", "records", "sync", "ack", "orphans", "orphans-none", "snap"])
def test_every_kind_decodes_to_what_was_built(frames: list[bytes], message: link.Message) -> None:
    assert link.decode(frames) == message


def test_the_wire_format_is_short_keys_in_a_fixed_order() -> None:
    """What the two servers exchange (both sides must agree byte for byte across a rolling upgrade)."""
    def head(frames: list[bytes]) -> list[tuple[str, Any]]:
        return list(msgpack.unpackb(frames[1]).items())

    assert head(link.encode_state(HAState.PASSIVE, "backup", E, 4, False, stream="s" * 16, acked=3)) == [
        ("s", 4), ("role", "backup"), ("e", E), ("q", 4), ("f", False), ("st", "s" * 16), ("a", 3)]
    assert head(link.encode_state(HAState.ACTIVE, "primary", E, 4, True)) == [
        ("s", 3), ("role", "primary"), ("e", E), ("q", 4), ("f", True)]
    assert head(link.encode_records(E, 5, [b"r"])) == [("e", E), ("q", 5)]
    assert head(link.encode_sync(E)) == [("e", E)]
    assert head(link.encode_ack(E, 2)) == [("e", E), ("q", 2)]
    assert head(link.encode_orphans(E, [])) == [("e", E)]
    assert head(link.encode_snap(E, 9, 0, False, [])) == [("e", E), ("q", 9), ("i", 0), ("last", False)]
    assert [f[0] for f in (link.encode_state(HAState.ACTIVE, "primary", E, 0, False), link.encode_records(E, 1, []),
                           link.encode_sync(E), link.encode_ack(E, 0), link.encode_orphans(E, []),
                           link.encode_snap(E, 0, 0, True, []))] == \
        [b"STATE", b"REC", b"SYNC", b"ACK", b"ORPHANS", b"SNAP"]


def _state(**change: Any) -> list[bytes]:
    head: dict[str, Any] = {"s": 3, "role": "primary", "e": E, "q": 0, "f": False}
    head.update(change)
    return [link.STATE, pack(head)]


GOOD_RECORD = link.pack_record(REC0)
MALFORMED: list[tuple[str, list[bytes], str]] = [
    ("no frames", [], "kind and a header"),
    ("kind only", [link.SYNC], "kind and a header"),
    ("unknown kind", [b"HELLO", pack({})], "unknown message kind"),
    ("header not msgpack", [link.SYNC, b"\xc1"], "SYNC header"),
    ("header not a map", [link.SYNC, msgpack.packb([E])], "SYNC header"),
    ("missing field", [link.ACK, pack({"e": E})], "lacks its field 'q'"),
    ("state out of range", _state(s=9), "'s' must be a state"),
    ("state zero", _state(s=0), "'s' must be a state"),
    ("state a bool", _state(s=True), "'s' must be a state"),
    ("state a float", _state(s=3.0), "'s' must be a state"),
    ("unknown role", _state(role="tertiary"), "'role' must be primary or backup"),
    ("role a list", _state(role=["primary"]), "'role' must be primary or backup"),
    ("epoch empty", _state(e=""), "'e' must be a string"),
    ("epoch too long", _state(e="x" * 65), "'e' must be a string"),
    ("epoch bytes", _state(e=b"abc"), "'e' must be a string"),
    ("seq negative", _state(q=-1), "'q' must be an integer"),
    ("seq too large", _state(q=2**63), "'q' must be an integer"),
    ("seq a string", _state(q="1"), "'q' must be an integer"),
    ("seq a float", _state(q=1.0), "'q' must be an integer"),
    ("seq not finite", _state(q=float("nan")), "'q' must be an integer"),
    ("seq a bool", _state(q=True), "'q' must be an integer"),
    ("flag an int", _state(f=1), "'f' must be true or false"),
    ("stream without its ack", _state(st=E), "together or neither"),
    ("ack without its stream", _state(a=1), "together or neither"),
    ("ack negative", _state(st=E, a=-2), "'a' must be an integer"),
    ("extra frame", [link.ACK, pack({"e": E, "q": 1}), b"x"], "1 frame(s) after its header"),
    ("records without a record", [link.REC, pack({"e": E, "q": 1})], "carries no record"),
    ("record not msgpack", [link.REC, pack({"e": E, "q": 1}), b"\xc1"], "not msgpack"),
    ("record not a list", [link.REC, pack({"e": E, "q": 1}), msgpack.packb({"S": 1})], "a record is a list"),
    ("record empty", [link.SNAP, pack({"e": E, "q": 1, "i": 0, "last": True}), msgpack.packb([])],
     "a record is a list"),
    ("record code not a string", [link.ORPHANS, pack({"e": E}), GOOD_RECORD, msgpack.packb([1, "t"])],
     "a record is a list"),
    ("chunk index negative", [link.SNAP, pack({"e": E, "q": 1, "i": -1, "last": True})], "'i' must be an integer"),
    ("last not a bool", [link.SNAP, pack({"e": E, "q": 1, "i": 0, "last": None})], "'last' must be true or false"),
]


@pytest.mark.parametrize(("frames", "reason"), [(f, r) for _, f, r in MALFORMED], ids=[n for n, _, _ in MALFORMED])
def test_a_malformed_message_raises_link_error_and_nothing_else(frames: list[bytes], reason: str) -> None:
    with pytest.raises(link.LinkError, match=re.escape(reason)):
        link.decode(frames)


def test_read_counts_logs_and_drops_a_malformed_message(caplog: pytest.LogCaptureFixture) -> None:
    counters: dict[str, int] = {"ha_bad_messages": 0}
    with caplog.at_level(logging.WARNING, "orchester.ha"):
        assert link.read([link.ACK, pack({"e": E, "q": "many"})], counters) is None
    assert counters["ha_bad_messages"] == 1
    assert "bad message on the peer link: ACK field 'q' must be an integer" in caplog.text
    assert link.read(link.encode_ack(E, 1), counters) == link.Ack(E, 1)
    assert counters["ha_bad_messages"] == 1


def test_every_field_of_every_message_is_described_once() -> None:
    assert set(link.KINDS) == {link.STATE, link.REC, link.SYNC, link.ACK, link.ORPHANS, link.SNAP}
    for kind in link.KINDS.values():
        attrs = [f.attr for f in kind.fields] + ([] if kind.min_records is None else ["records"])
        assert attrs == [f.name for f in dataclasses.fields(kind.message)], kind.name
        assert len({f.key for f in kind.fields}) == len(kind.fields), kind.name


def test_docs_show_the_link_messages_as_they_are() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "ha.rst").read_text()
    assert link.table_rst() in doc, "docs/ha.rst is stale: paste orchester.ha.link.table_rst() into it"
