"""Hardening (issue 14) on real processes: a CONTROL strategy cannot run code (15); a satellite that
allows pickle still refuses a pickle task the orchestrator did not accept (17)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchester import Client
from orchester.errors import RemoteError
from serializers import protocol as P

pytestmark = pytest.mark.integration
HB = "0.2"


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def _endpoints(efile: Path, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, "orchestrator exited at start"
        assert time.monotonic() < deadline, "orchestrator did not start"
        try:
            return dict(json.loads(efile.read_text()))
        except (OSError, ValueError):  # not written yet (or half written)
            time.sleep(0.02)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Callable[..., subprocess.Popen[bytes]]]]:
    """``orchester serve`` on tcp://127.0.0.1:* (no --allow-pickle), and a way to add satellites to it."""
    efile = tmp_path / "endpoints.json"
    procs = [subprocess.Popen([sys.executable, "-m", "orchester", "--log-level", "WARNING", "serve",
                               "--bind", "tcp://127.0.0.1:*", "--pub", "tcp://127.0.0.1:*",
                               "--heartbeat-interval", HB, "--endpoint-file", str(efile)],
                              stdin=subprocess.DEVNULL)]
    try:
        endpoint = _endpoints(efile, procs[0])["bind"][0]

        def satellite(*args: str) -> subprocess.Popen[bytes]:
            p = subprocess.Popen([sys.executable, "-m", "satellites", "--log-level", "WARNING", "run",
                                  "--connect", endpoint, "--workers", "1", "--heartbeat-interval", HB, *args],
                                 stdin=subprocess.DEVNULL)
            procs.append(p)
            return p

        yield procs[0], endpoint, satellite
    finally:
        _stop(procs)


def test_a_control_strategy_naming_sys_exit_is_refused_and_the_server_keeps_serving(served: Any) -> None:
    proc, endpoint, _ = served
    with Client(endpoint) as c:
        for name in ("sys:exit", "os:abort", "builtins:exit"):
            with pytest.raises(RemoteError) as e:
                c.set_strategy(name, timeout=10)
            assert e.value.code == P.E_BAD_REQUEST and "not allowed" in e.value.message
        time.sleep(0.3)
        assert proc.poll() is None, "the orchestrator stopped"
        st = c.status(timeout=10)
        assert st["strategy"] == "least_loaded"
        assert c.set_strategy("round_robin", timeout=10)["strategy"] == "round_robin"
