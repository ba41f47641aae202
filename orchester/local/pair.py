"""A binary-star pair and its satellites as processes on this machine (tests, benchmarks, trials).

Example::

    from orchester.local.pair import LocalPair

    with LocalPair(satellites=2, workers=2) as pair:
        with pair.client() as client:
            fut = client.submit("echo", 1)
            pair.kill(pair.active_role())      # kill -9 of the active server
            print(fut.result(timeout=30))      # answered by the other one

Both servers bind ``ipc://`` endpoints in a private folder (0700, like
:class:`~orchester.LocalCluster`'s: no other local user can connect), so a server killed and
started again comes back on the same endpoints (clients and satellites keep theirs). Each
server has its own journal folder (``journals/primary``, ``journals/backup``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from orchester.client.status import fleet_of
from orchester.client.sync import Client
from orchester.errors import OrchesterError
from orchester.local.cluster import ClusterError, LocalCluster

ROLES = ("primary", "backup")


class LocalPair(LocalCluster):
    """Start a primary and a backup orchestrator, then ``satellites`` satellites connected to both."""

    def __init__(self, satellites: int = 2, workers: int = 2, *, ha_heartbeat: float = 1.0,
                 replication: str = "sync", journal: bool = True, durability: str = "full",
                 **kwargs: Any) -> None:
        super().__init__(satellites, workers, **kwargs)
        self.ha_heartbeat = ha_heartbeat
        self.replication = replication
        self.journal = journal
        self.durability = durability
        self.servers: dict[str, subprocess.Popen[bytes] | None] = dict.fromkeys(ROLES)
        self.endpoints = {role: f"ipc://{self.dir}/{role}.sock" for role in ROLES}
        self.pub_endpoints = {role: f"ipc://{self.dir}/{role}.pub" for role in ROLES}
        self.state_endpoints = {role: f"ipc://{self.dir}/{role}.state" for role in ROLES}
        self.endpoint = self.endpoints["primary"]
        self.pub_endpoint = self.pub_endpoints["primary"]

    # ------------------------------------------------------------ servers
    def start_orchestrator(self, bind: str | None = None, pub: str | None = None) -> None:
        """Start both servers (the primary first) and wait until one of them is active."""
        self.start_server("primary")
        self.start_server("backup")
        self.wait_active()

    def start_server(self, role: str, extra: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        """Start (or restart) one server of the pair on its fixed endpoints."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        old = self.servers.get(role)
        if old is not None and old.poll() is None:
            raise ClusterError(f"the {role} is still running")
        other = "backup" if role == "primary" else "primary"
        efile = os.path.join(self.dir, f"{role}.json")
        if os.path.exists(efile):
            os.unlink(efile)
        cmd = [sys.executable, "-m", "orchester", "--log-level", self.log_level, "serve", f"--{role}",
               "--bind", self.endpoints[role], "--pub", self.pub_endpoints[role],
               "--state-bind", self.state_endpoints[role], "--peer", self.state_endpoints[other],
               "--endpoint-file", efile, "--strategy", self.strategy, "--replication", self.replication,
               "--heartbeat-interval", str(self.heartbeat_interval), "--liveness", str(self.liveness),
               "--ha-heartbeat", str(self.ha_heartbeat), *self.serve_args, *extra]
        if self.journal:
            cmd += ["--journal", os.path.join(self.dir, "journals", role), "--durability", self.durability]
        proc = self._popen(cmd, self.env, private=True)
        self.servers[role] = proc
        deadline = time.monotonic() + self.start_timeout
        while not os.path.exists(efile):
            if proc.poll() is not None:
                raise ClusterError(f"the {role} exited with {proc.returncode} at start")
            if time.monotonic() > deadline:
                raise ClusterError(f"the {role} did not start in time")
            time.sleep(0.02)
        with open(efile) as f:
            json.load(f)
        return proc

    def kill(self, role: str) -> None:
        """``kill -9`` one server (no goodbye, no flush)."""
        proc = self.servers.get(role)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def state(self, role: str, timeout: float = 2.0) -> dict[str, Any] | None:
        """One server's ``ha`` status (``None`` if it does not answer within ``timeout``)."""
        proc = self.servers.get(role)
        if proc is None or proc.poll() is not None:
            return None
        with Client(self.endpoints[role], context=None) as c:
            try:
                st = c.status(timeout=timeout)
            except OrchesterError:
                return None
        ha = st.get("ha")
        return {**ha, "satellites": fleet_of(st)["satellites"]} if isinstance(ha, dict) else None

    def active_role(self) -> str | None:
        """The role of the server that says it is active, if one does."""
        for role in ROLES:
            st = self.state(role)
            if st is not None and st["state"] == "active":
                return role
        return None

    def wait_active(self, timeout: float | None = None, satellites: int = 0) -> str:
        """Block until a server is active (with at least ``satellites`` registered); return its role."""
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while True:
            for role in ROLES:
                st = self.state(role, timeout=1.0)
                if st is not None and st["state"] == "active" and st["satellites"] >= satellites:
                    return role
            if time.monotonic() > deadline:
                raise ClusterError("no server of the pair became active in time")
            time.sleep(0.05)

    def wait_state(self, role: str, state: str, timeout: float = 30.0) -> dict[str, Any]:
        """Block until ``role`` reports ``state`` (``active``, ``passive``, ...); return its status."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.state(role, timeout=1.0)
            if st is not None and st["state"] == state:
                return st
            if time.monotonic() > deadline:
                raise ClusterError(f"the {role} is not {state} after {timeout}s (last: {st})")
            time.sleep(0.05)

    # ------------------------------------------------------ LocalCluster hooks
    def _connect_args(self) -> list[str]:
        return ["--connect", self.endpoints["primary"], "--connect", self.endpoints["backup"]]

    def wait_for_satellites(self, n: int, timeout: float | None = None) -> None:
        """Block until the active server has at least ``n`` satellites registered."""
        for p in self.satellites:
            if p.poll() is not None and p.returncode not in (0, -signal.SIGKILL, -signal.SIGTERM):
                raise ClusterError(f"satellite exited with {p.returncode} at start")
        self.wait_active(timeout, satellites=n)

    def client(self, **kwargs: Any) -> Client:
        """A new :class:`Client` knowing both servers (closed with the pair)."""
        c = Client([self.endpoints["primary"], self.endpoints["backup"]], pub=self.pub_endpoint, **kwargs)
        self._clients.append(c)
        return c

    def close(self, grace: float = 5.0) -> None:
        """Stop clients, satellites and both servers; remove the folder."""
        for role in ROLES:
            proc = self.servers.get(role)
            if proc is not None:
                self.satellites.append(proc)  # stopped by the same SIGTERM-then-SIGKILL sweep
                self.servers[role] = None
        super().close(grace)
