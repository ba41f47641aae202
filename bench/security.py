"""What CurveZMQ costs: throughput with keys (authentication, encryption, a role check per
request) against the same local cluster without, measured in the same run, and the raw cost
of CURVE on a pyzmq DEALER↔ROUTER echo as the baseline.

Run: ``python bench/security.py [--n 5000] [--window 500] [--payload 100] [--rounds 2]``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]  # bench/*.py must not shadow packages
sys.path.append(HERE)  # last: for closedloop, after every package

import zmq  # noqa: E402
from closedloop import echo_rate  # noqa: E402

from orchester import LocalCluster  # noqa: E402
from orchester.security.auth import CurveAuthenticator, KeyRing, secure_client, secure_server  # noqa: E402
from orchester.security.keys import generate_keys, load_keypair, load_public  # noqa: E402


def cluster_rate(n: int, window: int, payload: bytes, keys: Path | None) -> float:
    """Echo tasks per second through a fresh local cluster, with or without keys."""
    serve_args: list[str] = []
    env: dict[str, str] = {}
    if keys is not None:
        serve_args = ["--curve-secret", str(keys / "server" / "server.key_secret"),
                      "--authorized-keys", str(keys / "authorized")]
        env = {"ORCHESTER_CURVE_SECRET": str(keys / "own" / "all.key_secret"),
               "ORCHESTER_SERVER_KEY": str(keys / "server" / "server.key")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # this process's clients, and the satellites it starts
    try:
        with LocalCluster(satellites=2, workers=1, prefetch=8, log_level="ERROR", serve_args=serve_args) as c:
            return echo_rate(c.client(), n, window, payload)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def raw_rate(n: int, window: int, payload: bytes, keys: Path | None) -> float:
    """Messages per second echoed by a ROUTER to a DEALER in this process (CURVE or not)."""
    ctx = zmq.Context()
    auth = None
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        for s in (router, dealer):
            s.linger = 0
            s.sndhwm = s.rcvhwm = 100_000
        if keys is not None:
            auth = CurveAuthenticator(KeyRing(keys / "authorized"), ctx)
            auth.start()
            secure_server(router, *load_keypair(keys / "server" / "server.key_secret"))
            secure_client(dealer, *load_keypair(keys / "own" / "all.key_secret"),
                          load_public(keys / "server" / "server.key"))
        router.bind("tcp://127.0.0.1:*")
        dealer.connect(router.last_endpoint.decode())
        t0 = time.perf_counter()
        outstanding = sent = got = 0
        while got < n:
            while outstanding < window and sent < n:
                dealer.send(payload)
                sent += 1
                outstanding += 1
            while router.poll(0):
                router.send_multipart(router.recv_multipart())
            while dealer.poll(1 if outstanding else 0):
                dealer.recv()
                got += 1
                outstanding -= 1
        return n / (time.perf_counter() - t0)
    finally:
        router.close(0)
        dealer.close(0)
        if auth is not None:
            auth.stop()
        ctx.term()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--payload", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (the best of each is kept)")
    args = ap.parse_args(argv)
    payload = b"x" * args.payload
    with tempfile.TemporaryDirectory(prefix="orchester-bench-keys-") as tmp:
        keys = Path(tmp)
        generate_keys("server", keys / "server", ["admin"])
        public, _ = generate_keys("all", keys / "own", ["submit", "admin", "satellite"])
        (keys / "authorized").mkdir()
        (keys / "authorized" / "all.key").write_bytes(public.read_bytes())
        results: dict[str, float] = {}
        for _ in range(args.rounds):
            for name, fn, k in (("raw pyzmq", raw_rate, None), ("raw pyzmq + CURVE", raw_rate, keys),
                                ("orchester", cluster_rate, None), ("orchester + CURVE", cluster_rate, keys)):
                results[name] = max(results.get(name, 0.0), fn(args.n * (10 if fn is raw_rate else 1),
                                                               args.window, payload, k))
    print(f"echo of {args.payload} B, window {args.window}:")
    for name in ("raw pyzmq", "raw pyzmq + CURVE"):
        print(f"  {name:20s} {results[name]:9.0f} msg/s   {results[name] / results['raw pyzmq']:5.2f}x raw")
    for name in ("orchester", "orchester + CURVE"):
        print(f"  {name:20s} {results[name]:9.0f} tasks/s {results[name] / results['orchester']:5.2f}x "
              f"orchester without keys")
    return 0


if __name__ == "__main__":
    sys.exit(main())
