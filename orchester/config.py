"""Typed configuration of each Orchester process, built from flags, TOML and environment.

One config object per process. The CLI fills it from (in increasing priority)
defaults, a TOML file (``--config``; section ``[serve]`` for the orchestrator,
``[satellite]`` for satellites, ``[client]`` for client commands), environment
variables (``ORCHESTER_*``) and command-line flags. Embedders build it directly.

:class:`OrchestratorConfig` is also the one table of ``orchester serve``'s flags: a field that
is a flag carries its help text (and its name, choices or kind of path, if any) in
``field(metadata=flag(...))``, and the command builds its options from the fields, their
types and their defaults (:mod:`orchester.cli.serve`). The fields that are deliberately not
flags are listed in :data:`NOT_FLAGS`. This module imports no click.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from orchester.errors import OrchesterError
from serializers.protocol import DEFAULT_MAX_MESSAGE


class ConfigError(OrchesterError, ValueError):
    """A configuration value or file that cannot be used, with the reason."""


@dataclass(frozen=True)
class Flag:
    """How a config field is given on the command line; the command line builds its option from this.

    The option's default and type are the field's own: ``int``, ``float`` and ``str`` take a
    value, ``bool`` is an on/off flag, ``list[str]`` a repeatable flag, ``X | None`` has no
    default. Its name is ``--`` and the field's name with dashes, unless ``name`` says otherwise.
    """

    #: The text ``--help`` shows.
    help: str
    #: The flag (``--allow-strategy``) when it is not the field's name with dashes.
    name: str | None = None
    #: The only values allowed (``--help`` shows them as ``[a|b|c]``).
    choices: tuple[str, ...] = ()
    #: A path to a ``file`` (not a folder) or a ``dir`` (not a file); it need not exist yet.
    path: Literal["file", "dir"] | None = None
    #: The placeholder of the value in ``--help``.
    metavar: str | None = None
    #: A flag that takes no value and sets the field to this one (several such flags may share
    #: a field: ``--primary`` and ``--backup`` set ``ha``).
    value: str | None = None


#: The key of ``field(metadata=...)`` under which a field's flags are kept (a tuple of :class:`Flag`).
FLAGS = "flags"


def flag(help: str, *, name: str | None = None, choices: tuple[str, ...] = (),
         path: Literal["file", "dir"] | None = None, metavar: str | None = None) -> Mapping[str, Any]:
    """The ``metadata`` of a field that is one flag: ``field(default=..., metadata=flag("Help text."))``."""
    return {FLAGS: (Flag(help, name, choices, path, metavar),)}


def field_flags(f: dataclasses.Field[Any]) -> tuple[Flag, ...]:
    """The flags that set field ``f`` (none: it is not given on the command line)."""
    return tuple(f.metadata.get(FLAGS, ()))


@dataclass
class OrchestratorConfig:
    """Settings of one orchestrator process; the fields are in the order of ``orchester serve --help``."""

    #: Endpoints of the ROUTER socket for clients (and satellites, unless ``satellite_bind`` is set).
    bind: list[str] = field(default_factory=lambda: ["tcp://127.0.0.1:5555"],
                            metadata=flag("Endpoint for clients (and satellites); repeatable."))
    #: Optional separate ROUTER endpoints for satellites.
    satellite_bind: list[str] = field(default_factory=list,
                                      metadata=flag("Separate endpoint for satellites; repeatable."))
    #: Endpoints of the event PUB socket.
    pub: list[str] = field(default_factory=lambda: ["tcp://127.0.0.1:5556"],
                           metadata=flag("Endpoint for the event stream; repeatable."))
    #: Seconds between heartbeats to satellites (and expected from them).
    heartbeat_interval: float = field(default=1.0,
                                      metadata=flag("Seconds between heartbeats to and from satellites."))
    #: A satellite silent for ``liveness × heartbeat_interval`` is lost and its tasks requeued.
    liveness: int = field(default=3, metadata=flag("Heartbeats missed before a satellite is lost."))
    #: Initial routing strategy (built-in name or ``module:Class``); allowed for CONTROL switches too.
    strategy: str = field(default="least_loaded", metadata=flag("least_loaded, round_robin, tags, or module:Class."))
    #: Further ``module:Class`` strategies an admin's CONTROL request may switch to (the built-in
    #: ones always may); anything else is refused before its module is imported.
    strategies: list[str] = field(default_factory=list, metadata=flag(
        "A strategy class a CONTROL request may switch to at run time (repeatable; the built-in ones and "
        "--strategy always may).", name="--allow-strategy", metavar="MODULE:CLASS"))
    #: Accept SUBMITs whose payload is pickle-coded (``"c": "pickle"``) and tell satellites so in
    #: each DISPATCH; satellites also need ``--allow-pickle``. Off: such submits get the ``codec`` error.
    allow_pickle: bool = field(default=False, metadata=flag(
        "Accept pickle-coded tasks (they run code on the satellites, which need --allow-pickle too)."))
    #: Largest message accepted, in bytes (also set as ZMQ_MAXMSGSIZE on every socket).
    max_message: int = field(default=DEFAULT_MAX_MESSAGE, metadata=flag(
        "Largest message accepted, in bytes (also ZMQ_MAXMSGSIZE per frame)."))
    #: Most tasks queued at once; further submits get a ``busy`` error.
    max_queue: int = field(default=1_000_000, metadata=flag("Most tasks queued; further submits are refused as busy."))
    #: Crashes (satellite lost, stalled, worker died) a task may cause before it is quarantined.
    retries: int = field(default=3, metadata=flag(
        "Crashes (satellite lost, stalled, worker killed) before a task is quarantined."))
    #: First back-off before a retry, doubled per crash (capped at 30 s).
    retry_backoff: float = field(default=0.5, metadata=flag(
        "First back-off in seconds before a retry, doubled per crash."))
    #: Seconds a task may wait in the queue before it expires (0: forever; per task: ``ttl``).
    queue_ttl: float = field(default=0.0, metadata=flag(
        "Seconds a task may wait in the queue before it expires (0: forever)."))
    #: Seconds a dispatched task may wait for a worker to start it before it stalls (0: forever): a
    #: satellite that takes tasks and never starts them loses them to the others.
    dispatch_timeout: float = field(default=60.0, metadata=flag(
        "Seconds a dispatched task may wait to be started before it stalls (0: forever)."))
    #: Seconds without progress before a running task of a progress-reporting kind stalls
    #: (0: the kind's own ``stall_timeout``, if it declares one).
    stall_timeout: float = field(default=0.0, metadata=flag(
        "Seconds without progress before a progress-reporting task stalls (0: the kind's own)."))
    #: Seconds a task may run before its worker is killed and it fails (0: no limit; per task: ``max_run``).
    max_run_time: float = field(default=0.0, metadata=flag(
        "Seconds a task may run before its worker is killed (0: no limit)."))
    #: Consecutive failed tasks that put a satellite on probation (half credit), then draining (none).
    probation_after: int = field(default=5, metadata=flag(
        "Consecutive failed tasks that put a satellite on probation (half credit)."))
    drain_after: int = field(default=10, metadata=flag(
        "Consecutive failed tasks that drain a satellite on probation (no credit)."))
    #: Most unfinished tasks one client may have (further submits get the ``limit`` error).
    max_client_tasks: int = field(default=100_000, metadata=flag(
        "Most unfinished tasks one client may have; further submits get the 'limit' error."))
    #: Most bytes (payload, header and id) of one client's unfinished tasks the orchestrator holds.
    max_client_bytes: int = field(default=1 << 30, metadata=flag(
        "Most bytes (payload, header, id) of one client's unfinished tasks held by the orchestrator."))
    #: Most result bytes pushed to one key (without keys: one connection) that it has not acknowledged
    #: reading; further results wait in the orchestrator's result store (one result always goes).
    max_unread_bytes: int = field(default=64 << 20, metadata=flag(
        "Result bytes sent to one connection and not yet acknowledged, at most (then results wait)."))
    #: Most task slots one satellite may announce (a larger announcement is cut to this).
    max_slots: int = field(default=1024, metadata=flag(
        "Most task slots one satellite may announce (more are cut to this)."))
    #: Seconds a task that needs more cores (or memory) than any satellite has free may wait while narrower
    #: tasks pass it; then one satellite able to run it is reserved for it: it gets no other task until the
    #: wide one fits there (0: reserve at once, no narrower task ever passes a wider one).
    reserve_after: float = field(default=30.0, metadata=flag(
        "Seconds a wide task lets narrower ones pass before a satellite is reserved for it."))
    #: Seconds a satellite drained for failing tasks waits before it is given a task again, on probation.
    probation_cooldown: float = field(default=30.0, metadata=flag(
        "Seconds a satellite drained for failing waits before it gets tasks again, on probation."))
    #: CurveZMQ: most connections (routing identities heard within the last minute) one key may hold
    #: (satellites of a large allocation often share one key).
    max_key_connections: int = field(default=4096, metadata=flag("CurveZMQ: most connections one key may hold."))
    #: Most event subscriptions one key (without CurveZMQ: all subscribers together) may hold.
    max_subscriptions: int = field(default=1024, metadata=flag(
        "Most event subscriptions one key (without keys: everyone together) may hold."))
    #: Longest event subscription topic, in bytes (a longer one is never matched and is not kept).
    max_topic: int = field(default=256, metadata=flag("Longest event subscription topic, in bytes."))
    #: Most requests one key (without CurveZMQ: one connection) may make per second, beyond a burst
    #: of as many (submits, results and heartbeats are not counted).
    request_rate: float = field(default=50.0, metadata=flag(
        "Requests (status, history, ...) per second one key may make beyond a burst (0: no limit)."))
    #: Finished results kept for fetch by task id (count and total bytes).
    result_retention: int = field(default=10_000, metadata=flag("Finished results kept for fetch by task id."))
    result_retention_bytes: int = 256 * 1024 * 1024
    #: Messages queued per peer by ZeroMQ before sends to it are refused (SNDHWM/RCVHWM).
    hwm: int = field(default=1000, metadata=flag(
        "Messages ZeroMQ queues per peer before sends to it fail (memory bound)."))
    #: Most messages drained from one socket per wake-up (those a BATCH carries counted one by one). Small
    #: enough that the satellites and clients get work while the orchestrator reads on: with 256, a loaded
    #: wake-up took some 20 ms before anything went out, and the processes of a pipeline worked in turn.
    batch: int = 64
    #: Write the bound endpoints (JSON) to this file once listening.
    endpoint_file: str | None = field(default=None, metadata=flag(
        "Write the bound endpoints (JSON) here once listening.", path="file"))
    #: Journal folder: tasks, transitions and results are kept there and replayed at start.
    journal: str | None = field(default=None, metadata=flag(
        "Journal folder: tasks survive a crash and are replayed at start.", path="dir"))
    #: When acknowledgements wait for the journal: ``full`` (fsync), ``batch`` (written), ``off``.
    durability: str = field(default="full", metadata=flag(
        "full: acknowledge after fsync; batch: after the write; off: do not wait.", choices=("full", "batch", "off")))
    #: a TOML file whose ``[autoscale]`` table runs an autoscaler beside this orchestrator (a child process of
    #: ``orchester serve``: the bus does not depend on it)
    autoscale: str | None = field(default=None, metadata=flag(
        "A TOML file whose [autoscale] table runs 'orchester autoscale' beside this orchestrator (its connect "
        "defaults to this server's first endpoint).", path="file"))
    #: carbon daemon (``HOST:PORT``) to send metrics to (``None``: no metrics)
    carbon: str | None = field(default=None, metadata=flag("Send metrics to this carbon daemon (HOST:PORT)."))
    #: metric names start with this
    metrics_prefix: str = field(default="orchester", metadata=flag("Metric names start with this."))
    #: seconds between two metric reports
    metrics_interval: float = field(default=10.0, metadata=flag("Seconds between two metric reports."))
    #: ``pickle`` (batches, the default) or ``plaintext``
    carbon_protocol: str = field(default="pickle", metadata=flag(
        "How metrics reach carbon: pickled batches, or one plaintext line per metric.",
        choices=("pickle", "plaintext")))
    #: With a journal: once queued payloads pass this many bytes, further ones are dropped from
    #: memory once durable and read back from the journal when dispatched (0: never).
    spill_bytes: int = field(default=0, metadata=flag(
        "With --journal: queued payloads beyond this many bytes wait on disk, not in memory (0: never)."))
    #: CurveZMQ: this server's secret key file (``orchester keys generate``); with
    #: ``authorized_keys``, every socket of the orchestrator requires an authorised key.
    curve_secret: str | None = field(default=None, metadata=flag(
        "CurveZMQ: this server's secret key file; needs --authorized-keys.", path="file"))
    #: CurveZMQ: directory of the authorised public keys (``NAME.key``), re-read on SIGHUP.
    authorized_keys: str | None = field(default=None, metadata=flag(
        "CurveZMQ: directory of authorised public keys (NAME.key), re-read on SIGHUP.", path="dir"))
    #: Allow binding a non-loopback address without CurveZMQ (logged as a warning).
    insecure: bool = field(default=False, metadata=flag(
        "Allow binding a non-loopback address without CurveZMQ (a warning is logged)."))
    #: Binary star: ``primary`` or ``backup`` (``None``: a single orchestrator).
    ha: str | None = field(default=None, metadata={FLAGS: (
        Flag("Binary star: run as the primary of a pair (with --state-bind and --peer).", name="--primary",
             value="primary"),
        Flag("Binary star: run as the backup of a pair.", name="--backup", value="backup"))})
    #: Binary star: this server's state endpoint (bound; the peer connects to it).
    state_bind: str | None = field(default=None, metadata=flag("Binary star: this server's state endpoint (bound)."))
    #: Binary star: the peer's state endpoint (connected).
    peer: str | None = field(default=None, metadata=flag("Binary star: the other server's state endpoint."))
    #: Binary star: ``sync`` (acknowledge once the passive has the record) or ``async``.
    replication: str = field(default="sync", metadata=flag(
        "Binary star: acknowledge a task once the passive has it (sync), or without waiting.",
        choices=("sync", "async")))
    #: Binary star: seconds between state messages; the peer expires after two without one.
    ha_heartbeat: float = field(default=1.0, metadata=flag(
        "Binary star: seconds between state messages; the peer expires after two."))

    @property
    def exposed_endpoints(self) -> list[str]:
        """The endpoints this server binds that are reachable beyond this machine."""
        from orchester.security.auth import is_loopback

        return [e for e in [*self.bind, *self.satellite_bind, *self.pub, *filter(None, (self.state_bind,))]
                if not is_loopback(e)]

    @property
    def allowed_strategies(self) -> frozenset[str]:
        """The ``module:Class`` strategies this orchestrator may load: its start strategy and ``strategies``."""
        return frozenset([self.strategy, *self.strategies])

    @property
    def silent_after(self) -> float:
        """Seconds without a word from a satellite after which it gets no new work (two heartbeats)."""
        return 2 * self.heartbeat_interval

    @property
    def lost_after(self) -> float:
        """Seconds without a word from a satellite after which it is lost and its tasks rerouted."""
        return self.heartbeat_interval * self.liveness

    @property
    def secure(self) -> bool:
        """Whether CurveZMQ is on."""
        return bool(self.curve_secret and self.authorized_keys)

    def validate(self) -> OrchestratorConfig:
        """Check every value; raise :class:`ConfigError` naming the first bad one."""
        if not self.bind:
            raise ConfigError("bind: at least one endpoint is required")
        for name in ("heartbeat_interval",):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, not {getattr(self, name)!r}")
        for name in ("retry_backoff", "queue_ttl", "dispatch_timeout", "stall_timeout", "max_run_time",
                     "probation_cooldown", "request_rate", "reserve_after"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ConfigError(f"{name} must be a number >= 0, not {value!r}")
        for name in ("liveness", "max_message", "max_queue", "retries", "result_retention",
                     "result_retention_bytes", "hwm", "batch", "probation_after", "drain_after",
                     "max_client_tasks", "max_client_bytes", "max_slots", "max_key_connections", "max_unread_bytes",
                     "max_subscriptions", "max_topic"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, not {value!r}")
        from orchester.server.routing import is_strategy_spec

        if not isinstance(self.strategies, (list, tuple)):
            raise ConfigError(f"strategies must be a list of module:Class paths, not {self.strategies!r}")
        for name in [self.strategy, *self.strategies]:
            if not is_strategy_spec(name):
                raise ConfigError(f"routing strategy {name!r} is neither built-in (least_loaded, round_robin, "
                                  "tags) nor an import path like package.module:ClassName")
        if not isinstance(self.spill_bytes, int) or self.spill_bytes < 0:
            raise ConfigError(f"spill_bytes must be an integer >= 0, not {self.spill_bytes!r}")
        if self.spill_bytes and not self.journal:
            raise ConfigError("spilling queued payloads to disk needs a journal (--journal DIR)")
        if self.carbon is not None:
            from orchester.metrics.collector import parse_carbon

            try:
                parse_carbon(self.carbon)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if self.carbon_protocol not in ("pickle", "plaintext"):
            raise ConfigError(f"carbon_protocol must be pickle or plaintext, not {self.carbon_protocol!r}")
        if not self.metrics_interval > 0:
            raise ConfigError("metrics_interval must be > 0")
        if self.durability not in ("full", "batch", "off"):
            raise ConfigError(f"durability must be full, batch or off, not {self.durability!r}")
        if self.ha is not None:
            if self.ha not in ("primary", "backup"):
                raise ConfigError(f"ha must be primary or backup, not {self.ha!r}")
            if not self.state_bind or not self.peer:
                raise ConfigError("a binary-star server needs --state-bind (its own) and --peer (the other's)")
            if self.replication not in ("sync", "async"):
                raise ConfigError(f"replication must be sync or async, not {self.replication!r}")
            if not self.ha_heartbeat > 0:
                raise ConfigError(f"ha_heartbeat must be > 0, not {self.ha_heartbeat!r}")
        for ep in [*self.bind, *self.satellite_bind, *self.pub, *filter(None, (self.state_bind,))]:
            check_endpoint(ep, bind=True)
        if self.peer:
            check_endpoint(self.peer)
        if bool(self.curve_secret) != bool(self.authorized_keys):
            raise ConfigError("CurveZMQ needs both --curve-secret (this server's secret key file) and "
                              "--authorized-keys (the directory of authorised public keys)")
        from orchester.security.auth import SecurityError, check_binds

        try:
            check_binds(self.exposed_endpoints, secure=self.secure, insecure=self.insecure)
        except SecurityError as exc:
            raise ConfigError(str(exc)) from None
        return self


#: The fields of :class:`OrchestratorConfig` that are deliberately no ``serve`` flag (nor a ``[serve]``
#: setting): embedders set them in code. Every other field is a flag (a test checks it).
NOT_FLAGS: Mapping[str, str] = {
    "result_retention_bytes": "the result store's byte bound (256 MiB); deployments size it by count, "
                              "--result-retention",
    "batch": "messages drained from one socket per wake-up: a tuning knob of the poll loop, for benchmarks",
}


#: The batch schedulers ``orchester autoscale`` drives.
SCHEDULERS = ("slurm", "pbs")
#: Most jobs one autoscaler may hold (what one ``CONTROL jobs`` report may list).
MAX_AUTOSCALE_JOBS = 4096


@dataclass
class AutoscaleConfig:
    """Settings of one autoscaler (``orchester autoscale``, a ``[autoscale]`` table, ``serve --autoscale``):
    which bus, which scheduler, how many jobs and what each runs, and when to ask and give back."""

    connect: list[str] = field(default_factory=lambda: ["tcp://127.0.0.1:5555"], metadata=flag(
        "The orchestrator the satellites join (repeatable: a binary-star pair; @FILE: an endpoint file). The "
        "nodes must reach it: give its address on the cluster's network, not 127.0.0.1."))
    satellite_connect: list[str] = field(default_factory=list, metadata=flag(
        "Where the jobs' satellites connect, if not --connect (a server's separate --satellite-bind; "
        "repeatable).", name="--satellite-connect"))
    scheduler: str = field(default="slurm", metadata=flag("The batch scheduler.", choices=SCHEDULERS))
    tag: str = field(default="default", metadata=flag(
        "The autoscaler's jobs are named orchester-TAG: it finds them again after a restart and never "
        "touches another job. One tag per autoscaler."))
    min_jobs: int = field(default=0, metadata=flag("Jobs kept even when idle."))
    max_jobs: int = field(default=4, metadata=flag("Most jobs pending or running at once."))
    satellites_per_job: int = field(default=1, metadata=flag("Nodes per job: one satellite on each."))
    workers: int = field(default=1, metadata=flag("Worker processes per satellite (tasks it runs at once)."))
    cores: int | None = field(default=None, metadata=flag(
        "Cores per satellite, asked of the scheduler and announced to the bus [default: --workers]."))
    walltime: str = field(default="01:00:00", metadata=flag("Each job's walltime, HH:MM:SS."))
    partition: str | None = field(default=None, metadata=flag("The partition (Slurm) or queue (PBS)."))
    account: str | None = field(default=None, metadata=flag("The account the jobs are charged to."))
    directives: list[str] = field(default_factory=list, metadata=flag(
        "An extra scheduler line for the jobs' scripts, e.g. '#SBATCH --mem=8G' (repeatable).",
        name="--directive"))
    tasks: list[str] = field(default_factory=list, metadata=flag(
        "A module registering task kinds, for the satellites (repeatable)."))
    satellite_options: list[str] = field(default_factory=list, metadata=flag(
        "An extra flag for every satellite, e.g. --satellite-option=--tags=gpu (repeatable).",
        name="--satellite-option"))
    python: str | None = field(default=None, metadata=flag(
        "The Python with Orchester on the nodes [default: the autoscaler's own, as on a shared file system]."))
    workdir: str | None = field(default=None, metadata=flag(
        "The folder the jobs start in and write their output to [default: the current one].", path="dir"))
    satellite_secret: str | None = field(default=None, metadata=flag(
        "The satellites' CurveZMQ secret key file, as the nodes see it (with --satellite-server-key).",
        path="file"))
    satellite_server_key: str | None = field(default=None, metadata=flag(
        "The orchestrator's public key file, as the nodes see it (with --satellite-secret).", path="file"))
    wait_bound: float = field(default=10.0, metadata=flag(
        "Seconds work may wait for a free core before jobs are asked for (none at all: at once)."))
    idle_timeout: float = field(default=300.0, metadata=flag(
        "Seconds a job's satellites may be idle before it is drained and given back."))
    start_timeout: float = field(default=600.0, metadata=flag(
        "Seconds a running job may go without a satellite of it joining before it is cancelled."))
    backoff: float = field(default=10.0, metadata=flag(
        "Seconds before trying again after the scheduler refused or failed (doubled each time in a row)."))
    backoff_max: float = field(default=600.0, metadata=flag("The longest back-off, in seconds."))
    interval: float = field(default=5.0, metadata=flag("Seconds between two looks at the bus and the scheduler."))
    timeout: float = field(default=10.0, metadata=flag("Seconds to wait for the orchestrator's answers."))

    def validate(self) -> AutoscaleConfig:
        """Check every value; raise :class:`ConfigError` naming the first bad one."""
        for name in ("connect", "satellite_connect"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(isinstance(ep, str) for ep in value):
                raise ConfigError(f"{name} must be a list of endpoints, not {value!r}")
        if not self.connect:
            raise ConfigError("connect: at least one endpoint is required")
        for ep in [*self.connect, *self.satellite_connect]:  # (an @FILE is read, and checked, when opened)
            if not (ep.startswith("@") and len(ep) > 1):
                check_endpoint(ep)
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"scheduler must be one of {list(SCHEDULERS)}, not {self.scheduler!r}")
        for name, low, high in (("min_jobs", 0, MAX_AUTOSCALE_JOBS), ("max_jobs", 1, MAX_AUTOSCALE_JOBS),
                                ("satellites_per_job", 1, 100_000), ("workers", 1, 100_000), ("cores", 1, 65_536)):
            value = getattr(self, name)
            if value is None and name == "cores":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ConfigError(f"{name} must be an integer from {low} to {high}, not {value!r}")
        if self.min_jobs > self.max_jobs:
            raise ConfigError(f"min_jobs ({self.min_jobs}) is more than max_jobs ({self.max_jobs})")
        for name in ("wait_bound", "idle_timeout", "start_timeout", "backoff", "backoff_max", "interval", "timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 10 * 366 * 86400:
                raise ConfigError(f"{name} must be a number of seconds >= 0, not {value!r}")
        for name, least in (("interval", 0.1), ("timeout", 0.1), ("start_timeout", 1.0), ("backoff", 0.1)):
            if getattr(self, name) < least:  # (a scheduler asked in a tight loop; jobs cancelled before they start)
                raise ConfigError(f"{name} must be at least {least:g} s, not {getattr(self, name)!r}")
        if self.backoff_max < self.backoff:
            raise ConfigError(f"backoff_max ({self.backoff_max!r}) is less than backoff ({self.backoff!r})")
        for name in ("tag", "walltime", "python", "partition", "account", "workdir", "satellite_secret",
                     "satellite_server_key"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value or "\n" in value or "\0" in value):
                raise ConfigError(f"{name} must be a non-empty line of text, not {value!r}")
        if self.workdir is not None and any(c.isspace() or c in "%\"'\\" for c in self.workdir):
            raise ConfigError(f"workdir {self.workdir!r}: a folder without spaces, quotes or '%' (it names the "
                              "jobs' output in a scheduler directive)")
        for name in ("directives", "tasks", "satellite_options"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v and "\n" not in v
                                                               and "\0" not in v for v in value):
                raise ConfigError(f"{name} must be a list of non-empty lines of text, not {value!r}")
        if bool(self.satellite_secret) != bool(self.satellite_server_key):
            raise ConfigError("the satellites' keys need both --satellite-secret and --satellite-server-key")
        from orchester.batch.scripts import check_satellite_job

        try:
            check_satellite_job(self)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return self


#: Transports a client or a satellite may connect over (libzmq's, for a DEALER socket).
CONNECT_TRANSPORTS = ("tcp", "ipc", "inproc", "ws", "wss", "tipc", "vmci")
#: Transports an orchestrator may bind (its sockets are ROUTER and XPUB).
BIND_TRANSPORTS = (*CONNECT_TRANSPORTS, "pgm", "epgm", "udp")


def endpoint_problem(endpoint: object, *, bind: bool = False) -> str | None:
    """What is wrong with ``endpoint`` as a ZeroMQ endpoint to connect to (``bind``: to bind), or ``None``.

    Pure syntax, no I/O: ``TRANSPORT://ADDRESS`` with a known transport; for ``tcp://``
    (and ``ws://``) an address ``HOST:PORT`` (``[::1]:PORT`` for IPv6; an optional
    ``SOURCE;`` or interface before it) whose port is 1-65535 (``*`` or 0 too when binding);
    a non-empty path or name for ``ipc://`` and ``inproc://``; no white space anywhere.
    """
    if not isinstance(endpoint, str):
        return f"a {type(endpoint).__name__}, not text"
    transport, sep, address = endpoint.partition("://")
    if not sep:
        return "no transport: write tcp://HOST:PORT, ipc://PATH or inproc://NAME"
    if transport not in (BIND_TRANSPORTS if bind else CONNECT_TRANSPORTS):
        return f"unknown transport {transport!r}"
    if not address or any(c.isspace() for c in endpoint):
        return "an empty address" if not address else "white space in it"
    if transport in ("tcp", "ws", "wss"):
        hostport = address.rpartition(";")[2]
        if transport != "tcp":
            hostport = hostport.partition("/")[0]
        host, colon, port = hostport.rpartition(":")
        if not colon:
            return "no port: a tcp endpoint is tcp://HOST:PORT"
        if not host and not bind:
            return "no host before the port"
        if bind and (port == "*" or port.startswith("!ephemeral")):
            return None
        if not port.isdigit() or not (0 if bind else 1) <= int(port) <= 65535:
            return f"port {port!r} is not a number from 1 to 65535" if not bind else \
                f"port {port!r} is not a number from 0 to 65535 or *"
    return None


def check_endpoint(endpoint: Any, *, bind: bool = False) -> str:
    """``endpoint`` if it is a usable ZeroMQ endpoint (see :func:`endpoint_problem`), else :class:`ConfigError`.

    The one check of every endpoint a user gives: ``orchester serve``'s binds, the clients'
    and satellites' ``--connect``, ``ORCHESTER_CONNECT``, :class:`~orchester.Client` and
    :class:`~orchester.AsyncClient`. The message is the same everywhere::

        endpoint 'localhost:5555' is not a ZeroMQ endpoint like tcp://127.0.0.1:5555 (no transport: ...)
    """
    problem = endpoint_problem(endpoint, bind=bind)
    if problem is not None:
        raise ConfigError(f"endpoint {endpoint!r} is not a ZeroMQ endpoint like tcp://127.0.0.1:5555 ({problem})")
    return str(endpoint)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; :class:`ConfigError` with the reason if it cannot be used."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return data


def from_mapping(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in names:
            raise ConfigError(f"{where}: unknown setting {key!r}; known: {sorted(names)}")
        kwargs[name] = value
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    validate = getattr(obj, "validate", None)
    return validate() if validate else obj
