"""Debian packages the tests need, installed when missing (CI runs as root on a fresh machine).

The suite runs in several pytest-xdist workers at once, and two of them may find a package
missing at the same moment (Chromium for one module's browser, Slurm for another's): apt and dpkg
take one caller at a time, so every install here goes through one lock file, and apt waits for
dpkg's own lock (another apt on the machine) instead of failing.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Sequence

#: The lock every install of the suite's workers takes in turn.
LOCK = "/tmp/orchester-tests-apt.lock"
#: Seconds apt waits for dpkg's lock when another apt holds it.
DPKG_LOCK_WAIT = 600


def apt_install(packages: Sequence[str], commands: Sequence[str], why: str) -> None:
    """Install ``packages`` unless every one of ``commands`` is already on the PATH.

    Raises :class:`RuntimeError` naming ``why`` and the command to run when they are missing and
    this process is not root.
    """
    if all(shutil.which(c) for c in commands):
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"{why} need Debian's {' and '.join(packages)}: apt-get install {' '.join(packages)} "
                           "(as root)")
    with open(LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # (released when the file closes)
        if all(shutil.which(c) for c in commands):  # another worker installed them meanwhile
            return
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        wait = ["-o", f"DPkg::Lock::Timeout={DPKG_LOCK_WAIT}"]
        subprocess.run(["apt-get", *wait, "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL, timeout=900)
        subprocess.run(["apt-get", *wait, "install", "-y", "-q", "--no-install-recommends", *packages], check=True,
                       env=env, stdout=subprocess.DEVNULL, timeout=1200)
