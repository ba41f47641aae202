"""Issue 14, items 13 and 16: the journal and the fit cache are private to their user.

Tests run as root in CI, and root ignores permissions: so every check here inspects modes and
owners (``os.stat``), never whether another user could read a file.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import msgpack
import pytest

from orchester.genx.fits import FitCache, FitSettings, fit_key
from orchester.journal.folder import JournalError, UnsafeDirectoryError
from orchester.journal.segments import apply_retention, compact
from orchester.journal.wal import SegmentWriter, encode_record, read_all
from orchester.journal.writer import Journal, replay
from serializers import codecs, pack

IS_ROOT = os.geteuid() == 0


def mode(path: Path) -> int:
    """Permission bits of ``path`` (not following a symlink)."""
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """Umask 0 for the test: every mode seen comes from the code, not from a kind umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def submit(tid: str, t: float = 100.0) -> list[Any]:
    return ["S", tid, b"client", pack({"id": tid, "k": "echo"}), [b"secret payload"], t, None]


def done(tid: str, t: float = 101.0) -> list[Any]:
    return ["T", tid, 3, 1, "s1", None, t]


def result(tid: str, t: float = 102.0) -> list[Any]:
    return ["R", tid, [pack({"id": tid, "a": 1, "ok": True, "sat": "s1"}), b"secret result"], t]


# -- the journal -----------------------------------------------------------------------------

def test_journal_folder_0700_and_every_file_0600_whatever_the_umask(tmp_path: Path, open_umask: None) -> None:
    d = tmp_path / "deep" / "journal"
    w = SegmentWriter(d, segment_bytes=1)  # every sync closes the segment
    w.write([encode_record(r) for r in (submit("a"), done("a"), result("a"))])
    closed = w.sync()
    assert closed is not None
    w.write([encode_record(submit("b"))])
    w.sync()
    assert mode(d) == 0o700
    lock = d / "LOCK"
    assert lock.parent == d and mode(lock) == 0o600  # the lock lives inside the private folder
    h5 = compact(closed)  # PyTables: created 0600 before a record is written, renamed so
    apply_retention(d, results_before=1e12)  # rewrites the segment through a new temporary file
    w.close()
    names = sorted(p.name for p in d.iterdir())
    assert names == ["LOCK", "MANIFEST", h5.name, "wal-000002.log", "wal-000003.log"]  # a sync rotates at 1 byte
    assert {p.name: mode(p) for p in d.iterdir()} == {n: 0o600 for n in names}
    assert [r[1] for r in replay(d)[0]] == ["a", "a", "a", "b"]


def test_journal_thread_writes_private_segments(tmp_path: Path, open_umask: None) -> None:
    journal = Journal(tmp_path / "j", durability="full")
    try:
        journal.append(submit("x"))
        journal.append(result("x"))
    finally:
        journal.close()
    files = list((tmp_path / "j").iterdir())
    assert mode(tmp_path / "j") == 0o700 and files and all(mode(p) == 0o600 for p in files)
    assert [r[0] for r in read_all(tmp_path / "j")] == ["S", "R"]


@pytest.mark.parametrize("loose", [0o777, 0o770, 0o702, 0o1777])
def test_a_journal_folder_others_can_write_is_refused(tmp_path: Path, loose: int) -> None:
    d = tmp_path / "journal"
    d.mkdir()
    os.chmod(d, loose)
    with pytest.raises(UnsafeDirectoryError, match=r"writable by .* refusing it"):
        SegmentWriter(d)
    assert list(d.iterdir()) == []  # refused before a lock or a segment is made in it
    assert mode(d) == loose  # left as it was: the operator decides
    with pytest.raises(JournalError):  # what `orchester serve` reports as one line, exit 2
        Journal(d)


def test_a_journal_folder_another_uid_owns_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "journal"
    d.mkdir(mode=0o700)
    if IS_ROOT:
        os.chown(d, 4242, 4242)
    else:  # cannot give a folder away: pretend to be someone else instead
        uid = os.geteuid()
        monkeypatch.setattr(os, "geteuid", lambda: uid + 1)
    with pytest.raises(UnsafeDirectoryError, match=r"owned by uid \d+, not by this user"):
        SegmentWriter(d)


@pytest.mark.skipif(not IS_ROOT, reason="only root can give a file to another uid")
def test_a_journal_holding_a_file_of_another_uid_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "journal"
    SegmentWriter(d).close()
    planted = d / "wal-000009.log"  # forged records, planted while the folder was open
    planted.write_bytes(encode_record(result("a")))
    os.chown(planted, 4242, 4242)
    with pytest.raises(UnsafeDirectoryError, match="wal-000009.log, owned by uid 4242"):
        SegmentWriter(d)


def test_a_readable_journal_of_an_older_version_is_tightened(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                             open_umask: None) -> None:
    d = tmp_path / "journal"
    d.mkdir()
    os.chmod(d, 0o755)  # what an older version left: folder 0755, files 0644
    (d / "wal-000001.log").write_bytes(b"".join(encode_record(r) for r in (submit("a"), result("a"))))
    (d / "LOCK").write_bytes(b"")
    for p in d.iterdir():
        os.chmod(p, 0o644)
    with caplog.at_level(logging.WARNING, logger="orchester.journal"):
        w = SegmentWriter(d)
    w.close()
    assert mode(d) == 0o700
    assert {p.name: mode(p) for p in d.iterdir()} == {"LOCK": 0o600, "wal-000001.log": 0o600,
                                                      "wal-000002.log": 0o600}
    assert any("was readable by others" in r.getMessage() and "0755" in r.getMessage() for r in caplog.records)
    assert [r[0] for r in read_all(d)] == ["S", "R"]  # nothing lost on the way
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="orchester.journal"):
        SegmentWriter(d).close()
    assert not caplog.records  # private now: no warning at the next start


# -- the fit cache ---------------------------------------------------------------------------

RESULT = {"fom": 0.25, "generations": 3, "seconds": 1.5, "fom_name": "log", "model": b"model bytes",
          "fom_history": [[0, 1.0], [1, 0.5], [2, 0.25]], "parameters": [],
          "datasets": [{"name": "d", "x": [0.1, 0.2], "y": [1.0, 0.5], "error": [0.1, 0.1], "y_sim": [0.9, 0.6]}]}
KEY = fit_key(b"model bytes", FitSettings(generations=3), "3.7.0")
OTHER = fit_key(b"another model", FitSettings(generations=3), "3.7.0")


def old_entry(value: dict[str, Any]) -> bytes:
    """An entry as a planter (or the version before) writes it: plain msgpack, nothing to check."""
    meta, frames = codecs.encode(value)
    return msgpack.packb({"meta": meta, "body": bytes(frames[0]), "buffers": [bytes(b) for b in frames[1:]]},
                         use_bin_type=True)


def test_cache_folder_0700_entries_0600_atomic(tmp_path: Path, open_umask: None) -> None:
    cache = FitCache(tmp_path / "cache")
    assert cache.get(KEY) is None and not (tmp_path / "cache").exists()  # a lookup creates nothing
    cache.put(KEY, RESULT)
    assert cache.get(KEY) == RESULT
    entry = cache.dir / KEY[:2] / f"{KEY}.fit"
    assert mode(cache.dir) == 0o700 and mode(entry.parent) == 0o700 and mode(entry) == 0o600
    assert mode(cache.dir / "hmac.key") == 0o600 and (cache.dir / "hmac.key").stat().st_size == 32
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]  # no temporary file left
    assert FitCache(cache.dir).get(KEY) == RESULT  # another process: same secret, same answer


def test_a_planted_entry_is_never_served(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = FitCache(tmp_path / "cache")
    cache.put(OTHER, RESULT)  # the folder and its secret exist
    forged = {**RESULT, "fom": 1e-9}
    entry = cache.dir / KEY[:2] / f"{KEY}.fit"
    entry.parent.mkdir(exist_ok=True)
    entry.write_bytes(old_entry(forged))  # what was served as "(cached)" before
    with caplog.at_level(logging.WARNING, logger="orchester.fits"):
        assert FitCache(cache.dir).get(KEY) is None
    assert not entry.exists() and entry.with_suffix(".rejected").exists()  # moved aside
    assert any("fails verification" in r.getMessage() for r in caplog.records)


def test_an_altered_or_moved_entry_is_never_served(tmp_path: Path) -> None:
    cache = FitCache(tmp_path / "cache")
    cache.put(KEY, RESULT)
    cache.put(OTHER, {**RESULT, "fom": 0.5})
    entry, other = (cache.dir / k[:2] / f"{k}.fit" for k in (KEY, OTHER))
    good = entry.read_bytes()
    altered = bytearray(good)
    altered[-3] ^= 0x01
    entry.write_bytes(bytes(altered))
    assert cache.get(KEY) is None and not entry.exists()
    entry.write_bytes(other.read_bytes())  # a genuine entry under another key: bound to its own key
    assert cache.get(KEY) is None
    entry.write_bytes(good[:-10])  # truncated
    assert cache.get(KEY) is None
    entry.write_bytes(good)
    assert cache.get(KEY) == RESULT and cache.get(OTHER) == {**RESULT, "fom": 0.5}


@pytest.mark.parametrize("loose", [0o777, 0o775])
def test_a_cache_folder_others_can_write_is_not_used(tmp_path: Path, loose: int,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "cache"
    d.mkdir()
    os.chmod(d, loose)
    entry = d / KEY[:2] / f"{KEY}.fit"
    entry.parent.mkdir()
    entry.write_bytes(old_entry(RESULT))
    cache = FitCache(d)
    with caplog.at_level(logging.WARNING, logger="orchester.fits"):
        assert cache.get(KEY) is None
        cache.put(OTHER, RESULT)
        assert cache.get(OTHER) is None
    assert cache.disabled is not None and "refusing it" in cache.disabled
    warnings = [r for r in caplog.records if "running without the fit cache" in r.getMessage()]
    assert len(warnings) == 1  # warned once
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name] and not (d / "hmac.key").exists()
    assert not (d / OTHER[:2]).exists() and mode(d) == loose


def test_a_cache_folder_another_uid_owns_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = FitCache(tmp_path / "cache")
    cache.put(KEY, RESULT)
    if IS_ROOT:
        os.chown(cache.dir, 4242, 4242)
    else:
        uid = os.geteuid()
        monkeypatch.setattr(os, "geteuid", lambda: uid + 1)
    again = FitCache(cache.dir)
    assert again.get(KEY) is None and again.disabled is not None and "owned by uid" in again.disabled


def test_a_readable_cache_is_tightened_and_a_readable_secret_replaced(tmp_path: Path) -> None:
    cache = FitCache(tmp_path / "cache")
    cache.put(KEY, RESULT)
    entry = cache.dir / KEY[:2] / f"{KEY}.fit"
    os.chmod(cache.dir, 0o755)
    os.chmod(entry, 0o644)
    again = FitCache(cache.dir)
    assert again.get(KEY) == RESULT  # tightened, secret still private: the entry stands
    assert mode(cache.dir) == 0o700 and mode(entry) == 0o600
    os.chmod(cache.dir / "hmac.key", 0o644)  # someone may have read it: it signs nothing any more
    os.chmod(cache.dir, 0o700)
    third = FitCache(cache.dir)
    assert third.get(KEY) is None and mode(cache.dir / "hmac.key") == 0o600
    third.put(KEY, RESULT)
    assert FitCache(cache.dir).get(KEY) == RESULT


def test_bad_keys_never_leave_the_folder(tmp_path: Path) -> None:
    cache = FitCache(tmp_path / "cache")
    for bad in ("../../etc/passwd", "ab", KEY.upper(), KEY + "/x"):
        with pytest.raises(ValueError):
            cache.put(bad, RESULT)


# -- orchester fit: a planted entry is fitted, not reported "(cached)" ----------------------------

class _Stream:
    def recv(self, timeout: float | None = None) -> None:
        return None

    def close(self) -> None:
        """A fake stream holds nothing to close."""


class _Client:
    """Just what :func:`run_fits` asks of a client; every fit finishes at once with ``fitted``."""

    def __init__(self, fitted: dict[str, Any]) -> None:
        self.fitted = fitted
        self.submitted = 0

    def status(self) -> dict[str, Any]:
        return {"satellites": [{"kinds": ["genx.fit"], "versions": {"genx.fit": "3.7.0"}}]}

    def subscribe(self, topics: list[str]) -> _Stream:
        return _Stream()

    def submit(self, kind: str, model: bytes, **kw: Any) -> Any:
        self.submitted += 1
        fut: Future[dict[str, Any]] = Future()
        fut.task_id = f"t{self.submitted}"  # type: ignore[attr-defined]
        fut.set_result(self.fitted)
        return fut

    def show(self, tid: str) -> dict[str, Any]:
        return {"satellite": "s1"}


def test_run_fits_fits_again_instead_of_serving_a_planted_entry(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from rich.console import Console

    from orchester.genx.job import run_fits

    model = tmp_path / "film.hgx"
    model.write_bytes(b"model bytes")
    settings = FitSettings(generations=3)
    key = fit_key(b"model bytes", settings, "3.7.0")
    cache = FitCache(tmp_path / "cache")
    cache.put(OTHER, RESULT)
    entry = cache.dir / key[:2] / f"{key}.fit"
    entry.parent.mkdir(exist_ok=True)
    entry.write_bytes(old_entry({**RESULT, "fom": 1e-9}))  # a planted "perfect" fit
    client = _Client(RESULT)
    quiet = Console(file=open(os.devnull, "w"))
    rows = run_fits(client, [model], settings, tmp_path / "out", cache, console=quiet)  # type: ignore[arg-type]
    assert client.submitted == 1 and rows[0]["cached"] == "no" and rows[0]["fom"] == "0.25"
    rows = run_fits(client, [model], settings, tmp_path / "out2", cache, console=quiet)  # type: ignore[arg-type]
    assert client.submitted == 1 and rows[0]["cached"] == "yes" and rows[0]["fom"] == "0.25"
    quiet.file.close()


def test_a_journal_folder_never_re_modes_what_is_not_the_journals(tmp_path: Path) -> None:
    """``--journal ~`` by mistake must not strip a home folder's files of their modes (review of issue 14)."""
    from orchester.journal.folder import UnsafeDirectoryError, private_directory

    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)
    script = home / "run.sh"
    script.write_text("#!/bin/sh\n")
    os.chmod(script, 0o755)
    log = home / "wal-000001.log"
    log.write_bytes(b"")
    os.chmod(log, 0o644)
    private_directory(home)
    assert stat.S_IMODE(script.stat().st_mode) == 0o755  # not the journal's: untouched
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    link = tmp_path / "link"
    link.symlink_to(home)
    with pytest.raises(UnsafeDirectoryError, match="symbolic link"):
        private_directory(link)
