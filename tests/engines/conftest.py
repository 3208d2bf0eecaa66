"""Small markets for the engine tests (in process, no sockets)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from common.grid import GridModel
from common.models import EVModel, HourlyPeer, ev_plugged_mask, load_utility_coefficients

H = 4


def small_p2p(H: int = H, seed: int = 3) -> list[HourlyPeer]:
    """Two producers and two consumers over H hours."""
    rng = np.random.default_rng(seed)
    peers = []
    for i in range(2):
        hi = rng.uniform(2.0, 5.0, H)
        peers.append(HourlyPeer(f"g{i}", "chp", 1, np.zeros(H), hi, np.full(H, rng.uniform(0.5, 2.0)),
                                np.full(H, rng.uniform(5.0, 20.0)), 0.0))
    for i in range(2):
        d_min, d_max = rng.uniform(1.0, 2.0, H), rng.uniform(3.0, 4.0, H)
        a, b = load_utility_coefficients(d_min, d_max, rng.uniform(40.0, 60.0), rng.uniform(0.0, 10.0))
        peers.append(HourlyPeer(f"l{i}", "load", 2, -d_max, -d_min, a, b, 0.3))
    return peers


def small_community(H: int = 6):
    """Three peers (a load, a PV unit, an EV) on a 3-bus feeder, and its grid model."""
    t = np.arange(H)
    base = 0.3 + 0.1 * np.sin(t)
    a, b = load_utility_coefficients(0.9 * base, 1.1 * base, 150.0, 40.0)
    load = HourlyPeer("load2", "load", 2, -1.1 * base, -0.9 * base, a, b, 0.3)
    pv = HourlyPeer("pv1", "pv", 1, np.zeros(H), 0.2 * np.ones(H), np.full(H, 1.0), np.full(H, 4.0), 0.0)
    ev = EVModel(id="ev1", bus=2, capacity_mwh=0.06, soc_initial_mwh=0.03, soc_min_mwh=0.006, soc_departure_mwh=0.04,
                 soc_final_mwh=0.03, trip_energy_mwh=0.01, p_charge_max_mw=0.011, p_discharge_max_mw=0.011,
                 eta_charge=0.95, eta_discharge=0.95, arrival_hour=1, departure_hour=5, degradation_eur_per_mwh=3.0,
                 plugged=ev_plugged_mask(1, 5, H))
    grid = GridModel(n_bus=3, root=0, base_mva=1.0, base_kv=np.full(3, 12.66), from_bus=[0, 1], to_bus=[1, 2],
                     r_pu=[0.02, 0.03], x_pu=[0.015, 0.02], s_max_pu=[np.inf, np.inf], branch_kind=("line",) * 2,
                     branch_name=("l01", "l12"), vm_min_pu=0.95, vm_max_pu=1.05)
    return [load, pv, ev], grid


class FlowLog:
    """Every delivered message as (iteration, type, sender, receiver)."""

    def __init__(self):
        self.rows: list[tuple[int, str, str, str]] = []
        self.messages: list = []

    def __call__(self, now_s, sender, to, iteration, message):
        self.rows.append((iteration, message.TYPE.value, sender, to))
        self.messages.append((sender, to, iteration, message))

    def count(self, **where) -> Counter:
        keys = ("iteration", "type", "sender", "to")
        return Counter(r for r in self.rows if all(r[keys.index(k)] == v for k, v in where.items()))

    def n(self, **where) -> int:
        return sum(self.count(**where).values())


@pytest.fixture
def flow():
    return FlowLog()


@pytest.fixture
def p2p_peers():
    return small_p2p()


@pytest.fixture
def community_case():
    return small_community()
