"""Where to draw a network: bus coordinates and branch end points for the network map of the report.

A network whose every in-service bus has geodata (pandapower's ``net.bus.geo``, e.g. case33bw) is
drawn there; any other one (e.g. mv37, built from the thesis's tables) gets a tree layout from the
slack: x = feeder depth (branches from the slack), y = the buses in depth-first order, each
branch's buses centred on its leaves. Meshed links are drawn but do not shape the layout.
"""

from __future__ import annotations

import json
from collections import defaultdict, deque

import numpy as np
import pandas as pd

BUS_COLUMNS = ["bus", "x", "y", "vn_kv", "slack", "source"]
BRANCH_COLUMNS = ["line", "element", "kind", "from_bus", "to_bus"]


def network_tables(net, branches: pd.DataFrame, li: np.ndarray, ti: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(buses: bus, x, y, vn_kv, slack, source; branches: line, element, kind, from_bus, to_bus) for the
    branches of the AC report (``dso_service.powerflow._branches``)."""
    from_bus = np.r_[net.line.loc[li, "from_bus"].to_numpy(dtype=int), net.trafo.loc[ti, "hv_bus"].to_numpy(dtype=int)
                     if len(ti) else np.array([], int)]
    to_bus = np.r_[net.line.loc[li, "to_bus"].to_numpy(dtype=int), net.trafo.loc[ti, "lv_bus"].to_numpy(dtype=int)
                   if len(ti) else np.array([], int)]
    br = pd.DataFrame({"line": branches["line"].to_numpy(dtype=int), "element": branches["element"].to_numpy(),
                       "kind": branches["kind"].to_numpy(), "from_bus": from_bus, "to_bus": to_bus},
                      columns=BRANCH_COLUMNS)
    bus_ids = net.bus.index[net.bus["in_service"].to_numpy(dtype=bool)].to_numpy(dtype=int)
    xy = _geodata(net, bus_ids)
    source = "geodata"
    roots = net.ext_grid.loc[net.ext_grid["in_service"].astype(bool), "bus"].to_numpy(dtype=int)
    if xy is None:
        xy = tree_layout(bus_ids, from_bus, to_bus, roots[0] if len(roots) else bus_ids[0])
        source = "tree layout"
    buses = pd.DataFrame({"bus": bus_ids, "x": xy[:, 0], "y": xy[:, 1],
                          "vn_kv": net.bus.loc[bus_ids, "vn_kv"].to_numpy(dtype=float),
                          "slack": np.isin(bus_ids, roots), "source": source},
                         columns=BUS_COLUMNS)
    return buses, br


def _geodata(net, bus_ids) -> np.ndarray | None:
    if "geo" not in net.bus.columns:
        return None
    out = np.full((len(bus_ids), 2), np.nan)
    for k, g in enumerate(net.bus.loc[bus_ids, "geo"].to_numpy()):
        try:
            coords = (json.loads(g) if isinstance(g, str) else g)["coordinates"]
            out[k] = float(coords[0]), float(coords[1])
        except (TypeError, ValueError, KeyError, IndexError):
            return None
    return out if np.isfinite(out).all() else None


def tree_layout(bus_ids, from_bus, to_bus, root: int) -> np.ndarray:
    """(x, y) per bus of ``bus_ids``: a tidy tree from ``root`` (buses it cannot reach are put in a
    column to the right)."""
    adj = defaultdict(list)
    for f, t in zip(from_bus, to_bus):
        adj[int(f)].append(int(t))
        adj[int(t)].append(int(f))
    children, depth = defaultdict(list), {int(root): 0}
    queue = deque([int(root)])
    while queue:
        b = queue.popleft()
        for n in sorted(adj[b]):
            if n not in depth:
                depth[n] = depth[b] + 1
                children[b].append(n)
                queue.append(n)
    y: dict[int, float] = {}
    next_leaf = [0.0]

    def place(b: int) -> float:  # iterative post-order would be longer; feeders are shallow enough
        kids = children[b]
        if not kids:
            y[b] = next_leaf[0]
            next_leaf[0] += 1.0
        else:
            y[b] = float(np.mean([place(k) for k in kids]))
        return y[b]

    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * len(bus_ids) + 100))
    try:
        place(int(root))
    finally:
        sys.setrecursionlimit(limit)
    far = max(depth.values(), default=0) + 1
    out = np.empty((len(bus_ids), 2))
    for k, b in enumerate(bus_ids):
        b = int(b)
        if b in depth:
            out[k] = depth[b], -y[b]
        else:
            out[k] = far, -next_leaf[0]
            next_leaf[0] += 1.0
    return out
