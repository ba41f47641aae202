"""The autoscaler on a real one-node Slurm: time to the first result from no job at all, and what an elastic
allocation costs against a fixed one over a bursty workload.

Everything is real: Debian's slurm-wlm started for the run (``tests/slurm_node.py``: munged, slurmctld,
slurmd; installed when missing, as root), an orchestrator on loopback TCP, ``orchester autoscale`` as a
process, satellites inside ``sbatch`` jobs. ``squeue`` is read every 0.2 s from a thread: when each job
was pending and running.

1. **Time to the first result with no job at start** (median of ``--repeat``): a burst of tasks is
   submitted to a bus with no satellite; the time until the first result, split into the steps the
   scheduler and the satellite take (the job submitted, running, its satellite registered, the first
   result). The baseline, in the same run: the same burst to a bus whose job is already running.
2. **Utilisation over a bursty workload**: ``--bursts`` bursts of ``--tasks`` tasks of ``--seconds``
   each, ``--gap`` seconds apart, run twice: on an elastic allocation (``--min-jobs 0 --max-jobs J``,
   jobs given back after ``--idle-timeout``) and on a fixed one of the same peak size (``--min-jobs J
   --max-jobs J``: J jobs held from the first burst to the end). Utilisation is the tasks' busy
   core-seconds over the allocation's core-seconds (each job's running time, from ``squeue``, times
   its cores); core-hours saved are the fixed allocation's less the elastic one's; the makespan is from
   the first submission to the last result.

Run (as root, on a machine where a one-node Slurm may start): ``python bench/autoscale.py
[--repeat 3] [--bursts 3] [--tasks 16] [--seconds 1] [--gap 20] [--jobs 4] [--json F]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]  # bench/*.py must not shadow packages
sys.path.append(os.path.join(ROOT, "tests"))  # the one-node Slurm of the tests

from slurm_node import OneNodeSlurm  # noqa: E402

from orchester import Client  # noqa: E402
from orchester.config import OrchestratorConfig  # noqa: E402
from orchester.server.broker import BrokerThread  # noqa: E402


class Watch:
    """``squeue`` every 0.2 s: when each job of a name was first seen pending, first running, last seen."""

    def __init__(self, slurm: OneNodeSlurm, name: str) -> None:
        self.slurm, self.name = slurm, name
        self.first: dict[str, float] = {}
        self.running: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for job, state in self.slurm.jobs(self.name).items():
                self.first.setdefault(job, now)
                self.last[job] = now
                if state in ("RUNNING", "COMPLETING"):
                    self.running.setdefault(job, now)
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def running_seconds(self, until: float) -> float:
        """Seconds the jobs ran, in all (a job still listed runs until ``until``)."""
        return sum(min(self.last[j], until) - t for j, t in self.running.items())


def start_autoscaler(slurm: OneNodeSlurm, endpoint: str, workdir: Path, tag: str,
                     *flags: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "orchester", "--log-level", "ERROR", "autoscale", "--connect", endpoint,
            "--tag", tag, "--workdir", str(workdir), "--interval", "0.3", "--wait-bound", "0",
            "--walltime", "00:30:00", "--workers", "1", "--cores", "1",
            "--satellite-option=--heartbeat-interval=0.5", *flags]
    return subprocess.Popen(argv, env=slurm.env)


def stop(proc: subprocess.Popen[bytes], slurm: OneNodeSlurm, tag: str) -> None:
    proc.terminate()
    proc.wait(20)
    slurm.run("scancel", f"--name=orchester-{tag}", check=False)
    deadline = time.monotonic() + 30
    while slurm.jobs(f"orchester-{tag}") and time.monotonic() < deadline:
        time.sleep(0.2)


def first_result(slurm: OneNodeSlurm, workdir: Path, tag: str, warm: bool) -> dict[str, float]:
    """Seconds from a burst to its first result (and to each step on the way), from no job (``warm``: with
    one job already running and its satellite registered)."""
    with BrokerThread(OrchestratorConfig(bind=["tcp://127.0.0.1:*"], pub=["tcp://127.0.0.1:*"],
                                         heartbeat_interval=0.5, liveness=4)) as broker:
        endpoint = broker.endpoints["bind"][0]
        watch = Watch(slurm, f"orchester-{tag}")
        proc = start_autoscaler(slurm, endpoint, workdir, tag, "--max-jobs", "1", "--min-jobs", "1" if warm else "0")
        try:
            with Client(endpoint) as client:
                if warm:
                    while not client.status()["satellites"]:
                        time.sleep(0.1)
                t0 = time.monotonic()
                futures = [client.submit("sleep", 0.1) for _ in range(8)]
                registered = None
                while not any(f.done() for f in futures):
                    if registered is None and client.status()["satellites"]:
                        registered = time.monotonic()
                    time.sleep(0.02)
                t_first = time.monotonic()
                for f in futures:
                    f.result(timeout=120)
        finally:
            watch.stop()
            stop(proc, slurm, tag)
        out = {"first_result": t_first - t0}
        if not warm:
            job = min(watch.first, key=watch.first.__getitem__)
            out.update(submitted=watch.first[job] - t0, running=watch.running.get(job, t_first) - t0,
                       registered=(registered or t_first) - t0)
        return out


def bursty(slurm: OneNodeSlurm, workdir: Path, tag: str, elastic: bool, args: argparse.Namespace) -> dict[str, float]:
    """One run of the bursty workload on an elastic or a fixed allocation of ``--jobs`` jobs."""
    with BrokerThread(OrchestratorConfig(bind=["tcp://127.0.0.1:*"], pub=["tcp://127.0.0.1:*"],
                                         heartbeat_interval=0.5, liveness=4)) as broker:
        endpoint = broker.endpoints["bind"][0]
        watch = Watch(slurm, f"orchester-{tag}")
        low = "0" if elastic else str(args.jobs)
        proc = start_autoscaler(slurm, endpoint, workdir, tag, "--max-jobs", str(args.jobs), "--min-jobs", low,
                                "--idle-timeout", str(args.idle_timeout))
        busy = 0.0
        try:
            with Client(endpoint) as client:
                t0 = time.monotonic()
                for b in range(args.bursts):
                    if b:
                        time.sleep(args.gap)
                    futures = [client.submit("sleep", args.seconds) for _ in range(args.tasks)]
                    for f in futures:
                        f.result(timeout=600)
                    busy += args.tasks * args.seconds
                makespan = time.monotonic() - t0
            end = time.monotonic()
        finally:
            watch.stop()
            stop(proc, slurm, tag)
        allocated = watch.running_seconds(end)  # one core per job (--cores 1)
        return {"makespan": makespan, "allocated_core_seconds": allocated, "busy_core_seconds": busy,
                "utilisation": busy / allocated if allocated else 0.0, "jobs": len(watch.running)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs of the first-result measurement")
    ap.add_argument("--bursts", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=16, help="tasks per burst")
    ap.add_argument("--seconds", type=float, default=1.0, help="each task's run time")
    ap.add_argument("--gap", type=float, default=20.0, help="seconds between bursts")
    ap.add_argument("--jobs", type=int, default=4, help="the allocation's peak: jobs of one satellite and one core")
    ap.add_argument("--idle-timeout", type=float, default=5.0, help="the elastic allocation's idle timeout")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="orchester-bench-autoscale-"))
    slurm = OneNodeSlurm(work / "slurm").start()
    try:
        cold, warm = [], []
        for i in range(args.repeat):  # alternating
            cold.append(first_result(slurm, work, f"cold{i}", warm=False))
            warm.append(first_result(slurm, work, f"warm{i}", warm=True))
        med = {k: statistics.median(r[k] for r in cold) for k in cold[0]}
        med_warm = statistics.median(r["first_result"] for r in warm)
        print(f"time to the first result of a burst, median of {args.repeat} (one-node Slurm {slurm.cpus} CPUs)")
        print(f"  no job at start:  job submitted {med['submitted']:.2f} s, running {med['running']:.2f} s, "
              f"satellite registered {med['registered']:.2f} s, first result {med['first_result']:.2f} s")
        print(f"  a job already running (baseline): first result {med_warm:.3f} s   "
              f"ratio {med['first_result'] / med_warm:.0f}×")
        runs = {"elastic": bursty(slurm, work, "elastic", True, args),
                "fixed": bursty(slurm, work, "fixed", False, args)}
        print(f"{args.bursts} bursts of {args.tasks} × {args.seconds:g} s tasks, {args.gap:g} s apart; "
              f"at most {args.jobs} jobs of one core")
        for name, r in runs.items():
            print(f"  {name:8s} makespan {r['makespan']:6.1f} s   allocation {r['allocated_core_seconds']:7.1f} "
                  f"core-s   busy {r['busy_core_seconds']:6.1f} core-s   utilisation {r['utilisation']:6.1%}   "
                  f"jobs {r['jobs']}")
        saved = runs["fixed"]["allocated_core_seconds"] - runs["elastic"]["allocated_core_seconds"]
        gain = runs["elastic"]["utilisation"] / runs["fixed"]["utilisation"]
        longer = runs["elastic"]["makespan"] / runs["fixed"]["makespan"]
        print(f"  elastic against fixed: utilisation ×{gain:.2f}, makespan ×{longer:.2f}, "
              f"core-hours saved {saved / 3600:.4f} ({saved / runs['fixed']['allocated_core_seconds']:.0%} "
              "of the fixed allocation)")
        if args.json:
            Path(args.json).write_text(json.dumps({"first_result": {"cold": cold, "warm": warm}, "bursty": runs},
                                                  indent=2))
    finally:
        slurm.stop()


if __name__ == "__main__":
    main()
