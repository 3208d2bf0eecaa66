"""CURVE security (``common.security``): keys per role, a ZAP handler admitting only the roster,
the sender of a message taken from its authenticated key, message types checked against the
sender's role. Attacked as an outsider (no key, a wrong key, a replay from a previous run) and as
an insider holding one peer host's key (claiming another role's name, forging a grid report or a
partner's trades): everything refused and counted, the run's result unchanged."""

from __future__ import annotations

import ast
import asyncio
import json
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.asyncio

from common.codec import encode
from common.engine import COORDINATOR, Finish, Received, Send, Started
from common.protocol.control import Heartbeat, Hello, Shutdown
from common.protocol.grid import GridReport
from common.protocol.market import Trades, Update, UpdatePeer
from common.security import (DOMAIN_MESH, KeysError, Roster, load_identity, may_send, write_keys)
from common.shell import Shell
from p2pm_support import P2PM, invoke, small_market


def _wire(msg, run: str, sender: str, iteration: int = 0) -> bytes:
    return encode(msg.envelope(run_id=run, sender=sender, iteration=iteration))


def _grid_report() -> GridReport:
    from common.protocol.grid import Violation

    return GridReport(violations=(Violation(kind="voltage", element=3, hour=0, value=1.2, limit=1.1),), tables={})


def _update(peer: str) -> Update:
    one = np.zeros(1)
    return Update(peers={peer: UpdatePeer(p_out_mw=np.zeros((1, 1)), dual_sq=one, solve_s=0.0)})


def _client(ctx, address: str, *, public=None, secret=None, server=None, routing_id: bytes | None = None):
    """A raw DEALER: CURVE when keys are given, else no security mechanism at all."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if routing_id is not None:
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
    if public is not None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server
    sock.connect(address)
    return sock


# ------------------------------------------------------------------------------------------ keys

def test_keys_give_each_role_only_its_own_secret_key(tmp_path):
    out = tmp_path / "keys"
    r = invoke("keys", "mv37", "--out", out, "--peers-per-process", "10")
    assert r.exit_code == 0, r.output
    roster = json.loads((out / "roster.json").read_text())
    roles = set(roster["roles"])
    hosts = {h for h in roles if h not in ("coordinator", "dso", "tso")}
    assert len(hosts) == 5 and {"coordinator", "dso", "tso"} < roles
    assert sorted(p for ps in roster["hosts"].values() for p in ps) == sorted(
        json.loads((out / "roster.json").read_text())["hosts"]["h0000-grid"] + [
            p for h, ps in roster["hosts"].items() if h != "h0000-grid" for p in ps])
    assert sum(len(ps) for ps in roster["hosts"].values()) == 50
    for role in roles:
        folder = out / role
        secrets = list(folder.glob("*.key_secret"))
        assert [s.name for s in secrets] == [f"{role}.key_secret"]  # its own, nothing else
        assert folder.stat().st_mode & 0o777 == 0o700 and secrets[0].stat().st_mode & 0o777 == 0o600
        me = load_identity(folder)
        assert me.role == role and me.roster.keys[role] == me.public and len(me.secret) == 40
    assert not list(out.glob("*.key_secret")) and (out / "roster.json").stat().st_mode & 0o777 == 0o644

    # a key readable by others, a folder of two keys, a key the roster does not know: refused
    (out / "dso" / "dso.key_secret").chmod(0o644)
    with pytest.raises(KeysError, match="readable by others"):
        load_identity(out / "dso")
    with pytest.raises(KeysError, match="holds 0 secret keys"):
        load_identity(out)
    other = tmp_path / "other"
    write_keys(other, ["coordinator", "dso", "tso"])
    (out / "tso" / "roster.json").write_text((other / "roster.json").read_text())
    with pytest.raises(KeysError, match="no role 'tso' with this key"):
        load_identity(out / "tso")


def test_roles_by_hand_need_a_key_or_an_explicit_insecure(tmp_path):
    split = invoke("scenarios", "split", "mv37", "--out", tmp_path / "split")
    assert split.exit_code == 0
    public = tmp_path / "split" / "public.json"
    assert invoke("keys", "mv37", "--out", tmp_path / "k").exit_code == 0
    r = invoke("coordinator", "--scenario", public)
    assert r.exit_code == 2 and "--keys" in r.output and "--insecure" in r.output
    r = invoke("coordinator", "--scenario", public, "--keys", tmp_path / "k" / "dso")
    assert r.exit_code == 2 and "key of 'dso'" in r.output
    r = invoke("dso", "--scenario", public, "--coordinator", "tcp://127.0.0.1:9", "--keys", tmp_path / "k" / "dso",
               "--insecure")
    assert r.exit_code == 2 and "--insecure" in r.output
    model = tmp_path / "split" / "peers" / "pv3.json"
    r = invoke("peer", "--coordinator", "tcp://127.0.0.1:9", "--model", model, "--keys", tmp_path / "k" / "h0000-grid")
    assert r.exit_code == 2 and "the roster gives host 'h0000-grid' the peers grid" in r.output
    r = invoke("peer", "--coordinator", "tcp://127.0.0.1:9", "--model", model, "--keys", tmp_path / "k" / "tso")
    assert r.exit_code == 2 and "not of a peer host" in r.output
    # p2pm run: its own throwaway keys by default; --keys must be a key folder, and not with --insecure
    r = invoke("run", "mv37", "--out", tmp_path / "r", "--keys", tmp_path / "nowhere")
    assert r.exit_code == 2 and "roster.json does not exist" in r.output
    r = invoke("run", "mv37", "--out", tmp_path / "r", "--keys", tmp_path / "k", "--insecure")
    assert r.exit_code == 2 and "--insecure" in r.output


def test_each_role_may_send_only_its_own_message_types():
    from common.protocol import MsgType

    assert may_send("h0003-pv1", "main", MsgType.UPDATE) and may_send("h0003-pv1", "mesh", MsgType.TRADES)
    assert not may_send("h0003-pv1", "main", MsgType.GRID_REPORT) and not may_send("h0003-pv1", "main", MsgType.ROUND)
    assert not may_send("h0003-pv1", "main", MsgType.TRADES) and not may_send("h0003-pv1", "mesh", MsgType.UPDATE)
    assert not may_send("h0003-pv1", "mesh", MsgType.HEARTBEAT)  # heartbeats go to the coordinator only
    assert may_send("dso", "main", MsgType.GRID_REPORT) and not may_send("tso", "main", MsgType.GRID_REPORT)
    assert not may_send("dso", "mesh", MsgType.TRADES) and not may_send("dso", "main", MsgType.UPDATE)
    assert may_send(COORDINATOR, "main", MsgType.ROUND) and not may_send(COORDINATOR, "main", MsgType.UPDATE)


# ------------------------------------------------------------------------------- socket level

class Registrar:
    """A coordinator-side engine: takes HELLOs (answering SHUTDOWN) and anything else it is given;
    finishes at the HELLO of ``last``."""

    name = COORDINATOR

    def __init__(self, last: str):
        self.last, self.got = last, []

    def handle(self, event):
        if isinstance(event, Received):
            self.got.append((event.sender, event.message.TYPE.value))
            if isinstance(event.message, Hello):
                out = [Send(event.sender, Shutdown(reason="bye"))]
                return out + ([Finish(list(self.got))] if event.sender == self.last else [])
        return []


class Host:
    """A peer host that says HELLO for ``peers`` and stops at SHUTDOWN."""

    def __init__(self, name: str, peers: tuple[str, ...]):
        self.name, self.peers = name, peers

    def handle(self, event):
        if isinstance(event, Started):
            return [Send(COORDINATOR, Hello(role="peer", peer_ids=self.peers, pid=1, host="test"))]
        if isinstance(event, Received) and isinstance(event.message, Shutdown):
            return [Finish("stopped")]
        return []


class Partner:
    """A peer host's mesh side: counts TRADES, never finishes by itself."""

    def __init__(self, name: str):
        self.name, self.trades = name, []

    def handle(self, event):
        if isinstance(event, Received):
            self.trades.append(event.sender)
        return []


async def _until(predicate, timeout_s: float = 40.0) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.02)


async def test_strangers_wrong_keys_and_forged_senders_are_refused_and_counted(tmp_path):
    hosts = {"h0000-a": ["a"], "h0001-b": ["b"]}
    keys = tmp_path / "keys"
    write_keys(keys, ["coordinator", "dso", "tso", *hosts], hosts, "test")
    ids = {role: load_identity(keys / role) for role in ["coordinator", "dso", *hosts]}
    coord = Shell(Registrar(last="h0000-a"), bind="tcp://127.0.0.1:*", run_id="r1", timeout_s=60, notes=lambda n: None,
                  curve=ids["coordinator"])
    server = ids["coordinator"].public
    b, dso = ids["h0001-b"], ids["dso"]
    stranger_public, stranger_secret = zmq.curve_keypair()
    ctx = zmq.asyncio.Context()
    socks = []

    async def attack_then_register():
        def client(**kw):
            socks.append(_client(ctx, coord.address, **kw))
            return socks[-1]

        await client().send(_wire(Hello("peer", ("a",), 1, "x"), "r1", "h0000-a"))  # no key at all
        await client(public=stranger_public, secret=stranger_secret, server=server).send(
            _wire(Hello("peer", ("a",), 1, "x"), "r1", "h0000-a"))  # a key not in the roster
        await client(public=b.public, secret=b.secret, server=zmq.curve_keypair()[0]).send(
            _wire(Hello("peer", ("b",), 1, "x"), "r1", "h0001-b"))  # a known key, the wrong server key
        insider = client(public=b.public, secret=b.secret, server=server, routing_id=b"h0000-a")  # claims a's name
        await insider.send(_wire(Hello("peer", ("a",), 1, "x"), "r1", "h0000-a"))  # ... and a's envelope
        await insider.send(_wire(Hello("peer", ("a",), 1, "x"), "r1", "h0001-b"))  # a's peers under its own name
        await insider.send(_wire(_grid_report(), "r1", "h0001-b"))  # a grid report from a peer host's key
        await insider.send(_wire(_grid_report(), "r1", "dso"))  # ... claiming to be the DSO
        await insider.send(_wire(_update("b"), "r0", "h0001-b"))  # a message of another run (a replay)
        await client(public=dso.public, secret=dso.secret, server=server).send(
            _wire(Hello("peer", ("a",), 1, "x"), "r1", "dso"))  # the DSO registering as a peer host
        rejected = coord.transport.rejected
        await _until(lambda: rejected["unauthenticated"] >= 1 and rejected["handshake"] >= 2
                     and rejected["sender"] >= 2 and rejected["role"] >= 3 and rejected["run"] >= 1)
        a = Shell(Host("h0000-a", ("a",)), connect=coord.address, curve=ids["h0000-a"])
        try:
            return await a.serve()
        finally:
            a.close()

    try:
        got, stopped = await asyncio.wait_for(asyncio.gather(coord.serve(), attack_then_register()), 60)
    finally:
        for s in socks:
            s.close(0)
        ctx.term()
        coord.close()
    assert got == [("h0000-a", "hello")] and stopped == "stopped"  # only the real host's HELLO, answered on its connection
    rejected = dict(coord.transport.rejected)
    assert rejected["sender"] == 2 and rejected["role"] == 3 and rejected["run"] == 1, rejected
    assert rejected["unauthenticated"] >= 1 and rejected["handshake"] >= 2, rejected  # clients retry their handshakes
    assert coord.transport.zap.refused_keys == {stranger_public.decode(): rejected["unauthenticated"]}
    assert coord.routes["h0000-a"] != b"h0000-a"  # the claimed name reaches nothing of a's


async def test_a_captured_session_replayed_on_the_wire_is_refused(tmp_path):
    """The bytes a peer host sent in one run (recorded by a TCP relay between it and the coordinator:
    CURVE handshake, then its encrypted HELLO) replayed to the coordinator of a later run, with new
    keys and with the same keys: the handshake fails, nothing is delivered, the failure is counted."""
    hosts = {"h0000-a": ["a"]}
    ids = {}
    for run in ("first", "second"):
        write_keys(tmp_path / run, ["coordinator", "dso", "tso", *hosts], hosts, "test")
        ids[run] = {role: load_identity(tmp_path / run / role) for role in ["coordinator", "h0000-a"]}
    captured: list[bytes] = []

    async def relay_to(target_port: int):
        async def handle(reader, writer):
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)

            async def pipe(src, dst, record):
                while data := await src.read(65536):
                    if record:
                        captured.append(data)
                    dst.write(data)
                    await dst.drain()
                dst.close()

            await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False), return_exceptions=True)

        return await asyncio.start_server(handle, "127.0.0.1", 0)

    async def session(keys: dict, *, replay: bytes | None = None):
        coord = Shell(Registrar(last="h0000-a"), bind="tcp://127.0.0.1:*", run_id=f"run-{id(keys)}", timeout_s=60,
                      notes=lambda n: None, curve=keys["coordinator"])
        port = int(coord.address.rsplit(":", 1)[1])
        server = None

        async def client():
            nonlocal server
            if replay is not None:  # the recorded bytes, as they were sent
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(replay)
                await writer.drain()
                await _until(lambda: coord.transport.rejected["handshake"] >= 1)
                writer.close()
            server = await relay_to(port)
            relay = f"tcp://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            a = Shell(Host("h0000-a", ("a",)), connect=relay if replay is None else coord.address,
                      curve=keys["h0000-a"])
            try:
                return await a.serve()
            finally:
                a.close()

        try:
            got, _ = await asyncio.wait_for(asyncio.gather(coord.serve(), client()), 60)
        finally:
            coord.close()
            if server is not None:
                server.close()
        return got, dict(coord.transport.rejected)

    got, rejected = await session(ids["first"])  # the recorded run
    assert got == [("h0000-a", "hello")] and not rejected
    recorded = b"".join(captured)
    assert len(recorded) > 200 and b"hello" not in recorded  # the handshake and the HELLO, encrypted
    for keys in (ids["second"], ids["first"]):  # a later run: new keys; the same keys
        got, rejected = await session(keys, replay=recorded)
        assert got == [("h0000-a", "hello")]  # only the live host's HELLO
        assert rejected.get("handshake", 0) >= 1 and set(rejected) <= {"handshake"}, rejected


async def test_a_mesh_socket_admits_only_peer_hosts_and_their_own_trades(tmp_path):
    hosts = {"h0000-a": ["a"], "h0001-b": ["b"]}
    keys = tmp_path / "keys"
    write_keys(keys, ["coordinator", "dso", "tso", *hosts], hosts, "test")
    ids = {role: load_identity(keys / role) for role in ["dso", *hosts]}
    partner = Partner("h0000-a")
    shell = Shell(partner, connect="tcp://127.0.0.1:9", mesh_host="127.0.0.1", timeout_s=10, curve=ids["h0000-a"])
    assert shell.mesh_in.getsockopt(zmq.ZAP_DOMAIN) == DOMAIN_MESH.encode()
    b, dso = ids["h0001-b"], ids["dso"]
    server = ids["h0000-a"].public
    trades = Trades(from_peers=("b",), to_peers=("a",), p_mw=np.zeros((1, 1)))
    ctx = zmq.asyncio.Context()
    socks = [_client(ctx, shell.mesh_address, public=dso.public, secret=dso.secret, server=server),
             _client(ctx, shell.mesh_address, public=b.public, secret=b.secret, server=server)]
    try:
        await socks[0].send(_wire(trades, "r1", "dso"))  # the DSO's key: not a peer host
        await socks[1].send(_wire(trades, "r1", "h0000-a"))  # a peer host's key under another name
        await socks[1].send(_wire(Update({}), "r1", "h0001-b"))  # not a mesh message
        await socks[1].send(_wire(Heartbeat(), "r1", "h0001-b"))  # nor is a heartbeat (they go to the coordinator)
        await socks[1].send(_wire(trades, "r1", "h0001-b"))  # its own trades: delivered
        rejected = shell.transport.rejected
        end = time.monotonic() + 40
        while not (partner.trades and rejected["unauthenticated"] >= 1):
            assert time.monotonic() < end, dict(rejected)
            if await shell.mesh_in.poll(50):
                await shell._receive(shell.mesh_in)
    finally:
        for s in socks:
            s.close(0)
        ctx.term()
        shell.close()
    assert partner.trades == ["h0001-b"]
    assert rejected["sender"] == 1 and rejected["role"] == 2 and rejected["unauthenticated"] >= 1, dict(rejected)


# -------------------------------------------------------------------------------- end to end

def _rejected_in_log(log: Path) -> dict:
    """The ``rejected messages: {...}`` lines of a role's log (its shell's and its engine's), summed."""
    total: dict = {}
    for found in re.findall(r"rejected messages: (?:Counter\()?(\{.*?\})", log.read_text()):
        for reason, n in ast.literal_eval(found).items():
            total[reason] = total.get(reason, 0) + n
    return total


def _mesh_address(log: Path) -> str:
    return re.search(r"mesh socket (tcp://\S+)", log.read_text()).group(1)


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    """A small mesh market (three peers per process), its keys, and its clean run."""
    tmp = tmp_path_factory.mktemp("security")
    scen = small_market(tmp / "small.yaml", 15, hours=3)
    keys = {}
    for name in ("clean", "attacked"):
        r = invoke("keys", scen, "--out", tmp / f"keys-{name}", "--peers-per-process", "3")
        assert r.exit_code == 0, r.output
        keys[name] = tmp / f"keys-{name}"
    clean = tmp / "clean"
    r = subprocess.run([*P2PM, "run", str(scen), "--topology", "mesh", "--peers-per-process", "3", "--out", str(clean),
                        "--quiet", "--no-report", "--no-pool-price", "--keys", str(keys["clean"])], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout
    return tmp, scen, keys, clean


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_an_attacked_run_refuses_everything_and_ends_as_the_clean_run(market):
    tmp, scen, keys, clean = market
    out = tmp / "attacked"
    proc = subprocess.Popen([*P2PM, "run", str(scen), "--topology", "mesh", "--peers-per-process", "3", "--out",
                             str(out), "--quiet", "--no-report", "--no-pool-price", "--keys", str(keys["attacked"])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    roster = Roster.load(keys["attacked"] / "roster.json")
    hosts = sorted(roster.hosts)
    grid_host = next(h for h, ps in roster.hosts.items() if "grid" in ps)
    insider_name = next(h for h in hosts if h != grid_host)
    insider, old = load_identity(keys["attacked"] / insider_name), load_identity(keys["clean"] / insider_name)
    coordinator = roster.keys["coordinator"]
    clean_run_id = re.search(r"run ([0-9a-f]{12})", (clean / "logs" / "coordinator.log").read_text()).group(1)
    ctx = zmq.Context()
    socks = []
    try:
        address_file = out / "logs" / "coordinator.address"
        end = time.monotonic() + 60
        # attack once every peer host is registered (the ADMM is under way)
        while not (address_file.exists() and address_file.read_text() and "ready" in
                   (out / "logs" / "coordinator.log").read_text()):
            assert time.monotonic() < end and proc.poll() is None, proc.stderr.read() if proc.poll() else "no start"
            time.sleep(0.05)
        address = address_file.read_text().strip()

        def client(addr, **kw):
            socks.append(_client(ctx, addr, **kw))
            return socks[-1]

        grid_update = _wire(_update("grid"), "unused", grid_host)
        # outsiders: no key; a key not in the roster; the previous run's key and coordinator key (a replay
        # of that run's HELLO)
        client(address).send(_wire(Hello("peer", ("grid",), 1, "x"), "r", grid_host))
        stranger = zmq.curve_keypair()
        client(address, public=stranger[0], secret=stranger[1], server=coordinator).send(grid_update)
        old_hello = _wire(Hello("peer", tuple(roster.hosts[insider_name]), 1, "x"), clean_run_id, insider_name)
        client(address, public=old.public, secret=old.secret, server=old.roster.keys["coordinator"]).send(old_hello)
        client(address, public=old.public, secret=old.secret, server=coordinator).send(old_hello)
        # an insider (a peer host's key): takes the grid host's name, speaks for it, forges a grid report
        spy = client(address, public=insider.public, secret=insider.secret, server=coordinator,
                     routing_id=grid_host.encode())
        spy.send(_wire(_update("grid"), "x", grid_host))  # the envelope of the grid host (wrong run id as well)
        run_id = re.search(r"run ([0-9a-f]{12})", (out / "logs" / "coordinator.log").read_text()).group(1)
        spy.send(_wire(_update("grid"), run_id, grid_host, 1))
        spy.send(_wire(_grid_report(), run_id, insider_name, 1))
        spy.send(_wire(_grid_report(), run_id, "dso", 1))
        spy.send(old_hello)  # a replay of the previous run's HELLO with a valid key
        # the mesh: trades of the grid's peer sent to another host by a host that does not host it
        target = next(h for h in hosts if h not in (grid_host, insider_name))
        target_log = out / "logs" / f"{target}.log"
        mesh = client(_mesh_address(target_log), public=insider.public, secret=insider.secret,
                      server=roster.keys[target])
        victim = roster.hosts[target][0]
        for k in range(1, 4):
            mesh.send(_wire(Trades(("grid",), (victim,), np.full((1, 3), 5.0)), run_id, insider_name, k))
        # the mesh socket of a peer host does not admit the DSO's key
        dso = load_identity(keys["attacked"] / "dso")
        client(_mesh_address(target_log), public=dso.public, secret=dso.secret, server=roster.keys[target]).send(
            _wire(Trades(("grid",), (victim,), np.zeros((1, 3))), run_id, "dso", 1))
        stdout, stderr = proc.communicate(timeout=150)
    finally:
        for s in socks:
            s.close(0)
        ctx.term()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr + stdout
    a, c = (json.loads((d / "summary.json").read_text()) for d in (out, clean))
    assert a["iterations"] == c["iterations"] > 20 and a["converged"]
    assert a["social_welfare_eur"] == pytest.approx(c["social_welfare_eur"], rel=1e-9, abs=1e-9)
    coord = _rejected_in_log(out / "logs" / "coordinator.log")
    assert coord.get("handshake", 0) >= 2 and coord.get("unauthenticated", 0) >= 2, coord  # no key, old keys
    assert coord.get("sender", 0) >= 2 and coord.get("role", 0) >= 1 and coord.get("run", 0) >= 2, coord
    assert a["rejected_messages"] >= 7 and c["rejected_messages"] == 0
    host = {**_rejected_in_log(target_log)}
    assert host.get("unauthenticated", 0) >= 1, host  # the DSO's key on the mesh socket
    assert host.get("body", 0) >= 1 or host.get("stale", 0) >= 1, host  # trades not sent by the grid's host
    # the clean run: nothing refused anywhere
    for log in (clean / "logs").glob("*.log"):
        assert "rejected messages" not in log.read_text(), log
