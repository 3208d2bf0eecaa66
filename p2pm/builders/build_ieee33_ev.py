"""Build the built-in scenario ``ieee33-ev``: the poster's community market on IEEE 33-bus.

Run ``python -m p2pm.builders.build_ieee33_ev`` from the repository root. It reads the CSVs in
``common/data/`` (credits in ``common/data/CREDITS.md``), the Baran & Wu network from pandapower
(``case33bw``) and writes ``common/scenarios/ieee33-ev.yaml`` (self-contained: every series inline).
Every number and its origin is listed in ``common/scenarios/ieee33-ev.md``; the constants below
carry a one-line reason each.

Clock. The market day is the OMIE day: market hour h covers [h-1, h) in Spanish time (CET/CEST),
which is exactly OMIE period h, i.e. [h-2, h-1) on the Portuguese legal clock. Portuguese-clock
profiles (load, PV, EV times) are shifted by one hour: market hour h takes the profile value of
the Portuguese hour starting at h-2; market hour 1 (23:00-24:00 of the previous day in Portugal)
takes the typical day's own 23:00 value (a typical weekday repeats; PV is zero then).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from p2pm.builders.writer import scenario_yaml

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data"
OUT = HERE / "ieee33-ev.yaml"
H = 24

# ---------------------------------------------------------------------------------------------
# Choices (each documented in ieee33-ev.md)
# ---------------------------------------------------------------------------------------------
# Network: pandapower 70-AL1/11-ST1A 10 kV overhead conductor, 0.29 kA: the base-case peak current
# of the first line (0.210 kA) is then 72.6 % of the rating.
LINE_MAX_I_KA = 0.29
# The base case peaks at 0.913 pu (bus 17); 0.95 pu would need ~45 % less load at the evening peak.
# 0.92 pu is held by the loads' own 10 % flexibility alone (AC power flow: 0.9238 pu at worst, hour
# 22, with every load at its minimum, PV at forecast and EVs idle); 0.93 pu makes the centralized
# SOCP infeasible.
VM_MIN_PU, VM_MAX_PU = 0.92, 1.05

# Loads: E-REDES/ERSE 2023 BTN C (residential) profile, typical summer weekday, peak hour = 1.0.
LOAD_DAY, LOAD_COLUMN = "2023-07-19", "BTN_C_kWh_per_MWh_yr"
LOAD_FLEX_FRACTION = 0.10

# PV: REN national PV output on a clear summer day, p.u. of July 2024's highest hourly output.
PV_COLUMN = "2024-07-16_summer_sunny"
PV_COST_A_EUR_PER_MW2H, PV_COST_B_EUR_PER_MWH = 1.0, 4.0
# (bus, kWp): 10 units, 2.5 MWp in all, spread over the four feeders, bigger where the loads are.
PV_UNITS = [(6, 300), (8, 150), (13, 200), (16, 250), (20, 150), (23, 400), (24, 400), (28, 200), (30, 250),
            (32, 200)]

# Grid: OMIE Portugal day-ahead price of the same day as the PV profile, plus a flat access tariff.
OMIE_DAY = "2024-07-16"
GRID_TARIFF_EUR_PER_MWH = 50.0
EXPORT_SHARE_OF_OMIE = 0.9
P_IMPORT_MAX_MW, P_EXPORT_MAX_MW = 10.0, 5.0

# EVs: 20 cars, one at each of the 20 "residential" buses with the lowest base-case voltage
# (of the 21 buses with a Baran & Wu load <= 90 kW, only bus 18 is left out).
N_EV = 20
EV_MAX_BUS_LOAD_MW = 0.09  # "residential" bus: Baran & Wu load <= 90 kW
EV_MODELS = [  # (brand, model, variant, usable kWh): rows of the open-ev-data extract, 41-58 kWh
    ("Renault", "Zoe", "R110 ZE40", 41.0), ("Fiat", "500e", None, 42.0), ("MG", "ZS EV", None, 44.5),
    ("Peugeot", "e-208", "7,2 kW-AC", 45.0), ("Volkswagen", "ID.3", "45 kWh", 45.0), ("Tesla", "Model 3", "SR+", 50.0),
    ("Renault", "Zoe", "R110 ZE50", 52.0), ("Volkswagen", "ID.3", "58 kWh", 58.0),
]
WALLBOX_SMALL_KW, WALLBOX_LARGE_KW = 3.7, 7.4  # 1-phase 16 A / 32 A home chargers
WALLBOX_LARGE_FROM_KWH = 44.5  # cars with >= 44.5 kWh get the 7.4 kW wallbox
SOC_MIN_SHARE, SOC_DEPARTURE_SHARE, SOC_START_SHARE = 0.20, 0.90, 0.25
ETA = 0.95
EV_DEGRADATION_EUR_PER_MWH = 5.0
EV_PERMUTATION_SEED = 33  # shuffles the arrival, departure and trip-energy quantiles among the cars

MARKET = {"kind": "community", "rho": 100.0, "tolerance": 1.0e-4, "max_iterations": 2000, "residual_balancing": False, "price_init_eur_per_mwh": 150.0}


# ---------------------------------------------------------------------------------------------
def market_from_pt_clock(values_by_pt_hour) -> np.ndarray:
    """24 values indexed by the Portuguese hour start 0..23 -> market hours 1..24 (OMIE clock)."""
    v = np.asarray(values_by_pt_hour, dtype=float)
    assert v.shape == (24,)
    return np.array([v[(h - 2) % 24] for h in range(1, H + 1)])


def pt_clock_to_arrival_hour(t_pt: float) -> int:
    """First market hour in which the car is home for at least half the hour."""
    t = t_pt + 1.0  # Spanish clock
    return min(H, math.ceil(t + 0.5))


def pt_clock_to_departure_hour(t_pt: float) -> int:
    """First market hour in which the car is away for more than half the hour."""
    t = t_pt + 1.0
    return math.floor(t + 0.5) + 1


def quantile(stats: pd.DataFrame, metric: str, level: float) -> float:
    row = stats.set_index("metric").loc[metric]
    levels = [0.10, 0.25, 0.50, 0.75, 0.90]
    return float(np.interp(level, levels, [row[c] for c in ("p10", "p25", "p50", "p75", "p90")]))


def baran_wu():
    import pandapower as pp
    import pandapower.networks as pn

    net = pn.case33bw()
    pp.runpp(net, numba=False)
    loads = net.load[["bus", "p_mw", "q_mvar"]].copy()
    vm = net.res_bus.vm_pu.copy()
    line0_i_ka = float(net.res_line.i_ka.iloc[0])
    return loads, vm, line0_i_ka, float(vm.min()), int(vm.idxmin())


def build() -> tuple[dict, dict]:
    """The scenario as a plain dict, and facts for the header and the data note."""
    loads, vm, line0_i_ka, vmin, vmin_bus = baran_wu()

    # --- series -------------------------------------------------------------------------------
    lp = pd.read_csv(DATA / "load_eredes_2023_BTN_hourly_typical_days.csv")
    lp = lp[lp.date == LOAD_DAY].sort_values("hour_start_pt_local")
    load_shape = market_from_pt_clock(lp[LOAD_COLUMN].to_numpy())
    load_shape = load_shape / load_shape.max()

    pv = pd.read_csv(DATA / "pv_portugal_REN_hourly_pu_sunny_cloudy.csv").sort_values("hour_start_pt_local")
    pv_shape = market_from_pt_clock(pv[PV_COLUMN].to_numpy())

    om = pd.read_csv(DATA / "omie_dayahead_PT_wide_24h.csv").set_index("date_omie").loc[OMIE_DAY]
    omie = np.array([float(om[f"H{h:02d}"]) for h in range(1, H + 1)])  # OMIE period h = market hour h
    if np.any(omie < 0):
        raise SystemExit(f"OMIE day {OMIE_DAY} has negative prices")
    import_price = omie + GRID_TARIFF_EUR_PER_MWH
    export_price = EXPORT_SHARE_OF_OMIE * omie

    series = {
        "load_btn_c_pu": _r(load_shape, 5),
        "pv_ren_pu": _r(pv_shape, 4),
        "import_price_eur_per_mwh": _r(import_price, 2),
        "export_price_eur_per_mwh": _r(export_price, 3),
    }

    peers: list[dict] = [{
        "id": "grid", "kind": "grid", "bus": 0,
        "p_import_max_mw": P_IMPORT_MAX_MW, "p_export_max_mw": P_EXPORT_MAX_MW,
        "import_price_eur_per_mwh": {"series": "import_price_eur_per_mwh"},
        "export_price_eur_per_mwh": {"series": "export_price_eur_per_mwh"},
    }]

    # --- loads: one per bus, utility line spanning the day's import-price range ---------------
    price_hi, price_lo = float(import_price.max()), float(import_price.min())
    for _, row in loads.iterrows():
        bus, p, q = int(row.bus), float(row.p_mw), float(row.q_mvar)
        peers.append({
            "id": f"load{bus}", "kind": "load", "bus": bus,
            "p_base_mw": {"series": "load_btn_c_pu", "scale": round(p, 6)},
            "flex_fraction": LOAD_FLEX_FRACTION,
            "price_at_min_eur_per_mwh": round(price_hi, 2), "price_at_max_eur_per_mwh": round(price_lo, 2),
            "tan_phi": round(q / p, 6),
        })

    # --- PV -----------------------------------------------------------------------------------
    for bus, kwp in PV_UNITS:
        peers.append({
            "id": f"pv{bus}", "kind": "pv", "bus": bus,
            "p_forecast_mw": {"series": "pv_ren_pu", "scale": kwp / 1000.0},
            "cost_a_eur_per_mw2h": PV_COST_A_EUR_PER_MW2H, "cost_b_eur_per_mwh": PV_COST_B_EUR_PER_MWH,
        })

    # --- EVs ----------------------------------------------------------------------------------
    stats = pd.read_csv(DATA / "ev_norway_residential_session_stats.csv")
    models = pd.read_csv(DATA / "ev_models_battery_charging_open_ev_data.csv")
    residential = loads[loads.p_mw <= EV_MAX_BUS_LOAD_MW + 1e-9].bus.astype(int).tolist()
    ev_buses = sorted(residential, key=lambda b: (vm[b], b))[:N_EV]  # the lowest base-case voltages
    rng = np.random.default_rng(EV_PERMUTATION_SEED)
    perm_arr, perm_dep, perm_energy = rng.permutation(N_EV), rng.permutation(N_EV), rng.permutation(N_EV)
    ev_rows = []

    def level(k: int) -> float:  # quantile level of car k, spread evenly over p10..p90
        return 0.10 + 0.80 * (k + 0.5) / N_EV

    for i, bus in enumerate(sorted(ev_buses)):
        brand, model, variant, kwh = EV_MODELS[i % len(EV_MODELS)]
        sel = (models.brand == brand) & (models.model == model) & np.isclose(models.usable_battery_kWh, kwh)
        sel &= models.variant.isna() if variant is None else (models.variant == variant)
        car = models[sel]
        if len(car) != 1:
            raise SystemExit(f"EV model {brand} {model} {variant}: {len(car)} rows in the open-ev-data extract")
        car = car.iloc[0]
        cap_kwh = float(car.usable_battery_kWh)
        wallbox = WALLBOX_LARGE_KW if cap_kwh >= WALLBOX_LARGE_FROM_KWH else WALLBOX_SMALL_KW
        p_kw = min(wallbox, float(car.ac_max_kW))
        t_arr = quantile(stats, "arrival_hour_overnight_sessions", level(int(perm_arr[i])))
        t_dep = quantile(stats, "departure_hour_overnight_sessions", level(int(perm_dep[i])))
        trip_kwh = quantile(stats, "energy_per_overnight_session", 0.25 + 0.50 * (int(perm_energy[i]) + 0.5) / N_EV)
        arr, dep = pt_clock_to_arrival_hour(t_arr), pt_clock_to_departure_hour(t_dep)
        if not dep < arr:
            raise SystemExit(f"EV {i + 1}: departure hour {dep} is not before arrival hour {arr} (not overnight)")
        soc0 = SOC_START_SHARE * cap_kwh
        peers.append({
            "id": f"ev{i + 1:02d}", "kind": "ev", "bus": int(bus),
            "capacity_mwh": _k(cap_kwh), "soc_initial_mwh": _k(soc0), "soc_min_mwh": _k(SOC_MIN_SHARE * cap_kwh),
            "soc_departure_mwh": _k(SOC_DEPARTURE_SHARE * cap_kwh), "soc_final_mwh": _k(soc0),
            "trip_energy_mwh": _k(trip_kwh),
            "p_charge_max_mw": _k(p_kw), "p_discharge_max_mw": _k(p_kw),
            "eta_charge": ETA, "eta_discharge": ETA,
            "arrival_hour": arr, "departure_hour": dep,
            "degradation_eur_per_mwh": EV_DEGRADATION_EUR_PER_MWH,
        })
        ev_rows.append(dict(id=f"ev{i + 1:02d}", bus=int(bus), car=f"{brand} {model} {variant or ''}".strip(),
                            cap_kwh=cap_kwh, p_kw=p_kw, t_arr_pt=t_arr, t_dep_pt=t_dep, arr=arr, dep=dep,
                            trip_kwh=trip_kwh))

    scenario = {
        "name": "ieee33-ev",
        "description": (
            f"Poster community market on IEEE 33-bus (Baran & Wu, pandapower case33bw): {len(loads)} loads "
            f"(E-REDES BTN C {LOAD_DAY}), {len(PV_UNITS)} PV units ({sum(k for _, k in PV_UNITS) / 1000:g} MWp, REN "
            f"{PV_COLUMN[:10]}), {N_EV} V2G EVs (Norwegian home sessions, open-ev-data batteries), grid at OMIE PT "
            f"{OMIE_DAY} + {GRID_TARIFF_EUR_PER_MWH:g} EUR/MWh tariff; 24 market hours on the OMIE clock (CET)."),
        "network": {"name": "case33bw", "vm_min_pu": VM_MIN_PU, "vm_max_pu": VM_MAX_PU, "line_max_i_ka": LINE_MAX_I_KA},
        "market": dict(MARKET),
        "series": series,
        "peers": peers,
    }
    facts = dict(line0_i_ka=line0_i_ka, vmin=vmin, vmin_bus=vmin_bus, price_hi=price_hi, price_lo=price_lo,
                 omie=omie, load_shape=load_shape, pv_shape=pv_shape, ev_rows=ev_rows, ev_buses=ev_buses,
                 load_total_mw=float(loads.p_mw.sum()))
    return scenario, facts


def _r(values, nd) -> list[float]:
    return [round(float(v), nd) for v in values]


def _k(kwh: float) -> float:
    """kWh (or kW) -> MWh (or MW), rounded to the Wh."""
    return round(kwh / 1000.0, 6)


HEADER = """\
# ieee33-ev -- the poster's community P2P market on the IEEE 33-bus network (Baran & Wu 1989,
# pandapower case33bw, 12.66 kV, 3.715 MW / 2.3 Mvar), with PV, V2G EVs and MIBEL prices, 24 h.
# GENERATED by `python -m p2pm.builders.build_ieee33_ev`; edit the builder, not this file.
# Every number and its source: common/scenarios/ieee33-ev.md; data credits: common/data/CREDITS.md.
#
# Clock: market hour h = OMIE period h = [h-1, h) Spanish time = [h-2, h-1) Portuguese time.
# Units: MW, MWh, EUR/MWh; p_base_mw is consumption (positive); EV hours are market hours.
# Series:
#   load_btn_c_pu            E-REDES/ERSE 2023 BTN C profile, 2023-07-19 (summer weekday), peak hour = 1.0
#                            (loads: p_base_mw = Baran & Wu bus load x this shape)
#   pv_ren_pu                REN measured PV output, Portugal, 2024-07-16 (clear), p.u. of the July peak
#                            (PV: p_forecast_mw = kWp/1000 x this shape)
#   import_price_eur_per_mwh OMIE day-ahead Portugal, {omie_day}, + {tariff:g} EUR/MWh access tariff (assumption)
#   export_price_eur_per_mwh {share:g} x OMIE (assumption)
"""


def main(argv: list[str] | None = None) -> int:
    scenario, facts = build()
    header = HEADER.format(omie_day=OMIE_DAY, tariff=GRID_TARIFF_EUR_PER_MWH, share=EXPORT_SHARE_OF_OMIE)
    text = scenario_yaml(scenario, header)
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(HERE.parent.parent)}: {len(scenario['peers'])} peers "
          f"({sum(p['kind'] == 'ev' for p in scenario['peers'])} EVs, "
          f"{sum(p['kind'] == 'pv' for p in scenario['peers'])} PV)")
    if "--ev-table" in (sys.argv[1:] if argv is None else argv):  # the EV table of ieee33-ev.md
        print("| EV | bus | car | battery kWh | charger kW | arrival (PT clock) | market hour | departure (PT clock) "
              "| market hour | trip kWh |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in facts["ev_rows"]:
            print(f"| {r['id']} | {r['bus']} | {r['car']} | {r['cap_kwh']:g} | {r['p_kw']:g} | {_hhmm(r['t_arr_pt'])} "
                  f"| {r['arr']} | {_hhmm(r['t_dep_pt'])} | {r['dep']} | {r['trip_kwh']:.1f} |")
    return 0


def _hhmm(hours: float) -> str:
    m = int(round(hours * 60))
    return f"{m // 60:02d}:{m % 60:02d}"


if __name__ == "__main__":
    sys.exit(main())
