"""Throughput with metrics on against off, in the same run (target >= 0.95x).

"On" sends every metric each ``--interval`` seconds to a TCP sink on loopback that reads and
discards (carbon's own cost is not Orchester's); the figure is the best of interleaved rounds.

Run: ``python bench/metrics.py [--n 10000] [--rounds 3] [--interval 1]``
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading

from closedloop import echo_rate  # bench/ is this script's folder, first on the path

from orchester import LocalCluster


def sink() -> tuple[int, threading.Event]:
    """A carbon stand-in that accepts connections and discards what it reads."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            threading.Thread(target=drain, args=(conn,), daemon=True).start()
        server.close()

    def drain(conn: socket.socket) -> None:
        with conn:
            while conn.recv(1 << 16):
                pass

    threading.Thread(target=serve, daemon=True).start()
    return int(server.getsockname()[1]), stop


def run(n: int, window: int, serve_args: list[str]) -> float:
    with LocalCluster(satellites=2, workers=1, prefetch=8, log_level="ERROR", serve_args=serve_args) as cluster:
        return echo_rate(cluster.client(), n, window, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between metric reports when on")
    args = ap.parse_args(argv)
    port, stop = sink()
    best = {"off": 0.0, "on": 0.0}
    try:
        for _ in range(args.rounds):
            best["off"] = max(best["off"], run(args.n, args.window, []))
            best["on"] = max(best["on"], run(args.n, args.window, ["--carbon", f"127.0.0.1:{port}",
                                                                     "--metrics-interval", str(args.interval)]))
    finally:
        stop.set()
    print(f"{args.n} echo tasks, window {args.window}, best of {args.rounds} interleaved rounds:")
    print(f"  metrics off {best['off']:8.0f} tasks/s")
    print(f"  metrics on  {best['on']:8.0f} tasks/s   {best['on'] / best['off']:.2f}x   (target >= 0.95x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
