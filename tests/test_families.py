"""Scenario families (p2pm scenarios make), the trade graph at scale, the pool reference and the
message-size check made before a run."""

from __future__ import annotations

import numpy as np
import pytest

from common.market import trade_graph_from_roster
from common.models import PRODUCER_KINDS, peer_models
from common.scenario import ScenarioError, parse_scenario


def _loop_graph(producer, two_way):
    owner, partner = [], []
    for n in range(len(producer)):
        for m in range(len(producer)):
            if n != m and (two_way[n] or two_way[m] or producer[n] != producer[m]):
                owner.append(n)
                partner.append(m)
    lookup = {(n, m): k for k, (n, m) in enumerate(zip(owner, partner))}
    return owner, partner, [lookup[(m, n)] for n, m in zip(owner, partner)]


@pytest.mark.parametrize("n, with_two_way", [(2, False), (3, False), (9, True), (57, False), (57, True)])
def test_the_vectorised_trade_graph_is_the_pairwise_one(n, with_two_way):
    rng = np.random.default_rng(n)
    producer = list(rng.random(n) < 0.45)
    producer[0], producer[-1] = True, False
    two_way = list(rng.random(n) < 0.2) if with_two_way else [False] * n
    g = trade_graph_from_roster([f"p{i}" for i in range(n)], producer, two_way if with_two_way else None)
    owner, partner, reverse = _loop_graph(producer, two_way)
    assert g.owner.tolist() == owner and g.partner.tolist() == partner and g.reverse.tolist() == reverse
    assert np.array_equal(g.reverse[g.reverse], np.arange(g.n_pairs))
    expected = np.where(np.asarray(two_way)[g.owner], 0.0, np.where(np.asarray(producer)[g.owner], 1.0, -1.0))
    assert np.array_equal(g.sign, expected)


def test_a_made_family_keeps_the_mix_and_the_aggregate_and_is_valid_for_both_markets():
    from p2pm.builders.make_scenario import make_scenario

    base = parse_scenario(make_scenario(50, jitter=0.0))  # 49 market peers = the mv37 mix once
    big = parse_scenario(make_scenario(99, jitter=0.0))  # twice, each at half size
    assert len(big.peers) == 99 and len({p.id for p in big.peers}) == 99
    kinds = lambda sc: sorted(p.kind for p in sc.peers)  # noqa: E731
    assert kinds(big)[:3] == ["chp"] * 3 and sum(p.kind == "pv" for p in big.peers) == 44
    peak = lambda sc: sum(m.p_max_mw.sum() for m in peer_models(sc) if m.kind != "grid")  # noqa: E731
    assert peak(big) == pytest.approx(peak(base), rel=1e-6)
    small = parse_scenario(make_scenario(10, seed=3))
    assert {p.kind for p in small.peers} >= {"grid", "load", "pv"}
    assert any(p.kind in PRODUCER_KINDS and p.kind != "grid" for p in small.peers)
    lv = parse_scenario(make_scenario(30, feeder="kerber-dorf", market="community", seed=1))
    assert lv.market.kind == "community" and lv.network.name == "kerber-dorf"
    assert lv.market.tolerance == pytest.approx(1e-5 * 0.4 / 20)
    assert parse_scenario(make_scenario(30, feeder="kerber-dorf", seed=1)).market.kind == "p2p"
    # the same seed gives the same scenario; another seed another one
    assert make_scenario(20, seed=5) == make_scenario(20, seed=5) != make_scenario(20, seed=6)
    with pytest.raises(ScenarioError, match="feeder: unknown feeder"):
        make_scenario(20, feeder="nowhere")
    with pytest.raises(ScenarioError, match="market: the base 'ieee33-ev'|base: the base network"):
        make_scenario(20, base="ieee33-ev", market="p2p")


def test_the_pool_reference_is_the_full_markets_optimum():
    from common.centralized import solve_p2p
    from p2pm.builders.make_scenario import make_scenario
    from p2pm.experiment import pool_reference

    models = peer_models(parse_scenario(make_scenario(12, seed=2)))
    sw, _ = pool_reference(models)
    full = solve_p2p(models)
    assert sw == pytest.approx(float(np.sum(full.social_welfare_eur)), rel=1e-6)


def test_a_run_whose_messages_exceed_the_limit_is_refused_before_it_starts(tmp_path):
    from p2pm.builders.make_scenario import make_scenario
    from p2pm.launcher import LaunchError, run_distributed
    from p2pm.sizing import check_message_size

    sc = parse_scenario(make_scenario(1000, seed=0))
    assert check_message_size(sc, 50) is None
    reason = check_message_size(sc, 200)
    assert reason and "16 MiB message limit" in reason and "use at most" in reason
    with pytest.raises(LaunchError, match="peers_per_process 200"):
        run_distributed(sc, tmp_path / "run", peers_per_process=200, quiet=True)
    assert not (tmp_path / "run").exists()
