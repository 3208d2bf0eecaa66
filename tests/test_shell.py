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
