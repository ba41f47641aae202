"""The examples shipped in examples/ run as documented."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from orchester import LocalCluster

pytestmark = pytest.mark.integration
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")


def test_quickstart_example() -> None:
    r = subprocess.run([sys.executable, os.path.join(EXAMPLES, "quickstart.py")], capture_output=True, text=True,
                       timeout=180, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "numpy round trip equal: True" in r.stdout and "a failed task: RuntimeError on purpose" in r.stdout


def test_user_task_module_example() -> None:
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [EXAMPLES, os.environ.get("PYTHONPATH", "")]))}
    with LocalCluster(satellites=1, workers=2, tasks=["mytasks"], env=env, log_level="ERROR") as cluster:
        c = cluster.client()
        assert c.submit("mytasks.integrate", 0, np.pi, 100_000).result(60) == pytest.approx(2.0, rel=1e-6)
        values = np.random.default_rng(0).normal(size=10_000)
        out = c.submit("mytasks.histogram", values, bins=5).result(60)
        assert out["counts"].sum() == 10_000 and out["edges"].shape == (6,)
