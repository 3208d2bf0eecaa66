"""Liveness, waits and loss policies as events of the engines (no sockets): a wait's deadline that
refused messages do not extend, a silent role lost after a few heartbeat intervals and named, a send
failure blamed on its receiver, a dropped peer host and the market cleared on without its peers (the
centralized optimum of the market without them), rejections counted by every role."""

from __future__ import annotations

import numpy as np
import pytest

from common.centralized import solve_p2p
from common.engine import COORDINATOR, Fail, InProcessDriver, PeerLost, Received, RunFailed, Send, Started, Tick
from common.protocol.control import Heartbeat
from common.protocol.grid import GridReport
from common.protocol.market import Trades, Update, UpdatePeer
from coordinator.engine import CoordinatorEngine
from p2pm.local import clear_market, market_public
from peer_node.engine import PeerEngine


class Net:
    """A hand-driven run: messages are delivered at the time given, in order; hosts in ``frozen``
    get nothing and say nothing (a stopped process)."""

    def __init__(self, coordinator, hosts):
        self.coordinator = coordinator
        self.engines = {e.name: e for e in [coordinator, *hosts]}
        self.queue: list[tuple[str, str, Send]] = []
        self.frozen: set[str] = set()
        self.ended: list = []  # the coordinator's Fail / Finish instructions

    def _take(self, source: str, instructions: list) -> None:
        for ins in instructions:
            if isinstance(ins, Send):
                self.queue.append((source, ins.to, ins))
            elif source == COORDINATOR and type(ins).__name__ in ("Fail", "Finish"):
                self.ended.append(ins)

    def start(self, now: float = 0.0) -> None:
        for name, engine in self.engines.items():
            self._take(name, engine.handle(Started(now)))
        self.pump(now)

    def event(self, to: str, event) -> None:
        self._take(to, self.engines[to].handle(event))

    def pump(self, now: float) -> None:
        """One hop: deliver what is in flight now (the answers go out with the next pump)."""
        flight, self.queue = self.queue, []
        for source, to, ins in flight:
            if to in self.frozen or source in self.frozen or to not in self.engines:
                continue
            self.event(to, Received(source, ins.message, ins.iteration, now))

    def warm_up(self, until_s: float = 2.0) -> None:
        """Start, then deliver every 0.1 s until ``until_s``: the clearing is running."""
        self.start(0.0)
        for t in np.arange(0.1, until_s, 0.1):
            self.pump(float(t))

    def beat_until_ended(self, t: float, beating: str = "h0000-g0") -> float:
        """Every 0.5 s only ``beating`` sends a heartbeat, and the coordinator ticks, until it ends
        the run; returns the time it did."""
        while not self.ended:
            t = round(t + 0.5, 1)
            self.event(COORDINATOR, Received(beating, Heartbeat(), 0, t))
            self.event(COORDINATOR, Tick(t))
            self.pump(t)
        return t


def _market(p2p_peers, **kw):
    public = market_public(p2p_peers, tolerance=1e-9, pool_price_start=False)
    coordinator = CoordinatorEngine(public, timeout_s=10.0, heartbeat_s=1.0, **kw)
    hosts = [PeerEngine(p2p_peers[:2], "h0000-g0"), PeerEngine(p2p_peers[2:], "h0002-l0")]
    return coordinator, hosts


def test_refused_messages_do_not_extend_a_wait(p2p_peers):
    """A stopped host while a trickle of stale answers (and heartbeats) comes from it: the wait ends
    at its deadline, 10 s after the round was sent, naming that host only."""
    coordinator, hosts = _market(p2p_peers)
    net = Net(coordinator, hosts)
    net.warm_up(3.0)  # registration and a few iterations
    k = coordinator.iteration
    assert k >= 2 and not net.ended
    net.frozen.add("h0002-l0")
    net.pump(3.0)  # the round of iteration k + 1 is out; h0002-l0 does not answer it
    k = coordinator.iteration
    H = hosts[1].hours
    stale = Update(peers={"l0": UpdatePeer(np.zeros((2, H)), np.zeros(H), np.zeros(H), 0.0),
                          "l1": UpdatePeer(np.zeros((2, H)), np.zeros(H), np.zeros(H), 0.0)})
    t = 3.0
    while not net.ended and t < 30:
        t = round(t + 0.5, 1)
        net.event(COORDINATOR, Received("h0002-l0", stale, k - 1, t))  # a stale answer
        net.event(COORDINATOR, Received("h0002-l0", Heartbeat(), 0, t))  # and it looks alive
        net.event(COORDINATOR, Received("h0000-g0", Heartbeat(), 0, t))
        net.event(COORDINATOR, Tick(t))
    fail = net.ended[0]
    assert isinstance(fail, Fail) and fail.role == "h0002-l0"
    assert 13.0 <= t <= 13.6  # the deadline counts from the round (t = 3 s), not from the last refused message
    assert f"iteration {k}: no answer within 10 s from h0002-l0" in fail.reason and "h0000-g0" not in fail.reason
    assert coordinator.rejected["stale"] >= 19


def test_a_stopped_host_is_lost_after_a_few_heartbeat_intervals_and_named(p2p_peers):
    coordinator, hosts = _market(p2p_peers)
    net = Net(coordinator, hosts)
    net.warm_up()
    net.frozen.add("h0002-l0")  # SIGSTOP: nothing, not even heartbeats
    t = net.beat_until_ended(2.0)
    fail = net.ended[0]
    assert fail.role == "h0002-l0" and t <= 2.0 + 5 * 1.0 + 1.0
    assert "peer host h0002-l0 (peers l0, l1) lost at iteration" in fail.reason
    assert "no message or heartbeat for" in fail.reason


def test_a_send_that_cannot_leave_blames_its_receiver_and_strangers_are_ignored(p2p_peers):
    coordinator, hosts = _market(p2p_peers)
    net = Net(coordinator, hosts)
    net.start(0.0)
    net.pump(0.1)
    net.event(COORDINATOR, PeerLost("a-stranger", 0.2, "disconnected"))  # not a role of the run
    assert not net.ended
    net.event(COORDINATOR, PeerLost("h0000-g0", 0.3, "could not send round to h0000-g0 within 10 s"))
    fail = net.ended[0]
    assert fail.role == "h0000-g0" and "could not send round" in fail.reason and "h0002-l0" not in fail.reason


def test_heartbeats_carry_every_roles_refusals(p2p_peers):
    coordinator, hosts = _market(p2p_peers)
    net = Net(coordinator, hosts)
    net.start(0.0)
    net.pump(0.1)
    net.event(COORDINATOR, Received("h0002-l0", Heartbeat(rejected={"stale": 4, "body": 1}), 0, 0.2))
    net.event(COORDINATOR, Received("stranger", Heartbeat(rejected={"body": 99}), 0, 0.2))  # not registered
    assert coordinator.role_rejected == {"h0002-l0": {"stale": 4, "body": 1}}
    # a registered role's heartbeat is never refused as an unexpected message; a stranger's is, and counted
    assert coordinator.rejected == {"type": 1}


def test_a_lost_host_aborts_by_default_and_is_dropped_on_request(p2p_peers):
    """Policy drop: the host of l1 is lost during iteration 6; the market clears on without l1,
    warm-started, to the centralized optimum of the market without it; the masked welfare still
    unmasks (the remaining peers left l1's pairs)."""
    peers = list(p2p_peers)
    public = market_public(peers, tolerance=1e-7, pool_price_start=False)

    def hosts():
        return [PeerEngine([p], f"h{i:04d}-{p.id}") for i, p in enumerate(peers)]

    with pytest.raises(RunFailed) as err:
        InProcessDriver([CoordinatorEngine(public), *hosts()], lose={"h0003-l1": 6}).run()
    assert err.value.role == "h0003-l1" and "peer host h0003-l1 (peer l1) lost at iteration 6" in err.value.reason

    coordinator = CoordinatorEngine(public, on_peer_loss="drop")
    driver = InProcessDriver([coordinator, *hosts()], lose={"h0003-l1": 6})
    outcome = driver.run()
    assert coordinator.dropped == [{"host": "h0003-l1", "peers": ["l1"], "iteration": 6,
                                    "reason": "lost (fault injection)", "detected_s": 0.0}]
    last = outcome.clearings[-1]
    assert last.converged and [p.id for p in coordinator.roster] == ["g0", "g1", "l0"]
    ref = solve_p2p(peers[:3])
    np.testing.assert_allclose(last.p_mw, ref.p_mw, atol=1e-4)
    assert abs(last.sw_eur.sum() - ref.social_welfare_eur.sum()) <= 1e-5 * abs(ref.social_welfare_eur.sum())
    # the same as a market that never had l1, cleared warm from where the loss left it
    fresh, _, _ = clear_market(peers[:3], tolerance=1e-7, pool_price_start=False)
    np.testing.assert_allclose(last.p_mw, fresh.clearings[-1].p_mw, atol=1e-4)
    # one history: iterations 1-5, then 7 on (iteration 6 never completed)
    assert last.rounds.start_iteration == 6 and len(last.rounds.history) == last.rounds.iteration - 1


def test_drop_is_refused_when_the_market_cannot_go_on(p2p_peers):
    """Both consumers on the lost host: nobody is left to buy."""
    public = market_public(p2p_peers, tolerance=1e-7, pool_price_start=False)
    hosts = [PeerEngine(p2p_peers[:2], "h0000-g0"), PeerEngine(p2p_peers[2:], "h0002-l0")]
    with pytest.raises(RunFailed) as err:
        InProcessDriver([CoordinatorEngine(public, on_peer_loss="drop"), *hosts], lose={"h0002-l0": 3}).run()
    assert err.value.role == "h0002-l0" and "would have no trading partner left" in err.value.reason


def test_a_trade_of_the_wrong_length_is_refused_and_counted_by_the_peer(p2p_peers):
    """Mesh: TRADES whose rows do not cover the hours of the iteration (now, or one round early)."""
    g0 = PeerEngine(p2p_peers[:1], "hg")
    H = 4
    g0.handle(Received(COORDINATOR, _welcome(p2p_peers), 0, 0.0))
    from common.protocol.market import Round

    g0.handle(Received(COORDINATOR, Round(rho=1.0, stop=False, peers={}), 1, 0.1))
    wrong = Trades(from_peers=("l0",), to_peers=("g0",), p_mw=np.zeros((1, H + 3)))
    out = g0.handle(Received("hl", wrong, 1, 0.2))  # this iteration
    out += g0.handle(Received("hl", wrong, 2, 0.2))  # one round early: checked when its round comes
    g0.handle(Received(COORDINATOR, Round(rho=1.0, stop=False, peers={}), 2, 0.3))
    assert g0.rejected == {"body": 2}
    assert all(type(i).__name__ == "Log" for i in out)


def _welcome(peers):
    from common.protocol.control import Welcome

    return Welcome(config={"run_id": "r", "hours": 4, "topology": "mesh", "market": "p2p",
                           "partners": {"g0": ["l0", "l1"]}, "hosts": {"l0": "hl", "l1": "hl"},
                           "public_keys": {}})


def test_a_grid_report_without_its_tables_is_refused_and_the_wait_goes_on(monkeypatch):
    """A GRID_REPORT saying ok without its tables (it would crash the results) is refused and
    counted; the DSO's real answer is still taken."""
    from common.scenario import load_scenario
    from p2pm.local import engines_for

    sc = load_scenario("mv37", max_iterations=3, pool_price_start=False)
    coordinator, engines = engines_for(sc, peers_per_process=25)

    class Forger:
        def __init__(self, dso):
            self.dso, self.name = dso, dso.name

        def handle(self, event):
            out = self.dso.handle(event)
            if any(isinstance(i, Send) and isinstance(i.message, GridReport) for i in out):
                empty = GridReport(violations=(), tables={})
                out = [Send(COORDINATOR, empty, event.iteration), *out]
            return out

    engines = [Forger(e) if e.name == "dso" else e for e in engines]
    outcome = InProcessDriver(engines).run()
    assert coordinator.rejected["body"] == 1
    assert "buses" in outcome.report.tables


def test_a_lost_host_that_comes_back_within_the_grace_time_ends_at_the_same_optimum(p2p_peers):
    """Policy wait: the host of l1 is lost during iteration 6 and started again at once (a new
    engine: fresh state, fresh keys); it is welcomed again, the others learn its new keys, and the
    clearing goes on from the last complete iteration to the optimum of the whole market."""
    peers = list(p2p_peers)
    public = market_public(peers, tolerance=1e-7, pool_price_start=False)

    def hosts():
        return [PeerEngine([p], f"h{i:04d}-{p.id}") for i, p in enumerate(peers)]

    coordinator = CoordinatorEngine(public, on_peer_loss="wait", grace_s=30.0)
    driver = InProcessDriver([coordinator, *hosts()], lose={"h0003-l1": 6},
                             restart={"h0003-l1": lambda: PeerEngine([peers[3]], "h0003-l1")})
    outcome = driver.run()
    (back,) = coordinator.rejoined
    assert back["host"] == "h0003-l1" and back["peers"] == ["l1"] and back["iteration"] == 6
    assert coordinator.dropped == [] and [p.id for p in coordinator.roster] == ["g0", "g1", "l0", "l1"]
    last = outcome.clearings[-1]
    ref = solve_p2p(peers)
    assert last.converged
    np.testing.assert_allclose(last.p_mw, ref.p_mw, atol=1e-4)
    # the welfare unmasks: every peer's pairs with l1 use its new key
    assert abs(last.sw_eur.sum() - ref.social_welfare_eur.sum()) <= 1e-5 * abs(ref.social_welfare_eur.sum())


def test_a_lost_host_that_does_not_come_back_ends_the_run_naming_it(p2p_peers):
    coordinator, hosts = _market(p2p_peers, on_peer_loss="wait", grace_s=8.0)
    net = Net(coordinator, hosts)
    net.warm_up()
    net.event(COORDINATOR, PeerLost("h0002-l0", 2.0, "disconnected"))
    t = net.beat_until_ended(2.0)
    fail = net.ended[0]
    assert fail.role == "h0002-l0" and 10.0 <= t <= 11.0
    assert "did not come back within 8 s" in fail.reason


def test_a_host_that_comes_back_has_every_other_host_start_again_in_every_hour(p2p_peers):
    """Policy wait with per-hour stopping: hours closed before the loss. After the WELCOME with
    the returning host's keys, the coordinator's next ROUND sets each peer's state in every hour
    (the clearing goes on as a fresh one from the last complete iteration), and the other hosts
    take it instead of refusing arrays that cover more than the hours they solved last."""
    from common.protocol.control import Welcome
    from common.protocol.market import Round, RoundPeer

    g0 = PeerEngine(p2p_peers[:1], "hg")
    H = 4
    config = {"run_id": "r", "hours": H, "topology": "relay", "market": "p2p", "partners": {"g0": ["l0", "l1"]},
              "hosts": {"l0": "hl", "l1": "hl"}, "public_keys": {}}
    g0.handle(Received(COORDINATOR, Welcome(config=config), 0, 0.0))
    g0.handle(Received(COORDINATOR, Round(rho=1.0, stop=False, peers={"g0": RoundPeer(p_in_mw=np.zeros((2, H)))},
                                          hours=np.array([1, 3])), 1, 0.1))  # hours 0 and 2 closed
    g0.handle(Received(COORDINATOR, Welcome(config={"run_id": "r", "rekey": True, "public_keys": {}}), 0, 0.2))
    start = RoundPeer(p_in_mw=np.full((2, H), 0.1), price_eur_per_mwh=np.full((2, H), 50.0),
                      p_own_mw=np.full((2, H), -0.1))
    out = g0.handle(Received(COORDINATOR, Round(rho=1.0, stop=False, peers={"g0": start}), 2, 0.3))
    assert g0.rejected == {}, out
    (update,) = [i.message for i in out if isinstance(i, Send)]
    assert isinstance(update, Update)


@pytest.mark.parametrize("service", ["dso", "tso"])
def test_a_service_lost_while_asked_is_asked_again_once_it_is_back(service):
    """Policy wait: the DSO (TSO) is lost when the coordinator sends it its request and is started
    again at once (a new engine); it registers again, gets the request again, and the run ends
    with its answer; ``rejoined_services`` says when."""
    from common.scenario import load_scenario
    from dso_service.engine import DSOEngine
    from p2pm.local import engines_for
    from tso_service.engine import TSOEngine

    sc = load_scenario("mv37")
    coordinator, engines = engines_for(sc, peers_per_process=25)
    coordinator.on_peer_loss, coordinator.grace_s = "wait", 30.0
    public = coordinator.public
    factory = {"dso": lambda: DSOEngine(public), "tso": lambda: TSOEngine(public.tso_virtual_load_mw)}[service]
    driver = InProcessDriver(engines, lose={service: 0}, restart={service: factory})
    outcome = driver.run()
    (back,) = coordinator.rejoined_services
    assert back["role"] == service and "fault injection" in back["reason"]
    assert coordinator.rejoined == [] and outcome.clearings[-1].converged
    assert "buses" in outcome.report.tables
    assert sum(1 for n in driver.notes if n.event == "waiting" and n.fields["host"] == service) == 1


def test_a_lost_service_that_does_not_come_back_ends_the_run_naming_it():
    from common.scenario import load_scenario
    from p2pm.local import engines_for

    sc = load_scenario("mv37")
    coordinator, engines = engines_for(sc, peers_per_process=25)
    coordinator.on_peer_loss, coordinator.grace_s = "wait", 5.0
    with pytest.raises(RunFailed) as err:
        InProcessDriver(engines, lose={"dso": 0}).run()
    assert err.value.role == "dso" and "the dso service, lost (lost (fault injection)), did not come back" in err.value.reason


def test_trades_after_a_refused_welcome_are_refused_and_counted(p2p_peers):
    """Mesh: a WELCOME that names no host for a partner is refused; TRADES that come anyway are
    refused too (the host has no layout of the exchange), and the host goes on."""
    from common.protocol.control import Welcome

    g0 = PeerEngine(p2p_peers[:1], "hg")
    config = dict(_welcome(p2p_peers).config, hosts={"l0": "hl"})  # l1's host missing
    out = g0.handle(Received(COORDINATOR, Welcome(config=config), 0, 0.0))
    assert g0.rejected == {"body": 1} and all(type(i).__name__ == "Log" for i in out)
    out = g0.handle(Received("hl", Trades(from_peers=("l0",), to_peers=("g0",), p_mw=np.zeros((1, 4))), 1, 0.1))
    assert g0.rejected == {"body": 2} and all(type(i).__name__ == "Log" for i in out)
