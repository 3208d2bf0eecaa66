"""Whom each peer of the full P2P market trades with (``market.partners`` of a scenario).

The full market trades every producer with every consumer (and every two-way peer with everybody):
about N^2/4 pairs, which is what makes large markets slow. Large P2P markets in the literature
restrict the trading partners (Sousa et al. 2019, sec. 5; Khorasany et al. 2019; Baroche et al.
2019's electrical distance): each peer trades with a few neighbours. The rules here (all public: the
scenario's network and roster, so the coordinator, the DSO and the centralized solver build the
same trade graph):

- ``full`` (default): every pair of the full market;
- ``k_nearest`` (``k``): each peer chooses its ``k`` nearest possible partners by ``distance``:
  ``network``, the length of the path between the two buses along the lines [km] (transformers
  0 km; pandapower.topology), or ``straight``, the distance between the buses' coordinates (the
  network's geodata); ties (peers on the same bus) are broken round-robin from the peer's own
  index, so that the choices spread over equally near partners. A pair trades when either side
  chooses it (the symmetric k-nearest-neighbour graph), so every peer has at least
  ``min(k, possible partners)`` partners;
- ``same_feeder``: a feeder is a subtree of the radial network below the substation busbar (the
  first bus, going down from the external grid, where the network branches); peers of the same
  feeder trade, peers on the busbar or above it (the substation) trade with every feeder;
- ``explicit``: ``lists`` {peer id: [partner ids]}; a pair listed on either side trades.

``hubs`` (default: the external supplier, kind ``grid``) keep every possible partner whatever the
rule, so that every consumer can still buy from the grid and the market stays feasible.

Only pairs of the full market can trade: a rule never makes two producers partners.
"""

from __future__ import annotations


import numpy as np


class PartnersError(ValueError):
    """A ``market.partners`` section that cannot be used; ``str()`` names the field."""


def eligible_pairs(producer, two_way=None) -> np.ndarray:
    """(N, N) the pairs of the full market: producers x consumers, two-way peers x everybody."""
    prod = np.asarray(producer, dtype=bool).reshape(-1)
    n = len(prod)
    tw = np.zeros(n, dtype=bool) if two_way is None else np.asarray(two_way, dtype=bool).reshape(-1)
    return (tw[:, None] | tw[None, :] | (prod[:, None] != prod[None, :])) & ~np.eye(n, dtype=bool)


_CACHE: dict = {}


def partner_mask(spec, network_spec, ids, kinds, buses, eligible: np.ndarray, net=None) -> np.ndarray | None:
    """(N, N) symmetric boolean mask of the pairs allowed by ``spec`` (a ``PartnersSpec``), within
    ``eligible``; None for the full market. ``net``: the pandapower network if already built."""
    if spec is None or spec.rule == "full":
        return None
    key = (spec.model_dump_json(), network_spec.model_dump_json() if network_spec is not None else "",
           tuple(ids), tuple(int(b) for b in buses), eligible.tobytes())
    if key in _CACHE:
        return _CACHE[key].copy()
    ids = list(ids)
    N = len(ids)
    index = {pid: n for n, pid in enumerate(ids)}
    buses = np.asarray(buses, dtype=int)
    hubs = spec.hubs if spec.hubs is not None else [pid for pid, k in zip(ids, kinds) if k == "grid"]
    unknown = [h for h in hubs if h not in index]
    if unknown:
        raise PartnersError(f"market.partners.hubs: unknown peer(s) {', '.join(unknown[:5])}")
    if spec.rule == "explicit":
        chosen = np.zeros((N, N), dtype=bool)
        for pid, partners in spec.lists.items():
            if pid not in index:
                raise PartnersError(f"market.partners.lists.{pid}: unknown peer {pid!r}")
            for q in partners:
                if q not in index:
                    raise PartnersError(f"market.partners.lists.{pid}: unknown partner {q!r}")
                if not eligible[index[pid], index[q]]:
                    raise PartnersError(f"market.partners.lists.{pid}: {pid} and {q} cannot trade (two producers, "
                                        "two consumers, or the peer itself)")
                chosen[index[pid], index[q]] = True
    elif spec.rule == "k_nearest":
        dist = _distances(spec.distance, network_spec, buses, net)
        chosen = np.zeros((N, N), dtype=bool)
        order_tie = (np.arange(N)[None, :] - np.arange(N)[:, None]) % N  # round-robin from the peer itself
        for n in range(N):
            cand = np.flatnonzero(eligible[n])
            if len(cand) == 0:
                continue
            pick = cand[np.lexsort((order_tie[n, cand], dist[n, cand]))[: spec.k]]
            chosen[n, pick] = True
    elif spec.rule == "same_feeder":
        feeder = _feeders(network_spec, buses, net)
        on_trunk = feeder < 0
        chosen = (feeder[:, None] == feeder[None, :]) | on_trunk[:, None] | on_trunk[None, :]
    else:  # the schema allows only the rules above
        raise PartnersError(f"market.partners.rule: unknown rule {spec.rule!r}")
    mask = chosen | chosen.T
    for h in hubs:
        mask[index[h], :] = mask[:, index[h]] = True
    mask &= eligible
    alone = np.flatnonzero(~mask.any(axis=1) & eligible.any(axis=1))
    if len(alone):
        raise PartnersError(f"market.partners: peer(s) {', '.join(ids[i] for i in alone[:5])} have no trading partner "
                            f"under the rule {spec.rule!r}")
    _CACHE.clear()
    _CACHE[key] = mask
    return mask.copy()


def _network(network_spec, net):
    if net is not None:
        return net
    from common.networks import build_network

    return build_network(network_spec)


def _distances(kind: str, network_spec, buses: np.ndarray, net) -> np.ndarray:
    from common.networks import bus_coordinates, line_distances_km

    net = _network(network_spec, net)
    distinct = sorted(set(int(b) for b in buses))
    pos = {b: i for i, b in enumerate(distinct)}
    if kind == "network":
        D = line_distances_km(net, distinct)
        if not np.all(np.isfinite(D)):
            raise PartnersError("market.partners.distance: some peers' buses are not connected along the lines")
    else:
        xy = bus_coordinates(net)
        missing = [b for b in distinct if b not in xy]
        if missing:
            raise PartnersError(f"market.partners.distance: 'straight' needs bus coordinates; the network has none for "
                                f"bus(es) {missing[:10]} (use 'network')")
        P = np.array([xy[b] for b in distinct], dtype=float)
        D = np.sqrt(((P[:, None, :] - P[None, :, :]) ** 2).sum(axis=2))
    idx = np.array([pos[int(b)] for b in buses])
    return D[np.ix_(idx, idx)]


def bus_feeders(net) -> dict[int, int]:
    """{bus: feeder number} of a radial network: the subtrees below the substation busbar (the first
    bus from the external grid with more than one branch going down); -1 on the busbar and above."""
    import networkx as nx

    from common.networks import bus_graph

    g = nx.Graph(bus_graph(net))
    root = int(net.ext_grid.bus.iloc[0])
    parent, cur, trunk = None, root, {root}
    while True:
        children = [c for c in g.neighbors(cur) if c != parent]
        if len(children) != 1:
            break
        parent, cur = cur, children[0]
        trunk.add(cur)
    out = {int(b): -1 for b in g.nodes}
    below = [c for c in g.neighbors(cur) if c not in trunk]
    for f, child in enumerate(sorted(below)):
        seen, stack = {child}, [child]
        while stack:
            b = stack.pop()
            out[int(b)] = f
            for c in g.neighbors(b):
                if c not in seen and c not in trunk:
                    seen.add(c)
                    stack.append(c)
    return out


def _feeders(network_spec, buses: np.ndarray, net) -> np.ndarray:
    f = bus_feeders(_network(network_spec, net))
    return np.array([f.get(int(b), -1) for b in buses])


def roster_mask(market, network_spec, roster, net=None) -> np.ndarray | None:
    """The mask of a public roster (``common.public.RosterEntry``: id, kind, bus, two_way)."""
    from common.models import PRODUCER_KINDS

    spec = getattr(market, "partners", None)
    if spec is None or spec.rule == "full":
        return None
    two_way = [bool(getattr(p, "two_way", False)) for p in roster]
    producer = [p.kind in PRODUCER_KINDS and not w for p, w in zip(roster, two_way)]
    return partner_mask(spec, network_spec, [p.id for p in roster], [p.kind for p in roster], [p.bus for p in roster],
                        eligible_pairs(producer, two_way), net)


def public_graph(public, net=None):
    """The trade graph of a public scenario (its roster and ``market.partners``)."""
    from common.market import roster_graph

    return roster_graph(public.roster, roster_mask(public.market, public.network, public.roster, net))


def scenario_graph(scenario):
    """The trade graph of a (full) scenario: the same as its public part's."""
    from common.public import split_scenario

    return public_graph(split_scenario(scenario)[0])
