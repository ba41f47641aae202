"""The command lines, as a user runs them: real processes, exit codes, config files, environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import stop_processes

pytestmark = pytest.mark.integration


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """``orchester serve`` and one ``satellite run``, started as a user would."""
    d = tmp_path_factory.mktemp("cli")
    efile = d / "endpoints.json"
    procs = [subprocess.Popen([sys.executable, "-m", "orchester", "--log-level", "WARNING", "serve",
                               "--bind", "tcp://127.0.0.1:*", "--pub", "tcp://127.0.0.1:*",
                               "--heartbeat-interval", "0.2", "--endpoint-file", str(efile)],
                              stdin=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 30
        while not efile.exists():
            assert time.monotonic() < deadline and procs[0].poll() is None, "orchestrator did not start"
            time.sleep(0.02)
        eps = json.loads(efile.read_text())
        procs.append(subprocess.Popen([sys.executable, "-m", "satellites", "--log-level", "WARNING", "run",
                                       "--connect", eps["bind"][0], "--workers", "1", "--tags", "cli,test",
                                       "--heartbeat-interval", "0.2", "--id", "cli-sat"],
                                      stdin=subprocess.DEVNULL))
        while True:
            r = run("orchester", "status", "--connect", eps["bind"][0], "--json")
            if r.returncode == 0 and json.loads(r.stdout)["satellites"]:
                break
            assert time.monotonic() < deadline, "satellite did not register"
            time.sleep(0.1)
        yield {"connect": eps["bind"][0], "pub": eps["pub"][0], "dir": str(d)}
    finally:
        stop_processes(procs)


def test_submit_prints_the_result_as_json(served: dict[str, str]) -> None:
    r = run("orchester", "submit", "echo", '{"a": [1, 2]}', "--connect", served["connect"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"a": [1, 2]}
    r = run("orchester", "submit", "echo", "plain words", "--connect", served["connect"], "--tags", "cli")
    assert json.loads(r.stdout) == "plain words"


def test_failed_task_exits_1_with_the_remote_error(served: dict[str, str]) -> None:
    r = run("orchester", "submit", "fail", '"kaput"', "--connect", served["connect"])
    assert r.returncode == 1
    assert "RuntimeError: kaput" in r.stderr and "Traceback" in r.stderr


def test_unknown_kind_exits_1(served: dict[str, str]) -> None:
    r = run("orchester", "submit", "nope", "--connect", served["connect"])
    assert r.returncode == 1 and "unknown_kind" in r.stderr


def test_no_wait_prints_an_id_whose_result_can_be_fetched(served: dict[str, str]) -> None:
    r = run("orchester", "submit", "sleep", "0.1", "--no-wait", "--connect", served["connect"])
    assert r.returncode == 0, r.stderr
    task_id = r.stdout.strip()
    from orchester import Client

    with Client(served["connect"]) as c:
        assert c.result(task_id, timeout=30) == 0.1


def test_submit_after_and_ref_and_show_the_dependencies(served: dict[str, str]) -> None:
    first = run("orchester", "submit", "sleep", "0.5", "--no-wait", "--connect", served["connect"])
    assert first.returncode == 0, first.stderr
    a = first.stdout.strip()
    r = run("orchester", "submit", "echo", '"then"', "--after", a, "--ref", a, "--connect", served["connect"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == ["then", 0.5]  # ARGS, then the referenced result
    waits = run("orchester", "submit", "echo", "x", "--after", a, "--cores", "1", "--memory", "1M", "--no-wait",
                "--connect", served["connect"])
    assert waits.returncode == 0, waits.stderr
    shown = run("orchester", "show", waits.stdout.strip(), "--connect", served["connect"])
    assert shown.returncode == 0 and f"waits for: {a}" in shown.stdout, shown.stdout
    shown = run("orchester", "show", a, "--connect", served["connect"], "--json")
    assert waits.stdout.strip() in json.loads(shown.stdout)["dependents"]
    bad = run("orchester", "submit", "echo", "--after", "f" * 32, "--connect", served["connect"])
    assert bad.returncode == 1 and "unknown_task" in bad.stderr
    for flags in (["--cores", "0"], ["--memory", "lots"], ["--on-failure", "maybe"]):
        r = run("orchester", "submit", "echo", *flags, "--connect", served["connect"])
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_status_json_and_table(served: dict[str, str]) -> None:
    r = run("orchester", "status", "--connect", served["connect"], "--json")
    st = json.loads(r.stdout)
    assert st["satellites"][0]["id"] == "cli-sat" and st["satellites"][0]["tags"] == ["cli", "test"]
    r = run("orchester", "status", "--connect", served["connect"])
    assert r.returncode == 0 and "cli-sat" in r.stdout and "least_loaded" in r.stdout


def test_endpoint_from_environment_and_config_file(served: dict[str, str], tmp_path: Path) -> None:
    r = run("orchester", "status", "--json", env={"ORCHESTER_CONNECT": served["connect"]})
    assert r.returncode == 0 and json.loads(r.stdout)["satellites"]
    cfg = tmp_path / "orchester.toml"
    cfg.write_text(f'[client]\nconnect = ["{served["connect"]}"]\n[status]\ntimeout = 5.0\n')
    r = run("orchester", "--config", str(cfg), "status", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["satellites"]


def test_watch_prints_events(served: dict[str, str]) -> None:
    watcher = subprocess.Popen([sys.executable, "-m", "orchester", "watch", "--connect", served["connect"],
                                "--topic", "task:", "--count", "3", "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while watcher.poll() is None and time.monotonic() < deadline:
            run("orchester", "submit", "echo", "1", "--connect", served["connect"])
        out, err = watcher.communicate(timeout=30)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait(5)
    assert watcher.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert len(events) == 3 and all(e["topic"].startswith("task:") for e in events)
    assert {"pending", "dispatched", "done"} & {e["state"] for e in events}


def test_unreachable_exits_3() -> None:
    for cmd in (["status"], ["submit", "echo", "1"]):
        r = run("orchester", *cmd, "--connect", "tcp://127.0.0.1:9", "--timeout", "0.5")
        assert r.returncode == 3 and "no orchestrator answered" in r.stderr


def test_usage_and_config_errors_exit_2(tmp_path: Path) -> None:
    assert run("orchester", "serve", "--liveness", "0").returncode == 2
    assert run("orchester", "frobnicate").returncode == 2
    garbage = tmp_path / "bad.toml"
    garbage.write_text("this is = = not toml")
    r = run("orchester", "--config", str(garbage), "status")
    assert r.returncode == 2 and "not valid TOML" in r.stderr
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[serve]\ncolour = 'red'\n")
    r = run("orchester", "--config", str(unknown), "serve")
    assert r.returncode == 2
    r = run("satellites", "run", "--tasks", "no_such_module_here", "--connect", "tcp://127.0.0.1:9")
    assert r.returncode == 2 and "no_such_module_here" in r.stderr


@pytest.mark.parametrize("cmd", [["orchester"], ["orchester", "serve"], ["orchester", "submit"], ["orchester", "show"],
                                 ["orchester", "status"], ["orchester", "watch"], ["orchester", "demo"],
                                 ["satellites"], ["satellites", "run"]])
def test_every_command_has_help(cmd: list[str]) -> None:
    r = run(*cmd, "--help")
    assert r.returncode == 0 and "Usage" in r.stdout


def test_demo_runs_the_main_job() -> None:
    r = run("orchester", "--log-level", "WARNING", "demo", "--tasks", "40", "--satellites", "2", "--workers", "1",
            timeout=120)
    assert r.returncode == 0, r.stderr
    assert "40 tasks in" in r.stdout and "0 failed, 0 wrong results" in r.stdout


def test_submit_shows_progress_on_a_terminal(served: dict[str, str]) -> None:
    import pty
    import select

    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "orchester", "submit", "sleep", "1.0", "5", "--connect",
                          served["connect"]], stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL,
                         env={**os.environ, "COLUMNS": "120", "TERM": "xterm"})
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 60
    try:
        while p.poll() is None and time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    seen += os.read(master, 65536)
                except OSError:
                    break
        out, _ = p.communicate(timeout=30)
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()
            p.wait(5)
    assert p.returncode == 0 and json.loads(out) == 1.0
    text = seen.decode(errors="replace")
    assert "done=" in text and "total=5" in text  # the bar showed the task's progress reports


def test_show_reads_a_forgotten_task_from_the_journal(tmp_path: Path) -> None:
    """An orchestrator keeping one finished task: the others' transitions come back from its journal."""
    efile = tmp_path / "endpoints.json"
    procs = [subprocess.Popen([sys.executable, "-m", "orchester", "--log-level", "WARNING", "serve",
                               "--bind", "tcp://127.0.0.1:*", "--pub", "tcp://127.0.0.1:*", "--journal",
                               str(tmp_path / "j"), "--result-retention", "1", "--heartbeat-interval", "0.2",
                               "--endpoint-file", str(efile)], stdin=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 30
        while not efile.exists():
            assert time.monotonic() < deadline and procs[0].poll() is None, "orchestrator did not start"
            time.sleep(0.02)
        connect = json.loads(efile.read_text())["bind"][0]
        procs.append(subprocess.Popen([sys.executable, "-m", "satellites", "--log-level", "WARNING", "run",
                                       "--connect", connect, "--workers", "1", "--heartbeat-interval", "0.2",
                                       "--id", "old-sat"], stdin=subprocess.DEVNULL))
        from orchester import Client

        with Client(connect) as c:
            first = c.submit("echo", 1)
            first.result(timeout=60)
            for i in range(3):
                c.submit("echo", i).result(timeout=60)
        r = run("orchester", "show", first.task_id, "--connect", connect, "--json")
        assert r.returncode == 0, r.stderr
        task = json.loads(r.stdout)
        assert task["source"] == "history" and task["state"] == "done" and task["kind"] == "echo"
        assert [h["state"] for h in task["history"]][-3:] == ["dispatched", "running", "done"]
        assert {h["sat"] for h in task["history"] if h["state"] == "running"} == {"old-sat"}
        r = run("orchester", "show", first.task_id, "--connect", connect)
        assert r.returncode == 0 and "old-sat" in r.stdout and "done" in r.stdout, r.stdout + r.stderr
        r = run("orchester", "show", "no-such-task", "--connect", connect)
        assert r.returncode == 1 and "unknown" in r.stderr
    finally:
        stop_processes(procs)


def test_show_prints_a_tasks_history(served: dict[str, str]) -> None:
    r = run("orchester", "submit", "sleep", "0.1", "--no-wait", "--connect", served["connect"])
    task_id = r.stdout.strip()
    from orchester import Client

    with Client(served["connect"]) as c:
        c.result(task_id, timeout=30)
    r = run("orchester", "show", task_id, "--connect", served["connect"], "--json")
    assert r.returncode == 0, r.stderr
    task = json.loads(r.stdout)
    assert task["state"] == "done" and [h["state"] for h in task["history"]] == \
        ["pending", "dispatched", "running", "done"]
    r = run("orchester", "show", task_id, "--connect", served["connect"])
    assert r.returncode == 0 and "history" in r.stdout and "cli-sat" in r.stdout
    r = run("orchester", "show", "no-such-task", "--connect", served["connect"])
    assert r.returncode == 1 and "unknown" in r.stderr
