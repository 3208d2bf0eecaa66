"""Scenario families that scale: N peers from a base mix on a real feeder (``p2pm scenarios make``).

A made scenario keeps the base scenario's series, market settings and mix of peers (``mv37``:
22 flexible loads, 3 CHP, 22 PV, 2 wind farms; the external supplier), and replicates the mix
until there are N peers: N - 1 market peers (base peer ``i mod B`` for the i-th, B the number of
base peers other than the supplier, in an order whose every prefix keeps the mix's proportions) plus the external supplier at the feeder's root. Every number
is documented in ``common/scenarios/families.md``.

- **Sizes.** The market's aggregate is the base's, scaled to the feeder: each replica's size (load
  baseline, PV/wind forecast, CHP bounds) is the base peer's x ``B / (N - 1)`` x ``feeder scale``
  x a seeded factor drawn uniformly in [1 - jitter, 1 + jitter] (jitter 0.2 by default). The feeder
  scale is the feeder transformer's rating over the base network's (``mv37``: 20 MVA), 1 on the
  base network itself. The quadratic cost terms that make curtailment unique (``a``) are divided by
  the same factor, so that each replica's marginal cost at its own full output is the base peer's.
  The supplier's import (and export) limit is scaled by the feeder scale.
- **Stopping tolerance.** ``market.tolerance`` x feeder scale: the residuals are in MW and the
  market is that much smaller, so the same relative accuracy is asked of every size.
- **Buses.** On the base network (``--feeder mv37``) each replica sits on its base peer's bus. On an
  LV feeder (``common.feeders``) the market peers are spread over the feeder's house
  connections: a seeded shuffle of those buses, used in turn; the supplier sits on bus 0 (the
  transformer's primary, where the ext_grid is).
- **Market.** ``p2p`` (the base's settings) or ``community`` (rho 100, no residual balancing, the
  supplier's prices as the tariff at the root, as in ``ieee33-ev``). The full P2P market of N peers
  has producers x consumers trades (about N^2 / 4).
- **Ids.** ``<base id>-<replica>`` (``load3-0``, ``load3-1``, ...); the supplier keeps its id.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import yaml

from common.scenario import FEEDER_BUSES, ScenarioError, load_scenario, parse_scenario, resolve_path
from p2pm.builders.writer import scenario_yaml

FEEDERS = ("mv37", *FEEDER_BUSES)
BASE_TRANSFORMER_MVA = {"mv37": 20.0}
SIZE_FIELDS = {"load": ("p_base_mw",), "pv": ("p_forecast_mw",), "wind": ("p_forecast_mw",),
               "chp": ("p_min_mw", "p_max_mw")}
COST_A_FIELDS = ("cost_a_eur_per_mw2h",)


def _scale_hourly(value, k: float):
    if isinstance(value, dict):
        return {**value, "scale": round(float(value.get("scale", 1.0)) * k, 9)}
    if isinstance(value, list):
        return [round(float(v) * k, 9) for v in value]
    return round(float(value) * k, 9)


def _interleaved(mix: list[dict]) -> list[dict]:
    """The base peers in an order whose every prefix has the mix's proportions of kinds (the j-th of
    n peers of a kind at position (j + 1/2) / n), so that a small N is a fair sample of the mix."""
    count: dict[str, int] = {}
    for p in mix:
        count[p["kind"]] = count.get(p["kind"], 0) + 1
    seen: dict[str, int] = {}
    keyed = []
    for i, p in enumerate(mix):
        j = seen.get(p["kind"], 0)
        seen[p["kind"]] = j + 1
        keyed.append(((j + 0.5) / count[p["kind"]], i, p))
    return [p for _, _, p in sorted(keyed, key=lambda t: (t[0], t[1]))]


def make_scenario(n_peers: int, *, feeder: str = "mv37", base: str = "mv37", market: str | None = None,
                  seed: int = 0, jitter: float = 0.2, name: str | None = None) -> dict:
    """The scenario document (a dict, validated) of ``n_peers`` peers from ``base``'s mix on ``feeder``."""
    if feeder not in FEEDERS:
        raise ScenarioError(f"feeder: unknown feeder {feeder!r}; known: {', '.join(FEEDERS)}")
    if not 0 <= jitter < 1:
        raise ScenarioError("jitter: must be in [0, 1)")
    raw = yaml.safe_load(resolve_path(base).read_text())
    base_sc = load_scenario(base)
    if base_sc.network.name not in BASE_TRANSFORMER_MVA:
        raise ScenarioError(f"base: the base network of {base!r} is {base_sc.network.name or base_sc.network.file!r}; "
                            f"a family is made from a base on {', '.join(BASE_TRANSFORMER_MVA)}")
    market = market or base_sc.market.kind
    if market not in ("p2p", "community"):
        raise ScenarioError(f"market: {market!r} is not a market kind (p2p, community)")
    grid = [p for p in raw["peers"] if p["kind"] == "grid"]
    mix = _interleaved([p for p in raw["peers"] if p["kind"] not in ("grid", "virtual_load")])
    if len(grid) != 1:
        raise ScenarioError(f"base: {base!r} needs exactly one external supplier (kind 'grid')")
    if market == "p2p" and any(p["kind"] == "ev" for p in mix):
        raise ScenarioError(f"market: the base {base!r} has EVs, which the full P2P market does not take; "
                            "use --market community")
    if n_peers < 3:
        raise ScenarioError("peers: at least 3 (the supplier and a producer and a consumer)")
    rng = np.random.default_rng(seed)
    if feeder == "mv37":
        feeder_scale, buses = 1.0, None
    else:
        from common.feeders import house_buses, transformer_mva

        feeder_scale = transformer_mva(feeder) / BASE_TRANSFORMER_MVA[base_sc.network.name]
        houses = house_buses(feeder)
        buses = [houses[i] for i in rng.permutation(len(houses))]
    share = len(mix) / (n_peers - 1) * feeder_scale
    factors = rng.uniform(1 - jitter, 1 + jitter, size=n_peers - 1)
    peers = []
    g = copy.deepcopy(grid[0])
    g["bus"] = 0
    for key in ("p_import_max_mw", "p_export_max_mw"):
        if key in g:
            g[key] = round(float(g[key]) * feeder_scale, 9)
    peers.append(g)
    for i in range(n_peers - 1):
        src = mix[i % len(mix)]
        k = share * float(factors[i])
        p = copy.deepcopy(src)
        p["id"] = f"{src['id']}-{i // len(mix)}"
        if buses is not None:
            p["bus"] = int(buses[i % len(buses)])
        for fld in SIZE_FIELDS.get(p["kind"], ()):
            if fld in p:
                p[fld] = _scale_hourly(p[fld], k)
        if p["kind"] == "ev":
            for fld in ("capacity_mwh", "soc_initial_mwh", "soc_min_mwh", "soc_departure_mwh", "soc_final_mwh",
                        "trip_energy_mwh", "p_charge_max_mw", "p_discharge_max_mw"):
                if p.get(fld) is not None:
                    p[fld] = round(float(p[fld]) * k, 9)
        for fld in COST_A_FIELDS:
            if p.get(fld):
                p[fld] = round(float(p[fld]) / k, 9)
        peers.append(p)
    m = dict(raw["market"])
    m["kind"] = market
    m.pop("model", None)
    m["tolerance"] = float(m.get("tolerance", 1e-4)) * feeder_scale
    if market == "community" and base_sc.market.kind != "community":
        m.update(rho=100.0, residual_balancing=False, max_iterations=max(int(m.get("max_iterations", 2000)), 2000))
        for key in ("pool_price_start", "acceleration"):
            m.pop(key, None)
    name = name or f"{base}-{feeder}-{n_peers}" + ("" if market == base_sc.market.kind else f"-{market}")
    doc = {
        "name": name,
        "description": f"{n_peers} peers from the {base} mix ({len(mix)} market peers and the supplier, replicated, sizes "
                       f"x {len(mix)}/{n_peers - 1} x {feeder_scale:.4g} x U[{1 - jitter:g}, {1 + jitter:g}], seed {seed}) on "
                       f"the {feeder} feeder; {market} market (p2pm scenarios make; common/scenarios/families.md).",
        "network": {"name": feeder},
        "market": m,
        "series": raw.get("series", {}),
        "peers": peers,
    }
    parse_scenario(doc, source=name)
    return doc


def header(doc: dict, command: str) -> str:
    return (f"# {doc['name']} -- {doc['description']}\n# GENERATED by `{command}`; every choice: "
            "common/scenarios/families.md and p2pm/builders/make_scenario.py.\n")


def write(doc: dict, out: Path, command: str) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(scenario_yaml(doc, header(doc, command)))
    return out
