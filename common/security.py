"""CURVE security (ironhouse: every key is known in advance).

Every role of a run has its own CURVE key pair: the coordinator, the DSO and TSO services and each
peer host. ``p2pm keys SCENARIO --out DIR`` (or the launchers and deployment generators, for their
own runs) writes

- ``DIR/roster.json``: the public roster, every role's public key by role name (and which peers
  each peer host hosts); anyone may read it;
- ``DIR/<role>/<role>.key_secret`` (mode 0600, folder 0700): the role's secret key, next to a copy
  of the roster; a role is given its own folder only (``--keys DIR/<role>``).

On the wire (:class:`common.transport.Transport` and :class:`common.shell.Shell`):

- the coordinator's ROUTER and each peer host's mesh ROUTER are CURVE servers; every other socket
  is a CURVE client that pins its server's public key from the roster (a server without the
  matching secret key cannot complete a handshake);
- a ZAP handler (:class:`ZapHandler`, a thread of the role's process) admits only the roster's
  public keys (on a mesh socket only the peer hosts') and names the connection after the key's
  role (ZeroMQ's ``User-Id`` metadata of every message); refused connections and failed handshakes
  are counted (reasons ``unauthenticated`` and ``handshake``);
- the receiving shell takes a message's sender from that ``User-Id``, never from the envelope or
  the routing identity: a message whose envelope names another sender is refused (reason
  ``sender``), as is a message type the sender's role may not send (:func:`may_send`, reason
  ``role``). Clients set no routing identity: the server names each connection, and the coordinator
  answers a role on the connection its key last authenticated, so that claiming a role's name
  reaches nothing of that role (and ``ROUTER_HANDOVER`` is off: a claimed name is never taken over).

``--insecure`` (``security: none``) turns all of this off for experiments; the in-process driver has
no sockets and is unaffected.
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from zmq.utils import z85

from common.protocol import MsgType

ROSTER_FILE = "roster.json"
ROSTER_SCHEMA = "p2pm.roster/1"
SECRET_SUFFIX = ".key_secret"
SERVICES = ("coordinator", "dso", "tso")
DOMAIN_MAIN, DOMAIN_MESH = "p2pm", "p2pm-mesh"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"


class KeysError(ValueError):
    """A key folder or roster that cannot be used (the CLI's exit 2, naming the file)."""


class Refused(Exception):
    """A message refused for who sent it (``reason``: identity, sender or role), counted like a
    :class:`common.protocol.ProtocolError`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def role_kind(role: str) -> str:
    """coordinator, dso, tso, or peer (every peer host)."""
    return role if role in SERVICES else "peer"


# What each role may send, by the socket it arrives on (main: to or from the coordinator; mesh: a
# peer host's partners). Anything else from that role is refused (reason "role").
_CONTROL = {MsgType.HELLO, MsgType.HEARTBEAT, MsgType.READY}
MAY_SEND: dict[tuple[str, str], frozenset[MsgType]] = {
    ("peer", "main"): frozenset(_CONTROL | {MsgType.UPDATE, MsgType.RESIDUALS, MsgType.RESULT, MsgType.QUANTITY_SUM,
                                            MsgType.POOL_QUANTITY}),
    ("peer", "mesh"): frozenset({MsgType.TRADES}),  # (HEARTBEATs go to the coordinator only)
    ("dso", "main"): frozenset(_CONTROL | {MsgType.GRID_REPORT, MsgType.NETWORK_RESULT}),
    ("tso", "main"): frozenset(_CONTROL | {MsgType.FREQ_REQUEST}),
    ("coordinator", "main"): frozenset({MsgType.WELCOME, MsgType.SHUTDOWN, MsgType.HEARTBEAT,
                                        MsgType.ROUND, MsgType.PENALTY, MsgType.DROP, MsgType.PRICE_PROBE, MsgType.POOL_PRICE,
                                        MsgType.DISPATCH, MsgType.NETWORK_UPDATE, MsgType.FREQ_QUERY,
                                        MsgType.RESULT}),
}


def may_send(role: str, socket: str, type_: MsgType) -> bool:
    """Whether ``role`` may send a message of ``type_`` on a ``socket`` ("main" or "mesh")."""
    return type_ in MAY_SEND.get((role_kind(role), socket), frozenset())


# ------------------------------------------------------------------------------------------ keys

@dataclass(frozen=True)
class Roster:
    """Every role's public key (Z85, 40 characters) and the peers of each peer host."""

    keys: dict[str, bytes]
    hosts: dict[str, list[str]] = field(default_factory=dict)
    scenario: str = ""

    def role_of(self) -> dict[bytes, str]:
        return {k: r for r, k in self.keys.items()}

    def dump(self) -> dict:
        return {"schema": ROSTER_SCHEMA, "scenario": self.scenario,
                "roles": {r: k.decode() for r, k in self.keys.items()}, "hosts": self.hosts}

    @classmethod
    def load(cls, path: Path) -> Roster:
        try:
            raw = json.loads(_maybe_base64(Path(path).read_bytes()))
        except OSError as exc:
            raise KeysError(f"{path}: cannot read the roster: {exc.strerror or exc}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise KeysError(f"{path}: not a roster (JSON written by 'p2pm keys')") from None
        if not isinstance(raw, dict) or raw.get("schema") != ROSTER_SCHEMA or not isinstance(raw.get("roles"), dict):
            raise KeysError(f"{path}: schema: expected a roster ({ROSTER_SCHEMA!r}, written by 'p2pm keys')")
        keys = {}
        for role, key in raw["roles"].items():
            if not isinstance(key, str) or len(key) != 40:
                raise KeysError(f"{path}: roles.{role}: a Z85 public key of 40 characters is required")
            keys[str(role)] = key.encode()
        for role in SERVICES:
            if role not in keys:
                raise KeysError(f"{path}: roles.{role}: missing")
        hosts = raw.get("hosts") or {}
        if not isinstance(hosts, dict) or any(h not in keys for h in hosts):
            raise KeysError(f"{path}: hosts: every peer host needs a key in roles")
        return cls(keys=keys, hosts={str(h): [str(p) for p in ps] for h, ps in hosts.items()},
                   scenario=str(raw.get("scenario", "")))


@dataclass(frozen=True)
class Identity:
    """A role's own key pair and the roster it trusts."""

    role: str
    public: bytes
    secret: bytes
    roster: Roster


def write_keys(out: Path, roles: list[str], hosts: dict[str, list[str]] | None = None, scenario: str = "") -> Roster:
    """Make a CURVE key pair per role in ``out``: ``out/roster.json`` (0644) and
    ``out/<role>/<role>.key_secret`` (0600) with a copy of the roster, in folders of 0700. Folders
    of roles already in ``out`` are replaced."""
    import zmq.auth

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keys = {}
    for role in roles:
        folder = out / role
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(mode=0o700)
        folder.chmod(0o700)
        old = os.umask(0o077)
        try:
            public_file, secret_file = zmq.auth.create_certificates(str(folder), role)
        finally:
            os.umask(old)
        Path(secret_file).chmod(0o600)
        Path(public_file).chmod(0o644)
        keys[role] = zmq.auth.load_certificate(public_file)[0]
    roster = Roster(keys=keys, hosts=dict(hosts or {}), scenario=scenario)
    text = json.dumps(roster.dump(), indent=1)
    for path in [out / ROSTER_FILE, *(out / r / ROSTER_FILE for r in roles)]:
        path.write_text(text)
        path.chmod(0o644)
    return roster


def _maybe_base64(raw: bytes) -> bytes:
    """A file as written, or base64-decoded (podman 4.3's ``kube play`` writes a Secret's data into
    its volume without decoding it)."""
    head = raw.lstrip()[:1]
    if head in (b"{", b"#", b"m", b"c", b""):
        return raw
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        return raw


_KEY_LINE = re.compile(rb'(public|secret)-key\s*=\s*"([^"]{40})"')


def load_identity(folder: str | Path, roster_path: str | Path | None = None) -> Identity:
    """A role's key folder (``DIR/<role>`` of ``p2pm keys``): its one ``*.key_secret`` file, which
    must not be readable by others when it is this user's, and the roster (``roster.json`` in the folder or its parent, or
    ``roster_path``). KeysError naming the file otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KeysError(f"--keys: {folder} is not a folder (give a role's folder written by 'p2pm keys')")
    secrets = sorted(folder.glob(f"*{SECRET_SUFFIX}"))
    if len(secrets) != 1:
        raise KeysError(f"--keys: {folder} holds {len(secrets)} secret keys (*{SECRET_SUFFIX}); a role's folder "
                        "holds exactly its own")
    path = secrets[0]
    role = path.name[: -len(SECRET_SUFFIX)]
    st = path.stat()
    mode = st.st_mode & 0o777
    # a key of this user's that others may read is refused (the user can fix it); a mounted Secret
    # owned by someone else is as the container engine made it (podman kube play ignores defaultMode)
    if mode & 0o007 and st.st_uid == os.geteuid():
        raise KeysError(f"--keys: {path} is readable by others (mode {mode:04o}); chmod 600 it")
    found = dict((k.decode(), v) for k, v in _KEY_LINE.findall(_maybe_base64(path.read_bytes())))
    if set(found) != {"public", "secret"}:
        raise KeysError(f"--keys: {path}: not a CURVE secret key file (public-key and secret-key lines)")
    if roster_path is None:
        candidates = [folder / ROSTER_FILE, folder.parent / ROSTER_FILE]
        roster_path = next((c for c in candidates if c.exists()), candidates[0])
    roster = Roster.load(Path(roster_path))
    if roster.keys.get(role) != found["public"]:
        raise KeysError(f"--keys: {path}: the roster {roster_path} has no role {role!r} with this key")
    return Identity(role=role, public=found["public"], secret=found["secret"], roster=roster)


# ------------------------------------------------------------------------------------------- ZAP

class ZapHandler:
    """The ZAP handler of a role's process (a thread answering ``inproc://zeromq.zap.01`` in the
    role's context): admits a CURVE client whose public key is in the roster (a mesh socket: a peer
    host's key only) and names the connection after its role (``User-Id``). It also watches the
    CURVE servers' handshake events. Counts, by reason: ``unauthenticated`` (a key not admitted)
    and ``handshake`` (a failed handshake: no CURVE, a wrong server key, garbage or a replay)."""

    def __init__(self, context: zmq.Context, roster: Roster, refused: collections.Counter | None = None):
        self.ctx = zmq.Context.shadow(context.underlying)
        self.by_key = roster.role_of()
        # the transport's rejection counter (this thread writes only its own two reasons)
        self.refused: collections.Counter[str] = refused if refused is not None else collections.Counter()
        self.refused_keys: collections.Counter[str] = collections.Counter()  # which strangers (Z85)
        self.admitted = 0
        self._monitors: list[str] = []
        self._pending_monitors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = self.ctx.socket(zmq.REP)
        self._sock.linger = 0
        self._sock.bind(ZAP_ENDPOINT)  # before any CURVE server binds: a connection never finds no handler
        self._thread = threading.Thread(target=self._serve, name="zap", daemon=True)
        self._thread.start()

    def watch(self, sock: zmq.Socket) -> None:
        """Count the failed handshakes of a CURVE server socket (a ZeroMQ socket monitor)."""
        addr = f"inproc://p2pm-monitor-{id(sock)}"
        events = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        zmq.Socket.shadow(sock.underlying).monitor(addr, events)
        with self._lock:
            self._pending_monitors.append(addr)

    def _serve(self) -> None:
        from zmq.utils.monitor import parse_monitor_message

        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        monitors: list[zmq.Socket] = []
        try:
            while not self._stop.is_set():
                with self._lock:
                    pending, self._pending_monitors = self._pending_monitors, []
                for addr in pending:
                    m = self.ctx.socket(zmq.PAIR)
                    m.linger = 0
                    m.connect(addr)
                    poller.register(m, zmq.POLLIN)
                    monitors.append(m)
                ready = dict(poller.poll(50))
                if self._sock in ready:
                    frames = self._sock.recv_multipart()
                    try:
                        reply = self._answer(frames)
                    except Exception:  # noqa: BLE001 - a request this handler cannot read is refused
                        self.refused["unauthenticated"] += 1
                        reply = [*frames[:2], b"500", b"unreadable ZAP request", b"", b""]
                    self._sock.send_multipart(reply)
                for m in monitors:
                    if m in ready:
                        ev = parse_monitor_message(m.recv_multipart())
                        if ev["event"] in (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                            self.refused["handshake"] += 1
        except zmq.ContextTerminated:
            pass
        finally:
            for m in monitors:
                m.close(linger=0)
            self._sock.close(linger=0)

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        # ZAP request (RFC 27): version, request id, domain, address, identity, mechanism, credentials...
        if len(frames) < 6:
            raise ValueError("a ZAP request of fewer than 6 frames")
        version, request_id, domain, mechanism = frames[0], frames[1], frames[2].decode(errors="replace"), frames[5]
        role = None
        if mechanism == b"CURVE" and len(frames) >= 7:
            role = self.by_key.get(z85.encode(frames[6]))
            if role is not None and domain == DOMAIN_MESH and role_kind(role) != "peer":
                role = None  # only peer hosts trade on a mesh socket
        if role is None:
            self.refused["unauthenticated"] += 1
            if mechanism == b"CURVE" and len(frames) >= 7:
                self.refused_keys[z85.encode(frames[6]).decode()] += 1
            return [version, request_id, b"400", b"not in the roster", b"", b""]
        self.admitted += 1
        return [version, request_id, b"200", b"OK", role.encode(), b""]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def configure_server(sock: zmq.Socket, me: Identity, domain: str) -> None:
    """A CURVE server socket (set before it binds): the role's secret key, the ZAP domain, ZAP
    enforced (no handler: no connection), no handover of identities."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, me.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, me.public)
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    if sock.socket_type == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_HANDOVER, 0)


def configure_client(sock: zmq.Socket, me: Identity, server_role: str) -> None:
    """A CURVE client socket (set before it connects) that only talks to ``server_role``'s key."""
    server = me.roster.keys.get(server_role)
    if server is None:
        raise KeysError(f"the roster has no key for {server_role!r}")
    sock.setsockopt(zmq.CURVE_SERVERKEY, server)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, me.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, me.secret)
