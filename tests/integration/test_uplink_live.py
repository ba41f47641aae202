"""The uplink live: a satellite, as a client does, reaches its orchestrator through an endpoint file."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from conftest import broker_config

from orchester import AsyncClient, Client
from orchester.server.broker import BrokerThread
from satellites.satellite import Satellite

pytestmark = pytest.mark.integration


def test_a_satellite_and_both_clients_connect_through_an_endpoint_file(tmp_path: Path) -> None:
    efile = tmp_path / "endpoints.json"
    with BrokerThread(broker_config(endpoint_file=str(efile))) as broker:
        deadline = time.monotonic() + 10
        while not efile.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        sat = Satellite(f"@{efile}", workers=1, sid="from-file", heartbeat_interval=0.2)
        assert sat.endpoints == broker.endpoints["bind"][:1]
        thread = threading.Thread(target=sat.run, name="satellite-from-file", daemon=True)
        thread.start()
        try:
            with Client(f"@{efile}") as client:
                deadline = time.monotonic() + 30
                while not client.status(timeout=10)["satellites"] and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert [s["id"] for s in client.status(timeout=10)["satellites"]] == ["from-file"]
                assert client.submit("echo", 21).result(timeout=30) == 21

            async def through_the_async_client() -> list[int]:
                async with AsyncClient(f"@{efile}") as aclient:
                    return await aclient.map("echo", range(5))

            assert asyncio.run(asyncio.wait_for(through_the_async_client(), 60)) == list(range(5))
        finally:
            sat.stop()
            thread.join(15)
        assert not thread.is_alive()

