"""Which package may import which (docs/architecture.rst): checked in fresh interpreters."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(("module", "forbidden"), [
    ("satellites.cli", ("orchester.cli.main", "orchester.server.broker", "orchester.server.core")),
    ("satellites.satellite", ("orchester.cli.main", "orchester.server.broker", "orchester.server.core")),
    ("serializers", ("orchester", "satellites", "tracker")),
    ("tracker", ("orchester", "satellites", "zmq")),
])
def test_a_package_does_not_import_what_it_must_not(module: str, forbidden: tuple[str, ...]) -> None:
    code = (f"import sys, {module}\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r} or m in {forbidden!r})\n"
            "print(' '.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    leaked = [m for m in out.stdout.split() if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert not leaked, f"{module} imports {leaked}"
