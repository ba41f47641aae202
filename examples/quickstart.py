"""Run a few tasks on a local cluster: futures, map, numpy payloads, errors, events.

    python examples/quickstart.py
"""

from __future__ import annotations

import time

import numpy as np

from orchester import LocalCluster, TaskFailed


def main() -> None:
    with LocalCluster(satellites=2, workers=2) as cluster, cluster.client() as client:
        print("echo:", client.submit("echo", {"hello": "world"}).result(timeout=30))
        print("map:", list(client.map("echo", range(10))))
        arr = np.linspace(0.0, 1.0, 1_000_000)
        back = client.submit("echo", arr).result(timeout=30)
        print("numpy round trip equal:", bool(np.array_equal(arr, back)))
        try:
            client.submit("fail", "on purpose").result(timeout=30)
        except TaskFailed as exc:
            print("a failed task:", exc.type, exc.message)
        with client.subscribe(["task:"]) as events:
            time.sleep(0.3)  # a new subscription takes a moment to reach the publisher
            fut = client.submit("sleep", 0.2)
            fut.result(timeout=30)
            ev = events.recv(timeout=5)
            print("an event:", ev.topic if ev else None, ev.data if ev else None)
        st = client.status()
        print("satellites:", [(s["id"], s["done"]) for s in st["satellites"]])


if __name__ == "__main__":
    main()
