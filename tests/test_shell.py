"""The socket shell (``common.shell``) at the socket level, with pytest-asyncio: two shells in one
event loop over real ZeroMQ sockets on loopback, driving small engines."""

from __future__ import annotations

import asyncio

import pytest
import zmq
import zmq.asyncio

from common.engine import COORDINATOR, Deadline, Finish, Log, Received, Send, Started
from common.protocol.control import Hello, Shutdown
from common.protocol.market import Penalty
from common.shell import Shell, ShellFailure


class Echo:
    """A coordinator-side engine: answers every HELLO with a SHUTDOWN and finishes after ``n``."""

    name = COORDINATOR

    def __init__(self, n: int = 1):
        self.n, self.seen, self.deadlines = n, [], 0

    def handle(self, event):
        if isinstance(event, Deadline):
            self.deadlines += 1
            return []
        if isinstance(event, Received) and isinstance(event.message, Hello):
            self.seen.append(event.sender)
            out = [Send(event.sender, Shutdown(reason="bye"))]
            return out + ([Finish(tuple(self.seen))] if len(self.seen) >= self.n else [])
        return []


class Client:
    """A role that says HELLO and stops at SHUTDOWN; ``explode`` raises on the first PENALTY."""

    def __init__(self, name: str, explode: bool = False):
        self.name, self.explode, self.got = name, explode, []

    def handle(self, event):
        if isinstance(event, Started):
            return [Send(COORDINATOR, Hello(role="peer", peer_ids=(self.name,), pid=1, host="test"))]
        if isinstance(event, Received):
            self.got.append(type(event.message).__name__)
            if isinstance(event.message, Penalty) and self.explode:
                raise RuntimeError("a bug in the engine")
            if isinstance(event.message, Shutdown):
                return [Log("done"), Finish("stopped")]
        return []


def _coordinator(engine, timeout_s=5.0):
    return Shell(engine, bind="tcp://127.0.0.1:*", run_id="r1", timeout_s=timeout_s, notes=lambda n: None)


async def test_two_roles_talk_over_real_sockets():
    coord = _coordinator(Echo(n=2))
    a, b = Shell(Client("a"), connect=coord.address), Shell(Client("b"), connect=coord.address)
    try:
        outcome, ra, rb = await asyncio.wait_for(asyncio.gather(coord.serve(), a.serve(), b.serve()), 10)
    finally:
        for s in (coord, a, b):
            s.close()
    assert sorted(outcome) == ["a", "b"] and ra == rb == "stopped"
    assert coord.transport.received.messages == 2 and coord.transport.sent.messages == 2


async def test_malformed_and_forged_messages_are_counted_never_delivered():
    engine = Echo(n=1)
    coord = _coordinator(engine)
    raw_ctx = zmq.asyncio.Context()
    raw = raw_ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.ROUTING_ID, b"x")
    raw.connect(coord.address)
    client = Shell(Client("c"), connect=coord.address)
    try:
        await raw.send(b"\xc1 not msgpack")
        await raw.send_multipart([b"a", b"b"])
        from common.codec import encode

        forged = Hello(role="peer", peer_ids=("z",), pid=1, host="h").envelope(run_id="r1", sender="someone-else")
        await raw.send(encode(forged))  # a sender that is not its connection's identity

        async def later(coro):
            await asyncio.sleep(0.3)  # the coordinator has read the raw messages by then
            return await coro

        outcome = (await asyncio.wait_for(asyncio.gather(coord.serve(), later(client.serve())), 10))[0]
    finally:
        raw.close(0)
        raw_ctx.term()
        coord.close()
        client.close()
    assert outcome == ("c",)  # only the valid HELLO reached the engine
    assert dict(coord.transport.rejected) == {"malformed": 2, "sender": 1}, coord.transport.rejected


async def test_a_deadline_names_the_silent_side_and_an_engine_error_does_not_kill_a_role():
    # a peer-side shell whose engine raises keeps serving; its coordinator never answers
    coord_ctx = zmq.asyncio.Context()
    router = coord_ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    client = Shell(Client("d", explode=True), connect=f"tcp://127.0.0.1:{port}", timeout_s=0.5)
    try:
        from common.codec import encode

        async def poke():
            ident, _ = await router.recv_multipart()  # the HELLO
            beat = Penalty(peers={}).envelope(run_id="*", sender=COORDINATOR)
            await router.send_multipart([ident, encode(beat)])

        with pytest.raises(ShellFailure, match="no message within 0.5 s from the coordinator"):
            await asyncio.wait_for(asyncio.gather(client.serve(), poke()), 10)
    finally:
        router.close(0)
        coord_ctx.term()
        client.close()
    assert client.internal_errors == 1 and client.engine.got == ["Penalty"]
    assert client.rejected_counts() == {"internal": 1}


class Busy:
    """A role whose engine computes for ``busy_s`` (blocking) when it is welcomed."""

    def __init__(self, busy_s: float):
        self.name, self.busy_s = "busy", busy_s

    def handle(self, event):
        import time

        if isinstance(event, Started):
            return [Send(COORDINATOR, Hello(role="peer", peer_ids=("busy",), pid=1, host="test"))]
        if isinstance(event, Received) and type(event.message).__name__ == "Welcome":
            time.sleep(self.busy_s)  # a long local solve: the loop is blocked
            return [Log("done computing")]
        if isinstance(event, Received) and isinstance(event.message, Shutdown):
            return [Finish("stopped")]
        return []


def test_a_role_busy_in_its_engine_still_sends_heartbeats_and_leaves_when_its_coordinator_does():
    """A role computing for 1.5 s with a heartbeat every 0.1 s keeps beating (from its heartbeat
    thread); then its coordinator goes silent and the role stops within a few intervals, naming it."""
    import threading
    import time

    from common.codec import decode, encode
    from common.protocol.control import Welcome

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    result = {}

    def role():
        shell = Shell(Busy(1.5), connect=f"tcp://127.0.0.1:{port}", timeout_s=30.0)
        try:
            shell.run()
        except ShellFailure as exc:
            result["failure"] = exc
        finally:
            shell.close()

    thread = threading.Thread(target=role, daemon=True)
    thread.start()
    try:
        assert router.poll(10_000)
        ident, _ = router.recv_multipart()  # the HELLO
        welcome = Welcome(config={"run_id": "r1", "hours": 1, "heartbeat_s": 0.1}).envelope(run_id="r1", sender=COORDINATOR)
        router.send_multipart([ident, encode(welcome)])
        t0 = time.monotonic()
        beats = []
        while time.monotonic() - t0 < 1.4:  # the role is computing all along
            if router.poll(50):
                _, data = router.recv_multipart()
                if decode(data).type.value == "heartbeat":
                    beats.append(time.monotonic() - t0)
        assert len(beats) >= 6, beats  # (one every interval, give or take the scheduler)
        thread.join(timeout=10)  # the coordinator (this test) says nothing more: 5 intervals later the role stops
        assert not thread.is_alive()
        assert result["failure"].role == COORDINATOR and "lost the coordinator" in result["failure"].reason
    finally:
        router.close(0)
        ctx.term()


class Welcomer:
    """A coordinator engine for the mesh: welcomes ``n`` peer hosts with every host's mesh address,
    then ends the run once each has had a TRADES from every host (itself included)."""

    name = COORDINATOR

    def __init__(self, n: int, hold: bool = False):
        self.n, self.addresses, self.ready = n, {}, set()
        self.hold = hold  # the run does not end while set (checked on every tick)

    def _end(self):
        return [*(Send(h, Shutdown(reason="done")) for h in self.ready), Finish(sorted(self.ready))]

    def handle(self, event):
        from common.engine import Tick
        from common.protocol.control import Ready, Welcome

        if isinstance(event, Tick) and len(self.ready) == self.n and not self.hold:
            return self._end()
        if not isinstance(event, Received):
            return []
        if isinstance(event.message, Hello):
            self.addresses[event.sender] = event.message.address
            if len(self.addresses) < self.n:
                return []
            cfg = {"run_id": "r1", "heartbeat_s": 0.2, "addresses": dict(self.addresses)}
            return [Send(h, Welcome(config=cfg)) for h in self.addresses]
        if isinstance(event.message, Ready):
            self.ready.add(event.sender)
            if len(self.ready) == self.n and not self.hold:
                return self._end()
        return []


class MeshHost:
    """A peer host that sends a TRADES to every host as soon as it is welcomed (before its partners
    may have announced their connections) and says READY once it has one from every host."""

    def __init__(self, name: str, hosts: list[str], address: str | None = None):
        self.name, self.hosts, self.address, self.got = name, hosts, address, set()

    def handle(self, event):
        import numpy as np

        from common.protocol.control import Ready, Welcome
        from common.protocol.market import Trades

        if isinstance(event, Started):
            return [Send(COORDINATOR, Hello(role="peer", peer_ids=(self.name,), pid=1, host="test",
                                            address=self.address))]
        if not isinstance(event, Received):
            return []
        if isinstance(event.message, Welcome):
            return [Send(h, Trades(from_peers=(self.name,), to_peers=(h,), p_mw=np.ones((1, 2))), 1) for h in self.hosts]
        if isinstance(event.message, Trades):
            assert event.message.from_peers == (event.sender,)
            self.got.add(event.sender)
            return [Send(COORDINATOR, Ready())] if self.got == set(self.hosts) else []
        if isinstance(event.message, Shutdown):
            return [Finish(sorted(self.got))]
        return []


def _mesh_hosts(names: list[str], coord: Shell) -> dict[str, Shell]:
    """A peer host shell with a mesh socket per name, each announcing its mesh address."""
    hosts = {n: Shell(MeshHost(n, names), connect=coord.address, mesh_host="127.0.0.1", heartbeat_s=0.2)
             for n in names}
    for shell in hosts.values():
        shell.engine.address = shell.mesh_address
    return hosts


async def _run_mesh(coord: Shell, hosts: dict[str, Shell], *more) -> list:
    """Serve the coordinator and the hosts (and ``more`` coroutines) to the end; every socket closed."""
    try:
        return await asyncio.wait_for(asyncio.gather(coord.serve(), *(s.serve() for s in hosts.values()), *more), 20)
    finally:
        for s in (coord, *hosts.values()):
            s.close()


async def test_mesh_hosts_share_one_connection_per_pair_both_ways():
    """Each pair of peer hosts shares one connection: the host whose name sorts first dials (and a
    host reaches its own socket through its own dialled connection); TRADES sent before the partner
    has announced its connection wait for it; every host hears from every host."""
    names = ["h0", "h1", "h2", "h3"]
    coord = _coordinator(Welcomer(len(names)))
    hosts = _mesh_hosts(names, coord)
    results = await _run_mesh(coord, hosts)
    assert results[0] == names and all(r == names for r in results[1:])
    for i, (n, shell) in enumerate(hosts.items()):
        assert sorted(shell.mesh_out) == names[i:]  # dialled: itself and the hosts after it
        assert sorted(h for h in shell.mesh_routes if h != n) == names[:i]  # announced: the hosts before it
        assert shell.transport.sent.messages - 2 == len(names)  # HELLO, READY and one TRADES to every host
        assert not shell.transport.rejected and not shell.transport.dropped


async def test_a_mesh_connection_announced_by_a_host_that_should_not_dial_is_refused():
    """Only a partner host whose name sorts before this host's announces a connection to it: an
    announcement from a host that is not a partner, or that this host dials itself, is refused and
    counted, and takes no route."""
    names = ["h0", "h1"]
    coord = _coordinator(Welcomer(len(names), hold=True))
    hosts = _mesh_hosts(names, coord)
    ctx = zmq.asyncio.Context()
    strangers = []
    for ident in (b"h9", b"h1"):  # not a partner; a partner that h0 dials itself
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.ROUTING_ID, ident)
        strangers.append(s)

    async def announce_later():
        while not hosts["h0"].welcomed:
            await asyncio.sleep(0.01)
        for s in strangers:
            s.connect(hosts["h0"].mesh_address)
            await s.send(b"")
        for _ in range(500):  # until h0 has judged both (or 5 s)
            if sum(hosts["h0"].transport.rejected.values()) >= 2:
                break
            await asyncio.sleep(0.01)
        coord.engine.hold = False

    try:
        results = await _run_mesh(coord, hosts, announce_later())
    finally:
        for s in strangers:
            s.close(0)
        ctx.term()
    assert results[0] == names
    assert "h9" not in hosts["h0"].mesh_routes
    assert dict(hosts["h0"].transport.rejected) == {"role": 2}, hosts["h0"].transport.rejected


async def test_a_lost_mesh_connection_is_replaced_by_one_the_answering_host_dials():
    """When the connection a partner dialled is gone (a send on it finds no route), the host that
    answered on it dials the partner itself and the message goes that way: nothing is dropped."""
    names = ["h0", "h1"]
    coord = _coordinator(Welcomer(len(names)))
    hosts = _mesh_hosts(names, coord)
    hosts["h1"].mesh_routes["h0"] = b"\x00gone"  # the route of a connection that no longer exists
    results = await _run_mesh(coord, hosts)
    assert results[0] == names and all(r == names for r in results[1:])
    assert hosts["h1"]._redialled == {"h0"} and sorted(hosts["h1"].mesh_out) == ["h0", "h1"]
    assert not hosts["h1"].transport.dropped and not hosts["h0"].transport.rejected
