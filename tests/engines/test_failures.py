"""Failures as events: a silent peer host, a DSO that cannot check a dispatch, stale and forged
messages; every one ends in a failure naming the role, or is rejected and counted."""

from __future__ import annotations

import numpy as np
import pytest

from common.engine import InProcessDriver, Received, RunFailed, Send
from common.protocol.market import Update, UpdatePeer
from common.scenario import load_scenario
from coordinator.engine import CoordinatorEngine
from p2pm.local import clear_market, engines_for, market_public
from peer_node.engine import PeerEngine


class Silent:
    """A peer host that stops answering after ``after`` rounds (a process that hangs or died)."""

    def __init__(self, engine, after: int):
        self.engine, self.after, self.name, self.rounds = engine, after, engine.name, 0

    def handle(self, event):
        out = self.engine.handle(event)
        if isinstance(event, Received) and type(event.message).__name__ == "Round":
            self.rounds += 1
            if self.rounds > self.after:
                return []
        return out


def test_a_silent_peer_host_ends_the_run_naming_it(p2p_peers):
    public = market_public(p2p_peers, tolerance=1e-9, pool_price_start=False)
    hosts = [PeerEngine(p2p_peers[:2], "h0000-g0"), Silent(PeerEngine(p2p_peers[2:], "h0002-l0"), after=3)]
    driver = InProcessDriver([CoordinatorEngine(public), *hosts])
    with pytest.raises(RunFailed) as err:
        driver.run()
    assert err.value.role == "h0002-l0"
    assert "iteration 4: no answer" in err.value.reason and "h0002-l0 (peer l0, l1)" in err.value.reason
    assert "h0000-g0" not in err.value.reason


def test_a_dso_that_cannot_check_the_dispatch_is_named_and_lives_on(monkeypatch):
    def broken(*a, **kw):
        raise ValueError("the network has no bus 99")

    monkeypatch.setattr("dso_service.powerflow.run_ac", broken)
    sc = load_scenario("mv37", max_iterations=3, pool_price_start=False)
    coordinator, engines = engines_for(sc, peers_per_process=25)
    driver = InProcessDriver(engines)
    with pytest.raises(RunFailed) as err:
        driver.run()
    assert err.value.role == "dso" and "could not check the dispatch" in err.value.reason
    assert "no bus 99" in err.value.reason
    assert "dso" not in driver.finished  # the engine answered; nothing killed it


def test_stale_forged_and_malformed_answers_are_rejected_and_counted(p2p_peers):
    """A host answering for another host's peers, with the wrong shape or for another iteration is
    refused; the clearing goes on to the same result."""
    reference, _, _ = clear_market(list(p2p_peers), tolerance=1e-6, peers_per_process=2, pool_price_start=False)

    class Noisy:
        def __init__(self, engine):
            self.engine, self.name = engine, engine.name

        def handle(self, event):
            out = self.engine.handle(event)
            if isinstance(event, Received) and type(event.message).__name__ == "Round" and not event.message.stop:
                k = event.iteration
                H = event.message.peers["g0"].p_in_mw.shape[1]
                forged = [Update(peers={"l0": UpdatePeer(np.zeros((2, H)), np.zeros(H), 0.0)}),  # not its peer
                          Update(peers={"g0": UpdatePeer(np.zeros((5, H)), np.zeros(H), 0.0),
                                        "g1": UpdatePeer(np.zeros((2, H)), np.zeros(H), 0.0)})]  # wrong shape
                out = [Send("coordinator", m, k) for m in forged] + [Send("coordinator", forged[0], k - 1)] + out
            return out

    coordinator = CoordinatorEngine(market_public(p2p_peers, tolerance=1e-6, pool_price_start=False))
    driver = InProcessDriver([coordinator, Noisy(PeerEngine(p2p_peers[:2], "h0000-g0")),
                              PeerEngine(p2p_peers[2:], "h0002-l0")])
    outcome = driver.run()
    K = outcome.clearings[-1].rounds.iteration
    assert K == reference.clearings[-1].rounds.iteration
    np.testing.assert_allclose(outcome.clearings[-1].p_mw, reference.clearings[-1].p_mw, atol=1e-12)
    assert coordinator.rejected["body"] >= 2 * (K - 1) and coordinator.rejected["stale"] >= K - 1
