"""The code base stays ruff-clean and mypy-clean (part of the README's test command)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_clean() -> None:
    r = run_tool("ruff", "check", ".")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_clean() -> None:
    r = run_tool("mypy")
    assert r.returncode == 0, r.stdout + r.stderr


def test_packages_are_typed() -> None:
    for pkg in ("orchester", "satellites", "serializers", "tracker", "topology_tests"):
        assert os.path.exists(os.path.join(ROOT, pkg, "py.typed")), pkg


def test_docs_build_without_warnings(tmp_path: object) -> None:
    r = run_tool("sphinx", "-b", "html", "-W", "--keep-going", "-q", "docs", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
