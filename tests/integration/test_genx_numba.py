"""GenX's kernels with numba on satellites: warmed once, a worker's share of the cores, off on request.

numba is an optional extra (``pip install 'orchester[numba]'``) that the test environment does not
install: GenX then runs on numpy everywhere else in the suite. These tests fetch numba (and
llvmlite) with pip into a folder of their own, once per machine, and give it to their satellites
only (``PYTHONPATH``), so that nothing else in this test session sees it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_ENV

from orchester import LocalCluster

pytestmark = pytest.mark.integration

pytest.importorskip("genx")
MODEL = Path(__file__).resolve().parents[2] / "examples" / "genx" / "nickel_film.hgx"
#: Where the tests keep numba: outside the environment, reused by later runs on this machine.
SITE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "orchester-tests" / "numba-site"


def _has_numba(site: Path) -> bool:
    probe = subprocess.run([sys.executable, "-c", "import numba"], env={**os.environ, "PYTHONPATH": str(site)},
                           capture_output=True, timeout=120)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def numba_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of satellites that have numba (installed for them alone), with a numba cache of the module's."""
    if not _has_numba(SITE):
        SITE.mkdir(parents=True, exist_ok=True)
        # numba and llvmlite only: numpy is the environment's own
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(SITE),
                            "numba>=0.59", "llvmlite"], capture_output=True, text=True, timeout=900)
        if r.returncode != 0 or not _has_numba(SITE):
            pytest.fail(f"numba could not be installed for the numba tests: {r.stderr[-500:]}")
    path = os.pathsep.join([str(SITE), TEST_ENV["PYTHONPATH"]])
    return {"PYTHONPATH": path, "NUMBA_CACHE_DIR": str(tmp_path_factory.mktemp("numba-cache"))}


def _fit(cluster: LocalCluster, **kw: Any) -> dict[str, Any]:
    with cluster.client() as c:
        result: dict[str, Any] = c.submit("genx.fit", MODEL.read_bytes(), generations=4, population=10, seed=5,
                                          **kw).result(300)
    return result


@pytest.fixture(scope="module")
def with_numba(numba_env: dict[str, str]) -> Iterator[LocalCluster]:
    # the first start compiles GenX's kernels (about 20 s on one core), once, before the satellites start
    with LocalCluster(satellites=2, workers=1, log_level="WARNING", env=numba_env, start_timeout=120) as c:
        yield c


def test_fits_run_numba_kernels_on_a_workers_share_of_the_cores(with_numba: LocalCluster,
                                                                numba_env: dict[str, str]) -> None:
    from satellites.genx_numba import usable_cores

    results = [_fit(with_numba) for _ in range(2)]
    share = max(1, usable_cores() // 2)  # two satellites of one worker each
    assert all(r["numba"] is True and r["numba_threads"] == share for r in results), results
    assert results[0]["fom"] == results[1]["fom"]  # the same fit on either satellite
    # warmed once: the cache holds the compiled kernels
    assert list(Path(numba_env["NUMBA_CACHE_DIR"]).rglob("*.nbc"))
    # the same model with GenX's numpy kernels: the start's figure of merit to rounding, the fit's too
    with LocalCluster(satellites=1, workers=1, log_level="WARNING",
                      env={**numba_env, "ORCHESTER_GENX_NUMBA": "0"}) as plain:
        numpy = _fit(plain)
    assert numpy["numba"] is False and numpy["numba_threads"] == 0
    assert results[0]["fom_start"] == pytest.approx(numpy["fom_start"], rel=1e-9)
    assert results[0]["fom"] == pytest.approx(numpy["fom"], rel=1e-6)


def test_the_threads_and_the_switch_are_the_satellites(numba_env: dict[str, str]) -> None:
    with LocalCluster(satellites=1, workers=1, log_level="WARNING", env=numba_env) as one:
        r = _fit(one)
        assert r["numba"] and r["numba_threads"] >= 1
        # a satellite added by hand: its own --numba-threads, and one with --no-numba
        one.add_satellite("three", extra=["--numba-threads", "3", "--tags", "three"])
        one.add_satellite("off", extra=["--no-numba", "--tags", "off"])
        one.wait_for_satellites(3)
        with one.client() as c:
            three = c.submit("genx.fit", MODEL.read_bytes(), generations=2, population=8, tags=["three"]).result(300)
            off = c.submit("genx.fit", MODEL.read_bytes(), generations=2, population=8, tags=["off"]).result(300)
            # a fit that asked for two cores: numba's threads are its cores, then the worker's share again
            wide = c.submit("genx.fit", MODEL.read_bytes(), generations=2, population=8, tags=["three"],
                            cores=2).result(300)
            again = c.submit("genx.fit", MODEL.read_bytes(), generations=2, population=8, tags=["three"]).result(300)
    assert three["numba"] and three["numba_threads"] == 3
    assert wide["numba"] and wide["numba_threads"] == 2 and again["numba_threads"] == 3
    assert off["numba"] is False


def test_a_warm_up_that_fails_turns_numba_off(numba_env: dict[str, str], tmp_path: Path) -> None:
    code = ("import json; from satellites import genx_numba as g; s = g.setup(1, timeout=0.001); "
            "print(json.dumps([s.enabled, s.reason, __import__('os').environ['ORCHESTER_GENX_NUMBA']]))")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, **numba_env}, capture_output=True, text=True,
                       timeout=120)
    enabled, reason, flag = json.loads(r.stdout)
    assert enabled is False and "longer than" in reason and flag == "0"
    # and a satellite whose kernels do not compile fits on numpy (an unwritable cache is no failure: a broken numba is)
    broken = tmp_path / "broken"
    (broken / "numba").mkdir(parents=True)
    (broken / "numba" / "__init__.py").write_text("raise ImportError('this numba is broken')\n")
    env = {**numba_env, "PYTHONPATH": os.pathsep.join([str(broken), numba_env["PYTHONPATH"]])}
    with LocalCluster(satellites=1, workers=1, log_level="WARNING", env=env) as c:
        assert _fit(c)["numba"] is False


def test_sigterm_during_the_warm_up_stops_the_satellite_and_its_compiler(numba_env: dict[str, str],
                                                                        tmp_path: Path) -> None:
    env = {**os.environ, **numba_env, "NUMBA_CACHE_DIR": str(tmp_path / "cold")}  # nothing compiled: a long warm-up
    sat = subprocess.Popen([sys.executable, "-m", "satellites", "run", "--connect", "tcp://127.0.0.1:9",
                            "--workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        warm: list[int] = []
        while not warm and time.monotonic() < deadline:
            warm = [int(p) for p in _children(sat.pid) if b"genx_numba" in _cmdline(int(p))]
            time.sleep(0.1)
        assert warm, "no warm-up child"
        sat.send_signal(signal.SIGTERM)
        assert sat.wait(30) == 0
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in warm) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in warm)
    finally:
        if sat.poll() is None:
            sat.kill()
            sat.wait(10)
        if sat.stderr is not None:
            sat.stderr.close()


def _children(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("command", ["run", "mpi"])
def test_a_bad_thread_count_is_one_line_and_exit_2(command: str) -> None:
    r = subprocess.run([sys.executable, "-m", "satellites", command, "--numba-threads", "0"], capture_output=True,
                       text=True, timeout=60, env={**os.environ, **TEST_ENV})
    assert r.returncode == 2 and "--numba-threads" in r.stderr and "Traceback" not in r.stderr, r.stderr
