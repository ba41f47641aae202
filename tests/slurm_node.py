"""A real one-node Slurm for the tests: munged, slurmctld and slurmd on this machine.

Debian's ``slurm-wlm`` (installed when missing, as root), configured in a temporary folder: its own
ports (chosen by the OS), state and spool; ``proctrack/linuxproc`` and ``task/none`` (no cgroups in
a container), ``select/cons_tres`` with the node's real CPUs and memory, ``OverSubscribe=FORCE`` so
that more jobs than cores may run. Every daemon this starts is stopped by its pid at the end
(munged only if it was not running already). Client commands need ``SLURM_CONF``: :attr:`env`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from debian_packages import apt_install

#: The Debian packages the fixture needs.
PACKAGES = ("slurm-wlm", "munge")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN = Path("/run/munge")


def install() -> None:
    """Install Debian's slurm-wlm and munge when missing (CI runs as root on a fresh machine)."""
    apt_install(PACKAGES, ("slurmctld", "slurmd", "sbatch", "munged"), "the Slurm tests")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports the OS has free now (all held open together, so none is chosen twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("", 0))
        return [int(s.getsockname()[1]) for s in socks]


def _memory_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 1024


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OneNodeSlurm:
    """The daemons of a one-node cluster, started in ``root`` (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.cpus = os.cpu_count() or 1
        self._munged: int | None = None  #: the munged this started (None: one was running)

    # ------------------------------------------------------------ start, stop
    def start(self, timeout: float = 60.0, attempts: int = 3) -> OneNodeSlurm:
        """Start munged (if needed), slurmctld and slurmd; wait until the node is idle.

        The daemons' ports are chosen free, but another process (a test in another worker) may
        take one before slurmctld binds it: then the daemons start again on new ports, up to
        ``attempts`` times."""
        install()
        self._start_munge()
        for _ in range(attempts - 1):
            try:
                return self._start_daemons(timeout)
            except RuntimeError as exc:
                if "Address already in use" not in str(exc):
                    raise
                for name in ("ctld.log", "d.log", "slurmctld.pid", "slurmd.pid"):
                    (self.root / name).unlink(missing_ok=True)
        return self._start_daemons(timeout)

    def _start_daemons(self, timeout: float) -> OneNodeSlurm:
        """slurmctld and slurmd on two ports free now; the node idle (else RuntimeError, both stopped)."""
        ctld_port, d_port = _free_ports(2)
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=orchestertest",
            f"SlurmctldHost={self.host}",
            "AuthType=auth/munge",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/ctld.log",
            f"SlurmdLogFile={r}/d.log",
            "SlurmUser=root",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={d_port}",
            "ReturnToService=2",
            "JobAcctGatherType=jobacct_gather/none",
            "MinJobAge=2",
            "KillWait=5",
            "SchedulerParameters=sched_interval=1",
            f"NodeName={self.host} CPUs={self.cpus} RealMemory={max(256, _memory_mib() - 1024)} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8",
            "",
        ]))
        try:
            subprocess.run(["slurmctld", "-f", str(self.conf)], env=self.env, check=True, timeout=60,
                           capture_output=True)
            subprocess.run(["slurmd", "-f", str(self.conf)], env=self.env, check=True, timeout=60,
                           capture_output=True)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:  # (a node not yet registered is "idle*", "unk*": not up)
                out = self.run("sinfo", "--noheader", "--format=%t", check=False)
                if out.strip() in ("idle", "mix", "alloc"):
                    return self
                if "Address already in use" in self.logs():  # (a daemon lost its port: start again)
                    break
                time.sleep(0.3)
            raise RuntimeError(f"the Slurm node did not come up (waited up to {timeout:g} s): {self.logs()}")
        except BaseException:
            self.stop(daemons_only=True)
            raise

    def _start_munge(self) -> None:
        running = _pid(MUNGE_RUN / "munged.pid")
        if running and _alive(running) and (MUNGE_RUN / "munge.socket.2").exists():
            return
        if not MUNGE_KEY.exists():
            MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
            MUNGE_KEY.write_bytes(os.urandom(1024))
            shutil.chown(MUNGE_KEY, "munge", "munge")
            MUNGE_KEY.chmod(0o400)
        MUNGE_RUN.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_RUN, "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force"], check=True, timeout=30)
        self._munged = _pid(MUNGE_RUN / "munged.pid")
        deadline = time.monotonic() + 10
        while not (MUNGE_RUN / "munge.socket.2").exists() and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop(self, daemons_only: bool = False) -> None:
        """Cancel every job, then stop slurmd, slurmctld and the munged this started (by pid;
        ``daemons_only``: not munged)."""
        if self.conf.exists() and _pid(self.root / "slurmctld.pid"):
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True, timeout=30)
            deadline = time.monotonic() + 30  # the jobs' steps end while slurmd and munged still run
            while time.monotonic() < deadline and self.run("squeue", "--noheader", check=False).strip():
                time.sleep(0.3)
        munged = None if daemons_only else self._munged
        pids = [p for p in (_pid(self.root / "slurmd.pid"), _pid(self.root / "slurmctld.pid"), munged) if p]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # (gone already)
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for pid in pids:
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError):  # (it may end between the look and the kill)
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
        if not daemons_only:
            self._munged = None

    # ------------------------------------------------------------ commands
    def run(self, *argv: str, check: bool = True) -> str:
        """A Slurm client command's output (``SLURM_CONF`` set)."""
        try:
            done = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            if check:
                raise
            return ""
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
        return done.stdout

    def jobs(self, name: str | None = None) -> dict[str, str]:
        """``squeue``: job id → state (PENDING, RUNNING, COMPLETING, …), of the jobs named ``name``."""
        argv = ["squeue", "--noheader", "--format=%i|%T"] + ([f"--name={name}"] if name else [])
        out = self.run(*argv)
        return dict(line.strip().split("|", 1) for line in out.splitlines() if "|" in line)

    def logs(self) -> str:
        """The last lines of the daemons' logs (for a failure's message)."""
        out = []
        for name in ("ctld.log", "d.log"):
            path = self.root / name
            if path.exists():
                out.append(f"{name}: " + " | ".join(path.read_text(errors="replace").splitlines()[-8:]))
        return "; ".join(out)
