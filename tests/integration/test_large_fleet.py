"""A fleet larger than a screen: a status lists a page of satellites and sums up the rest; the client pages
through the whole fleet; ``orchester status`` and ``orchester top`` sum up what they do not list.

The satellites are simulated (:class:`conftest.SimulatedFleet`: DEALERs following ``docs/protocol.rst``)
against a real orchestrator; the CLI runs as its own process.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest
from conftest import SimulatedFleet

from orchester import AsyncClient, Client

pytestmark = pytest.mark.integration

N = 130


def _wait_for(client: Client, n: int) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        st = client.status(satellites=0)
        if st["fleet"]["satellites"] >= n:
            return st
        assert time.monotonic() < deadline, st["fleet"]
        time.sleep(0.1)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchester", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "160"}, stdin=subprocess.DEVNULL)


def test_a_status_pages_the_fleet_and_sums_it_up(broker: Any) -> None:
    with SimulatedFleet(broker.client_endpoint, N) as fleet, Client(broker.client_endpoint) as client:
        summary = _wait_for(client, N)["fleet"]
        assert summary["hosts"] == 7 and summary["kinds"] == {"sim.none": N} and summary["slots"] == 2 * N
        assert sum(summary["busiest_hosts"].values()) == N and sum(summary["states"].values()) == N
        st = client.status()
        assert [s["id"] for s in st["satellites"]] == fleet.sids[:100] and st["satellites_next"] == fleet.sids[99]
        assert [s["id"] for s in client.satellites(page=40)] == fleet.sids

        async def every() -> list[str]:
            async with AsyncClient(broker.client_endpoint) as ac:
                return [s["id"] async for s in ac.satellites(page=64)]

        assert asyncio.run(every()) == fleet.sids

        # the CLI: a page listed, the rest summed up; --satellites all lists everyone
        r = _cli("status", "--connect", broker.client_endpoint)
        assert r.returncode == 0, r.stderr
        assert f"100 of {N} satellites listed" in r.stdout and "7 hosts" in r.stdout and "node00" in r.stdout
        r = _cli("status", "--connect", broker.client_endpoint, "--satellites", "all", "--json")
        listed = json.loads(r.stdout)
        assert [s["id"] for s in listed["satellites"]] == fleet.sids and listed["satellites_next"] is None
        r = _cli("status", "--connect", broker.client_endpoint, "--satellites", "3", "--json")
        assert len(json.loads(r.stdout)["satellites"]) == 3
        for bad in ("5000", "-1", "lots"):
            r = _cli("status", "--connect", broker.client_endpoint, "--satellites", bad)
            assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
            assert "Traceback" not in r.stderr and "--satellites" in r.stderr

        # top: more satellites than the screen holds are summed up, per state and host
        from rich.console import Console

        from orchester.cli.top import TopModel

        model = TopModel()
        model.on_status(client.status(), 0.0)
        console = Console(record=True, width=120, file=open(os.devnull, "w"))  # noqa: SIM115
        try:
            console.print(model.render(height=50))
            text = console.export_text()
        finally:
            console.file.close()
        assert f"satellites: {N} on 7 hosts" in text and "host node00" in text and fleet.sids[5] not in text
        assert "slots busy" in text and "0/260" in text
    _wait_for_gone(broker)


def _wait_for_gone(broker: Any) -> None:
    """The fleet's LEAVEs took every satellite out at once (no wait for silence)."""
    with Client(broker.client_endpoint) as client:
        deadline = time.monotonic() + 30
        while client.status(satellites=0)["fleet"]["satellites"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
