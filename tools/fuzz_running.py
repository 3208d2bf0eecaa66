"""Fuzz the listening sockets of running clearings: hostile messages against the coordinator's
ROUTER and the peer hosts' mesh ROUTERs of real `p2pm run` processes, then the result compared with
a clean reference run of the same options.

Targets: ``mv37-relay`` (mv37, relay topology), ``mv37-mesh`` (mv37, ``--topology mesh``) and
``ieee33-ev`` (the community market), each with ``--no-pool-price`` (the clearing lasts hundreds
of ADMM iterations) and ten peers per process. For every target, in two modes:

- ``curve`` (the default security, with keys from ``p2pm keys``): strangers connect with no key,
  with a key not in the roster, or with the wrong server key, and queue hostile messages. The ZAP
  handler refuses every connection before any message reaches the application: one refused
  handshake is counted per connection (``handshake`` or ``unauthenticated``; the strangers do not
  reconnect), the queued messages are dropped by ZeroMQ and never delivered. Plain TCP connections
  sending bytes that are not ZMTP are closed by ZeroMQ without any count (listed apart).
- ``insecure`` (``--insecure``: no CURVE, so that hostile bytes reach the decoder): the fuzzer
  connects as stranger identities and sends mutated copies of real messages of every type
  (captured from an in-process run of the same target) and crafted ones: byte flips, insertions
  and deletions, truncations, types a stranger may not send, wrong or unknown types and versions,
  wrong run ids, stale and absurd iterations, forged senders, HELLOs and HEARTBEATs of strangers,
  non-UTF-8 identities, multipart garbage, random bytes and msgpack (deep nesting, bad arrays, NaN),
  and messages of about 16 MiB just under and just over the codec's limit. One message over
  ZeroMQ's own limit (``MAXMSGSIZE``, 4 x 16 MiB) per run is sent apart: ZeroMQ closes the
  connection before the application sees it, and it is listed apart.

The messages are spread over the first part of the clearing at a rate planned from the reference
run's length (``--max-rate`` caps it); a run that ends before its share is sent is followed by
another fuzzed run of the same target until the share is reached. ``--messages`` is the number of
hostile messages that reach the decoders (the insecure runs), over all targets.

After each fuzzed run: exit code 0, the same iterations, rounds and dispatch as the reference, the
welfare within 1e-9 relative, no role that crashed (no traceback, no internal error in any log),
no process left; and the refusals: the roles' logs must count exactly what was sent to each role
(the coordinator's ``rejected messages`` line: its ROUTER; a peer host's lines of its engine and its
shell: the mesh sockets, summed over the hosts), and ``summary.json`` ``rejected_by_role`` minus the
reference's must equal it for the coordinator and may fall short for the peers only by what they
refused after their last heartbeat before the results were written (their counts come with their
heartbeats; in the full run of 100 000 messages nothing fell short).

    PYTHONPATH=. python tools/fuzz_running.py --messages 100000 --out fuzz.json
    PYTHONPATH=. python tools/fuzz_running.py --messages 3000 --targets mv37-relay

Exit code 0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(REPO), str(REPO / "tests")) if p not in sys.path]

import msgspec
import numpy as np
import zmq
from p2pm_support import alive, descendants  # the process-tree helpers of the tests

from common.codec import encode
from common.protocol import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, MsgType

TARGETS = {
    "mv37-relay": ("mv37", ["--topology", "relay"]),
    "mv37-mesh": ("mv37", ["--topology", "mesh"]),
    "ieee33-ev": ("ieee33-ev", []),
}
ZMQ_LIMIT = 4 * MAX_MESSAGE_BYTES  # common.transport: MAXMSGSIZE = ZMQ_SIZE_FACTOR * max_bytes
PLAN_SHARE = 0.5  # the messages of a run are planned over this share of the reference run's clearing
STOP_SHARE = 0.8  # and never sent after this share (so that each is read before the run ends)


def p2pm(*args) -> list[str]:
    return [sys.executable, "-m", "p2pm", *map(str, args)]


def env() -> dict:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}


# ----------------------------------------------------------------------------- real messages

def capture(scenario: str, topology: str, per_process: int, max_per_type: int = 6) -> list[tuple[str, int, object]]:
    """(sender, iteration, message) of real messages of a short in-process run of the target (pool
    price on, so that its messages are there too), a few of each type."""
    from common.scenario import load_scenario
    from p2pm.local import run_in_process

    scen = load_scenario(scenario)
    scen = scen.model_copy(update={"market": scen.market.model_copy(update={"max_iterations": 12})})
    seen: dict[str, list] = defaultdict(list)

    def trace(now_s, sender, to, iteration, message):
        kept = seen[message.TYPE.value]
        if len(kept) < max_per_type:
            kept.append((sender, iteration, message))

    run_in_process(scen, topology=topology, peers_per_process=per_process, trace=trace)
    return [m for kept in seen.values() for m in kept]


def synthetic(peers: list[str], hours: int) -> list[tuple[str, int, object]]:
    """Messages of the types a run of the target does not send (heartbeats, outer-loop penalties,
    drops, the other topology's and market's messages), with the target's peers and hours."""
    from common.protocol import control, grid, market

    rng = np.random.default_rng(0)
    a, b = peers[0], peers[-1]
    h = hours

    def arr(*shape):
        return rng.normal(size=shape)

    return [
        ("h0001-x", 0, control.Heartbeat(rejected={"stale": 3, "body": 1})),
        ("h0001-x", 0, control.Heartbeat()),
        ("coordinator", 3, market.Penalty({a: {"diff_eur_per_mwh": arr(2, h)}})),
        ("coordinator", 4, market.Drop(peers=(a,), hosts=("h0001-x",))),
        ("h0001-x", 5, market.Trades((a,), (b,), arr(1, h))),
        ("h0001-x", 5, market.Update({a: market.UpdatePeer(arr(2, h), np.full(h, 0.5), 0.003)})),
        ("h0001-x", 5, market.Residuals({a: market.ResidualsPeer(np.abs(arr(h)), np.abs(arr(h)), 0.01)})),
        ("coordinator", 6, grid.NetworkUpdate(2.0, {"p_mw": arr(33, h)})),
        ("dso", 6, grid.NetworkResult({"p_mw": arr(33, h)}, "ok")),
        ("coordinator", 0, control.Welcome({"run_id": "x", "hours": h, "addresses": {"h0001-x": "tcp://127.0.0.1:9"}})),
    ]


class Head(msgspec.Struct, array_like=True):
    """An envelope as it travels, its body left as bytes (to forge variants of a real message)."""

    version: int
    run_id: str
    sender: str
    type: str
    iteration: int
    body: msgspec.Raw


def envelope_bytes(version, run_id, sender, type_, iteration, body: bytes) -> bytes:
    return msgspec.msgpack.encode([version, run_id, sender, type_, iteration, msgspec.Raw(body)])


def random_msgpack(rng: random.Random, depth: int = 0):
    """A random plain value (what a stranger may put in a field)."""
    k = rng.randrange(9 if depth < 4 else 5)
    if k == 0:
        return rng.choice([None, True, False])
    if k == 1:
        return rng.choice([0, -1, 2**63 - 1, -(2**63), 2**64 - 1, rng.randrange(-1000, 1000)])
    if k == 2:
        return rng.choice([0.0, -0.0, 1e308, float("nan"), float("inf"), rng.random()])
    if k == 3:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(0, 40)))
    if k == 4:
        return rng.randbytes(rng.randrange(0, 40))
    if k in (5, 6):
        return [random_msgpack(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    if k == 7:
        return {str(random_msgpack(rng, 4)): random_msgpack(rng, depth + 1) for _ in range(rng.randrange(0, 5))}
    return msgspec.msgpack.Ext(rng.choice([1, 2, 7, 127, -5]), rng.randbytes(rng.randrange(0, 40)))


# ------------------------------------------------------------------------------- hostile messages

KINDS = {  # kind -> weight (share of the insecure runs' messages)
    "mutated": 30, "truncated": 8, "retyped": 8, "wrong_run": 7, "stale": 7, "forged_sender": 6,
    "not_allowed": 6, "hello": 5, "heartbeat": 3, "non_utf8": 5, "multipart": 5, "garbage": 6, "msgpack": 4,
}


class Forge:
    """Hostile frames for one target: variants of its real messages."""

    def __init__(self, templates, run_id: str, real_roles: list[str], seed: int):
        self.rng = random.Random(seed)
        self.run_id = run_id
        self.real_roles = real_roles
        self.templates = templates
        self.types = [t.value for t in MsgType]
        self.bodies = []  # (type, encoded body) of each template: envelopes are made around them
        for sender, iteration, message in templates:
            head = msgspec.msgpack.decode(encode(message.envelope(run_id=run_id, sender=sender, iteration=iteration)),
                                          type=Head)
            self.bodies.append((head.type, bytes(head.body)))

    def wire(self, index: int, sender: str, iteration: int, run_id: str | None = None) -> bytes:
        """Template ``index`` as a valid message of ``sender`` (its body as the run sent it)."""
        type_, body = self.bodies[index]
        return envelope_bytes(PROTOCOL_VERSION, run_id or self.run_id, sender, type_, iteration, body)

    def iteration(self) -> int:
        return self.rng.choice([0, 1, 2, 3, 7, 50, 400, 2**31, 2**63 - 1, self.rng.randrange(0, 5000)])

    def template(self, types: set[str] | None = None) -> int:
        choices = [i for i, t in enumerate(self.templates) if types is None or t[2].TYPE.value in types]
        return self.rng.choice(choices)

    def frames(self, kind: str, me: str) -> list[bytes]:
        """The frames of one hostile message of ``kind`` from the stranger ``me``."""
        rng = self.rng
        i = self.template()
        if kind == "mutated":
            b = bytearray(self.wire(i, me, self.iteration()))
            for _ in range(rng.randrange(1, 5)):
                op, at = rng.randrange(4), rng.randrange(len(b))
                if op == 0:
                    b[at] = rng.randrange(256)
                elif op == 1:
                    del b[at]
                elif op == 2:
                    b.insert(at, rng.randrange(256))
                else:
                    b[at:at] = rng.randbytes(rng.randrange(1, 64))
            return [bytes(b)]
        if kind == "truncated":
            data = self.wire(i, me, self.iteration())
            return [data[: rng.randrange(len(data))]]
        if kind in ("retyped", "stale", "wrong_run", "forged_sender", "not_allowed"):
            version, run_id, sender, iteration = 1, self.run_id, me, self.iteration()
            type_, body = self.bodies[i]
            head_type = type_
            if kind == "retyped":  # the body of one type under another type, an unknown type, another version
                choice = rng.randrange(4)
                if choice == 0:
                    type_ = rng.choice([t for t in self.types if t != head_type])
                elif choice == 1:
                    type_ = rng.choice(["", "HELLO", "round ", "x" * 300, "trade"])
                elif choice == 2:
                    version = rng.choice([0, PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1, 255, -1])
                else:
                    type_ = rng.choice([7, None, 1.5, ["round"]])
            elif kind == "stale":  # a message of the run from a stranger, of an old, future or absurd iteration
                i = self.template({"update", "residuals", "trades", "result", "quantity_sum", "pool_quantity"})
                return [self.wire(i, me, rng.choice([0, 1, 2, 10**6, 2**63 - 1]))]
            elif kind == "wrong_run":
                run_id = rng.choice(["0" * 12, "another-run", "*", "x" * 257, "", self.run_id[:-1] + "f"])
            elif kind == "forged_sender":
                sender = rng.choice([*self.real_roles, "coordinator", "dso", "tso", me + "x"])
            else:  # a valid message of a type a stranger (a peer host) may not send, on any socket
                i = self.template({"welcome", "shutdown", "round", "penalty", "drop", "price_probe", "pool_price",
                                   "dispatch", "grid_report", "network_update", "network_result", "freq_query",
                                   "freq_request"})
                return [self.wire(i, me, self.iteration())]
            return [envelope_bytes(version, run_id, sender, type_, iteration, body)]
        if kind == "hello":  # registrations of a stranger: real peers, a service's role, nothing
            from common.protocol.control import Hello

            peers = [p for t in self.templates for p in getattr(t[2], "peer_ids", ())][:50] or ["x"]
            hello = rng.choice([Hello("peer", tuple(rng.sample(peers, min(len(peers), rng.randrange(1, 4)))), 1, "x"),
                                Hello("dso", (), 1, "x"), Hello("tso", (), 1, "x"), Hello("peer", (), 2, "y")])
            return [encode(hello.envelope(run_id=rng.choice([self.run_id, "*"]), sender=me))]
        if kind == "heartbeat":
            from common.protocol.control import Heartbeat

            beat = rng.choice([Heartbeat(), Heartbeat(rejected={"stale": rng.randrange(10**6)})])
            return [encode(beat.envelope(run_id=self.run_id, sender=me))]
        if kind == "multipart":
            parts = [rng.choice([self.wire(i, me, 1), b"", rng.randbytes(rng.randrange(1, 100))])
                     for _ in range(rng.randrange(2, 6))]
            return parts
        if kind == "garbage":
            return [rng.choice([b"", b"\xc1", rng.randbytes(rng.randrange(1, 3000)), b"\x96" + rng.randbytes(50)])]
        if kind == "msgpack":
            choice = rng.randrange(5)
            if choice == 0:  # deep nesting in the body
                depth = rng.choice([100, 1000, 20000])
                return [envelope_bytes(PROTOCOL_VERSION, self.run_id, me, "update", 1, b"\x91" * depth + b"\xc0")]
            if choice == 1:  # a container claiming 2**32-1 elements
                return [envelope_bytes(PROTOCOL_VERSION, self.run_id, me, "update", 1, b"\xdd\xff\xff\xff\xff")]
            if choice == 2:  # an array ext with a wrong shape, dtype or NaN
                payload = rng.choice([b"\x01\x01\x05\x00\x00\x00" + b"\x00" * 8, b"\x09\x00",
                                      b"\x01\x01\x01\x00\x00\x00" + np.array([np.nan]).tobytes(), b""])
                body = msgspec.msgpack.encode({"peers": {"a": {"p_out_mw": msgspec.msgpack.Ext(1, payload),
                                                               "dual_sq": [], "solve_s": 0.0}}})
                return [envelope_bytes(PROTOCOL_VERSION, self.run_id, me, "update", 1, body)]
            value = random_msgpack(rng)
            if choice == 3:
                return [msgspec.msgpack.encode(value)]
            return [envelope_bytes(PROTOCOL_VERSION, self.run_id, me, rng.choice(self.types), 1, msgspec.msgpack.encode(value))]
        raise ValueError(kind)

    def huge(self, me: str) -> list[tuple[str, bytes]]:
        """Messages of about 16 MiB: a valid one of a stranger, one with a NaN at its end, one of
        exactly the limit and one a byte over it (refused before decoding)."""
        from common.protocol.market import Update, UpdatePeer

        n = (MAX_MESSAGE_BYTES - 4096) // 8
        big = np.zeros((n, 1))  # (partners, hours)
        big[-1, 0] = 12345.678  # where the NaN goes
        valid = encode(Update({"x": UpdatePeer(big, np.zeros(1), 0.0)}).envelope(run_id=self.run_id, sender=me,
                                                                                  iteration=1))
        nan = bytearray(valid)
        at = nan.rindex(np.array([12345.678]).tobytes())
        nan[at:at + 8] = np.array([np.nan]).tobytes()
        limit = valid + b"\x00" * (MAX_MESSAGE_BYTES - len(valid))
        return [("huge_valid", valid), ("huge_nan", bytes(nan)), ("huge_limit", limit),
                ("huge_over", b"\x96" + b"\x00" * MAX_MESSAGE_BYTES)]


# ------------------------------------------------------------------------------------------ runs

@dataclass
class Run:
    target: str
    mode: str  # curve | insecure
    label: str  # ref | fuzz
    out: Path
    proc: subprocess.Popen | None = None
    t_start: float = 0.0
    t_ready: float = 0.0
    wall_s: float = 0.0
    pids: set = field(default_factory=set)
    address: str = ""
    run_id: str = ""
    mesh: dict = field(default_factory=dict)  # host -> mesh address
    hosted: dict = field(default_factory=dict)  # host -> its peers

    def start(self, scenario: str, extra: list[str], per_process: int, keys: Path | None, timeout_s: float) -> None:
        args = [*extra, "--out", self.out, "--quiet", "--no-report", "--no-pool-price", "--peers-per-process",
                per_process, "--timeout-s", timeout_s]
        args += ["--keys", keys] if self.mode == "curve" else ["--insecure"]
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen(p2pm("run", scenario, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env(), start_new_session=True)

    def watch(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.pids.update(descendants(self.proc.pid))

    def wait_ready(self, limit_s: float = 120.0) -> bool:
        """Until the coordinator has every peer host (the clearing starts); False if the run ended first."""
        log = self.out / "logs" / "coordinator.log"
        end = time.monotonic() + limit_s
        while time.monotonic() < end:
            self.watch()
            text = log.read_text(errors="replace") if log.exists() else ""
            m = re.search(r"listening on (\S+), run (\w+)", text)
            if m and re.search(r"peers in \d+ processes ready", text):
                self.address, self.run_id = m.group(1).rstrip(","), m.group(2)
                self.t_ready = time.monotonic()
                for path in sorted((self.out / "logs").glob("h*.log")):
                    hm = re.search(r"hosting (.*?); mesh socket (tcp://\S+)", path.read_text(errors="replace"))
                    if hm:
                        self.mesh[path.stem] = hm.group(2)
                        self.hosted[path.stem] = hm.group(1).split(", ")
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.02)
        raise RuntimeError(f"{self.target} {self.mode} {self.label}: not ready within {limit_s:g} s")

    def finish(self, limit_s: float = 600.0) -> dict:
        end = time.monotonic() + limit_s
        while self.proc.poll() is None and time.monotonic() < end:
            self.watch()
            time.sleep(0.05)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        _, stderr = self.proc.communicate()
        self.wall_s = time.monotonic() - self.t_start
        leftover_end = time.monotonic() + 10
        while [p for p in self.pids if alive(p)] and time.monotonic() < leftover_end:
            time.sleep(0.05)
        left = sorted(p for p in self.pids if alive(p))
        for p in left:  # what this tool started, by pid
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        summary_path = self.out / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        return {"code": self.proc.returncode, "stderr": stderr[-2000:], "summary": summary, "left": left,
                "processes": len(self.pids)}


def logs_report(logs: Path) -> dict:
    """What the roles' logs say: refusals per role (the coordinator's ``rejected messages`` line of
    its shell's and engine's counts; a peer host's lines of its engine and its shell, summed), and
    the logs with a traceback or an internal error."""
    out = {"coordinator": Counter(), "peers": Counter(), "per_host": {}, "crashed": []}
    for path in sorted(logs.glob("*.log")):
        text = path.read_text(errors="replace")
        lines = [Counter(ast.literal_eval(found)) for found in re.findall(r"rejected messages: (\{.*?\})", text)]
        if path.stem.startswith("h"):  # its engine's line and its shell's
            counts = sum(lines, Counter())
            out["per_host"][path.stem] = sum(counts.values())
            out["peers"].update(counts)
        elif path.stem == "coordinator" and lines:  # its engine's and shell's, and its shell's alone
            out["coordinator"].update(max(lines, key=lambda c: sum(c.values())))
        if "Traceback" in text or "could not handle" in text or "internal error" in text:
            out["crashed"].append(path.stem)
    return {"coordinator": dict(out["coordinator"]), "peers": dict(out["peers"]), "per_host": out["per_host"],
            "crashed": out["crashed"]}


def read_dispatch(path: Path) -> list[list]:
    with open(path) as f:
        return list(csv.reader(f))


def dispatch_diff(a: Path, b: Path) -> float:
    """The largest difference between two dispatch tables (inf if their rows or text differ)."""
    ra, rb = read_dispatch(a), read_dispatch(b)
    if len(ra) != len(rb) or ra[0] != rb[0]:
        return math.inf
    worst = 0.0
    for x, y in zip(ra[1:], rb[1:]):
        if len(x) != len(y):
            return math.inf
        for u, v in zip(x, y):
            if u == v:
                continue
            try:
                worst = max(worst, abs(float(u) - float(v)))
            except ValueError:
                return math.inf
    return worst


# ----------------------------------------------------------------------------------- the fuzzers

class Sender:
    """Stranger DEALERs of one run: a few per listening socket, and one with a non-UTF-8 identity."""

    def __init__(self, ctx: zmq.Context, run: Run, tag: str, per_socket: int = 3):
        self.socks: dict[str, list[tuple[str, zmq.Socket]]] = {}
        self.odd: dict[str, zmq.Socket] = {}
        for dest, address in [("coordinator", run.address), *run.mesh.items()]:
            mine = []
            for k in range(per_socket):
                name = f"fuzz-{tag}-{dest[:12]}-{k}"
                mine.append((name, self._dealer(ctx, address, name.encode())))
            self.socks[dest] = mine
            self.odd[dest] = self._dealer(ctx, address, b"\xff\xfe" + f"fuzz-{tag}".encode() + b"\xc3\x28")

    @staticmethod
    def _dealer(ctx, address: str, identity: bytes) -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTING_ID, identity)
        s.setsockopt(zmq.SNDHWM, 200)
        s.connect(address)
        return s

    def close(self) -> None:
        for mine in self.socks.values():
            for _, s in mine:
                s.close(0)
        for s in self.odd.values():
            s.close(0)


def send(sock: zmq.Socket, frames: list[bytes], proc: subprocess.Popen, limit_s: float = 10.0) -> bool:
    """Queue one message; waits (polling) while the socket is at its high-water mark; False if the run ended."""
    end = time.monotonic() + limit_s
    while True:
        try:
            sock.send_multipart(frames, zmq.NOBLOCK, copy=len(frames[-1]) < 65536)
            return True
        except zmq.Again:
            if proc.poll() is not None or time.monotonic() > end:
                return False
            time.sleep(0.002)


def fuzz_insecure(run: Run, forge: Forge, quota: int, window_s: float, max_rate: float, rng: random.Random,
                  with_huge: bool) -> dict:
    """Send up to ``quota`` hostile messages during the run; what was sent to which role, by kind."""
    ctx = zmq.Context()
    sender = Sender(ctx, run, f"{run.target[:4]}{rng.randrange(10**6)}")
    kinds, weights = zip(*KINDS.items())
    sent = {"coordinator": 0, "peers": 0}
    per_host: Counter = Counter()
    by_kind: Counter = Counter()
    over_zmq = 0
    rate = min(max_rate, quota / max(0.5, PLAN_SHARE * window_s))
    stop_at = run.t_ready + STOP_SHARE * window_s
    dests = list(sender.socks)
    t0 = time.monotonic()
    n = 0
    try:
        if with_huge:  # the ~16 MiB messages first: to the coordinator and to one mesh socket
            for dest in ("coordinator", rng.choice(dests[1:]) if len(dests) > 1 else "coordinator"):
                me, sock = sender.socks[dest][0]
                for kind, data in forge.huge(me):
                    if send(sock, [data], run.proc):
                        sent["coordinator" if dest == "coordinator" else "peers"] += 1
                        per_host[dest] += 1
                        by_kind[kind] += 1
                        n += 1
            # one message over ZeroMQ's MAXMSGSIZE: ZeroMQ closes that connection, the application never sees it
            big = Sender._dealer(ctx, run.address, f"fuzz-big-{rng.randrange(10**6)}".encode())
            if send(big, [b"\x00" * (ZMQ_LIMIT + 1)], run.proc):
                over_zmq += 1
        while n < quota and run.proc.poll() is None and time.monotonic() < stop_at:
            due = int((time.monotonic() - t0) * rate) + 1
            while n < min(due, quota):
                # the coordinator's ROUTER gets about half, the mesh sockets share the rest
                dest = "coordinator" if (len(dests) == 1 or rng.random() < 0.5) else rng.choice(dests[1:])
                kind = rng.choices(kinds, weights)[0]
                if kind == "non_utf8":
                    frames, sock = forge.frames(rng.choice(["mutated", "hello", "stale"]), "fuzz"), sender.odd[dest]
                else:
                    me, sock = rng.choice(sender.socks[dest])
                    frames = forge.frames(kind, me)
                if not send(sock, frames, run.proc):
                    break
                sent["coordinator" if dest == "coordinator" else "peers"] += 1
                per_host[dest] += 1
                by_kind[kind] += 1
                n += 1
            if run.proc.poll() is not None:
                break
            run.watch()
            time.sleep(0.005)
    finally:
        time.sleep(0.2)
        sender.close()
        try:
            big.close(0)
        except NameError:
            pass
        ctx.term()
    return {"sent": sent, "per_host": dict(per_host), "by_kind": dict(by_kind), "over_zmq_limit": over_zmq,
            "send_s": time.monotonic() - t0}


def fuzz_curve(run: Run, forge: Forge, keys: Path, connections: int, per_connection: int, window_s: float,
               rng: random.Random) -> dict:
    """Strangers during the run: no key, a key not in the roster, the wrong server key (each one
    connection that does not reconnect, queueing ``per_connection`` hostile messages), and plain TCP
    connections sending bytes that are not ZMTP."""
    from common.security import Roster

    roster = Roster.load(keys / "roster.json")
    ctx = zmq.Context()
    dests = [("coordinator", run.address, roster.keys["coordinator"]),
             *[(h, a, roster.keys[h]) for h, a in run.mesh.items()]]
    expected = {"coordinator": Counter(), "peers": Counter()}
    offered = Counter()
    raw_tcp = 0
    open_socks: list = []
    t0 = time.monotonic()
    stop_at = run.t_ready + STOP_SHARE * window_s
    interval = PLAN_SHARE * window_s / max(1, connections)
    made = 0
    try:
        while made < connections and run.proc.poll() is None and time.monotonic() < stop_at:
            if time.monotonic() < t0 + made * interval:
                time.sleep(0.005)
                continue
            dest, address, server = dests[0] if rng.random() < 0.5 else rng.choice(dests)
            role = "coordinator" if dest == "coordinator" else "peers"
            kind = rng.choice(["no_key", "unknown_key", "wrong_server_key", "no_key", "unknown_key",
                               "wrong_server_key", "raw_tcp"])
            made += 1
            if kind == "raw_tcp":
                host, port = address.rsplit("/", 1)[1].rsplit(":", 1)
                try:
                    with socket.create_connection((host, int(port)), timeout=2) as c:
                        c.sendall(rng.randbytes(rng.randrange(1, 2000)))
                    raw_tcp += 1
                except OSError:
                    pass
                continue
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RECONNECT_IVL, -1)  # one handshake per stranger: one refusal to count
            if kind != "no_key":
                public, secret = zmq.curve_keypair()
                s.curve_publickey, s.curve_secretkey = public, secret
                s.curve_serverkey = server if kind == "unknown_key" else zmq.curve_keypair()[0]
            s.connect(address)
            for _ in range(per_connection):
                try:
                    s.send_multipart(forge.frames(rng.choice(["mutated", "stale", "hello"]), "stranger"), zmq.NOBLOCK)
                    offered[role] += 1
                except zmq.Again:
                    break
            expected[role]["unauthenticated" if kind == "unknown_key" else "handshake"] += 1
            open_socks.append((time.monotonic(), s))
            while open_socks and time.monotonic() - open_socks[0][0] > 1.0:  # a second for the handshake
                open_socks.pop(0)[1].close(0)
            run.watch()
    finally:
        time.sleep(1.0)
        for _, s in open_socks:
            s.close(0)
        ctx.term()
    return {"expected": {r: dict(c) for r, c in expected.items()}, "offered": dict(offered), "raw_tcp": raw_tcp,
            "connections": made, "send_s": time.monotonic() - t0}


# ---------------------------------------------------------------------------------------- checks

def counted(summary: dict, role: str) -> Counter:
    return Counter((summary.get("rejected_by_role") or {}).get(role) or {})


def compare(ref: dict, fz: dict) -> dict:
    rs, fs = ref["summary"], fz["summary"]
    w_ref, w_fz = rs.get("social_welfare_eur"), fs.get("social_welfare_eur")
    rel = abs(w_fz - w_ref) / max(abs(w_ref), 1e-12) if w_ref is not None and w_fz is not None else math.inf
    return {"iterations_ref": rs.get("iterations"), "iterations": fs.get("iterations"),
            "rounds_ref": rs.get("rounds"), "rounds": fs.get("rounds"), "welfare_rel_diff": rel}


def run_target(name: str, args, work: Path, quota: int, rng: random.Random, rows: list, printer) -> None:
    scenario, extra = TARGETS[name]
    topology = "mesh" if "mesh" in extra else "relay"
    keys = work / name / "keys"
    subprocess.run(p2pm("keys", scenario, "--out", keys, "--peers-per-process", args.peers_per_process), check=True,
                   capture_output=True, env=env())
    t = time.monotonic()
    templates = capture(scenario, topology, args.peers_per_process)
    peers = sorted({p for _, _, m in templates for p in getattr(m, "peer_ids", ())}) or ["x"]
    have = {m.TYPE.value for _, _, m in templates}
    hours = next((m.hours for _, _, m in templates if m.TYPE.value == "freq_query"), 24)
    templates += [t3 for t3 in synthetic(peers, hours) if t3[2].TYPE.value not in have or t3[2].TYPE.value == "heartbeat"]
    printer(f"{name}: {len(templates)} real and synthetic messages of {len({m.TYPE for _, _, m in templates})} types "
            f"({time.monotonic() - t:.1f} s)")
    for mode in args.modes:
        ref = Run(name, mode, "ref", work / name / f"{mode}-ref")
        ref.start(scenario, extra, args.peers_per_process, keys, args.timeout_s)
        ready = ref.wait_ready()
        r = ref.finish()
        window_s = max(1.0, ref.wall_s - (ref.t_ready - ref.t_start)) if ready else 10.0
        rows.append(row(name, mode, "ref", ref, r, r, None))
        printer(table_row(rows[-1]))
        left = quota if mode == "insecure" else args.strangers
        k = 0
        while left > 0 and k < args.max_runs:
            k += 1
            fz = Run(name, mode, f"fuzz{k}", work / name / f"{mode}-fuzz{k}")
            fz.start(scenario, extra, args.peers_per_process, keys, args.timeout_s)
            if not fz.wait_ready():
                f = fz.finish()
                rows.append(row(name, mode, fz.label, fz, f, r, {"error": "ended before it was ready"}))
                printer(table_row(rows[-1]))
                break
            forge = Forge(templates, fz.run_id, [*fz.mesh, "coordinator"], rng.randrange(2**32))
            if mode == "insecure":
                fuzz = fuzz_insecure(fz, forge, left, window_s, args.max_rate, rng, with_huge=True)
                done = sum(fuzz["sent"].values())
            else:
                fuzz = fuzz_curve(fz, forge, keys, left, args.per_connection, window_s, rng)
                done = fuzz["connections"]
            left -= done
            f = fz.finish()
            rows.append(row(name, mode, fz.label, fz, f, r, fuzz))
            printer(table_row(rows[-1]))
            if done == 0:
                break


def row(name: str, mode: str, label: str, run: Run, res: dict, ref: dict, fuzz: dict | None) -> dict:
    s = res["summary"]
    logs = logs_report(run.out / "logs") if (run.out / "logs").exists() else {"coordinator": {}, "peers": {},
                                                                                "per_host": {}, "crashed": []}
    out = {"target": name, "mode": mode, "run": label, "exit_code": res["code"], "wall_s": round(run.wall_s, 2),
           "processes": res["processes"], "left": len(res["left"]), "crashed": logs["crashed"],
           "rejected_by_role": s.get("rejected_by_role"), "logs": {"coordinator": logs["coordinator"],
                                                                  "peers": logs["peers"]},
           **compare(ref, res)}
    out["stderr"] = res["stderr"].strip().splitlines()[-1] if res["code"] and res["stderr"].strip() else ""
    ref_dispatch = run.out.parent / f"{mode}-ref" / "dispatch.csv"
    out["dispatch_max_diff"] = dispatch_diff(ref_dispatch, run.out / "dispatch.csv") if (
        ref_dispatch.exists() and (run.out / "dispatch.csv").exists()) else math.inf
    out["fuzz"] = fuzz
    checks = {"exit_0": res["code"] == 0, "no_crash": not logs["crashed"], "none_left": not res["left"],
              "same_iterations": out["iterations"] == out["iterations_ref"] and out["rounds"] == out["rounds_ref"],
              "welfare": out["welfare_rel_diff"] <= 1e-9, "dispatch": out["dispatch_max_diff"] <= 1e-9}
    ref_counts = {role: counted(ref["summary"], role) for role in ("coordinator", "peers")}
    if fuzz is None:
        checks["none_rejected"] = not s.get("rejected_messages")
    elif "sent" in fuzz:
        diff = {}
        for role in ("coordinator", "peers"):
            got = counted(s, role)
            got.subtract(ref_counts[role])
            n = sum(got.values())
            in_log = sum((logs[role] or {}).values())
            diff[role] = {"sent": fuzz["sent"][role], "counted": n, "in_logs": in_log, "by_reason": {k: v for k, v in got.items() if v}}
            # every message is in the role's own log; summary.json has the peers' counts as of their
            # last heartbeat before the results were written (those refused later are only logged)
            exact = role == "coordinator"
            checks[f"{role}_counted"] = in_log == fuzz["sent"][role] and (
                n == fuzz["sent"][role] if exact else n <= fuzz["sent"][role])
        out["accounting"] = diff
    elif "expected" in fuzz:
        diff = {}
        for role in ("coordinator", "peers"):
            got = counted(s, role)
            got.subtract(ref_counts[role])
            want = Counter(fuzz["expected"][role])
            diff[role] = {"connections": sum(want.values()), "expected": dict(want),
                          "counted": {k: v for k, v in got.items() if v}}
            checks[f"{role}_counted"] = all(got[k] == want[k] for k in set(got) | set(want))
        out["accounting"] = diff
    out["checks"] = checks
    out["ok"] = all(checks.values())
    return out


def table_row(r: dict) -> str:
    fz = r.get("fuzz") or {}
    acc = r.get("accounting") or {}
    if r["run"] == "ref":
        sent = "-"
        counts = "none" if not r.get("rejected_by_role") or not any(r["rejected_by_role"].values()) else json.dumps(
            r["rejected_by_role"])
    elif "sent" in fz:
        sent = f"{sum(fz['sent'].values())} (+{fz['over_zmq_limit']} >64MiB)"
        counts = "; ".join(f"{role} {a['counted']}/{a['sent']} {fmt(a['by_reason'])}" for role, a in acc.items())
    elif "expected" in fz:
        sent = f"{fz['connections']} conn ({sum(fz['offered'].values())} msgs queued, {fz['raw_tcp']} raw TCP)"
        counts = "; ".join(f"{role} {fmt(a['counted'])} (want {fmt(a['expected'])})" for role, a in acc.items())
    else:
        sent, counts = "?", json.dumps(fz)
    crashed = len(r["crashed"]) + (1 if r["exit_code"] else 0)
    return (f"| {r['target']} | {r['mode']} | {r['run']} | {sent} | {counts} | {crashed} | {r['left']} | "
            f"{r['iterations_ref']}/{r['iterations']} | {r['welfare_rel_diff']:.1e} | {r['dispatch_max_diff']:.1e} | "
            f"{r['wall_s']:.1f} | {'ok' if r['ok'] else 'FAIL ' + ','.join(k for k, v in r['checks'].items() if not v)} |")


def fmt(counts: dict) -> str:
    return "{" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + "}"


HEADER = ("| target | mode | run | hostile sent | rejected counted (fuzzed - ref) by role and reason | crashed | left | "
          "iterations ref/fuzzed | welfare rel diff | dispatch max diff | wall s | checks |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=100_000,
                    help="hostile messages that reach the decoders (insecure runs), over all targets")
    ap.add_argument("--strangers", type=int, default=150, help="stranger connections per target (CURVE runs)")
    ap.add_argument("--per-connection", type=int, default=5, help="hostile messages each stranger queues")
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--modes", nargs="+", default=["curve", "insecure"], choices=["curve", "insecure"])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-rate", type=float, default=4000.0, help="hostile messages per second at most")
    ap.add_argument("--max-runs", type=int, default=6, help="fuzzed runs per target and mode at most")
    ap.add_argument("--peers-per-process", type=int, default=10)
    ap.add_argument("--timeout-s", type=float, default=60.0)
    ap.add_argument("--work", type=Path, default=None, help="results folders of the runs (default: a temporary folder)")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args(argv)

    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="p2pm-fuzz-"))
    rng = random.Random(args.seed)
    rows: list[dict] = []
    t0 = time.monotonic()
    print(f"work folder {work}; {args.messages} hostile messages over {len(args.targets)} targets, seed {args.seed}",
          flush=True)
    print(HEADER, flush=True)
    share = [args.messages // len(args.targets) + (1 if i < args.messages % len(args.targets) else 0)
             for i in range(len(args.targets))]
    for name, quota in zip(args.targets, share):
        run_target(name, args, work, quota, rng, rows, lambda line: print(line, flush=True))
    fuzzed = [r for r in rows if r["run"] != "ref"]
    total = sum(sum(r["fuzz"]["sent"].values()) for r in fuzzed if r.get("fuzz") and "sent" in r["fuzz"])
    strangers = sum(r["fuzz"]["connections"] for r in fuzzed if r.get("fuzz") and "connections" in r["fuzz"])
    ok = all(r["ok"] for r in rows) and total >= args.messages
    by_reason: dict[str, Counter] = {}  # over every fuzzed run: what each role counted, by reason
    for r in fuzzed:
        for role, a in (r.get("accounting") or {}).items():
            by_reason.setdefault(f"{r['mode']} {role}", Counter()).update(a.get("by_reason") or a.get("counted") or {})
    print("\ncounted over all fuzzed runs (fuzzed - reference):", flush=True)
    for key, counts in sorted(by_reason.items()):
        print(f"  {key}: {sum(counts.values())} {fmt(dict(counts))}", flush=True)
    kinds = Counter()
    for r in fuzzed:
        kinds.update((r.get("fuzz") or {}).get("by_kind") or {})
    if kinds:
        print(f"  insecure messages by kind: {fmt(dict(kinds))}", flush=True)
    wall = time.monotonic() - t0
    load = os.getloadavg()
    print(f"\nhostile messages to the decoders: {total} (asked {args.messages}); stranger connections (CURVE): "
          f"{strangers}; runs {len(rows)} ({len(fuzzed)} fuzzed); all checks: {'ok' if ok else 'FAILED'}; "
          f"wall {wall:.0f} s; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs",
          flush=True)
    if args.out:
        args.out.write_text(json.dumps({"messages_to_decoders": total, "stranger_connections": strangers, "ok": ok,
                                        "counted_by_role_and_reason": {k: dict(v) for k, v in by_reason.items()},
                                        "insecure_messages_by_kind": dict(kinds),
                                        "wall_s": wall, "loadavg": load, "cpus": os.cpu_count(), "seed": args.seed,
                                        "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                       indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
