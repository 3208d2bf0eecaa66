"""The one transport layer every socket and every message goes through.

:class:`Transport` owns a ``zmq.Context``, makes ROUTER/DEALER sockets with safe defaults, and sends
and receives :class:`~common.protocol.Envelope` objects through :mod:`common.codec`:

- ``LINGER 0`` (closing never blocks), ``MAXMSGSIZE = max_bytes`` (a peer sending more is
  disconnected by ZeroMQ), ``SNDTIMEO`` (a send never blocks forever), TCP keepalive;
- ZeroMQ heartbeats (``HEARTBEAT_IVL`` = ``heartbeat_s``, ``HEARTBEAT_TIMEOUT`` and ``HEARTBEAT_TTL``
  = ``liveness_misses`` intervals): a connection whose other end stops answering (a stopped or
  vanished process, a dead link) is closed, so that sends to it fail instead of queueing;
- routers: ``ROUTER_MANDATORY`` (sending to an unknown identity raises :class:`Unreachable` instead
  of vanishing) and ``ROUTER_HANDOVER`` (a peer that restarts with the same identity takes over;
  off with CURVE, where no client names its connection);
- dealers: a fixed routing identity (with CURVE none: the server names the connection, and knows
  the role from its key); ``IMMEDIATE`` (no queueing towards a connection that does not exist) on
  send-only dealers. A dealer that also receives (a role's connection to its coordinator) is made
  without it: with ``IMMEDIATE`` ZeroMQ discards the messages received but not yet read when the
  connection ends, and a coordinator's last message (its SHUTDOWN, sent just before it closes)
  was lost in about one run in four.

Receiving never raises on a bad message: it is counted in :attr:`Transport.rejected` by reason
(see ``common.protocol.REASONS``) and the wait goes on until the deadline, which ends in
:class:`TimeoutError`. Good messages and bytes are counted per (iteration, type) in
:attr:`Transport.sent` and :attr:`Transport.received` (:class:`TrafficCounter`); the bytes are the
encoded envelope's size (ZeroMQ framing and routing-identity frames are not counted).

Fault injection and security go here and nowhere else: the constructor's ``latency_s`` (a delay
before every send) and ``drop_prob`` (a probability of silently dropping a send, counted in
:attr:`Transport.dropped`) are the first hooks; duplication and garbage belong in
:meth:`Transport._configure` and :meth:`Transport.send` as well. CURVE (``curve``: the role's
:class:`common.security.Identity`): routers are CURVE servers behind the process's ZAP handler
(:class:`common.security.ZapHandler`, started with the first router; its refusals are counted in
:attr:`Transport.rejected`), dealers CURVE clients pinning their server's key from the roster.
Latency with jitter and bandwidth per link, the same model as the in-process driver's clock, is
:mod:`common.network`; the socket shell applies it to every send.
"""

from __future__ import annotations

import collections
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence

import zmq

from common.codec import decode, encode
from common.protocol import MAX_MESSAGE_BYTES, Envelope, ProtocolError
from common.security import DOMAIN_MAIN, Refused, ZapHandler, configure_client, configure_server

__all__ = ["TrafficCounter", "Transport", "Unreachable", "bind_random_port"]

ZMQ_SIZE_FACTOR = 4

Check = Callable[[Envelope], None]
"""A receive-side check: raises ProtocolError (e.g. via ``codec.check_iteration``) to drop a message."""


class Unreachable(ConnectionError):
    """A ROUTER send to an identity that is not connected (ROUTER_MANDATORY)."""


class TrafficCounter:
    """Messages and bytes per (iteration, type)."""

    def __init__(self) -> None:
        self._counts: collections.Counter[tuple[int, str]] = collections.Counter()
        self._bytes: collections.Counter[tuple[int, str]] = collections.Counter()

    def add(self, iteration: int, type: str, nbytes: int, count: int = 1) -> None:
        key = (int(iteration), str(type))
        self._counts[key] += count
        self._bytes[key] += nbytes

    def rows(self) -> list[tuple[int, str, int, int]]:
        """``(iteration, type, count, bytes)`` sorted by iteration then type (``messages.csv``)."""
        return [(it, t, self._counts[(it, t)], self._bytes[(it, t)]) for it, t in sorted(self._counts)]

    @property
    def messages(self) -> int:
        return sum(self._counts.values())

    @property
    def bytes(self) -> int:
        return sum(self._bytes.values())

    def merge(self, other: TrafficCounter) -> TrafficCounter:
        """A new counter holding the sums of both."""
        out = TrafficCounter()
        for src in (self, other):
            for it, t, n, b in src.rows():
                out.add(it, t, b, n)
        return out

    def clear(self) -> None:
        self._counts.clear()
        self._bytes.clear()


def bind_random_port(sock: zmq.Socket, host: str = "127.0.0.1") -> str:
    """Bind ``sock`` to a free TCP port on ``host``; returns the address, e.g. ``tcp://127.0.0.1:41234``."""
    port = sock.bind_to_random_port(f"tcp://{host}")
    return f"tcp://{host}:{port}"


class Transport:
    """Sockets with safe defaults and a validated, counted send/recv pair.

    Parameters
    ----------
    run_id:
        If given, received messages of another run are rejected (reason "run").
    max_bytes:
        Message size limit (codec and ZMQ ``MAXMSGSIZE``).
    send_timeout_s:
        Longest a send may block (no connection yet, high-water mark reached) before TimeoutError.
    keepalive_idle_s:
        TCP keepalive idle time; None disables TCP keepalive.
    heartbeat_s, liveness_misses:
        ZeroMQ heartbeat interval (None: none) and the intervals without an answer after which a
        connection is closed.
    latency_s, drop_prob, seed:
        Fault injection (zero by default): sleep ``latency_s`` before each send; drop a send with
        probability ``drop_prob`` (random generator seeded by ``seed``).
    context:
        The ZeroMQ context to make sockets in (default: a new one); the socket shell passes a
        ``zmq.asyncio.Context`` and does its own asynchronous sends and receives with them.
    """

    def __init__(
        self,
        *,
        run_id: str | None = None,
        max_bytes: int = MAX_MESSAGE_BYTES,
        send_timeout_s: float = 10.0,
        keepalive_idle_s: float | None = 30.0,
        latency_s: float = 0.0,
        drop_prob: float = 0.0,
        seed: int | None = None,
        validate_outgoing: bool = True,
        context: zmq.Context | None = None,
        curve=None,
        heartbeat_s: float | None = 1.0,
        liveness_misses: int = 5,
    ) -> None:
        if latency_s < 0 or not 0.0 <= drop_prob <= 1.0 or send_timeout_s <= 0:
            raise ValueError("latency_s >= 0, 0 <= drop_prob <= 1 and send_timeout_s > 0 are required")
        self.run_id = run_id
        self._pollers: dict[tuple[int, ...], zmq.Poller] = {}
        self.validate_outgoing = validate_outgoing  # False on the hot ADMM path: receivers validate
        self.max_bytes = int(max_bytes)
        self.send_timeout_s = float(send_timeout_s)
        self.keepalive_idle_s = keepalive_idle_s
        self.heartbeat_s = heartbeat_s
        self.liveness_misses = int(liveness_misses)
        self.latency_s = float(latency_s)
        self.drop_prob = float(drop_prob)
        self._rng = random.Random(seed)
        self.ctx = context if context is not None else zmq.Context()  # a zmq.asyncio.Context for the shell
        self.sent = TrafficCounter()
        self.received = TrafficCounter()
        self.rejected: collections.Counter[str] = collections.Counter()
        self.rejected_bytes: collections.Counter[str] = collections.Counter()
        self.dropped: collections.Counter[str] = collections.Counter()
        self.last_rejection: ProtocolError | None = None
        self._sockets: dict[zmq.Socket, str] = {}
        self._closed = False
        self.curve = curve  # common.security.Identity, or None: no CURVE
        self.zap = None

    # -------------------------------------------------------------------------------- sockets

    def _configure(self, sock: zmq.Socket) -> None:
        """Options every socket gets (CURVE keys will be set here)."""
        sock.setsockopt(zmq.LINGER, 0)
        # The codec rejects and counts anything over max_bytes; ZeroMQ's own cap (which drops the
        # connection without telling anyone) only guards memory against far larger frames.
        sock.setsockopt(zmq.MAXMSGSIZE, ZMQ_SIZE_FACTOR * self.max_bytes)
        sock.setsockopt(zmq.SNDTIMEO, max(1, int(self.send_timeout_s * 1000)))
        if self.keepalive_idle_s is not None:
            sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
            sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, max(1, int(self.keepalive_idle_s)))
            sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, max(1, int(self.keepalive_idle_s) // 3))
            sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 3)
        if self.heartbeat_s:
            ivl_ms = max(1, int(1000 * self.heartbeat_s))
            sock.setsockopt(zmq.HEARTBEAT_IVL, ivl_ms)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, ivl_ms * self.liveness_misses)
            sock.setsockopt(zmq.HEARTBEAT_TTL, ivl_ms * self.liveness_misses)

    def router(self, bind_addr: str | None = None, *, domain: str = DOMAIN_MAIN) -> zmq.Socket:
        """A ROUTER socket, bound to ``bind_addr`` if given (else bind it with :func:`bind_random_port`).
        With CURVE: a CURVE server of ZAP ``domain`` (``p2pm``: every role of the roster;
        ``p2pm-mesh``: peer hosts only) and no handover of identities."""
        sock = self.ctx.socket(zmq.ROUTER)
        self._configure(sock)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if self.curve is not None:
            if self.zap is None:
                self.zap = ZapHandler(self.ctx, self.curve.roster, self.rejected)
            configure_server(sock, self.curve, domain)
            self.zap.watch(sock)
        self._sockets[sock] = "router"
        if bind_addr is not None:
            try:
                sock.bind(bind_addr)
            except zmq.ZMQError as exc:
                self.close_socket(sock)
                raise OSError(f"cannot bind {bind_addr}: {exc}") from exc
            self._sockets[sock] = f"router {bind_addr}"
        return sock

    def dealer(self, connect_addr: str | None, identity: str | bytes, *, server: str = "coordinator",
               immediate: bool = True) -> zmq.Socket:
        """A DEALER socket with routing ``identity``, connected to ``connect_addr`` if given; with
        CURVE a client of ``server``'s key (a role of the roster). ``immediate``: ZeroMQ's
        ``IMMEDIATE`` (a send fails rather than queue while not connected; for send-only dealers:
        it also drops what was received and not yet read when the connection ends)."""
        ident = identity.encode() if isinstance(identity, str) else bytes(identity)
        if not ident or len(ident) > 255 or ident[0] == 0:
            raise ValueError("a dealer identity is 1-255 bytes and does not start with a zero byte")
        sock = self.ctx.socket(zmq.DEALER)
        self._configure(sock)
        if immediate:
            sock.setsockopt(zmq.IMMEDIATE, 1)
        if self.curve is not None:  # the server names the connection; the role is the key's
            configure_client(sock, self.curve, server)
        else:
            sock.setsockopt(zmq.ROUTING_ID, ident)
        self._sockets[sock] = f"dealer {ident.decode(errors='replace')}"
        if connect_addr is not None:
            sock.connect(connect_addr)
            self._sockets[sock] = f"dealer {ident.decode(errors='replace')} -> {connect_addr}"
        return sock

    def label(self, sock: zmq.Socket) -> str:
        """What a socket is, for error messages."""
        label = self._sockets.get(sock, f"socket {sock!r}")
        if label == "router" and not sock.closed:  # bound later, e.g. by bind_random_port
            endpoint = sock.getsockopt(zmq.LAST_ENDPOINT)
            if endpoint:
                label = f"router {endpoint.decode(errors='replace')}"
        return label

    def _poller(self, socks: Sequence[zmq.Socket]) -> zmq.Poller:
        """One poller per set of sockets, kept: every receive on the ADMM path reuses it."""
        key = tuple(id(s) for s in socks)
        poller = self._pollers.get(key)
        if poller is None:
            poller = zmq.Poller()
            for sock in socks:
                poller.register(sock, zmq.POLLIN)
            self._pollers[key] = poller
        return poller

    def close_socket(self, sock: zmq.Socket) -> None:
        self._sockets.pop(sock, None)
        self._pollers = {k: v for k, v in self._pollers.items() if id(sock) not in k}
        sock.close(linger=0)

    def close(self, linger_ms: int = 0) -> None:
        """Close every socket this transport made and terminate its context; ``linger_ms``: how
        long messages still queued (a coordinator's SHUTDOWNs) may take to leave."""
        if self._closed:
            return
        self._closed = True
        for sock in list(self._sockets):
            sock.close(linger=linger_ms)
        self._sockets.clear()
        self._pollers.clear()
        if self.zap is not None:
            self.zap.stop()
        self.ctx.term()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ messages

    def send(self, sock: zmq.Socket, env: Envelope, to: bytes | str | None = None) -> int:
        """Encode and send ``env``; ``to`` is the routing identity on a ROUTER (None on a DEALER).

        Returns the encoded size in bytes (0 when fault injection dropped the message). Raises
        ProtocolError for an invalid envelope, :class:`Unreachable` for an unknown ``to``,
        TimeoutError when the send blocks longer than ``send_timeout_s``.
        """
        data = encode(env, max_bytes=self.max_bytes, validate=self.validate_outgoing)
        is_router = sock.socket_type == zmq.ROUTER
        if is_router and to is None:
            raise ValueError(f"{self.label(sock)}: a ROUTER send needs the receiver's identity (to=...)")
        if not is_router and to is not None:
            raise ValueError(f"{self.label(sock)}: only a ROUTER send takes to=...")
        if self.latency_s > 0:
            time.sleep(self.latency_s)
        if self.drop_prob > 0 and self._rng.random() < self.drop_prob:
            self.dropped[env.type.value] += 1
            return 0
        try:
            if is_router:
                assert to is not None
                ident = to.encode() if isinstance(to, str) else bytes(to)
                sock.send_multipart([ident, data], copy=False)
            else:
                sock.send(data, copy=False)
        except zmq.Again:
            raise TimeoutError(
                f"{self.label(sock)}: could not send {env.type.value} within {self.send_timeout_s:g} s"
                + (f" to {to!r}" if to is not None else " (no connected receiver?)")
            ) from None
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                raise Unreachable(f"{self.label(sock)}: {to!r} is not connected") from None
            raise
        self.sent.add(env.iteration, env.type.value, len(data))
        return len(data)

    def recv(
        self,
        sock: zmq.Socket,
        timeout_s: float,
        *,
        check: Check | None = None,
        waiting_for: str | None = None,
    ) -> tuple[bytes | None, Envelope]:
        """The next valid message on ``sock``: ``(sender identity or None on a DEALER, envelope)``.

        Invalid messages (and those ``check`` rejects with a ProtocolError) are counted in
        :attr:`rejected` and skipped. TimeoutError after ``timeout_s`` without a valid message.
        ``waiting_for`` names what is awaited in that error (e.g. "UPDATE from peer host h2").
        """
        _, ident, env = self.recv_any([sock], timeout_s, check=check, waiting_for=waiting_for)
        return ident, env

    def recv_any(
        self,
        socks: Sequence[zmq.Socket],
        timeout_s: float,
        *,
        check: Check | None = None,
        waiting_for: str | None = None,
    ) -> tuple[zmq.Socket, bytes | None, Envelope]:
        """Like :meth:`recv` on several sockets: ``(socket, identity or None, envelope)``."""
        poller = self._poller(socks)
        deadline = time.monotonic() + max(0.0, float(timeout_s))
        rejected_before = sum(self.rejected.values())
        while True:
            remaining_ms = max(0, math.ceil((deadline - time.monotonic()) * 1000))
            ready = dict(poller.poll(remaining_ms))
            for sock in socks:
                if sock in ready:
                    result = self._recv_one(sock, check)
                    if result is not None:
                        return (sock, *result)
            if time.monotonic() >= deadline:
                n_rej = sum(self.rejected.values()) - rejected_before
                what = waiting_for or "a message"
                raise TimeoutError(
                    f"no valid message ({what}) on {', '.join(self.label(s) for s in socks)} "
                    f"within {timeout_s:g} s" + (f"; {n_rej} rejected meanwhile" if n_rej else "")
                )

    def drain(self, sock: zmq.Socket, *, check: Check | None = None) -> list[tuple[bytes | None, Envelope]]:
        """Every valid message already waiting on ``sock`` (never blocks)."""
        out = []
        while sock.poll(0, zmq.POLLIN):
            result = self._recv_one(sock, check)
            if result is not None:
                out.append(result)
        return out

    def _reject(self, reason: str, nbytes: int, error: ProtocolError | None = None) -> None:
        self.rejected[reason] += 1
        self.rejected_bytes[reason] += nbytes
        self.last_rejection = error

    @staticmethod
    def authenticated(frames: list[zmq.Frame]) -> str:
        """The role that sent a message received on a CURVE server socket (``copy=False`` frames):
        the ``User-Id`` the ZAP handler gave its connection, whatever routing identity the
        connection claims (:class:`common.security.Refused` ``identity`` without one)."""
        user = frames[-1].get("User-Id")
        if not user:
            raise Refused("identity", "a connection without an authenticated role")
        return user

    def _recv_one(self, sock: zmq.Socket, check: Check | None) -> tuple[bytes | None, Envelope] | None:
        is_router = sock.socket_type == zmq.ROUTER
        secure = self.curve is not None and is_router
        try:
            raw = sock.recv_multipart(zmq.NOBLOCK, copy=not secure)
        except zmq.Again:
            return None
        frames = [f.bytes for f in raw] if secure else raw
        ident: bytes | None = frames[0] if is_router else None
        payload = frames[1:] if is_router else frames
        nbytes = sum(len(f) for f in payload)
        if len(payload) != 1:
            self._reject("malformed", nbytes, ProtocolError("malformed", f"{len(payload)} payload frames"))
            return None
        try:
            if secure:
                ident = self.authenticated(raw).encode()
            env = decode(payload[0], expect_run=self.run_id, max_bytes=self.max_bytes)
            if check is not None:
                check(env)
        except ProtocolError as exc:
            self._reject(exc.reason, nbytes, exc)
            return None
        except Refused as exc:
            self._reject(exc.reason, nbytes, None)
            return None
        self.received.add(env.iteration, env.type.value, nbytes)
        return ident, env

    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def traffic_rows(self) -> list[tuple[int, str, int, int]]:
        """Sent and received together, ``(iteration, type, count, bytes)`` rows."""
        return self.sent.merge(self.received).rows()

    def sockets(self) -> Iterable[zmq.Socket]:
        return list(self._sockets)
