"""The network model (common.network): deterministic with a seed, per link, in order, with
bandwidth; the in-process driver's clock follows it."""

from __future__ import annotations

import pytest

from common.network import LinkNetwork, LinkSpec, link_kind


def _arrivals(net, sends):
    return [net.arrival_s(a, b, n, t) for a, b, n, t in sends]


SENDS = [("coordinator", "h0000-a", 1000, 0.0), ("h0000-a", "coordinator", 500, 0.01),
         ("coordinator", "h0001-b", 1000, 0.0), ("h0000-a", "h0001-b", 200, 0.02),
         ("coordinator", "dso", 4000, 0.03), ("coordinator", "h0000-a", 1000, 0.05)] * 20


def _model(seed):
    return LinkNetwork(default=LinkSpec(20.0, 0.2), links={"peer-peer": LinkSpec(5.0, 0.5, 10.0)}, seed=seed)


def test_same_seed_same_arrivals_other_seed_other_arrivals():
    a, b, c = _arrivals(_model(7), SENDS), _arrivals(_model(7), SENDS), _arrivals(_model(8), SENDS)
    assert a == b and a != c
    again = LinkNetwork.from_json(_model(7).to_json())
    assert _arrivals(again, SENDS) == a


def test_a_links_delays_do_not_depend_on_other_links():
    alone = [s for s in SENDS if s[:2] == ("coordinator", "h0000-a")]
    mixed = _arrivals(_model(3), SENDS)
    only = _arrivals(_model(3), alone)
    assert [t for s, t in zip(SENDS, mixed) if s[:2] == ("coordinator", "h0000-a")] == only


def test_latency_jitter_bounds_order_and_bandwidth():
    net = LinkNetwork(default=LinkSpec(10.0, 0.2), seed=1)
    times = [net.arrival_s("coordinator", "h0000-a", 100, 0.0) for _ in range(200)]
    assert all(0.008 - 1e-12 <= t <= 0.012 + 1e-12 for t in times)
    assert times == sorted(times)  # a link delivers in order
    assert len(set(times)) > 1
    bw = LinkNetwork(links={"peer-peer": LinkSpec(0.0, 0.0, 8.0)})  # 8 Mbit/s = 1 MB/s
    assert bw.arrival_s("h0000-a", "h0001-b", 1_000_000, 0.0) == pytest.approx(1.0)
    assert bw.arrival_s("h0000-a", "h0001-b", 500_000, 0.2) == pytest.approx(1.5)  # queued behind the first
    assert bw.arrival_s("h0001-b", "h0000-a", 500_000, 0.2) == pytest.approx(0.7)  # the other direction is free
    assert link_kind("coordinator", "tso") == "coordinator-service"
    assert link_kind("h0002-x", "coordinator") == "coordinator-peer"
    assert link_kind("h0002-x", "h0001-y") == "peer-peer"
    with pytest.raises(ValueError):
        LinkNetwork(links={"ring": LinkSpec()})
    with pytest.raises(ValueError):
        LinkSpec(jitter=1.5)


def test_the_shell_reads_the_model_from_the_environment(monkeypatch):
    monkeypatch.delenv("P2PM_NETWORK", raising=False)
    assert LinkNetwork.from_env() is None
    monkeypatch.setenv("P2PM_NETWORK", LinkNetwork(seed=4).to_json())
    assert LinkNetwork.from_env() is None  # no latency, no bandwidth: sends go straight out
    monkeypatch.setenv("P2PM_NETWORK", _model(4).to_json())
    assert _arrivals(LinkNetwork.from_env(), SENDS) == _arrivals(_model(4), SENDS)
