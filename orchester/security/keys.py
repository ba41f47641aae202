"""CurveZMQ key files: generate a key pair, read one back (pyzmq's certificate format).

``orchester keys generate NAME --dir DIR --role ROLE`` writes ``DIR/NAME.key`` (the public
key, with its roles as metadata: give it to the orchestrator's operator) and
``DIR/NAME.key_secret`` (keep it: mode 0600).
"""

from __future__ import annotations

import logging
import os
import re
import struct
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from orchester.security.roles import DEFAULT_ROLES, ROLES, SecurityError

log = logging.getLogger("orchester.security")

#: The ZAP domain :func:`secure_server` sets and :class:`CurveAuthenticator` answers for.
ZAP_DOMAIN = "orchester"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def parse_roles(roles: str | Iterable[str]) -> frozenset[str]:
    """Roles from a comma-separated string or an iterable; ValueError on an unknown one."""
    items = roles.split(",") if isinstance(roles, str) else list(roles)
    found = frozenset(r.strip() for r in items if r.strip())
    unknown = sorted(found - set(ROLES))
    if unknown:
        raise ValueError(f"unknown role(s) {', '.join(map(repr, unknown))}; roles are {', '.join(ROLES)}")
    return found


def parse_kinds(kinds: str | Iterable[str]) -> frozenset[str]:
    """Task kinds from a comma-separated string or an iterable; ValueError on a malformed one."""
    items = kinds.split(",") if isinstance(kinds, str) else list(kinds)
    found = frozenset(k.strip() for k in items if k.strip())
    bad = sorted(k for k in found if len(k) > 256 or not k.isprintable() or " " in k)
    if bad:
        raise ValueError(f"malformed task kind(s) {', '.join(map(repr, bad))}")
    return found


def check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"key name {name!r} must be a simple file name: 1-64 letters, digits, '.', '_' "
                         "or '-', starting with a letter or digit")


# -- key files -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cert:
    public: bytes
    secret: bytes | None
    metadata: Mapping[str, str]


def read_cert(path: str | os.PathLike[str]) -> _Cert:
    """Parse a ZPL certificate (czmq's and pyzmq's format): a ``metadata`` and a ``curve`` section."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SecurityError(f"cannot read key file {path}: {e}") from e
    section = ""
    values: dict[str, dict[str, str]] = {"metadata": {}, "curve": {}}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if raw[0] not in " \t":
            section = line
        elif section in values and "=" in line:
            key, _, value = line.partition("=")
            values[section][key.strip()] = value.strip().strip("'\"")
    public, secret = values["curve"].get("public-key"), values["curve"].get("secret-key")
    if not public:
        raise SecurityError(f"{path} is not a CURVE key file: no public-key")
    return _Cert(_z85_key(public, path, "public"), _z85_key(secret, path, "secret") if secret else None,
                 values["metadata"])


def _z85_key(text: str, path: str | os.PathLike[str], label: str) -> bytes:
    """``text`` as a Z85 key (40 characters decoding to 32 bytes); SecurityError otherwise."""
    key = text.encode("ascii", "replace")
    try:
        valid = len(key) == 40 and len(z85.decode(key)) == 32
    except (ValueError, KeyError, struct.error):
        valid = False
    if not valid:
        raise SecurityError(f"{path}: the {label} key is not 40 characters of Z85")
    return key


def load_public(path: str | os.PathLike[str]) -> bytes:
    """The Z85 public key in a key file (a public ``.key`` or a ``.key_secret`` file)."""
    return read_cert(path).public


def load_keypair(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """The Z85 ``(public, secret)`` keys in a ``NAME.key_secret`` file (warns if others may read it).

    :class:`SecurityError` if it is unreadable, has no secret key or its two keys do not match.
    """
    cert = read_cert(path)
    if cert.secret is None:
        raise SecurityError(f"{path} holds no secret key (is it the public .key file? pass NAME.key_secret)")
    if zmq.curve_public(cert.secret) != cert.public:
        raise SecurityError(f"{path}: its public key does not belong to its secret key")
    mode = os.stat(path).st_mode
    if mode & 0o077:
        log.warning("secret key file %s is readable by other users (mode %o): chmod 600 it", path, mode & 0o777)
    return cert.public, cert.secret


def generate_keys(name: str, directory: str | os.PathLike[str], roles: str | Iterable[str] = DEFAULT_ROLES,
                  *, force: bool = False, kinds: str | Iterable[str] = (), server: bool = False) -> tuple[Path, Path]:
    """Write a new key pair as ``DIRECTORY/NAME.key`` and ``DIRECTORY/NAME.key_secret``.

    Both files are pyzmq certificates (:func:`zmq.auth.load_certificate` reads them) whose
    metadata holds ``roles = submit,admin``; unlike :func:`zmq.auth.create_certificates`
    alone, the *public* file carries the roles too, because that is the file the orchestrator
    reads from its authorised keys directory. The secret file is mode 0600 from the start; the
    directory is created (mode 0700) if missing. Raises ValueError for an unknown or empty
    role list or a name that is not a simple file name, FileExistsError when either file exists
    and ``force`` is false. Returns ``(public path, secret path)``.

    ``kinds``: the task kinds a satellite with this key may offer (metadata ``kinds = a,b``;
    empty: any kind). ``server``: the orchestrator's own key pair, which holds no role (its public
    key goes to clients and satellites, never into the authorised keys).
    """
    check_name(name)
    kind_set = sorted(parse_kinds(kinds))
    role_set = frozenset() if server else parse_roles(roles)
    if not role_set and not server:
        raise ValueError(f"a key needs at least one role; roles are {', '.join(ROLES)}")
    ordered = ",".join(r for r in ROLES if r in role_set)
    target = Path(directory)
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    public, secret = target / f"{name}.key", target / f"{name}.key_secret"
    existing = [str(p) for p in (public, secret) if p.exists() or p.is_symlink()]
    if existing and not force:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (pass force=True / --force)")
    # Written in a private (0700) directory next to the targets, then moved into place: a
    # reader never sees a half-written file, nobody else ever sees the secret.
    with tempfile.TemporaryDirectory(dir=target, prefix=".orchester-keys-") as tmp:
        metadata = {"roles": ordered, **({"kinds": ",".join(kind_set)} if kind_set else {})}
        tmp_public, tmp_secret = map(Path, zmq.auth.create_certificates(tmp, name, metadata=metadata))
        text = tmp_public.read_text(encoding="utf-8")
        for key, value in metadata.items():
            if f"{key} = {value}" not in text:  # pyzmq writes metadata into the secret file only
                text = text.replace("metadata\n", f"metadata\n    {key} = {value}\n", 1)
        tmp_public.write_text(text, encoding="utf-8")
        os.chmod(tmp_secret, 0o600)
        os.chmod(tmp_public, 0o644)
        os.replace(tmp_secret, secret)
        os.replace(tmp_public, public)
    return public, secret


def client_curve(curve_secret: str | os.PathLike[str] | None = None,
                 server_key: str | os.PathLike[str] | None = None) -> tuple[bytes, bytes, bytes] | None:
    """The keys a client or satellite connects with: ``(public, secret, server public)``.

    From the arguments, else from ``ORCHESTER_CURVE_SECRET`` and ``ORCHESTER_SERVER_KEY``;
    ``None`` when neither is set (no CurveZMQ); :class:`SecurityError` when only one is.
    """
    curve_secret = curve_secret or os.environ.get("ORCHESTER_CURVE_SECRET") or None
    server_key = server_key or os.environ.get("ORCHESTER_SERVER_KEY") or None
    if curve_secret is None and server_key is None:
        return None
    if curve_secret is None or server_key is None:
        raise SecurityError("CurveZMQ needs both a secret key file (--curve-secret, ORCHESTER_CURVE_SECRET) "
                            "and the server's public key file (--server-key, ORCHESTER_SERVER_KEY)")
    public, secret = load_keypair(os.path.expanduser(os.fspath(curve_secret)))
    return public, secret, load_public(os.path.expanduser(os.fspath(server_key)))
