"""The AsyncClient has every feature of the Client (one uplink for both): ``@FILE`` endpoints, the
refused-key error, failover across a binary-star pair, futures that know their task id."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_ENV, broker_config

from orchester import AsyncClient, Client, LocalCluster
from orchester.client.aio import AsyncTaskFuture
from orchester.errors import RemoteError, TaskFailed
from orchester.local.pair import LocalPair
from orchester.security.keys import generate_keys
from orchester.server.broker import BrokerThread
from serializers import protocol as P

pytestmark = pytest.mark.integration

HB = 0.2


def run(coro: Any, timeout: float = 120.0) -> Any:
    """Run ``coro`` in a new event loop, bounded by ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ------------------------------------------------------------------ @FILE endpoints


@pytest.fixture
def endpoint_file(tmp_path: Path) -> Iterator[Path]:
    """An orchestrator in a thread of this process (no satellite) that writes its endpoint file."""
    efile = tmp_path / "endpoints.json"
    with BrokerThread(broker_config(endpoint_file=str(efile))) as broker:
        deadline = time.monotonic() + 10
        while not efile.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert efile.exists()
        assert broker.endpoints["bind"]
        yield efile


def test_the_async_client_reads_an_endpoint_file_as_the_client_does(endpoint_file: Path) -> None:
    with Client(f"@{endpoint_file}") as client:
        expected = client.endpoints
        sync_status = client.status(timeout=10)

    async def scenario() -> None:
        async with AsyncClient(f"@{endpoint_file}", heartbeat_interval=HB) as client:
            assert client.endpoints == expected and client.endpoints[0].startswith("tcp://127.0.0.1:")
            status = await client.status(timeout=10)
            assert status["satellites"] == [] and set(status) == set(sync_status)
            # no satellite: the tasks stay queued, and are accepted, shown and cancelled by their ids
            futs = client.submit_many("echo", [(1,), (2,)], priority=3)
            assert all(isinstance(f, AsyncTaskFuture) and len(f.task_id) == 32 for f in futs)
            await asyncio.wait_for(asyncio.gather(*(f.accepted.wait() for f in futs)), 10)
            shown = await client.show(futs[0].task_id)
            assert shown["id"] == futs[0].task_id and shown["state"] == "pending"
            for f in futs:
                assert (await client.cancel(f.task_id))["cancelled"] is True
            for f in futs:
                with pytest.raises(TaskFailed) as failed:
                    await asyncio.wait_for(f, 10)
                assert failed.value.task_id == f.task_id and failed.value.type == "Cancelled"

    run(scenario())


# ------------------------------------------------------------------ a refused key


@pytest.fixture
def secured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, dict[str, str]]]:
    """An orchestrator process requiring keys; its endpoint, and the keys of 'ops' (authorised, this
    process's default) and 'mallory' (never authorised)."""
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    server_public, server_secret = generate_keys("server", tmp_path / "server", server=True)
    secrets: dict[str, str] = {}
    for name in ("ops", "mallory"):
        public, secret = generate_keys(name, tmp_path / "own", ["submit", "admin"])
        secrets[name] = str(secret)
        if name == "ops":
            (authorized / public.name).write_bytes(public.read_bytes())
    monkeypatch.setenv("ORCHESTER_CURVE_SECRET", secrets["ops"])
    monkeypatch.setenv("ORCHESTER_SERVER_KEY", str(server_public))
    with LocalCluster(satellites=0, heartbeat_interval=HB, env=TEST_ENV, log_level="WARNING",
                      serve_args=["--curve-secret", str(server_secret), "--authorized-keys", str(authorized)]) as c:
        yield c.endpoint, {"mallory": secrets["mallory"], "server": str(server_public)}


def test_a_refused_key_fails_the_async_client_with_the_clients_error(secured: tuple[str, dict[str, str]]) -> None:
    endpoint, keys = secured
    with Client(endpoint, curve_secret=keys["mallory"], server_key=keys["server"]) as client:
        with pytest.raises(RemoteError) as sync_err:
            client.submit("echo", 1).result(timeout=30)

    async def scenario() -> tuple[RemoteError, RemoteError]:
        async with AsyncClient(endpoint) as ops:  # the environment's key: authorised, CurveZMQ works
            assert (await ops.status(timeout=10))["satellites"] == []
        async with AsyncClient(endpoint, curve_secret=keys["mallory"], server_key=keys["server"]) as mallory:
            with pytest.raises(RemoteError) as first:
                await asyncio.wait_for(mallory.submit("echo", 1), 30)
            started = time.monotonic()
            with pytest.raises(RemoteError) as later:  # at once, not "unreachable" after the timeout
                await mallory.status(timeout=10)
            assert time.monotonic() - started < 2
            return first.value, later.value

    first, later = run(scenario())
    assert first.code == later.code == sync_err.value.code == P.E_FORBIDDEN
    assert first.message == later.message == sync_err.value.message
    assert first.message == f"the orchestrator at {endpoint} refused this client's CurveZMQ key (not authorised)"


# ------------------------------------------------------------------ failover across a pair


def executions(path: Path) -> collections.Counter[str]:
    """How many times each key was run by ``t.mark``."""
    return collections.Counter(path.read_text().split()) if path.exists() else collections.Counter()


@pytest.fixture
def pair() -> Iterator[LocalPair]:
    """A primary, a backup and two satellites (two workers each), fast heartbeats, journals on."""
    with LocalPair(satellites=2, workers=2, tasks=["orchester_test_tasks"], heartbeat_interval=HB, liveness=3,
                   ha_heartbeat=HB, env=TEST_ENV, log_level="WARNING") as p:
        p.wait_state("backup", "passive")
        yield p


def test_the_async_client_asks_the_active_server_and_fails_over_on_kill_9(pair: LocalPair, tmp_path: Path) -> None:
    """The async mirror of test_ha's redirect and kill -9 tests: nothing lost, nothing run twice."""
    marks = tmp_path / "marks"
    n = 2000

    async def scenario() -> list[Any]:
        async with AsyncClient(pair.endpoints["backup"], heartbeat_interval=HB) as alone:
            with pytest.raises(RemoteError) as err:  # the passive alone: refused, nowhere else to go
                await asyncio.wait_for(alone.submit("echo", 1), 10)
            assert err.value.code == P.E_NOT_ACTIVE
        async with AsyncClient([pair.endpoints["backup"], pair.endpoints["primary"]], heartbeat_interval=HB) as both:
            st = await both.status(timeout=10)  # knowing both, it asks the active one
            assert st["ha"]["state"] == "active" and st["ha"]["role"] == "primary"
        async with AsyncClient([pair.endpoints["primary"], pair.endpoints["backup"]], heartbeat_interval=HB,
                               liveness=3) as client:
            futs = client.submit_many("t.mark", [(str(marks), f"k{i}", 0.002) for i in range(n)])
            deadline = time.monotonic() + 60
            while sum(f.done() for f in futs) < n // 4 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert sum(f.done() for f in futs) < n, "the run ended before the kill: make the tasks longer"
            pair.kill("primary")
            results = await asyncio.wait_for(asyncio.gather(*futs), 120)  # no error reaches the client
            assert client._uplink.current == pair.endpoints["backup"]
            return results

    assert run(scenario(), timeout=240) == [f"k{i}" for i in range(n)]
    runs = executions(marks)
    assert set(runs) == {f"k{i}" for i in range(n)}
    assert max(runs.values()) == 1, {k: v for k, v in runs.items() if v > 1}
    st = pair.state("backup")
    assert st is not None and st["state"] == "active"
