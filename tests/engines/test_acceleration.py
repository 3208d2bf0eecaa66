"""Anderson acceleration of the P2P loop (relay: in the coordinator; mesh: the hosts hold their part
of the state and answer sums): the same optimum in fewer iterations, and the plain step taken
whenever an accelerated point is rejected."""

from __future__ import annotations

import numpy as np
import pytest

from common.admm import Anderson, AndersonCoefficients, AndersonMemory, BlockAnderson
from common.centralized import solve_p2p
from p2pm.local import clear_market


def test_anderson_solves_a_linear_fixed_point_in_few_steps():
    rng = np.random.default_rng(0)
    n = 12
    Q = np.linalg.qr(rng.normal(size=(n, n)))[0]
    A = Q @ np.diag(rng.uniform(0.5, 0.99, n)) @ Q.T  # a slow contraction
    b = rng.normal(size=n)
    star = np.linalg.solve(np.eye(n) - A, b)
    aa, z = Anderson(memory=n + 1), np.zeros(n)
    for _ in range(2 * n):
        z = aa.step(z, A @ z + b)
    plain = np.zeros(n)
    for _ in range(2 * n):
        plain = A @ plain + b
    assert np.linalg.norm(z - star) < 1e-4 * np.linalg.norm(star)
    assert np.linalg.norm(plain - star) > 100 * np.linalg.norm(z - star)


def _drift_map(z: np.ndarray) -> np.ndarray:
    """Prices 0.01 apart from a kink at 10 per step while far from it (a translation: f is the
    same at every point, Anderson's differences vanish), a contraction onto 10 near it."""
    return z + np.minimum(0.01, 0.5 * (10.0 - z))


@pytest.mark.parametrize("drift", [True, False])
def test_drift_steps_cross_a_translation_that_anderson_alone_walks(drift):
    """Where the map is a translation, ``DriftSteps`` doubles its step (the safeguard undoing an
    overshoot) and reaches the fixed point in tens of steps; without them Anderson walks the 1 000
    plain steps of 0.01 (or worse)."""
    aa, z = BlockAnderson(memory=5, drift=drift), np.zeros((1, 2))
    steps = 0
    while np.abs(z - 10.0).max() > 1e-9 and steps < 5000:
        z = aa.step(z, _drift_map(z))
        steps += 1
    assert np.abs(z - 10.0).max() <= 1e-9
    if drift:
        assert steps < 100 and aa.coef.drift.jumps > 5, steps
    else:
        assert steps >= 900, steps


def test_block_anderson_is_one_anderson_per_block():
    """Independent blocks (the hours) extrapolate with their own coefficients: the same iterates as
    one Anderson per block; dropping a block leaves the others' memory intact."""
    rng = np.random.default_rng(1)
    n, B = 8, 3
    maps = []
    for _ in range(B):
        Q = np.linalg.qr(rng.normal(size=(n, n)))[0]
        maps.append((Q @ np.diag(rng.uniform(0.3, 0.95, n)) @ Q.T, rng.normal(size=n)))
    block, single = BlockAnderson(memory=5, safeguard=1e9), [Anderson(memory=5, safeguard=1e9) for _ in range(B)]
    zb, zs = np.zeros((B, n)), [np.zeros(n) for _ in range(B)]
    for step in range(12):
        if step == 6:  # block 1 closes
            block.keep(np.array([True, False, True]))
            maps, zb, single, zs = [maps[0], maps[2]], zb[[0, 2]], [single[0], single[2]], [zs[0], zs[2]]
        tb = np.stack([A @ z + b for (A, b), z in zip(maps, zb)])
        zb = block.step(zb, tb)
        zs = [aa.step(z, A @ z + b) for aa, (A, b), z in zip(single, maps, zs)]
        np.testing.assert_allclose(zb, np.stack(zs), rtol=1e-6, atol=1e-9)


def test_memory_split_over_holders_gives_the_same_coefficients():
    """The state spread over two holders (each its own AndersonMemory, the sums added) extrapolates
    exactly as one BlockAnderson over the whole state; uncounted entries follow the same steps."""
    rng = np.random.default_rng(2)
    n, B = 10, 2
    maps = [(0.9 * np.linalg.qr(rng.normal(size=(n, n)))[0] @ np.diag(rng.uniform(0.3, 1.0, n)), rng.normal(size=n))
            for _ in range(B)]
    whole = BlockAnderson(memory=4)
    parts, coef = [AndersonMemory(4), AndersonMemory(4)], AndersonCoefficients(memory=4)
    z = np.zeros((B, n))
    for _ in range(10):
        t = np.stack([A @ zb + b for (A, b), zb in zip(maps, z)])
        nxt = whole.step(z, t)
        # holder 0: entries 0-5 (the last two mirrored, not counted); holder 1: entries 4-9
        s0 = parts[0].record(z[:, :6], t[:, :6], counted=4)
        s1 = parts[1].record(z[:, 4:], t[:, 4:])
        gamma, reject = coef.step(*(a + b for a, b in zip(s0, s1)))
        o0, o1 = parts[0].extrapolate(gamma, reject), parts[1].extrapolate(gamma, reject)
        np.testing.assert_allclose(np.concatenate([o0[:, :4], o1], axis=1), nxt, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(o0[:, 4:], nxt[:, 4:6], rtol=1e-9, atol=1e-12)
        z = nxt


def _clear(peers, **kw):
    outcome, coordinator, _ = clear_market(peers, rho=5.0, residual_balancing=False, tolerance=1e-7, pool_price_start=False,
                                           max_iterations=20000, peers_per_process=2, **kw)
    return outcome.clearings[-1], outcome.clearings[-1].rounds


def test_acceleration_reaches_the_centralized_optimum_in_fewer_iterations(p2p_peers):
    ref = solve_p2p(p2p_peers)
    plain, r_plain = _clear(p2p_peers)
    fast, r_fast = _clear(p2p_peers, acceleration=True)
    assert plain.converged and fast.converged
    assert r_fast.iteration < r_plain.iteration / 3, (r_fast.iteration, r_plain.iteration)
    np.testing.assert_allclose(fast.p_mw, ref.p_mw, atol=1e-4)
    assert abs(fast.sw_eur.sum() - ref.social_welfare_eur.sum()) <= 1e-7 * abs(ref.social_welfare_eur.sum())
    assert r_fast.anderson.accepted > 0


def test_rejected_acceleration_falls_back_to_the_plain_step(p2p_peers):
    """A safeguard no accelerated point can pass: every one is rejected, the plain step from the
    last accepted point is taken, and the clearing still reaches the optimum."""
    ref = solve_p2p(p2p_peers)
    cleared, rounds = _clear(p2p_peers, acceleration=True, aa_safeguard=1e-9)
    assert rounds.anderson.rejected > 10
    assert cleared.converged
    np.testing.assert_allclose(cleared.p_mw, ref.p_mw, atol=1e-4)


def test_mesh_acceleration_follows_the_relay_and_reaches_the_optimum(p2p_peers):
    """Mesh: the hosts record their part and answer sums, the coordinator sends the coefficients;
    without per-hour stopping the iterates are the relay's (up to rounding), and it converges."""
    ref = solve_p2p(p2p_peers)
    relay, r_relay = _clear(p2p_peers, acceleration=True, hour_stopping=False)
    mesh, r_mesh = _clear(p2p_peers, acceleration=True, hour_stopping=False, topology="mesh")
    assert mesh.converged and r_mesh.aa_coef.accepted > 0
    n = min(len(r_relay.history), len(r_mesh.history), 30)
    np.testing.assert_allclose([h.primal_residual for h in r_mesh.history[:n]],
                               [h.primal_residual for h in r_relay.history[:n]], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(mesh.p_mw, ref.p_mw, atol=1e-4)
    assert abs(mesh.sw_eur.sum() - ref.social_welfare_eur.sum()) <= 1e-7 * abs(ref.social_welfare_eur.sum())
    plain, r_plain = _clear(p2p_peers, hour_stopping=False, topology="mesh")
    assert r_mesh.iteration < r_plain.iteration / 3, (r_mesh.iteration, r_plain.iteration)


def test_mesh_acceleration_with_hour_stopping_and_a_rejecting_safeguard(p2p_peers):
    ref = solve_p2p(p2p_peers)
    for safeguard in (1.0, 1e-9):  # 1e-9: every accelerated point is rejected, the plain step taken
        cleared, rounds = _clear(p2p_peers, acceleration=True, topology="mesh", aa_safeguard=safeguard)
        assert cleared.converged
        np.testing.assert_allclose(cleared.p_mw, ref.p_mw, atol=1e-4)
    assert rounds.aa_coef.rejected > 10
