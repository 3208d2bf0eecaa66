"""Build the built-in scenario ``mv37``: the thesis's 37-bus 11 kV network with a full P2P market.

Run ``python -m p2pm.builders.build_mv37`` from the repository root. It reads the CSVs in
``common/data/`` (credits in ``common/data/CREDITS.md``) and the suggested placement of the peers
(``dso_service.networks.MV37_PLACEMENT``) and writes ``common/scenarios/mv37.yaml``
(self-contained: every series inline). ``--check`` also clears the market centrally
(``common.centralized.solve_p2p``), runs the AC power flow of the dispatch
(``dso_service.powerflow.run_ac``) and prints the "ours vs thesis" tables of
``common/scenarios/mv37.md``, where every number and its origin is listed.

Thesis = "P2P electricity markets with TSO/DSO coordination" (shared seed 004), sections 4.1-4.2.
The thesis's appendix A (agents, profiles, line data) is missing, so the series are rebuilt from
public data and calibrated so that the centralized benchmark lands near the thesis's results
(``THESIS`` below).

Clock. Market hour h (1..24) covers [h-1, h) in apparent solar time at Lisbon (38.7 N, 9.14 W) in
mid-July. Portuguese summer legal time (WEST, UTC+1) runs ``SOLAR_OFFSET_H`` = 1.709 h ahead of it
(1 h zone offset + 9.14/15 h longitude + 6 min equation of time), so market hour h covers the
legal-time interval [h + 0.709, h + 1.709): it takes 0.291 x the value of the legal hour starting at h
plus 0.709 x the value of the legal hour starting at h + 1 (a typical day repeats, so hour 24 wraps
to the early morning of the same day). On this clock the PV output is symmetric about hour 12 and
zero in hour 20, as in the thesis (figure 4.7 and section 4.2.2).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from p2pm.builders.writer import scenario_yaml

HERE = Path(__file__).resolve().parents[2] / "common" / "scenarios"  # where the built-in scenarios live
DATA = HERE.parent / "data"
OUT = HERE / "mv37.yaml"
H = 24

# ---------------------------------------------------------------------------------------------
# Choices (each documented in mv37.md)
# ---------------------------------------------------------------------------------------------
SOLAR_OFFSET_H = 1.0 + 9.14 / 15.0 + 0.1  # WEST minus apparent solar time at Lisbon, mid-July = 1.709 h

# Loads: E-REDES/ERSE 2023 standard profiles of a summer weekday, one class per feeder, each shape
# normalised to its own peak (= 1.0) after the clock shift.
LOAD_DAY = "2023-07-19"
FEEDER_PROFILE = {"A": "BTN_A", "B": "BTN_B", "C": "BTN_C"}
# peak base load = MV37_PLACEMENT size x feeder factor (calibrated, see mv37.md)
FEEDER_LOAD_FACTOR = {"A": 1.170, "B": 1.170, "C": 0.775}
# bus 14: the thesis gives its maximum demand in hour 17, 1509.2 kW = 1.3 x base, so base = 1160.9 kW
LOAD14_BASE_HOUR17_MW = 1.5092 / 1.3
LOAD_FLEX_FRACTION = 0.3  # thesis eqs. 4.6-4.8
LOAD_PRICE_AT_MIN, LOAD_PRICE_AT_MAX = 58.0, 4.0  # thesis eqs. 4.10-4.11
LOAD_TAN_PHI = 0.3  # thesis eq. 4.9

# PV: REN measured output of all Portuguese PV on a clear summer day, p.u. of the month's peak.
PV_COLUMN = "2024-07-16_summer_sunny"
PV_SCALE = 1.070  # kWp = MV37_PLACEMENT suggestion x PV_SCALE (calibrated)
PV14_HOUR17_MW = 1.1907  # thesis table 4.7: PV at bus 14 in hour 17 (sets the size of pv14)

# Wind: no measured wind series in the shared data. A smooth synthetic shape: a periodic cubic
# spline through values every 3 h (knot k at solar time 3k h, k = 0..7), p.u. of the farm's capacity,
# calibrated to the thesis's benchmark (mv37.md, section 5).
WIND_KNOTS_PU = (0.054, 0.424, 0.492, 0.594, 0.874, 0.820, 0.326, 0.226)
WIND14_HOUR17_MW = 3.2256  # thesis table 4.7: wind at bus 14 in hour 17 (sets both farms' capacity)

RES_COST_B_EUR_PER_MWH = 4.0  # thesis 4.1.3: the same b for every RES
RES_TAN_PHI = 0.4  # thesis eq. 4.5

# CHP: thesis eqs. 4.2-4.3; b slightly below the import price, a > 0 with MC(0.5 MW) = 58 EUR/MWh.
CHP_P_MIN_MW, CHP_P_MAX_MW = 0.1, 0.5
CHP_COST_A, CHP_COST_B = 16.0, 50.0
CHP_TAN_PHI = 0.3

# External supplier: thesis 4.1.2-4.1.3.
GRID_P_IMPORT_MAX_MW = 20.0
GRID_PRICE_EUR_PER_MWH = 58.0

# ADMM settings. Tolerance 1e-5 (MW for the primal, EUR/MWh for the dual residual, norms over all
# 616 x 2 trades x 24 h): at 1e-4 the dispatch is within 1e-3 MW but the prices of a few small
# trades are still off by several EUR/MWh; at 1e-5 every trade price is within 0.01 EUR/MWh of the
# centralized dual. Starting price 30 EUR/MWh: a public guess between the RES and import prices.
MARKET = {"kind": "p2p", "model": "benchmark", "hours": H, "rho": 1.0, "tolerance": 1.0e-5,
          "max_iterations": 20000, "residual_balancing": True, "price_init_eur_per_mwh": 30.0}

# PV below 0.5 % of its peak is taken as zero: the thesis removes PV units at night, and a unit
# with a few watts to sell holds the ADMM for thousands of iterations (its tiny trades move the
# prices by rho/2 x a few W per iteration).
PV_NIGHT_PU = 0.005

# The thesis's benchmark (tables 4.1, 4.3, 4.7; text of 4.2): the calibration targets.
THESIS = {
    "energy_mwh": {"grid": 47.47, "chp": 24.09, "wind": 114.06, "pv": 171.20, "load": 356.82},
    "losses_pct": 0.61,
    "social_welfare_eur": 22025.8,
    "losses_pct_by_hour": [1.09, 1.05, 1.11, 1.13, 1.32, 1.39, 0.9, 0.62, 0.37, 0.22, 0.12, 0.12,
                           0.1, 0.1, 0.15, 0.29, 0.33, 0.52, 0.82, 1.41, 1.35, 1.31, 1.26, 1.16],
    "sw_eur_by_hour": [604, 599, 584, 570, 565, 542, 667, 824, 985, 1146, 1212, 1290,
                       1288, 1271, 1264, 1253, 1258, 1215, 984, 839, 826, 801, 747, 692],
    "max_line_loading": (98.3, 26, 20),  # percent, line, hour
    "hour12_vm_pu": (0.99, 20, 1.00, 14),  # vmin, bus, vmax, bus
    "hour17_bus14_kw": {"chp": 100.0, "wind": 3225.6, "pv": 1190.7, "load": 1367.5},
}


# ---------------------------------------------------------------------------------------------
def market_from_legal_clock(values_by_legal_hour) -> np.ndarray:
    """24 values indexed by the legal-time (WEST) hour start 0..23 -> market hours 1..24 (solar clock)."""
    v = np.asarray(values_by_legal_hour, dtype=float)
    assert v.shape == (24,)
    n = math.floor(SOLAR_OFFSET_H - 1.0)  # market hour h starts at legal time h - 1 + offset
    frac = SOLAR_OFFSET_H - 1.0 - n
    h = np.arange(1, H + 1)
    first = (h + n) % 24  # legal hour that holds the start of market hour h
    return (1.0 - frac) * v[first] + frac * v[(first + 1) % 24]


def wind_shape() -> np.ndarray:
    """The synthetic wind shape, p.u. of capacity, at the middle of each market hour."""
    from scipy.interpolate import CubicSpline

    knots = np.arange(0.0, 25.0, 3.0)
    spline = CubicSpline(knots, np.r_[WIND_KNOTS_PU, WIND_KNOTS_PU[0]], bc_type="periodic")
    return np.clip(spline(np.arange(1, H + 1) - 0.5), 0.0, 1.0)


def feeder_of(bus: int) -> str:
    """Feeder of a mv37 bus (dso_service.networks): A = buses 2-12, B = 13-26, C = 27-37."""
    return "A" if bus <= 12 else ("B" if bus <= 26 else "C")


def build() -> tuple[dict, dict]:
    """The scenario as a plain dict, and facts for the header and the data note."""
    from dso_service.networks import MV37_PLACEMENT

    # --- series -------------------------------------------------------------------------------
    lp = pd.read_csv(DATA / "load_eredes_2023_BTN_hourly_typical_days.csv")
    lp = lp[lp.date == LOAD_DAY].sort_values("hour_start_pt_local")
    load_shapes = {}
    for cls in sorted(set(FEEDER_PROFILE.values())):
        shape = market_from_legal_clock(lp[f"{cls}_kWh_per_MWh_yr"].to_numpy())
        load_shapes[cls] = shape / shape.max()

    pv = pd.read_csv(DATA / "pv_portugal_REN_hourly_pu_sunny_cloudy.csv").sort_values("hour_start_pt_local")
    pv_shape = np.round(market_from_legal_clock(pv[PV_COLUMN].to_numpy()), 4)
    pv_shape[pv_shape < PV_NIGHT_PU] = 0.0
    wind = np.round(wind_shape(), 4)

    series = {f"load_{cls.lower()}_pu": _r(shape, 5) for cls, shape in load_shapes.items()}
    series["pv_ren_pu"] = _r(pv_shape, 4)
    series["wind_pu"] = _r(wind, 4)

    # the shapes as written (rounded), so that the sizes below use exactly what the YAML holds
    load_series = {cls: np.asarray(series[f"load_{cls.lower()}_pu"]) for cls in load_shapes}
    pv_series, wind_series = np.asarray(series["pv_ren_pu"]), np.asarray(series["wind_pu"])

    wind_cap_mw = round(float(WIND14_HOUR17_MW / wind_series[16]), 4)
    pv14_kwp = round(float(1000.0 * PV14_HOUR17_MW / pv_series[16]), 1)

    peers: list[dict] = [{
        "id": "grid", "kind": "grid", "bus": 0, "p_import_max_mw": GRID_P_IMPORT_MAX_MW,
        "import_price_eur_per_mwh": GRID_PRICE_EUR_PER_MWH, "cost_a_eur_per_mw2h": 0.0,
    }]
    sizes = {}
    for pid, kind, bus, size in MV37_PLACEMENT:
        if kind == "load":
            cls = FEEDER_PROFILE[feeder_of(bus)]
            if bus == 14:
                peak = LOAD14_BASE_HOUR17_MW / load_series[cls][16]
            else:
                peak = size * FEEDER_LOAD_FACTOR[feeder_of(bus)]
            peak = round(float(peak), 4)
            sizes[pid] = peak
            peers.append({
                "id": pid, "kind": "load", "bus": bus,
                "p_base_mw": {"series": f"load_{cls.lower()}_pu", "scale": peak},
                "flex_fraction": LOAD_FLEX_FRACTION,
                "price_at_min_eur_per_mwh": LOAD_PRICE_AT_MIN, "price_at_max_eur_per_mwh": LOAD_PRICE_AT_MAX,
                "tan_phi": LOAD_TAN_PHI,
            })
    for pid, kind, bus, size in MV37_PLACEMENT:
        if kind == "chp":
            sizes[pid] = CHP_P_MAX_MW
            peers.append({
                "id": pid, "kind": "chp", "bus": bus, "p_min_mw": CHP_P_MIN_MW, "p_max_mw": CHP_P_MAX_MW,
                "cost_a_eur_per_mw2h": CHP_COST_A, "cost_b_eur_per_mwh": CHP_COST_B, "tan_phi": CHP_TAN_PHI,
            })
    for pid, kind, bus, size in MV37_PLACEMENT:
        if kind in ("wind", "pv"):
            if kind == "wind":
                cap, ser, shape = wind_cap_mw, "wind_pu", wind_series
            else:
                cap = round(pv14_kwp / 1000.0, 4) if bus == 14 else round(float(size * PV_SCALE), 4)
                ser, shape = "pv_ren_pu", pv_series
            sizes[pid] = cap
            peak_fc = cap * float(shape.max())
            peers.append({
                "id": pid, "kind": kind, "bus": bus,
                "p_forecast_mw": {"series": ser, "scale": cap},
                # small a > 0: the marginal cost is 4 + p / peak, i.e. ~5 EUR/MWh at the unit's peak
                # forecast, so that the curtailment among the RES is unique (mv37.md, section 4)
                "cost_a_eur_per_mw2h": round(float(1.0 / peak_fc), 6), "cost_b_eur_per_mwh": RES_COST_B_EUR_PER_MWH,
                "tan_phi": RES_TAN_PHI,
            })

    n_kind = {k: sum(p["kind"] == k for p in peers) for k in ("load", "chp", "pv", "wind", "grid")}
    scenario = {
        "name": "mv37",
        "description": (
            "Thesis benchmark (sections 4.1-4.2) on its 37-bus 11 kV network: full P2P market, 24 solar-time hours; "
            f"{n_kind['load']} flexible loads (E-REDES/ERSE BTN A/B/C {LOAD_DAY}, 30 % flexibility, utility line "
            f"58 -> 4 EUR/MWh), {n_kind['chp']} CHP (0.1-0.5 MW), {n_kind['pv']} PV (REN {PV_COLUMN[:10]}, "
            f"{sum(sizes[p['id']] for p in peers if p['kind'] == 'pv'):.1f} MWp), {n_kind['wind']} wind farms "
            f"({wind_cap_mw:.2f} MW each, synthetic shape), external supplier 0-20 MW at 58 EUR/MWh."),
        "network": {"name": "mv37"},
        "market": dict(MARKET),
        "series": series,
        "peers": peers,
    }
    facts = dict(sizes=sizes, wind_cap_mw=wind_cap_mw, pv14_kwp=pv14_kwp, load_shapes=load_series,
                 pv_shape=pv_series, wind_shape=wind_series)
    return scenario, facts


def _r(values, nd) -> list[float]:
    return [round(float(v), nd) for v in values]


# ---------------------------------------------------------------------------------------------
# Check: centralized benchmark + AC power flow, "ours vs thesis"
# ---------------------------------------------------------------------------------------------
def dispatch_frame(scenario, p_mw: np.ndarray) -> pd.DataFrame:
    """peer, kind, bus, hour, p_mw, q_mvar. Loads draw q = p tan(phi) (p < 0); CHP and RES inject
    q = p tan(phi), their upper reactive limit (thesis eqs. 4.3, 4.5); the grid row has q = 0 (the
    slack of the power flow supplies the rest)."""
    rows = []
    for i, peer in enumerate(scenario.peers):
        tan_phi = 0.0 if peer.kind == "grid" else float(peer.tan_phi)
        for t in range(p_mw.shape[1]):
            p = float(p_mw[i, t])
            rows.append((peer.id, peer.kind, int(peer.bus), t + 1, p, p * tan_phi))
    return pd.DataFrame(rows, columns=["peer", "kind", "bus", "hour", "p_mw", "q_mvar"])


def check(path: Path = OUT) -> dict:
    """Load the written scenario, clear it centrally, run the AC power flow; return the figures."""
    from common.centralized import solve_p2p
    from common.market import uniform_price_interval
    from common.models import peer_models
    from common.scenario import load_scenario
    from dso_service.networks import build_network
    from dso_service.powerflow import run_ac

    sc = load_scenario(path)
    peers = peer_models(sc)
    sol = solve_p2p(peers)
    p = sol.p_mw
    kinds = np.array([m.kind for m in peers])
    ids = [m.id for m in peers]
    energy = {k: float(p[kinds == k].sum()) for k in ("grid", "chp", "wind", "pv")}
    energy["load"] = float(-p[kinds == "load"].sum())
    ac = run_ac(build_network(sc.network), dispatch_frame(sc, p), sc.network)
    hours = ac.hours.set_index("hour")
    lines = ac.lines[ac.lines["kind"] == "line"]
    top = lines.loc[lines["loading_percent"].idxmax()]
    trafo = ac.lines[ac.lines["kind"] == "trafo"]
    b12 = ac.buses[ac.buses["hour"] == 12].set_index("bus")["vm_pu"]
    lo, hi = uniform_price_interval(peers, p)
    load_rows = kinds == "load"
    d_min = -np.vstack([m.p_max_mw for m in peers])[load_rows]
    d_max = -np.vstack([m.p_min_mw for m in peers])[load_rows]
    d = -p[load_rows]
    share = (d.sum(0) - d_min.sum(0)) / (d_max.sum(0) - d_min.sum(0))  # 0 = all at minimum, 1 = at maximum
    i = {k: ids.index(k) for k in ("chp14", "wind14", "pv14", "load14")}
    return dict(
        status=sol.status, energy=energy, sw=sol.social_welfare_eur, losses_mw=hours["losses_mw"].to_numpy(),
        losses_pct_by_hour=hours["losses_pct"].to_numpy(), load_mw=hours["load_mw"].to_numpy(),
        losses_pct=100.0 * hours["losses_mw"].sum() / hours["load_mw"].sum(),
        violations=int(hours["violations"].sum()), converged=bool(hours["converged"].all()),
        max_line=(float(top["loading_percent"]), int(top["line"]), int(top["hour"])),
        line_max_by_hour=hours["max_line_loading_pct"].to_numpy(),
        trafo_max=(float(trafo["loading_percent"].max()), int(trafo.loc[trafo["loading_percent"].idxmax(), "hour"])),
        vmin=(float(ac.buses["vm_pu"].min()), int(ac.buses.loc[ac.buses["vm_pu"].idxmin(), "bus"]),
              int(ac.buses.loc[ac.buses["vm_pu"].idxmin(), "hour"])),
        vmax=(float(ac.buses["vm_pu"].max()), int(ac.buses.loc[ac.buses["vm_pu"].idxmax(), "bus"]),
              int(ac.buses.loc[ac.buses["vm_pu"].idxmax(), "hour"])),
        h12=(float(b12.min()), int(b12.idxmin()), float(b12.max()), int(b12.idxmax())),
        h17_bus14={k.rstrip("14"): (-1 if k == "load14" else 1) * 1000.0 * float(p[i[k], 16]) for k in i},
        price_lo=lo, price_hi=hi,
        load_share=share, grid_by_hour=p[kinds == "grid"].sum(0), chp_by_hour=p[kinds == "chp"].sum(0),
        wind_by_hour=p[kinds == "wind"].sum(0), pv_by_hour=p[kinds == "pv"].sum(0), load_by_hour=d.sum(0),
        res_available=np.vstack([m.p_max_mw for m in peers])[np.isin(kinds, ("pv", "wind"))].sum(0),
    )


def print_tables(r: dict) -> None:
    t = THESIS
    e = r["energy"]
    sw = float(np.sum(r["sw"]))
    print(f"solver status: {r['status']}; AC power flow converged in every hour: {r['converged']}; "
          f"violations: {r['violations']}\n")
    print("| quantity | ours | thesis | difference |")
    print("|---|---|---|---|")
    for key, label in (("grid", "grid import (MWh)"), ("chp", "CHP (MWh)"), ("wind", "wind (MWh)"),
                       ("pv", "PV (MWh)"), ("load", "consumption (MWh)")):
        ours, theirs = e[key], t["energy_mwh"][key]
        print(f"| {label} | {ours:.2f} | {theirs:.2f} | {100 * (ours / theirs - 1):+.1f} % |")
    print(f"| losses (% of consumption) | {r['losses_pct']:.2f} | {t['losses_pct']:.2f} | "
          f"{r['losses_pct'] - t['losses_pct']:+.2f} points |")
    print(f"| social welfare (EUR) | {sw:,.1f} | {t['social_welfare_eur']:,.1f} | "
          f"{100 * (sw / t['social_welfare_eur'] - 1):+.1f} % |")
    print()
    print("| hour | SW ours (EUR) | SW thesis | losses ours (%) | losses thesis | price (EUR/MWh) "
          "| loads (0 = min, 1 = max) | grid MW | CHP MW | wind MW | PV MW | RES available MW | max line loading % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key in ("grid_by_hour", "chp_by_hour", "wind_by_hour", "pv_by_hour", "res_available"):
        r[key] = np.where(np.abs(r[key]) < 5e-4, 0.0, r[key])  # solver noise around zero
    for h in range(H):
        lo, hi = r["price_lo"][h], r["price_hi"][h]
        price = f"{lo:.1f}" if abs(hi - lo) < 0.05 else f"{lo:.1f}-{hi:.1f}"
        print(f"| {h + 1} | {r['sw'][h]:.0f} | {t['sw_eur_by_hour'][h]} | {r['losses_pct_by_hour'][h]:.2f} | "
              f"{t['losses_pct_by_hour'][h]:.2f} | {price} | {r['load_share'][h]:.2f} | {r['grid_by_hour'][h]:.2f} | "
              f"{r['chp_by_hour'][h]:.2f} | {r['wind_by_hour'][h]:.2f} | {r['pv_by_hour'][h]:.2f} | "
              f"{r['res_available'][h]:.2f} | {r['line_max_by_hour'][h]:.1f} |")
    print()
    ml, tl = r["max_line"], t["max_line_loading"]
    print(f"max line loading: ours {ml[0]:.1f} % on line {ml[1]} in hour {ml[2]}; thesis {tl[0]} % on line {tl[1]} "
          f"in hour {tl[2]}")
    print(f"max transformer loading: {r['trafo_max'][0]:.1f} % in hour {r['trafo_max'][1]}")
    print(f"day voltage range: {r['vmin'][0]:.4f} pu (bus {r['vmin'][1]}, hour {r['vmin'][2]}) to "
          f"{r['vmax'][0]:.4f} pu (bus {r['vmax'][1]}, hour {r['vmax'][2]})")
    h12, th12 = r["h12"], t["hour12_vm_pu"]
    print(f"hour 12 voltages: ours {h12[0]:.4f} pu (bus {h12[1]}) to {h12[2]:.4f} pu (bus {h12[3]}); thesis "
          f"{th12[0]} (bus {th12[1]}) to {th12[2]} (bus {th12[3]})")
    b14, t14 = r["h17_bus14"], t["hour17_bus14_kw"]
    print("hour 17, bus 14 (kW): " + ", ".join(f"{k} ours {b14[k]:.1f} / thesis {t14[k]:.1f}"
                                             for k in ("chp", "wind", "pv", "load")))
    bal = r["h17_bus14"]["chp"] + r["h17_bus14"]["wind"] + r["h17_bus14"]["pv"] - r["h17_bus14"]["load"]
    print(f"hour 17, bus 14 balance: ours {bal:.1f} kW / thesis 3148.8 kW")


HEADER = """\
# mv37 -- the thesis's benchmark (sections 4.1-4.2) on its 37-bus 11 kV network (dso_service.networks.build_mv37):
# full P2P market, 22 flexible loads, 3 CHP, 22 PV, 2 wind farms and the external supplier, 24 hours.
# GENERATED by `python -m p2pm.builders.build_mv37`; edit the builder, not this file.
# Every number and its source: common/scenarios/mv37.md; data credits: common/data/CREDITS.md.
#
# Clock: market hour h = [h-1, h) apparent solar time at Lisbon in July (legal summer time - 1.709 h).
# Units: MW, MWh, EUR/MWh; p_base_mw is consumption (positive).
# Series:
#   load_btn_{{a,b,c}}_pu  E-REDES/ERSE 2023 BTN A/B/C profiles, {load_day} (summer weekday), peak hour = 1.0;
#                        feeder A (buses 2-12) BTN A, feeder B (13-26) BTN B, feeder C (27-37) BTN C
#   pv_ren_pu            REN measured PV output, Portugal, {pv_day} (clear), p.u. of the July peak
#   wind_pu              ASSUMPTION: synthetic smooth shape (periodic spline), calibrated to the thesis (mv37.md)
# RES carry a small quadratic cost (a = 1 / peak forecast) so that curtailment is unique (assumption, mv37.md).
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    scenario, facts = build()
    header = HEADER.format(load_day=LOAD_DAY, pv_day=PV_COLUMN[:10])
    text = scenario_yaml(scenario, header)
    OUT.write_text(text)
    kinds = [p["kind"] for p in scenario["peers"]]
    print(f"wrote {OUT.relative_to(HERE.parent.parent)}: {len(kinds)} peers "
          + ", ".join(f"{kinds.count(k)} {k}" for k in ("load", "chp", "pv", "wind", "grid")))
    if "--check" in args:
        print()
        print_tables(check(OUT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
