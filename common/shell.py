"""The socket shell: runs one role engine in its own OS process over ZeroMQ (``zmq.asyncio``).

It turns valid messages into ``Received`` events (anything the codec refuses is counted, never
delivered), a silence longer than ``timeout_s`` into a ``Deadline``, ``Send`` instructions into
socket sends, ``Note`` into JSON progress lines on stdout and ``Log`` into the role's log. One shell
serves every role:

- the coordinator binds a ROUTER; every other role connects a DEALER whose identity is its name;
- a peer host in the mesh topology also binds a ROUTER for its partners' TRADES and connects one
  DEALER per partner host, at the addresses the coordinator's WELCOME gives.

An exception inside a peer's or service's engine is logged with its traceback and counted; the
process lives on. The coordinator's engine failing is the run failing.

Who sent a message: with CURVE (``curve``, :mod:`common.security`) the role the ZAP handler
authenticated from the connection's key (``User-Id``), never the routing identity or the envelope;
without, the routing identity. Either way a message is refused (and counted) when its envelope
names another sender, when its type is not one its sender's role may send on that socket
(:func:`common.security.may_send`), and a HELLO when it registers another role (or, with a roster
that says which peers a host hosts, other peers).

Liveness: every socket has ZeroMQ heartbeats (``common.transport``); on top of them, every
``heartbeat_s`` the shell gives the engine a ``Tick`` and a non-coordinator role sends the
coordinator a HEARTBEAT (with its counts of refused messages) when it has sent nothing else for an
interval, also while its engine computes (a small thread sends it then, on the socket the busy
loop is not using). Once welcomed, a role whose coordinator has been silent for ``liveness_misses``
intervals stops ("lost the coordinator"); the coordinator's engine decides about the others. A send
that cannot leave (no route, send timeout) becomes a ``PeerLost`` for the coordinator's engine, and a
mesh TRADES that cannot leave is counted and dropped: neither ends the sender.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import traceback
from collections import Counter

import msgspec
import zmq
import zmq.asyncio

from common.codec import decode, encode
from common.engine import COORDINATOR, Checkpoint, Deadline, Fail, Finish, Log, Note, PeerLost, Received, Send, Started, Tick
from common.logs import role_logger
from common.protocol import ANY_RUN, MsgType, ProtocolError, parse
from common.protocol.control import Heartbeat, Hello
from common.protocol.market import Result
from common.network import LinkNetwork
from common.security import DOMAIN_MESH, Refused, may_send, role_kind
from common.transport import Transport


class ShellFailure(RuntimeError):
    def __init__(self, role: str, reason: str, outcome=None):
        super().__init__(reason)
        self.role, self.reason, self.outcome = role, reason, outcome


_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class Shell:
    """Runs ``engine`` until it finishes (returns its outcome) or fails (raises ShellFailure).

    ``bind``: the coordinator's listening address; ``connect``: the coordinator's address (other
    roles); ``mesh_host``: interface of a peer host's mesh socket; ``t0``: the run's launch time
    (events carry ``now_s`` = seconds since it).
    """

    def __init__(self, engine, *, bind: str | None = None, connect: str | None = None, run_id: str | None = None,
                 timeout_s: float = 30.0, mesh_host: str | None = None, advertise_host: str | None = None,
                 t0: float | None = None, notes=None, heartbeat_s: float = 1.0, liveness_misses: int = 5,
                 curve=None, checkpoint=None, welcome_timeout_s: float | None = None):
        self.engine = engine
        # a role that connects: how long it waits for the coordinator's WELCOME (None: ``timeout_s``)
        self.welcome_timeout_s = welcome_timeout_s
        self.connect_address = connect
        self.checkpoint = checkpoint  # called with a Checkpoint's state (the coordinator writes it), or None
        self.role = engine.name
        self.log = role_logger(self.role if len(self.role) < 40 else self.role[:40])
        self.trace = self.log.isEnabledFor(logging.DEBUG)  # every message sent and received
        self.timeout_s = timeout_s
        self.t0 = time.time() if t0 is None else t0
        self.notes = notes if notes is not None else self._print_note
        self.heartbeat_s = float(heartbeat_s)
        self.liveness_misses = int(liveness_misses)
        self.ctx = zmq.asyncio.Context()
        if curve is not None and curve.role != self.role:
            raise ValueError(f"the key of {curve.role!r} given to {self.role!r}")
        self.curve = curve  # common.security.Identity or None
        self.transport = Transport(run_id=run_id, validate_outgoing=False, context=self.ctx, curve=curve,
                                   heartbeat_s=self.heartbeat_s, liveness_misses=self.liveness_misses)
        self.is_coordinator = bind is not None
        self.address = None
        self.mesh_address = None
        self.mesh_in = None
        self.mesh_out: dict[str, zmq.Socket] = {}
        self.addresses: dict[str, str] = {}
        self.run_id = run_id or ANY_RUN
        self.internal_errors = 0
        # CURVE: each role's connection (the routing identity ZeroMQ gave it), learnt from the messages
        # its key authenticated and the shell accepted (a second connection of the same key whose
        # messages are refused never takes the route); a role that connects anew (a restart) is
        # reached on its new connection
        self.routes: dict[str, bytes] = {}
        if self.is_coordinator:
            self.main = self.transport.router(bind)
            self.address = self.main.getsockopt(zmq.LAST_ENDPOINT).decode()
        else:
            # (no IMMEDIATE: the coordinator's last messages, sent just before it closes, stay readable)
            self.main = self.transport.dealer(connect, identity=self.role, immediate=False)
        if mesh_host is not None:
            self.mesh_in = self.transport.router(f"tcp://{mesh_host}:*", domain=DOMAIN_MESH)
            endpoint = self.mesh_in.getsockopt(zmq.LAST_ENDPOINT).decode()
            if advertise_host:
                endpoint = f"tcp://{advertise_host}:{endpoint.rsplit(':', 1)[1]}"
            self.mesh_address = endpoint
        self.poller = zmq.asyncio.Poller()
        for sock in (self.main, self.mesh_in):
            if sock is not None:
                self.poller.register(sock, zmq.POLLIN)
        self.finished = False
        self.outcome = None
        self._shadows: dict = {}
        # injected latency, jitter and bandwidth per link (common.network; P2PM_NETWORK), or None
        self.netem = LinkNetwork.from_env()
        self._held = 0  # messages held back by the network model, not yet handed to ZeroMQ
        # liveness: the coordinator's last sign of life (once welcomed), the last send to it, the
        # losses to report to the coordinator's engine after the current instructions
        self.welcomed = False
        self.coordinator_lost = False
        self.coordinator_seen = time.monotonic()
        self.last_sent = 0.0
        self.reported: dict = {}  # the refusal counts the coordinator has last been sent
        self.heartbeats_sent = 0
        self._lost: list[PeerLost] = []
        self._lock = threading.Lock()  # the main socket changes hands between the loop and the heartbeat thread
        self._busy = False  # the loop is inside the engine (and touches no socket): the thread may beat
        self._stop_beats = threading.Event()

    def _sync(self, sock) -> zmq.Socket:
        """A synchronous shadow of an asyncio socket (the same ZeroMQ socket)."""
        shadow = self._shadows.get(sock)
        if shadow is None:
            shadow = self._shadows[sock] = zmq.Socket.shadow(sock.underlying)
        return shadow

    @staticmethod
    def _print_note(note: Note) -> None:
        print(json.dumps({"event": note.event, **note.fields}), flush=True)

    def now_s(self) -> float:
        return time.time() - self.t0

    # -- the loop -------------------------------------------------------------------------------
    def run(self):
        """Serve on a new event loop until the engine finishes (its outcome) or fails (ShellFailure).

        The loop is run and closed here rather than by ``asyncio.run``: measured in the coordinator
        of ``mv37``, ``asyncio.run`` took another 0.7-1.7 s after the served coroutine had returned
        before it did, on the critical path from the last answer to the results."""
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(self.serve())
        finally:
            try:
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    async def serve(self):
        beats = threading.Thread(target=self._beat_while_busy, name="heartbeats", daemon=True)
        beats.start()
        try:
            await self._deliver(Started(self.now_s()))
            last_progress = time.monotonic()
            next_tick = last_progress + self.heartbeat_s
            while not self.finished:
                now = time.monotonic()
                timeout_s = self._timeout_s()
                wake = min(last_progress + timeout_s, next_tick)
                ready = dict(await self.poller.poll(max(0, int(1000 * (wake - now)) + 1)))
                for sock in (self.main, self.mesh_in):
                    if sock is not None and sock in ready and not self.finished:
                        if await self._receive(sock):
                            last_progress = time.monotonic()
                await self._report_losses()
                now = time.monotonic()
                if now >= next_tick and not self.finished:
                    next_tick = now + self.heartbeat_s
                    await self._tick(now)
                    await self._report_losses()
                timeout_s = self._timeout_s()
                if not self.finished and time.monotonic() >= last_progress + timeout_s:
                    if not self.is_coordinator and not self.welcomed and self.welcome_timeout_s is not None:
                        self.coordinator_lost = True
                        raise ShellFailure(COORDINATOR, f"the coordinator at {self.connect_address} did not welcome "
                                                        f"this role within {timeout_s:g} s (is it running, and is "
                                                        f"this role in its run?)")
                    await self._deliver(Deadline(timeout_s, self.now_s()))
                    if not self.finished:
                        raise ShellFailure(self.role, f"no message within {timeout_s:g} s"
                                                      + (" from the coordinator" if not self.is_coordinator else ""))
            return self.outcome
        finally:
            self._stop_beats.set()
            beats.join(timeout=2 * self.heartbeat_s + 1)
            await self._flush()

    def _timeout_s(self) -> float:
        if self.welcome_timeout_s is not None and not self.is_coordinator and not self.welcomed:
            return self.welcome_timeout_s
        return self.timeout_s

    # -- liveness -------------------------------------------------------------------------------
    def rejected_counts(self) -> dict[str, int]:
        """Every message this role has refused, by reason: the codec's, the engine's and the
        engine's internal errors."""
        counts = Counter(self.transport.rejected)
        counts.update(getattr(self.engine, "rejected", None) or {})
        if self.internal_errors:
            counts["internal"] += self.internal_errors
        return {k: int(v) for k, v in counts.items() if v}

    def _heartbeat_frames(self) -> list:
        counts = self.rejected_counts()
        self.reported = counts
        env = Heartbeat(rejected=counts or None).envelope(run_id=self.run_id, sender=self.role)
        return [encode(env, max_bytes=self.transport.max_bytes, validate=False)]

    def _beat(self) -> None:
        """A HEARTBEAT to the coordinator now (never blocks; one that cannot leave is skipped)."""
        try:
            self._sync(self.main).send_multipart(self._heartbeat_frames(), zmq.NOBLOCK)
        except zmq.ZMQError:
            return
        self.last_sent = time.monotonic()
        self.heartbeats_sent += 1

    def _beat_while_busy(self) -> None:
        """The heartbeat thread: beats while the loop is inside the engine (a long local solve, an
        AC power flow; the coordinator: a clearing step of a large market) and has sent nothing for
        an interval. The coordinator beats to every role it has accepted a message from."""
        while not self._stop_beats.wait(self.heartbeat_s / 4):
            with self._lock:
                if not self._busy or time.monotonic() - self.last_sent < self.heartbeat_s:
                    continue
                if self.is_coordinator:
                    self._beat_roles()
                elif self.welcomed:
                    self._beat()

    def _beat_roles(self) -> None:
        """The coordinator's HEARTBEAT to every role it knows (never blocks; skipped where it cannot leave)."""
        env = Heartbeat().envelope(run_id=self.run_id, sender=self.role)
        data = encode(env, max_bytes=self.transport.max_bytes, validate=False)
        for route in list(self.routes.values()):
            try:
                self._sync(self.main).send_multipart([route, data], zmq.NOBLOCK)
            except zmq.ZMQError:
                continue
        self.last_sent = time.monotonic()

    async def _tick(self, now: float) -> None:
        if self.is_coordinator:
            await self._deliver(Tick(self.now_s()))
            return
        if self.welcomed and now - self.coordinator_seen > self.liveness_misses * self.heartbeat_s:
            self.coordinator_lost = True  # nothing queued for it will ever leave: no linger at close
            raise ShellFailure(COORDINATOR, f"lost the coordinator: nothing from it for {now - self.coordinator_seen:.1f} s "
                                            f"(heartbeat every {self.heartbeat_s:g} s)")
        if self.welcomed and now - self.last_sent >= self.heartbeat_s:  # (before: of no run yet)
            self._beat()
        await self._deliver(Tick(self.now_s()))

    async def _report_losses(self) -> None:
        """Hand the losses the sends met to the coordinator's engine (after the instructions that
        met them, so that it never handles an event in the middle of its own instructions)."""
        while self._lost and not self.finished:
            await self._deliver(self._lost.pop(0))

    async def _receive(self, sock, batch: int = 512) -> bool:
        """Receive what is waiting on ``sock`` (at most ``batch`` messages, so that a flood never
        holds off the ticks); True when a valid message was delivered."""
        delivered = False
        is_router = sock.socket_type == zmq.ROUTER
        secure = self.curve is not None and is_router  # the sender's role is in the frames' metadata
        channel = "mesh" if sock is self.mesh_in else "main"
        for _ in range(batch):
            if self.finished:
                break
            try:  # the socket's synchronous shadow: no future per message on the hot path
                frames = self._sync(sock).recv_multipart(zmq.NOBLOCK, copy=not secure)
            except zmq.Again:
                break
            payload = frames[1:] if is_router else frames
            nbytes = sum(len(f) for f in payload)
            try:
                if len(payload) != 1:
                    raise ProtocolError("malformed", f"{len(payload)} payload frames")
                route = None
                if secure:
                    sender = self.transport.authenticated(frames)
                    data = payload[0].bytes
                    route = frames[0].bytes if sock is self.main else None
                else:
                    sender = frames[0].decode() if is_router else COORDINATOR
                    data = payload[0]
                    route = frames[0] if is_router and sock is self.main else None
                env = decode(data, expect_run=self.transport.run_id, max_bytes=self.transport.max_bytes)
                if is_router and env.sender != sender:
                    raise Refused("sender", f"sender {env.sender!r} on the connection of {sender!r}")
                if not may_send(sender, channel, env.type):
                    raise Refused("role", f"{env.type.value} from {sender!r} ({role_kind(sender)}) on the {channel} socket")
                message = parse(env)
                if isinstance(message, Hello):
                    self._check_hello(sender, message)
                if route is not None:  # answers go to the connection of the key's last accepted message
                    self.routes[sender] = route
            except UnicodeDecodeError:
                self.transport._reject("malformed", nbytes, ProtocolError("malformed", "identity is not UTF-8"))
                continue
            except (ProtocolError, Refused) as exc:
                self.transport._reject(exc.reason, nbytes, exc if isinstance(exc, ProtocolError) else None)
                if self.trace:
                    self.log.debug("rejected %d B (%s): %s", nbytes, exc.reason, exc)
                elif isinstance(exc, Refused) and self.transport.rejected[exc.reason] <= 3:  # the first few, not a flood
                    self.log.warning("refused %d B (%s): %s", nbytes, exc.reason, exc)
                continue
            except (KeyError, TypeError, ValueError) as exc:
                self.transport._reject("body", nbytes, ProtocolError("body", str(exc)[:200]))
                continue
            if sock is self.main and not self.is_coordinator:
                self.coordinator_seen = time.monotonic()
            if env.type == MsgType.HEARTBEAT:  # liveness, not traffic of the run
                if self.is_coordinator:
                    await self._deliver(Received(sender, message, env.iteration, self.now_s()))
                delivered = True
                continue
            self.transport.received.add(env.iteration, env.type.value, nbytes)
            if self.trace:
                self.log.debug("received %s iteration %d from %s, %d B", env.type.value, env.iteration, env.sender,
                               nbytes)
            if env.type == MsgType.WELCOME and not self.is_coordinator:
                self._on_welcome(message.config)
            await self._deliver(Received(sender, message, env.iteration, self.now_s()))
            delivered = True
        return delivered

    def _check_hello(self, sender: str, hello: Hello) -> None:
        """A HELLO registers its sender's own role (and, with a roster that says so, its own peers)."""
        if hello.role != role_kind(sender):
            raise Refused("role", f"a {hello.role} HELLO from {sender!r} ({role_kind(sender)})")
        hosts = self.curve.roster.hosts if self.curve is not None else {}
        if hello.role == "peer" and sender in hosts and sorted(hello.peer_ids) != sorted(hosts[sender]):
            raise Refused("role", f"{sender!r} registers peers {list(hello.peer_ids)[:5]}, the roster gives it "
                                  f"{hosts[sender][:5]}")

    def _on_welcome(self, config: dict) -> None:
        if config.get("rekey"):  # new public keys of a peer host that came back: nothing for the shell
            return
        self.run_id = str(config.get("run_id", self.run_id))
        self.transport.run_id = self.run_id
        self.addresses = dict(config.get("addresses") or {})
        if self.mesh_in is not None:  # connect to the partner hosts now (TCP and CURVE handshakes
            for host in self.addresses:  # during the price rounds), not at the first TRADES
                self._mesh_socket(host)
        heartbeat_s = config.get("heartbeat_s")  # the coordinator's interval rules the run
        if isinstance(heartbeat_s, (int, float)) and 0.01 <= heartbeat_s <= 3600:
            self.heartbeat_s = float(heartbeat_s)
        self.welcomed = True
        self.coordinator_seen = time.monotonic()

    async def _deliver(self, event) -> None:
        try:
            with self._lock:
                self._busy = True
            try:
                instructions = self.engine.handle(event)
            finally:
                with self._lock:
                    self._busy = False
        except Exception as exc:  # noqa: BLE001
            if self.is_coordinator:
                raise ShellFailure(COORDINATOR, f"internal error: {type(exc).__name__}: {exc}\n"
                                                f"{traceback.format_exc()}") from exc
            self.internal_errors += 1
            self.log.error("could not handle %s: %s\n%s", type(getattr(event, "message", event)).__name__, exc,
                           traceback.format_exc())
            return
        for ins in instructions:
            if isinstance(ins, Send):
                await self._send(ins)
            elif isinstance(ins, Log):
                self.log.log(_LOG_LEVELS.get(ins.level, logging.INFO), ins.text)
            elif isinstance(ins, Note):
                self.notes(ins)
            elif isinstance(ins, Checkpoint):
                if self.checkpoint is not None:
                    self.checkpoint(ins.state)
            elif isinstance(ins, Finish):
                self.finished, self.outcome = True, ins.outcome
            elif isinstance(ins, Fail):
                # send what the engine queued before failing (SHUTDOWNs) first
                raise ShellFailure(ins.role, ins.reason, ins.outcome)

    async def _send(self, ins: Send) -> None:
        message = ins.message
        if isinstance(message, Result) and not self.is_coordinator:
            # the host's own traffic outside the coordinator's sight (mesh TRADES) goes with its result
            rows = tuple(r for r in self.transport.sent.rows() if r[1] == MsgType.TRADES.value)
            message = msgspec.structs.replace(message, traffic=rows)
        env = message.envelope(run_id=self.run_id, sender=self.role, iteration=ins.iteration)
        try:
            data = encode(env, max_bytes=self.transport.max_bytes, validate=False)
        except ProtocolError as exc:
            self.log.error("could not encode %s to %s: %s", env.type.value, ins.to, exc)
            self.transport.rejected["outgoing"] += 1
            return
        heartbeat = env.type == MsgType.HEARTBEAT
        mesh = False
        if self.is_coordinator:
            route = self._route(ins.to, env.type)
            if route is None:
                return
            sock, frames = self.main, [route, data]
        elif ins.to == COORDINATOR:
            sock, frames = self.main, [data]
            if not heartbeat and self.welcomed and self.reported != self.rejected_counts():
                self._beat()  # the coordinator learns of new refusals before the answer they may concern
            self.last_sent = time.monotonic()
        else:
            sock, frames, mesh = self._mesh_socket(ins.to), [data], True
        if self.netem is not None and not heartbeat:
            self._hold(sock, frames, env, ins.to, len(data))
            return
        try:
            try:  # the usual case: the message is queued at once (no future, no timer)
                self._sync(sock).send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.Again:  # not now (no connection yet, high-water mark): wait, up to the send timeout
                if heartbeat:
                    return  # a heartbeat that cannot leave now is skipped
                # the coordinator waits at most a heartbeat interval (its loop keeps every role's
                # liveness); a welcomed role at most as long as its coordinator may be silent
                # liveness); a welcomed role at most as long as its coordinator may be silent; a role
                # not yet welcomed (its coordinator not up yet) as long as it waits for its welcome
                wait_s = self.transport.send_timeout_s
                if self.is_coordinator:
                    wait_s = min(wait_s, self.heartbeat_s)
                elif self.welcomed:
                    wait_s = min(wait_s, self.liveness_misses * self.heartbeat_s)
                elif not mesh:
                    wait_s = self._timeout_s()
                end = time.monotonic() + wait_s
                while True:  # each try ends after the socket's send timeout (zmq.Again)
                    pending = sock.send_multipart(frames, copy=False)
                    pending.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: never logged
                    try:
                        await asyncio.wait_for(pending, max(0.001, end - time.monotonic()))
                        break
                    except zmq.Again:
                        if time.monotonic() >= end:
                            raise asyncio.TimeoutError from None
        except asyncio.TimeoutError:
            what = f"could not send {env.type.value} to {ins.to} within {wait_s:g} s"
            if not self.is_coordinator and not mesh and not self.welcomed:
                self.coordinator_lost = True
                raise ShellFailure(COORDINATOR, f"the coordinator at {self.connect_address} did not take this role's "
                                                f"{env.type.value.upper()} within {wait_s:g} s (is it running?)") from None
            self.transport.dropped[env.type.value] += 1
            if self.is_coordinator:  # its engine decides (the receiver is lost; it is to blame, not the others)
                self._lost.append(PeerLost(ins.to, self.now_s(), what))
                return
            if mesh:  # a partner host that is gone: the coordinator notices and decides
                self.log.warning(f"{what}: dropped")
                return
            if self.welcomed:
                self.coordinator_lost = True
                raise ShellFailure(COORDINATOR, f"lost the coordinator: {what}") from None
            raise ShellFailure(COORDINATOR, what) from None
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:  # the receiver is gone: counted; the coordinator's engine decides
                self.transport.dropped[env.type.value] += 1
                if self.is_coordinator:
                    self._lost.append(PeerLost(ins.to, self.now_s(), f"disconnected (a {env.type.value} found no route)"))
                return
            raise
        if heartbeat:
            return
        self.transport.sent.add(env.iteration, env.type.value, len(data))
        if self.trace:
            self.log.debug("sent %s iteration %d to %s, %d B", env.type.value, env.iteration, ins.to, len(data))

    def _hold(self, sock, frames, env, to: str, nbytes: int) -> None:
        """Hand the message to ZeroMQ at its arrival time under the network model (the link's
        order is kept: arrival times never decrease on a link, and timers at equal times run in
        the order they were set)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        at = self.netem.arrival_s(self.role, to, nbytes, now)
        self.transport.sent.add(env.iteration, env.type.value, nbytes)
        self._held += 1

        def release():
            self._held -= 1
            try:
                self._sync(sock).send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self._held += 1
                task = asyncio.ensure_future(sock.send_multipart(frames, copy=False))
                task.add_done_callback(lambda _t: setattr(self, "_held", self._held - 1))
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    self.log.error("could not send %s to %s: %s", env.type.value, to, exc)
                self.transport.dropped[env.type.value] += 1

        loop.call_at(at, release)

    def _route(self, to: str, type_: MsgType) -> bytes | None:
        """The coordinator's routing frame for role ``to``: with CURVE the connection its key last
        spoke on, else its name; None (counted as dropped) for a role never heard from with its key."""
        if self.curve is None:
            return to.encode()
        route = self.routes.get(to)
        if route is None:
            self.transport.dropped[type_.value] += 1
        return route

    def _mesh_socket(self, host: str):
        sock = self.mesh_out.get(host)
        if sock is None:
            address = self.addresses.get(host)
            if address is None:
                raise ShellFailure(self.role, f"no address for peer host {host} (mesh)")
            sock = self.transport.dealer(address, identity=self.role, server=host)
            self.mesh_out[host] = sock
        return sock

    async def _flush(self) -> None:
        """Let the event loop hand queued sends to ZeroMQ before the sockets close (they then
        linger up to a second for the messages to leave)."""
        await asyncio.sleep(0)
        end = time.monotonic() + 10.0
        while self._held > 0 and time.monotonic() < end:  # messages still held by the network model
            await asyncio.sleep(0.001)

    def send_now(self, to: str, message) -> None:
        """Queue ``message`` to ``to`` at once, outside the loop (a SHUTDOWN after a failure); one that
        cannot leave is skipped."""
        env = message.envelope(run_id=self.run_id, sender=self.role)
        frames = [encode(env, validate=False)]
        if self.is_coordinator:
            route = self._route(to, env.type)
            if route is None:
                return
            frames.insert(0, route)
        try:
            self._sync(self.main).send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError:
            self.transport.dropped[env.type.value] += 1

    def close(self) -> None:
        """Close the sockets; what is queued (SHUTDOWNs) has up to a second, or two heartbeat
        intervals, to leave."""
        if self.transport.rejected:
            self.log.warning("rejected messages: %s", dict(self.transport.rejected))
        self.transport.close(linger_ms=0 if self.coordinator_lost else int(1000 * max(1.0, 2 * self.heartbeat_s)))


def run_role(engine, coordinator: str, idle_timeout_s: float, welcome_timeout_s: float | None = None, **kw) -> int:
    """Run a non-coordinator engine until the coordinator's SHUTDOWN (0), or a silence of
    ``idle_timeout_s`` (``welcome_timeout_s`` before the coordinator's WELCOME), or a failure (1, logged)."""
    shell = Shell(engine, connect=coordinator, timeout_s=idle_timeout_s, welcome_timeout_s=welcome_timeout_s, **kw)
    try:
        shell.run()
        return 0
    except ShellFailure as exc:
        shell.log.error(f"stopped: {exc}")
        return 1
    finally:
        shell.close()
