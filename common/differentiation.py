"""Product differentiation as data (thesis eq. 3.1; Sousa et al. 2019; Baroche et al. 2019): the
fee every trade costs the peers on its two sides, from the scenario's ``differentiation`` section.

A trade between n and m carries the fee ``c_n * gamma_nm`` EUR/MWh for the peer n that pays it:
``gamma_nm`` is given (a matrix or a list of pairs) or computed by one of the recipes below, and
``c_n`` is the scenario's ``c_eur_per_mwh`` (or the peer's own entry in ``c_by_peer_eur_per_mwh``).
Who pays (``side``): the buyer, the seller, or both (``shared``: each side pays half of its own
fee). In the objective of the full P2P market (SPEC 3.2) the fee is the term ``w_nm p_nm`` of the
peer n that owns the trade p_nm, with ``w_nm = +fee`` when n sells (p_nm > 0) and ``-fee`` when n
buys (p_nm < 0), so that ``w_nm p_nm = fee |p_nm|`` >= 0.

Recipes for gamma_nm (symmetric; the peers' buses b(n), b(m)):

- ``given``: ``gamma`` as a mapping ``{n: {m: value}}`` (an absent (m, n) mirrors (n, m)) or a
  list of ``{peers: [n, m], gamma: value}``; pairs not listed: 0;
- ``distance``: the straight-line distance between the two buses (the thesis's definition), from
  ``bus_coordinates_km`` ({bus: [x, y]} in km) or, without it, the network's bus geodata
  (pandapower ``bus.geo`` / ``bus_geodata``, in the network's own coordinate units);
- ``network_distance``: the length of the shortest path between the buses along the lines [km]
  (pandapower.topology; transformers count 0 km);
- ``zonal``: ``zone_gamma`` for each pair of zones ({zones: [A, B], gamma}), ``intra_zone_gamma``
  within a zone; a peer's zone from ``zones`` ({peer id: zone}) or its bus's ``zone`` in the network;
- ``unique``: gamma = 1 for every trade (the fee is c);
- ``network_usage``: the network usage of a 1 MW trade from m to n in the DC approximation,
  gamma_nm = sum over branches l of weight_l |PTDF[l, b(n)] - PTDF[l, b(m)]| (Baroche et al.
  2019's electrical-distance policy), weight_l = 1 (``ptdf_weight: none``), the branch's
  reactance in ohm (``reactance_ohm``) or its length in km (``length_km``).

Between two two-way peers (prosumers) the direction of a trade is not known beforehand: no fee
is charged on it (a fee on |p_nm| would not be linear). Each peer's fees on its own trades are its
private data: they go into its private file (``common.models.peer_model_to_dict``); the
coordinator never needs them.
"""

from __future__ import annotations


import numpy as np


def gamma_matrix(scenario, models) -> np.ndarray:
    """(N, N) gamma_nm over the scenario's peers (in ``models`` order)."""
    spec = scenario.differentiation
    ids = [m.id for m in models]
    buses = np.array([int(m.bus) for m in models])
    index = {pid: n for n, pid in enumerate(ids)}
    N = len(ids)
    method = spec.method
    if method == "unique":
        g = np.ones((N, N))
    elif method == "given":
        g = np.zeros((N, N))
        given = np.zeros((N, N), dtype=bool)
        if isinstance(spec.gamma, dict):
            for a, row in spec.gamma.items():
                for b, value in row.items():
                    g[index[a], index[b]] = value
                    given[index[a], index[b]] = True
            mirror = given.T & ~given
            g[mirror] = g.T[mirror]
        else:
            for pair in spec.gamma or []:
                a, b = (index[p] for p in pair.peers)
                g[a, b] = g[b, a] = pair.gamma
    elif method == "distance":
        xy = _bus_xy(scenario, buses)
        g = np.sqrt(((xy[:, None, :] - xy[None, :, :]) ** 2).sum(axis=2))
    elif method == "network_distance":
        g = _network_distance_km(scenario, buses)
    elif method == "zonal":
        zones = _zones(scenario, models)
        fee = {frozenset(z.zones): z.gamma for z in spec.zone_gamma}
        g = np.array([[fee.get(frozenset((zones[n], zones[m])), spec.intra_zone_gamma if zones[n] == zones[m] else 0.0)
                       for m in range(N)] for n in range(N)])
    elif method == "network_usage":
        g = _network_usage(scenario, buses)
    else:  # the schema allows only the names above
        raise ValueError(f"unknown differentiation method {method!r}")
    np.fill_diagonal(g, 0.0)
    return g


def trade_fees(scenario, models) -> dict[str, dict[str, float]]:
    """{peer id: {partner id: w}}: the weight w of each of the peer's trades in the full P2P market
    (``w p_nm`` = the fee it pays on that trade, EUR), only for trades that cost it something."""
    from common.market import trade_graph

    spec = scenario.differentiation
    g = gamma_matrix(scenario, models)
    graph = trade_graph(models)
    ids = graph.peer_ids
    c = np.array([spec.c_by_peer_eur_per_mwh.get(pid, spec.c_eur_per_mwh) for pid in ids])
    share = {"buyer": (1.0, 0.0), "seller": (0.0, 1.0), "shared": (0.5, 0.5)}[spec.side]  # (buyer, seller)
    out: dict[str, dict[str, float]] = {}
    for k in range(graph.n_pairs):
        n, m = int(graph.owner[k]), int(graph.partner[k])
        sign = graph.sign[k] if graph.sign[k] != 0 else -graph.sign[graph.reverse[k]]  # +1: n sells on this trade
        if sign == 0:  # two two-way peers: the direction is not known beforehand
            continue
        part = share[1] if sign > 0 else share[0]
        fee = part * c[n] * g[n, m]
        if fee != 0.0:
            out.setdefault(ids[n], {})[ids[m]] = float(sign * fee)
    return out


# -- recipes -----------------------------------------------------------------------------------------
def _net(scenario):
    from common.networks import build_network

    return build_network(scenario.network)


def _bus_xy(scenario, buses: np.ndarray) -> np.ndarray:
    spec = scenario.differentiation
    if spec.bus_coordinates_km is not None:
        missing = sorted({int(b) for b in buses} - set(spec.bus_coordinates_km))
        if missing:
            raise ValueError(f"differentiation.bus_coordinates_km: no coordinates for bus(es) {missing[:10]}")
        return np.array([spec.bus_coordinates_km[int(b)] for b in buses], dtype=float)
    from common.networks import bus_coordinates

    xy = bus_coordinates(_net(scenario))
    missing = sorted({int(b) for b in buses} - set(xy))
    if missing:
        raise ValueError(f"differentiation.method 'distance': the network has no coordinates for bus(es) {missing[:10]}; "
                         "give differentiation.bus_coordinates_km")
    return np.array([xy[int(b)] for b in buses], dtype=float)


def _network_distance_km(scenario, buses: np.ndarray) -> np.ndarray:
    from common.networks import line_distances_km

    out = line_distances_km(_net(scenario), buses)
    if not np.all(np.isfinite(out)):
        raise ValueError("differentiation.method 'network_distance': some peers' buses are not connected")
    return out


def _zones(scenario, models) -> list[str]:
    spec = scenario.differentiation
    if spec.zones is not None:
        missing = [m.id for m in models if m.id not in spec.zones]
        if missing:
            raise ValueError(f"differentiation.zones: no zone for peer(s) {', '.join(missing[:10])}")
        return [str(spec.zones[m.id]) for m in models]
    net = _net(scenario)
    return [str(net.bus.at[int(m.bus), "zone"]) for m in models]


def ptdf_matrix(net) -> tuple[np.ndarray, np.ndarray]:
    """(PTDF (branches, buses) in the pandapower bus order, per-branch reactance in ohm) of the DC
    power flow of ``net`` (lines, then transformers), slack at the ext_grid."""
    import pandapower as pp
    from pandapower.pypower.idx_brch import BR_X
    from pandapower.pypower.makePTDF import makePTDF

    import logging
    import warnings

    quiet = logging.getLogger("pandapower")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the DC power flow warns about numba even with numba=False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pp.rundcpp(net, numba=False)
    finally:
        quiet.setLevel(level)
    ppc = net._ppc
    lookup = net._pd2ppc_lookups["bus"]
    ptdf = makePTDF(ppc["baseMVA"], ppc["bus"], ppc["branch"])
    cols = lookup[net.bus.index.to_numpy()]
    base_kv = ppc["bus"][:, 9]  # BASE_KV
    fbus = ppc["branch"][:, 0].real.astype(int)
    x_ohm = np.abs(ppc["branch"][:, BR_X].real) * base_kv[fbus] ** 2 / ppc["baseMVA"]
    return ptdf[:, cols], x_ohm


def _network_usage(scenario, buses: np.ndarray) -> np.ndarray:
    spec = scenario.differentiation
    net = _net(scenario)
    ptdf, x_ohm = ptdf_matrix(net)
    if spec.ptdf_weight == "reactance_ohm":
        weight = x_ohm
    elif spec.ptdf_weight == "length_km":
        n_line = len(net.line)
        weight = np.zeros(ptdf.shape[0])
        weight[:n_line] = net.line["length_km"].to_numpy(dtype=float)[: min(n_line, len(weight))]
    else:
        weight = np.ones(ptdf.shape[0])
    cols = ptdf[:, [int(net.bus.index.get_loc(int(b))) for b in buses]]  # (L, N)
    return np.einsum("l,lnm->nm", weight, np.abs(cols[:, :, None] - cols[:, None, :]))
