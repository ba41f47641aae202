"""Bad input at every entry point (issue 15), as a new user meets it: the command lines as real processes.

Every command runs with a timeout; a mistake must end it with its exit code (docs/cli.rst)
and one line on stderr, never a traceback, never a hang.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
        cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m ARGS`` (``orchester …`` or ``satellites …``) to its end, output captured."""
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL, cwd=cwd)


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    """The single line a failed command printed on stderr (fails the test unless there is exactly one)."""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


# -- item 3: a malformed endpoint ----------------------------------------------------------------

CLIENT_COMMANDS = [["status"], ["submit", "echo", "1"], ["show", "0" * 32], ["watch"], ["drain", "sat-1"],
                   ["history"], ["top", "--iterations", "1"]]


@pytest.mark.parametrize("endpoint", ["localhost:5555", "garbage", "tcp://localhost"])
def test_a_malformed_endpoint_exits_2_at_once_with_one_line(endpoint: str, tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    journal.mkdir()
    model = tmp_path / "m.hgx"
    model.write_bytes(b"not read")
    commands = [["orchester", *c, "--connect", endpoint] for c in CLIENT_COMMANDS]
    commands += [["orchester", "fit", str(model), "--connect", endpoint],
                 ["orchester", "replay", str(journal), "--since", "1h", "--connect", endpoint],
                 ["orchester", "promote", "--connect", endpoint],
                 ["orchester", "watch", "--pub", endpoint],
                 ["satellites", "run", "--connect", endpoint],
                 ["satellites", "mpi", "--connect", endpoint]]
    for cmd in commands:
        started = time.monotonic()
        r = run(*cmd, timeout=30)
        line = one_line(r)
        assert r.returncode == 2, (cmd, r.stderr)
        assert f"endpoint {endpoint!r} is not a ZeroMQ endpoint like tcp://127.0.0.1:5555" in line, line
        assert time.monotonic() - started < 10, cmd


def test_a_malformed_endpoint_in_the_environment_exits_2() -> None:
    for cmd in (["orchester", "status"], ["orchester", "submit", "echo", "1"], ["satellites", "run"]):
        r = run(*cmd, env={"ORCHESTER_CONNECT": "localhost:5555"}, timeout=30)
        assert r.returncode == 2 and "ORCHESTER_CONNECT names it" in one_line(r), r.stderr


def test_a_malformed_endpoint_in_a_config_file_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "orchester.toml"
    config.write_text('[client]\nconnect = ["garbage"]\n')
    r = run("orchester", "--config", str(config), "status", timeout=30)
    assert r.returncode == 2 and "'garbage' is not a ZeroMQ endpoint" in one_line(r)


def test_serve_names_a_malformed_bind_the_same_way() -> None:
    r = run("orchester", "serve", "--bind", "tcp://localhost", timeout=30)
    assert r.returncode == 2
    assert "endpoint 'tcp://localhost' is not a ZeroMQ endpoint like tcp://127.0.0.1:5555" in r.stderr
    assert "Traceback" not in r.stderr


# -- item 5: a server that wants keys; no satellite at all ---------------------------------------

def test_no_answer_says_that_the_server_may_want_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchester import LocalCluster
    from orchester.security.keys import generate_keys

    authorized = tmp_path / "authorized"
    server_public, secret = generate_keys("head", tmp_path / "server")
    _, ops_secret = generate_keys("ops", authorized)  # this process's key, for the cluster's own checks
    monkeypatch.setenv("ORCHESTER_CURVE_SECRET", str(ops_secret))
    monkeypatch.setenv("ORCHESTER_SERVER_KEY", str(server_public))
    env = {k: "" for k in ("ORCHESTER_CURVE_SECRET", "ORCHESTER_SERVER_KEY")}  # the user has no keys
    with LocalCluster(satellites=0, log_level="WARNING",
                      serve_args=["--curve-secret", str(secret), "--authorized-keys", str(authorized)]) as cluster:
        for cmd in (["status"], ["submit", "echo", "1"], ["history"]):
            r = run("orchester", *cmd, "--connect", cluster.endpoint, "--timeout", "1", env=env, timeout=30)
            line = one_line(r)
            assert r.returncode == 3 and "no orchestrator answered" in line, r.stderr
            assert "--curve-secret" in line and "--server-key" in line, line


def test_submit_says_once_that_no_satellite_is_connected_and_keeps_waiting() -> None:
    from orchester import LocalCluster

    with LocalCluster(satellites=0, workers=1, heartbeat_interval=0.2, log_level="WARNING") as cluster:
        p = subprocess.Popen([sys.executable, "-m", "orchester", "submit", "echo", '"hello"', "--connect",
                              cluster.endpoint], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL)
        try:
            assert p.stderr is not None
            line = p.stderr.readline()  # said at once, before any satellite exists
            assert "no satellite is connected" in line and "waits" in line, line
            time.sleep(1.0)
            assert p.poll() is None  # still waiting, as promised
            cluster.add_satellite("late")
            out, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        assert p.returncode == 0 and out.strip() == '"hello"', err
        assert "no satellite" not in err  # said once only


# -- item 6: orchester fit checks before it submits; one exit code per kind of mistake ---------------

def test_fit_with_bad_settings_or_files_exits_2_before_starting_anything(tmp_path: Path) -> None:
    model = tmp_path / "m.hgx"
    model.write_bytes(b"never read")
    for args in (["--generations", "0", str(model)], ["--generations", "-5", str(model)],
                 ["--population", "1", str(model)], ["--seed", "-3", str(model)],
                 [str(tmp_path / "missing.hgx")], [str(tmp_path)]):
        started = time.monotonic()
        r = run("orchester", "fit", *args, "--out", str(tmp_path / "out"), timeout=30)
        assert r.returncode == 2 and one_line(r).startswith("error: Invalid value for "), (args, r.stderr)
        assert time.monotonic() - started < 10 and not (tmp_path / "out").exists()  # no local cluster started


def test_ctrl_c_exits_130() -> None:
    import signal

    from orchester import LocalCluster

    with LocalCluster(satellites=0, log_level="WARNING") as cluster:
        p = subprocess.Popen([sys.executable, "-m", "orchester", "submit", "echo", "1", "--connect", cluster.endpoint],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        try:
            assert p.stderr is not None and "no satellite" in p.stderr.readline()  # it waits now
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err, err


# -- item 9: ids are never cut, at 80 columns either ----------------------------------------------------

def test_history_status_and_top_print_whole_ids_at_80_columns() -> None:
    from orchester import Client, LocalCluster, TaskFailed

    sid = "vm-25717-d3adbe-compute-node-17"
    with LocalCluster(satellites=0, workers=1, heartbeat_interval=0.2, log_level="WARNING") as cluster:
        cluster.add_satellite(sid)
        cluster.wait_for_satellites(1)
        with Client(cluster.endpoint) as client:
            ok = client.submit("echo", 1)
            bad = client.submit("fail", "kaput")
            ok.result(timeout=30)
            with pytest.raises(TaskFailed):
                bad.result(timeout=30)
        env = {"COLUMNS": "80", "LINES": "50"}
        r = run("orchester", "history", "--connect", cluster.endpoint, env=env, timeout=30)
        assert r.returncode == 0, r.stderr
        assert ok.task_id in r.stdout and bad.task_id in r.stdout and "…" not in r.stdout.split("not shown")[0]
        assert max(map(len, r.stdout.splitlines())) <= 80
        r = run("orchester", "status", "--connect", cluster.endpoint, env=env, timeout=30)
        assert r.returncode == 0 and sid in r.stdout, r.stdout
        r = run("orchester", "top", "--iterations", "1", "--interval", "0.2", "--connect", cluster.endpoint,
                env=env, timeout=30)
        assert r.returncode == 0 and sid in r.stdout, r.stdout + r.stderr
        r = run("orchester", "show", bad.task_id, "--connect", cluster.endpoint, env=env, timeout=30)
        assert r.returncode == 0 and bad.task_id in r.stdout and sid in r.stdout, r.stdout


# -- item 10: history shows a failed task's type and whole message --------------------------------------

def test_history_shows_the_whole_error_of_a_failed_task() -> None:
    from orchester import Client, LocalCluster, TaskFailed

    message = "the model diverged: " + " ".join(f"step{i}" for i in range(50))  # longer than a table line
    with LocalCluster(satellites=1, workers=1, heartbeat_interval=0.2, log_level="WARNING") as cluster:
        with Client(cluster.endpoint) as client:
            bad = client.submit("fail", message)
            with pytest.raises(TaskFailed):
                bad.result(timeout=30)
        for columns in ("80", "200"):
            r = run("orchester", "history", "--connect", cluster.endpoint, env={"COLUMNS": columns}, timeout=30)
            assert r.returncode == 0, r.stderr
            rows = [line.split("│")[1:-1] for line in r.stdout.splitlines() if line.startswith("│")]
            error = " ".join(row[-1].strip() for row in rows if row[-1].strip())
            assert error == f"RuntimeError: {message}", r.stdout
        r = run("orchester", "history", "--connect", cluster.endpoint, "--format", "json", timeout=30)
        assert json.loads(r.stdout)[0]["error"] == f"RuntimeError: {message}"


# -- item 11: satellite run --tasks finds a module of the working directory ------------------------------

def test_satellite_script_imports_task_modules_from_the_working_directory(tmp_path: Path) -> None:
    from orchester import Client, LocalCluster

    (tmp_path / "mytasks.py").write_text(
        "import os\nfrom satellites import task\n\n\n"
        "@task('mytasks.shout')\ndef shout(text):\n    return text.upper() + ' from ' + str(os.getpid())\n")
    script = Path(sys.executable).with_name("satellite")  # the console script, as a user runs it
    assert script.exists(), script
    with LocalCluster(satellites=0, heartbeat_interval=0.2, log_level="WARNING") as cluster:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        sat = subprocess.Popen([str(script), "--log-level", "WARNING", "run", "--tasks", "mytasks", "--workers", "1",
                                "--heartbeat-interval", "0.2", "--connect", cluster.endpoint],
                               cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            with Client(cluster.endpoint) as client:
                while not client.status()["satellites"]:
                    assert sat.poll() is None, sat.communicate()[1]
                    assert time.monotonic() < deadline, "the satellite did not register"
                    time.sleep(0.1)
                answer = client.submit("mytasks.shout", "hello").result(timeout=30)
            assert answer.startswith("HELLO from ") and answer != f"HELLO from {sat.pid}"  # ran in a worker
        finally:
            sat.terminate()
            try:
                sat.wait(10)
            except subprocess.TimeoutExpired:
                sat.kill()
                sat.wait(5)


# -- item 12: top quits on q; every flag has a help text -------------------------------------------------

def test_top_quits_when_q_is_typed_and_restores_the_terminal() -> None:
    import pty
    import select
    import termios

    from orchester import LocalCluster

    with LocalCluster(satellites=1, workers=1, heartbeat_interval=0.2, log_level="WARNING") as cluster:
        master, slave = pty.openpty()
        before = termios.tcgetattr(slave)
        p = subprocess.Popen([sys.executable, "-m", "orchester", "top", "--interval", "0.2", "--connect",
                              cluster.endpoint], stdin=slave, stdout=slave, stderr=slave,
                             env={**os.environ, "COLUMNS": "100", "TERM": "xterm"})
        seen = b""
        try:
            deadline = time.monotonic() + 30
            while b"q quits" not in seen and time.monotonic() < deadline and p.poll() is None:
                if select.select([master], [], [], 0.1)[0]:
                    seen += os.read(master, 65536)
            assert b"q quits" in seen, seen[-2000:]
            os.write(master, b"q")
            deadline = time.monotonic() + 10
            while p.poll() is None and time.monotonic() < deadline:  # keep reading: a full pty would block it
                if select.select([master], [], [], 0.1)[0]:
                    seen += os.read(master, 65536)
            assert p.returncode == 0, seen[-2000:]
            assert termios.tcgetattr(slave)[3] == before[3]  # echo and line mode are back
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(5)
            os.close(master)
            os.close(slave)


@pytest.mark.parametrize(("command", "flags"), [
    (["orchester", "fit"], ["--generations", "--population", "--seed"]),
    (["orchester", "demo"], ["--satellites"]),
    (["orchester", "submit"], ["--priority"]),
    (["satellites", "run"], ["--heartbeat-interval", "--liveness"]),
    (["satellites", "mpi"], ["--workers-per-rank"]),
])
def test_the_flags_named_in_the_issue_have_help_texts(command: list[str], flags: list[str]) -> None:
    r = run(*command, "--help", env={"COLUMNS": "200"}, timeout=30)
    assert r.returncode == 0
    for flag in flags:
        lines = r.stdout.splitlines()
        i = next(i for i, line in enumerate(lines) if line.strip().startswith(flag + " "))
        line = lines[i] if re.search(r"\S\s{2,}\S", lines[i]) else f"{lines[i]}  {lines[i + 1].strip()}"
        parts = re.split(r"\s{2,}", line.strip(), maxsplit=1)  # "--flag TYPE", then the help text
        assert len(parts) == 2 and not parts[1].startswith("["), f"{flag} has no help text: {line!r}"
