"""Asynchronous ADMM with bounded staleness (mesh, ``market.staleness``): under latency and jitter
on the in-process driver's network clock (seeded), the hosts iterate on their own and reach the
centralized optimum; no ROUND between the start and the stop; deterministic with the seed; sooner
on the simulated clock than the synchronous rounds."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from common.centralized import solve_p2p
from common.network import LinkNetwork, LinkSpec
from engines.conftest import small_p2p
from p2pm.local import clear_market

H = 4


def _clear(peers, staleness: int, seed: int = 7, trace=None, tolerance: float = 1e-5):
    net = LinkNetwork(default=LinkSpec(latency_ms=5.0, jitter=0.2), seed=seed)
    outcome, coordinator, driver = clear_market(peers, rho=5.0, tolerance=tolerance, residual_balancing=False,
                                                pool_price_start=False, hour_stopping=False, topology="mesh",
                                                peers_per_process=1, staleness=staleness, network=net,
                                                max_iterations=5000, trace=trace)
    return outcome.clearings[-1], driver


def test_async_mesh_reaches_the_centralized_optimum_under_jitter():
    peers = small_p2p(H, seed=5)
    ref = solve_p2p(peers)
    rows = []
    c, driver = _clear(peers, staleness=1, trace=lambda now, s, to, k, m: rows.append((now, type(m).__name__, s, to, k)))
    assert c.converged
    np.testing.assert_allclose(c.p_mw, ref.p_mw, atol=1e-4)
    sw_ref = ref.social_welfare_eur.sum()
    assert abs(c.sw_eur.sum() - sw_ref) <= 1e-6 * abs(sw_ref)
    # reciprocal trades, and the two sides of a pair hold the same price
    g = c.rounds.graph
    assert np.abs(c.trades_mw + c.trades_mw[g.reverse]).max() < 1e-4
    assert np.abs(c.prices_eur_per_mwh - c.prices_eur_per_mwh[g.reverse]).max() < 1e-3
    # one ROUND starts the hosts, one stops them; residuals of every iteration from every host
    kinds = Counter(r[1] for r in rows)
    assert kinds["Round"] == 2 * 4
    its = c.rounds.iteration
    assert kinds["Residuals"] >= 4 * its
    # the hosts really ran apart: some host computed an iteration before a partner's previous one arrived
    sent = {}
    for now, kind, s, to, k in rows:
        if kind == "Trades":
            sent.setdefault(s, []).append((now, k))
    spread = max(max(k for _, k in v) for v in sent.values()) - its
    assert spread >= 1


def test_async_mesh_is_deterministic_and_sooner_than_synchronous_rounds():
    peers = small_p2p(H, seed=5)
    a, da = _clear(peers, staleness=2, tolerance=1e-3)
    b, db = _clear(peers, staleness=2, tolerance=1e-3)
    assert a.rounds.iteration == b.rounds.iteration and da.now_s == db.now_s
    np.testing.assert_array_equal(a.p_mw, b.p_mw)
    sync, ds = _clear(peers, staleness=0, tolerance=1e-3)
    assert sync.converged and a.converged
    assert da.now_s < ds.now_s  # three messages per synchronous iteration, none waited for in between


@pytest.mark.parametrize("market, field", [
    (dict(kind="community", staleness=2), "market.staleness"),
    (dict(kind="p2p", model="cong", staleness=2), "market.staleness"),
])
def test_staleness_only_in_the_p2p_benchmark(tmp_path, market, field):
    import yaml

    from common.scenario import ScenarioError, load_scenario
    from p2pm_support import small_market

    doc = yaml.safe_load(small_market(tmp_path / "s.yaml", 3).read_text())
    doc["market"].update(market)
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ScenarioError, match=field):
        load_scenario(tmp_path / "x.yaml")


def test_staleness_needs_the_mesh(tmp_path):
    import yaml

    from p2pm_support import invoke, small_market

    doc = yaml.safe_load(small_market(tmp_path / "s.yaml", 3).read_text())
    doc["market"]["staleness"] = 2
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(doc))
    r = invoke("run", tmp_path / "x.yaml", "--topology", "relay", "--out", tmp_path / "out", "--quiet")
    assert r.exit_code == 2 and "market.staleness" in r.output


def test_trades_before_the_round_are_kept(monkeypatch):
    """A partner's host may start (and send its first trades) before this host gets its ROUND: the
    coordinator-peer links are slow and jittery here, the peer-peer links fast."""
    import peer_node.engine as pe

    taken = []
    original = pe.PeerEngine._on_round

    def on_round(self, msg, k):
        if self.staleness > 0 and self.async_mesh is None and not msg.stop:
            taken.append(len(self._early))
        return original(self, msg, k)

    monkeypatch.setattr(pe.PeerEngine, "_on_round", on_round)
    peers = small_p2p(H, seed=5)
    ref = solve_p2p(peers)
    net = LinkNetwork(links={"coordinator-peer": LinkSpec(latency_ms=50.0, jitter=0.9)},
                      default=LinkSpec(latency_ms=1.0), seed=3)
    outcome, _, driver = clear_market(peers, rho=5.0, tolerance=1e-5, residual_balancing=False, pool_price_start=False,
                                      hour_stopping=False, topology="mesh", peers_per_process=1, staleness=1,
                                      network=net, max_iterations=5000)
    c = outcome.clearings[-1]
    assert sum(taken) > 0  # some host had trades waiting when its ROUND came
    assert c.converged and not driver.rejected
    assert abs(c.sw_eur.sum() - ref.social_welfare_eur.sum()) <= 1e-6 * abs(ref.social_welfare_eur.sum())
