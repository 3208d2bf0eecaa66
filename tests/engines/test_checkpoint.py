"""Coordinator checkpoints and resume, in process: a run interrupted after a checkpoint and resumed
from it (new peer engines, a new coordinator) ends at the optimum of the uninterrupted run; a
checkpoint survives the disk (written atomically, read without pickle) and is refused for
another market."""

from __future__ import annotations

import numpy as np
import pytest

from common.checkpoint import CheckpointError, check_matches, read_state, write_state
from common.engine import InProcessDriver
from coordinator.engine import CoordinatorEngine, resume_unsupported
from p2pm.local import market_public
from peer_node.engine import PeerEngine


def _hosts(peers):
    return [PeerEngine(peers[:2], "h0000-g0"), PeerEngine(peers[2:], "h0002-l0")]


def _run(public, peers, **kw):
    coordinator = CoordinatorEngine(public, **kw)
    driver = InProcessDriver([coordinator, *_hosts(peers)])
    return coordinator, driver, driver.run()


def test_a_run_resumed_from_its_checkpoint_ends_at_the_uninterrupted_optimum(p2p_peers, tmp_path):
    public = market_public(p2p_peers, tolerance=1e-7, pool_price_start=False)
    _, ref_driver, reference = _run(public, p2p_peers)
    ref = reference.clearings[-1]
    assert ref.rounds.iteration > 40  # long enough to stop in the middle

    # the same run, checkpointing every 10 iterations; it "dies" after its third checkpoint
    _, driver, _ = _run(public, p2p_peers, checkpoint_every=10)
    assert [c.iteration for c in driver.checkpoints][:3] == [10, 20, 30]
    path = write_state(tmp_path, driver.checkpoints[2])
    state = read_state(tmp_path)
    assert path.name == "state.npz" and not list(path.parent.glob(".state-*"))  # no temporary file left
    assert state.iteration == 30 and len(state.history) == 30
    np.testing.assert_array_equal(state.trades_mw, driver.checkpoints[2].trades_mw)

    coordinator, resumed_driver, resumed = _run(public, p2p_peers, resume=state)
    got = resumed.clearings[-1]
    assert got.converged and coordinator.resumed_from["iteration"] == 30
    assert got.rounds.start_iteration == 30 and len(got.rounds.history) > 30  # history carried over, counting on
    assert abs(got.sw_eur.sum() - ref.sw_eur.sum()) <= 1e-6 * abs(ref.sw_eur.sum())
    np.testing.assert_allclose(got.p_mw, ref.p_mw, atol=1e-3)
    # the resumed run spends fewer iterations than a restart from scratch would
    assert got.rounds.iteration - 30 < ref.rounds.iteration
    assert not any(n.event == "ready" and n.fields.get("resumed") for n in resumed_driver.notes)
    assert any(n.event == "resumed" and n.fields["iteration"] == 30 for n in resumed_driver.notes)


def test_no_checkpoint_where_the_coordinator_does_not_hold_the_state(p2p_peers):
    public = market_public(p2p_peers, tolerance=1e-6, pool_price_start=False)
    _, driver, _ = _run(public, p2p_peers, topology="mesh", checkpoint_every=5)
    assert driver.checkpoints == []
    assert "mesh" in resume_unsupported(public.market, "mesh")
    assert resume_unsupported(public.market, "relay") is None


def test_a_checkpoint_of_another_market_or_a_broken_file_is_refused(p2p_peers, tmp_path):
    public = market_public(p2p_peers, tolerance=1e-6, pool_price_start=False)
    _, driver, _ = _run(public, p2p_peers, checkpoint_every=5)
    state = driver.checkpoints[0]
    ids, H, K = list(state.peer_ids), state.hours, state.trades_mw.shape[0]
    check_matches(state, scenario=state.scenario, topology="relay", peer_ids=ids, hours=H, pairs=K)
    for kw, field in ((dict(topology="mesh"), "checkpoint.topology"), (dict(peer_ids=ids[::-1]), "checkpoint.peer_ids"),
                      (dict(hours=H + 1), "checkpoint.hours"), (dict(pairs=K + 2), "checkpoint.trades_mw"),
                      (dict(scenario="other"), "checkpoint.scenario")):
        args = dict(scenario=state.scenario, topology="relay", peer_ids=ids, hours=H, pairs=K) | kw
        with pytest.raises(CheckpointError) as err:
            check_matches(state, **args)
        assert err.value.field == field
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state(tmp_path)
    write_state(tmp_path, state)
    (tmp_path / "checkpoint" / "state.npz").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_state(tmp_path)


def test_a_coordinator_refuses_a_checkpoint_that_does_not_fit(p2p_peers):
    public = market_public(p2p_peers, tolerance=1e-6, pool_price_start=False)
    _, driver, _ = _run(public, p2p_peers, checkpoint_every=5)
    state = driver.checkpoints[0]
    state.trades_mw = state.trades_mw[:-1]  # a checkpoint that does not fit the market
    with pytest.raises(CheckpointError) as err:
        CoordinatorEngine(public, resume=state)
    assert err.value.field == "checkpoint.trades_mw"
    with pytest.raises(CheckpointError, match="mesh"):
        CoordinatorEngine(public, resume=driver.checkpoints[0], topology="mesh")
