"""Failover time of a binary-star pair: from ``kill -9`` of the active to the first result.

A client keeps ``--inflight`` short tasks outstanding against a :class:`~orchester.local.pair.LocalPair`
(two satellites, journals on, synchronous replication). Each round kills the active server,
measures the time until the next result reaches the client (it can only come from the new
active), restarts the killed server (it rejoins as passive and resynchronises), and waits
until the pair is healthy again. At the end every task must have produced exactly one
result and run exactly once (the ``topo.mark`` kind appends its key to a file).

The baseline is the pair's own detection floor, measured in the same run: the time for the
passive to see its peer expire (two ``--heartbeat`` intervals after the last state message)
cannot be beaten; the figure printed is the median failover time and its ratio to that floor.

    python bench/failover.py --kills 20 --heartbeat 1.0
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]  # bench/*.py must not shadow packages

from orchester.local.pair import LocalPair  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--heartbeat", type=float, default=1.0, help="pair, client and satellite heartbeat (s)")
    ap.add_argument("--liveness", type=int, default=2, help="heartbeats of silence before clients fail over")
    ap.add_argument("--inflight", type=int, default=16)
    ap.add_argument("--task-seconds", type=float, default=0.01)
    args = ap.parse_args()

    marks = Path(tempfile.mkdtemp(prefix="orchester-failover-")) / "marks"
    hb = args.heartbeat
    times: list[float] = []
    lock = threading.Lock()
    arrivals: list[tuple[float, int]] = []  # (monotonic time, endpoint index of the client) of every result
    results: dict[str, str] = {}
    errors: list[str] = []
    submitted = 0
    with LocalPair(satellites=2, workers=2, tasks=["topology_tests.tasks"], heartbeat_interval=hb,
                   liveness=args.liveness, ha_heartbeat=hb, log_level="ERROR") as pair:
        pair.wait_state("backup" if pair.active_role() == "primary" else "primary", "passive")
        client = pair.client(heartbeat_interval=hb, liveness=args.liveness)
        stop = threading.Event()
        slots = threading.Semaphore(args.inflight)

        def on_done(fut: object, key: str) -> None:
            try:
                value = fut.result()  # type: ignore[attr-defined]
                with lock:
                    arrivals.append((time.monotonic(), client._index))  # callbacks run in the client's I/O thread
                    if key in results:
                        errors.append(f"{key}: a second result")
                    results[key] = value
            except Exception as exc:
                with lock:
                    errors.append(f"{key}: {exc!r}")
            slots.release()

        def pump() -> None:
            nonlocal submitted
            while not stop.is_set():
                if not slots.acquire(timeout=0.1):
                    continue
                key = f"k{submitted}"
                submitted += 1
                fut = client.submit("topo.mark", str(marks), key, args.task_seconds)
                fut.add_done_callback(lambda f, k=key: on_done(f, k))

        feeder = threading.Thread(target=pump, daemon=True)
        feeder.start()
        time.sleep(2 * hb)
        for i in range(args.kills):
            role = pair.active_role()
            assert role is not None, "no active server"
            other = "backup" if role == "primary" else "primary"
            pair.wait_state(other, "passive", timeout=60)
            _wait_in_sync(pair, other, 60)
            with lock:
                seen = len(arrivals)
            index = client._index
            t_kill = time.monotonic()
            pair.kill(role)
            deadline = t_kill + 60
            while time.monotonic() < deadline:
                with lock:
                    fresh = [t for t, i in arrivals[seen:] if t > t_kill and i != index]  # from the new active
                if fresh:
                    times.append(fresh[0] - t_kill)
                    break
                time.sleep(0.005)
            else:
                raise SystemExit(f"kill {i + 1}: no result within 60 s")
            print(f"kill {i + 1:2d}: {role:7s} killed, first result from the {other} after {times[-1]:.3f} s",
                  flush=True)
            pair.start_server(role)
            time.sleep(hb)
        stop.set()
        feeder.join(10)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with lock:
                if len(results) + len(errors) >= submitted:
                    break
            time.sleep(0.05)
    runs = collections.Counter(marks.read_text().split()) if marks.exists() else collections.Counter()
    lost = submitted - len(results)
    repeated = sum(1 for n in runs.values() if n > 1)
    floor = 2 * hb
    med = statistics.median(times)
    print()
    print(f"heartbeat {hb:g} s, client/satellite liveness {args.liveness}, {args.kills} kills, "
          f"{submitted} tasks")
    print(f"failover time (kill -9 -> first result): median {med:.3f} s, max {max(times):.3f} s, "
          f"min {min(times):.3f} s")
    print(f"detection floor (2 heartbeats): {floor:.3f} s -> median {med / floor:.2f}x the floor")
    print(f"lost {lost}, errors {len(errors)}, executed more than once {repeated}, "
          f"results {len(results)}/{submitted}")
    for e in errors[:10]:
        print("  ", e)
    if lost or errors or repeated:
        sys.exit(1)


def _wait_in_sync(pair: LocalPair, role: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = pair.state(role)
        if st is not None and st["state"] == "passive" and st["stream"] is not None:
            return
        time.sleep(0.05)
    raise SystemExit(f"the {role} did not resynchronise within {timeout} s")


if __name__ == "__main__":
    main()
