"""Journal records (orchester.journal.records): builders, checked views, the docs' table."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import msgpack
import pytest

from orchester.errors import OrchesterError
from orchester.journal import records as R
from orchester.journal.wal import ReadReport, encode_record, read_segment
from serializers import pack
from tracker import TaskState

HEADER = pack({"id": "t1", "k": "echo"})
RESULT_HEADER = pack({"id": "t1", "a": 2, "ok": True, "sat": "s1"})

#: (builder output, the same record as the orchestrator wrote it before the builders existed, its view)
BUILT: list[tuple[list[Any], list[Any], Any]] = [
    (R.submitted("t1", b"client", HEADER, [b"a", memoryview(b"bc")], 10.5, 30.0, "alice"),
     ["S", "t1", b"client", HEADER, [memoryview(b"a"), memoryview(b"bc")], 10.5, 30.0, "alice"],
     R.Submitted("t1", b"client", HEADER, [b"a", b"bc"], 10.5, 30.0, "alice")),
    (R.submitted("t1", b"client", HEADER, [], 10.5, None, None),
     ["S", "t1", b"client", HEADER, [], 10.5, None, None],
     R.Submitted("t1", b"client", HEADER, [], 10.5, None, None)),
    (R.transition("t1", TaskState.RUNNING, 2, "s1", "started", 11.0),
     ["T", "t1", 2, 2, "s1", "started", 11.0],
     R.Transition("t1", TaskState.RUNNING, 2, "s1", "started", 11.0)),
    (R.transition("t1", TaskState.PENDING, 0, None, None, 11.0),
     ["T", "t1", 0, 0, None, None, 11.0],
     R.Transition("t1", TaskState.PENDING, 0, None, None, 11.0)),
    (R.result("t1", [RESULT_HEADER, memoryview(b"\xc0")], 12.0),
     ["R", "t1", [memoryview(RESULT_HEADER), memoryview(b"\xc0")], 12.0],
     R.Result("t1", [RESULT_HEADER, b"\xc0"], 12.0)),
    (R.satellite_key("sat-1", "lab", 13.0), ["K", "sat-1", "lab", 13.0], R.SatelliteKey("sat-1", "lab", 13.0)),
    (R.barrier(14.0), ["Z", "", 14.0], R.Barrier("", 14.0)),
]


def decoded(records: list[list[Any]], tmp_path: Path) -> list[list[Any]]:
    """The records as the journal reads them back: encoded, written to a log segment, read."""
    path = tmp_path / "wal-000001.log"
    path.write_bytes(b"".join(encode_record(r) for r in records))
    report = ReadReport()
    back = list(read_segment(path, report))
    assert report.records == len(records) and not report.damaged
    return back


@pytest.mark.parametrize(("built", "written", "expected"), BUILT, ids=lambda v: None)
def test_a_built_record_is_written_as_before_and_reads_back_as_its_view(
        built: list[Any], written: list[Any], expected: Any, tmp_path: Path) -> None:
    assert encode_record(built) == encode_record(written)  # byte for byte what the orchestrator wrote
    [back] = decoded([built], tmp_path)
    v = R.view(back)
    assert v is not None and v == expected and type(v).of(back) == expected
    assert encode_record(v.record()) == encode_record(built)  # and back again


def test_every_kind_has_a_builder_case() -> None:
    assert {type(v) for _, _, v in BUILT} == set(R.VIEWS.values())
    assert list(R.VIEWS) == [R.SUBMITTED, R.TRANSITION, R.RESULT, R.SATELLITE_KEY, R.BARRIER]


def test_views_hold_typed_fields() -> None:
    t = R.Transition.of(["T", "t1", 3, 1, "s1", None, 5])
    assert t.state is TaskState.DONE and isinstance(t.time, float) and t.time == 5.0
    s = R.Submitted.of(["S", "t1", memoryview(b"c"), memoryview(HEADER), [b"x"], 1, 2, None])
    assert type(s.client) is bytes and type(s.header) is bytes and s.time == 1.0 and s.timeout == 2.0
    assert R.Result.of(["R", "t1", [memoryview(RESULT_HEADER)], 3.0]).header == RESULT_HEADER
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.attempt = 2  # type: ignore[misc]


@pytest.mark.parametrize(("older", "view"), [
    (["S", "t1", b"c", HEADER, [b"x"], 1.0, None], R.Submitted("t1", b"c", HEADER, [b"x"], 1.0, None, None)),
    (["S", "t1", b"c", HEADER, [b"x"], 1.0], R.Submitted("t1", b"c", HEADER, [b"x"], 1.0, None, None)),
    (["T", "t1", 1, 1, "s1", None], R.Transition("t1", TaskState.DISPATCHED, 1, "s1", None, None)),
    (["R", "t1", [RESULT_HEADER]], R.Result("t1", [RESULT_HEADER], None)),
    (["K", "sat-1", "lab"], R.SatelliteKey("sat-1", "lab", None)),
])
def test_records_of_older_versions_read_with_their_later_fields_nil(older: list[Any], view: Any,
                                                                     tmp_path: Path) -> None:
    [back] = decoded([older], tmp_path)
    assert R.view(back) == view
    again = view.record()
    if older[0] == R.SUBMITTED:  # written as today's builder writes it: every optional field, nil
        assert again == [*older, *[None] * (8 - len(older))]
    else:  # a record without a time stays one
        assert encode_record(again) == encode_record(older)


BAD: list[tuple[Any, str]] = [
    ("S", "non-empty list"),
    ([], "non-empty list"),
    ([7, "x"], "starting with its code"),
    (["S"], "6 to 8 elements"),
    (["S", "t1", b"c", HEADER, [b"x"], 1.0, None, None, "extra"], "6 to 8 elements"),
    (["S", 7, b"c", HEADER, [b"x"], 1.0], "task id must be a string"),
    (["S", "t1", "c", HEADER, [b"x"], 1.0], "client identity must be bytes"),
    (["S", "t1", b"c", None, [b"x"], 1.0], "task header must be bytes"),
    (["S", "t1", b"c", HEADER, b"x", 1.0], "payload must be a list of byte strings"),
    (["S", "t1", b"c", HEADER, [b"x", 1], 1.0], "payload must be a list of byte strings"),
    (["S", "t1", b"c", HEADER, [b"x"], "1.0"], "submission time must be a number"),
    (["S", "t1", b"c", HEADER, [b"x"], True], "submission time must be a number"),
    (["S", "t1", b"c", HEADER, [b"x"], 1.0, "soon"], "timeout must be a number"),
    (["S", "t1", b"c", HEADER, [b"x"], 1.0, None, b"alice"], "owner must be a string"),
    (["T", "x", "not a state"], "6 to 7 elements"),
    (["T", "t1", 99, 1, "s1", None, 1.0], "99 is no task state"),
    (["T", "t1", "3", 1, "s1", None, 1.0], "task state must be an integer"),
    (["T", "t1", 3, -1, "s1", None, 1.0], "attempt must be an integer from 0 to 1000000"),
    (["T", "t1", 3, R.MAX_ATTEMPT + 1, "s1", None, 1.0], "attempt must be an integer"),
    (["T", "t1", 3, 1.0, "s1", None, 1.0], "attempt must be an integer"),
    (["T", "t1", 3, 1, 5, None, 1.0], "satellite id must be a string or nil"),
    (["T", "t1", 3, 1, "s1", 5, 1.0], "reason must be a string or nil"),
    (["T", "t1", 3, 1, "s1", None, None], "transition time must be a number"),
    (["R", "x", []], "at least its header frame"),
    (["R", "x", [RESULT_HEADER, "text"], 1.0], "result must be a list of byte strings"),
    (["R", "x", RESULT_HEADER, 1.0], "result must be a list of byte strings"),
    (["R", "x"], "3 to 4 elements"),
    (["K", "sat-1", 5, 1.0], "key name must be a string"),
    (["K", None, "lab", 1.0], "satellite id must be a string"),
    (["Z", "", 1.0, "more"], "3 elements"),
    (["Z", "", None], "barrier's time must be a number"),
]


@pytest.mark.parametrize(("record", "why"), BAD, ids=[repr(r)[:40] for r, _ in BAD])
def test_a_record_of_the_wrong_shape_is_refused_with_one_error(record: Any, why: str, tmp_path: Path) -> None:
    if isinstance(record, list) and record:  # as it reads back from the journal, too
        [record] = decoded([record], tmp_path)
    with pytest.raises(R.RecordError, match=why):
        R.view(record)


def test_a_view_refuses_a_record_of_another_kind() -> None:
    with pytest.raises(R.RecordError, match="code 'S', not 'T'"):
        R.Submitted.of(R.transition("t1", TaskState.DONE, 1, "s1", None, 1.0))


def test_a_record_error_is_an_orchester_error_and_a_value_error() -> None:
    assert issubclass(R.RecordError, OrchesterError) and issubclass(R.RecordError, ValueError)


def test_a_kind_this_version_does_not_know_has_no_view() -> None:
    assert R.view(["Q", "t1", 1, 2]) is None


def test_the_unchecked_helpers() -> None:
    s = R.submitted("t1", b"c", HEADER, [b"ab", memoryview(b"cde")], 1.0, None, None)
    assert R.payload_bytes(s) == 5
    assert R.payload_bytes(R.result("t1", [RESULT_HEADER, b"xyz"], 1.0)) == 0
    assert R.payload_bytes(["S", "t1"]) == 0 and R.payload_bytes([]) == 0  # a bad shape counts nothing
    assert R.head(s) == ("S", "t1") and R.head(["Q", 5]) == ("Q", "5") and R.head([b"?"]) == ("b'?'", "")
    older = ["S", "t1", b"c", HEADER, [b"x"], 1.0, None]
    assert R.without_payload(older) == ["S", "t1", b"c", HEADER, [], 1.0, None] and older[4] == [b"x"]
    r = ["R", "t1", [RESULT_HEADER, b"payload"]]
    assert R.without_payload(r) == ["R", "t1", [RESULT_HEADER]] and len(r[2]) == 2
    k = R.satellite_key("sat-1", "lab", 1.0)
    assert R.without_payload(k) == k and R.without_payload(k) is not k


def test_records_pack_as_plain_msgpack() -> None:
    """What the replication stream sends: the same lists, packed as they are."""
    for built, _, expected in BUILT:
        back = msgpack.unpackb(msgpack.packb(built, use_bin_type=True), raw=False)
        assert R.view(back) == expected


def test_the_docs_hold_the_table_of_records() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "journal.rst").read_text()
    assert R.table_rst() in doc, "docs/journal.rst is stale: paste orchester.journal.records.table_rst() into it"
    for cls in R.VIEWS.values():
        assert all(f"``{f.name}``" in R.table_rst() for f in dataclasses.fields(cls))
