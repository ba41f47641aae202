"""Who may do what: roles, identities and the bind checks (pure policy: no I/O, no ZeroMQ).

The orchestrator's core asks :func:`allowed` whether the key a message came with may give that
command; ``orchester serve`` asks :func:`check_binds` whether its endpoints may be bound without
keys. :mod:`orchester.security.auth` holds the I/O half: key ring, ZAP handler, socket setup.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from orchester.errors import OrchesterError

#: The roles a key may hold: ``satellite`` registers and runs tasks; ``submit`` submits,
#: fetches, watches and cancels its own tasks; ``admin`` switches routing, drains satellites
#: and cancels anyone's tasks; ``pickle`` may submit pickle-coded tasks (which run code on the
#: satellites) to an orchestrator started with ``--allow-pickle``. No role implies another.
ROLES = ("satellite", "submit", "admin", "pickle")
#: Roles of a key file whose metadata names none (a key made by another tool, or by hand).
DEFAULT_ROLES = ("submit",)


class SecurityError(OrchesterError, ValueError):
    """A key file is unreadable or malformed, or a configuration would expose the bus."""


@dataclass(frozen=True)
class Identity:
    """Who an authorised key belongs to: its file name (without ``.key``), its roles and the task
    kinds a satellite with it may offer (``None``: any)."""

    name: str
    roles: frozenset[str] = field(default_factory=frozenset)
    kinds: frozenset[str] | None = None


# -- policy (no I/O) -------------------------------------------------------------------------


def allowed(identity: Identity | None, role: str, secure: bool) -> bool:
    """May ``identity`` act as ``role``? Without security everyone may; with it, only holders.

    ``identity`` is None for a peer without an authorised key (or a revoked one).
    Raises ValueError for a role not in :data:`ROLES`, so a typo cannot open a door.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    if not secure:
        return True
    return identity is not None and role in identity.roles


def is_loopback(endpoint: str) -> bool:
    """Is ``endpoint`` reachable from this machine only?

    ``ipc://`` and ``inproc://`` are; ``tcp://`` is when its host is ``localhost``, an address
    in 127.0.0.0/8 or ``[::1]``. Wildcards (``*``, ``0.0.0.0``, ``[::]``), other addresses,
    host and interface names (even ``lo``: no lookups are made) and other transports are not.
    """
    transport, sep, address = endpoint.partition("://")
    if sep and transport.lower() in ("ipc", "inproc"):
        return True
    if not sep or transport.lower() != "tcp" or ";" in address:
        return False
    if address.startswith("["):
        host = address[1:address.find("]")] if "]" in address else ""
    else:
        host = address.rpartition(":")[0] if ":" in address else address
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def check_binds(endpoints: Iterable[str], secure: bool, insecure: bool) -> list[str]:
    """The endpoints that are not loopback; :class:`SecurityError` if there are some and
    neither ``secure`` (a server key) nor ``insecure`` (the user accepts the risk) is set."""
    exposed = [e for e in endpoints if not is_loopback(e)]
    if exposed and not secure and not insecure:
        raise SecurityError(
            f"refusing to bind {', '.join(exposed)} without authentication: anyone who can reach it "
            "could submit tasks or pose as a satellite. Pass --curve-secret FILE and --authorized-keys DIR, "
            "bind to 127.0.0.1, or pass --insecure to accept the risk")
    return exposed
