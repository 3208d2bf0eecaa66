"""Anderson acceleration of the P2P relay loop: the same optimum in fewer iterations, and the
plain step taken whenever an accelerated point is rejected."""

from __future__ import annotations

import numpy as np
import pytest

from common.admm import Anderson, BlockAnderson
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
