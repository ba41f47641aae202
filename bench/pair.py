"""What a binary-star pair costs: throughput of a pair (sync and async replication) against one
orchester with the same journal, measured in the same run.

Each configuration is fresh (2 satellites × 1 worker, ``ipc://`` endpoints, journals in a
temporary folder, the given ``--durability``); a client keeps ``--window`` echo tasks in flight. With ``sync`` an
acknowledgement and a result wait until the passive has journaled the records they depend
on; with ``async`` they do not wait for it.

Run: ``python bench/pair.py [--n 5000] [--window 500] [--durability batch] [--rounds 2]``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]  # bench/*.py must not shadow packages
sys.path.append(HERE)  # last: for closedloop, after every package

from closedloop import echo_rate  # noqa: E402

from orchester import LocalCluster  # noqa: E402
from orchester.local.pair import LocalPair  # noqa: E402


def drive(cluster: LocalCluster, n: int, window: int) -> float:
    """Tasks per second through ``cluster`` (after a warm-up)."""
    return echo_rate(cluster.client(), n, window, b"x" * 100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--durability", default="batch", choices=["full", "batch", "off"])
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (the best of each is kept)")
    args = ap.parse_args(argv)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="orchester-bench-pair-") as tmp:
        for r in range(args.rounds):
            single = LocalCluster(satellites=0, workers=1, prefetch=8, log_level="ERROR",
                                  serve_args=["--journal", f"{tmp}/single-{r}", "--durability", args.durability])
            try:  # on ipc:// like the pair, so that only the pair differs
                single.start_orchestrator(bind=f"ipc://{tmp}/single-{r}.sock", pub=f"ipc://{tmp}/single-{r}.pub")
                for i in range(2):
                    single.add_satellite(f"s{i}")
                single.wait_for_satellites(2)
                results["one orchestrator"] = max(results.get("one orchestrator", 0.0),
                                                  drive(single, args.n, args.window))
            finally:
                single.close()
            for mode in ("sync", "async"):
                pair = LocalPair(satellites=2, workers=1, prefetch=8, log_level="ERROR", replication=mode,
                                 durability=args.durability)
                with pair:
                    pair.wait_state("backup", "passive")
                    name = f"pair, {mode}"
                    results[name] = max(results.get(name, 0.0), drive(pair, args.n, args.window))
    base = results["one orchestrator"]
    print(f"{args.n} echo tasks of 100 B, window {args.window}, journals with durability {args.durability}:")
    for name, rate in results.items():
        print(f"  {name:18s} {rate:8.0f} tasks/s   {rate / base:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
