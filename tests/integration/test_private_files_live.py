"""Issue 14, item 13 with a real ``orchester serve``: a journal others can write is refused, an old one tightened.

Tests run as root in CI (root ignores permissions): modes and owners are checked with ``os.stat``.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchester import Client

pytestmark = pytest.mark.integration
LOOPBACK = ["--bind", "tcp://127.0.0.1:*", "--pub", "tcp://127.0.0.1:*"]


def serve(journal: Path, *extra: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """``orchester serve --journal`` that is expected to stop by itself."""
    return subprocess.run([sys.executable, "-m", "orchester", "serve", *LOOPBACK, "--journal", str(journal), *extra],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.parametrize("loose", [0o777, 0o775])
def test_serve_refuses_a_journal_others_can_write_in_one_line(tmp_path: Path, loose: int) -> None:
    d = tmp_path / "journal"
    d.mkdir()
    os.chmod(d, loose)
    r = serve(d)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: journal ") and "writable by" in lines[0], r.stderr
    assert list(d.iterdir()) == [] and mode(d) == loose  # nothing made in it, nothing changed


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a folder to another uid")
def test_serve_refuses_a_journal_another_uid_owns(tmp_path: Path) -> None:
    d = tmp_path / "journal"
    d.mkdir(mode=0o700)
    os.chown(d, 4242, 4242)
    r = serve(d)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "owned by uid 4242" in lines[0], r.stderr


def test_serve_tightens_an_old_readable_journal_and_writes_private_files(tmp_path: Path) -> None:
    d = tmp_path / "journal"
    d.mkdir()
    os.chmod(d, 0o755)  # as an older version left it
    (d / "LOCK").write_bytes(b"")
    os.chmod(d / "LOCK", 0o644)
    efile = tmp_path / "endpoints.json"
    proc = subprocess.Popen([sys.executable, "-m", "orchester", "--log-level", "WARNING", "serve", *LOOPBACK,
                             "--journal", str(d), "--endpoint-file", str(efile)],
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            umask=0)  # every mode seen comes from the code, not from the umask
    try:
        deadline = time.monotonic() + 30
        while not efile.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "orchestrator did not start"
            time.sleep(0.02)
        endpoint = json.loads(efile.read_text())["bind"][0]
        with Client(endpoint) as c:
            fut = c.submit("echo", "a payload nobody else may read")
            assert fut.accepted.wait(30)  # acknowledged: its record (with the payload) is in the journal
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=5)
    assert "was readable by others" in err, err
    assert mode(d) == 0o700
    files = {p.name: mode(p) for p in d.iterdir()}
    assert "LOCK" in files and any(n.startswith("wal-") for n in files)
    assert set(files.values()) == {0o600}, files
    assert b"a payload nobody else may read" in b"".join(p.read_bytes() for p in d.glob("wal-*.log"))
