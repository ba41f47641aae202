"""Embedding the bus as a library: an orchestrator and a satellite in one script, tasks by decorator."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCRIPT = '''
import threading
import time

from orchester import Client
from orchester.server.broker import BrokerThread
from orchester.config import OrchestratorConfig
from satellites import Satellite, task


@task("embedded.triple")
def triple(x):
    return 3 * x


if __name__ == "__main__":
    config = OrchestratorConfig(bind=["tcp://127.0.0.1:*"], pub=["tcp://127.0.0.1:*"], heartbeat_interval=0.2)
    with BrokerThread(config) as broker:
        sat = Satellite(broker.client_endpoint, workers=1, heartbeat_interval=0.2)
        thread = threading.Thread(target=sat.run, daemon=True)
        thread.start()
        with Client(broker.client_endpoint) as client:
            deadline = time.monotonic() + 30
            while not client.status()["satellites"] and time.monotonic() < deadline:
                time.sleep(0.05)
            print("RESULT", client.submit("embedded.triple", 14).result(30))
        sat.stop()
        thread.join(10)
        print("STOPPED", not thread.is_alive())
'''


def test_decorated_tasks_in_the_main_script_run_in_worker_processes(tmp_path: Path) -> None:
    script = tmp_path / "embed.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "RESULT 42" in r.stdout and "STOPPED True" in r.stdout
