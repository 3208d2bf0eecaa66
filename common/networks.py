"""The grids: pandapower networks built from a scenario's ``network`` section, and their radial
branch data for the branch-flow model (``common.grid.GridModel``).

``build_network(spec)`` gives a fresh pandapower net:

- ``case33bw``: ``pandapower.networks.case33bw()`` (Baran & Wu 1989, 12.66 kV). It ships without
  thermal ratings (max_i_ka = 99999 kA, i.e. unrated): ``spec.line_max_i_ka`` gives every line one.
- ``case39``: ``pandapower.networks.case39()`` (IEEE 39-bus New England system, 345 kV, meshed;
  MATPOWER's line ratings). Meshed: the full P2P market's benchmark and its AC check only (the
  branch-flow model and the DSO's outer loops need a radial network).
- ``mv37``: ``build_mv37()``, the thesis's 37-bus 11 kV network rebuilt from its description
  (see below and ``common/scenarios/mv37-network.md``).
- ``spec.file``: a pandapower JSON file (``pandapower.from_json``).

Then the stress factors of the thesis's scenarios are applied (sections 4.3-4.5):

- ``line_capacity_scale``: max_i_ka of every distribution line x scale (scenario 2: 0.5);
- ``line_impedance_scale``: r and x of every distribution line x scale (scenario 3: 3);
- ``trafo_capacity_scale``: the transformers' rating x scale (scenario 1: 1/3). For a ``trafo``
  element sn_mva is scaled and vk_percent / vkr_percent with it (and i0_percent inversely), so the
  ohmic impedance and the no-load current stay those of the physical unit: only the rating
  changes. For a transformer modelled as a line (mv37), its max_i_ka is scaled.

"Distribution line" means a ``net.line`` row that is not a transformer-as-line.

Transformer as a line. The thesis models the HV/MV transformer "in per unit as a line"
(section 4.1.4). Such a line is marked by its name: a ``net.line`` row whose ``name`` is
``"trafo"`` (case-insensitive) is a transformer. ``grid_model`` reports it with branch_kind
"trafo", the AC report lists its loading as transformer loading, and the line scales above leave it
alone.

The mv37 network (``build_mv37``)
=================================
Known from the thesis (sections 4.1.1, 4.1.4, 4.2.2, 4.3.2): 37 buses at 11 kV, radial; the slack
(1.0 pu, 0 deg) on the primary of a 20 MVA HV/MV transformer modelled as a line; line 12 joins
buses 1-13, line 13 joins 13-14, line 26 joins 1-27; the feeder beyond bus 27 has only PV
generators plus the loads at 31, 32, 34, 36, 37 and is the one that shows low voltage; a load at 12.
The thesis's appendix with the line data (A.4, A.5) is missing, so everything else below is an
assumption, chosen to be realistic for an 11 kV network and to land near the thesis's benchmark
(no violation; highest loading 98.3 % on line 26 in hour 20; hour-12 voltages 0.99-1.00 pu).

Numbering: pandapower bus k == thesis bus k (k = 1..37); bus 0 is the transformer's primary, where
the ext_grid sits (all 38 buses are modelled at 11 kV, the transformer being a per-unit line).
``net.line`` index k == thesis line k, named "line k" (k = 1..36); index 0 is the transformer,
named "trafo". Line k always feeds bus k+1 (to_bus == k + 1), which matches the three known lines.

Transformer (line 0, bus 0 -> 1): 20 MVA (thesis), vk = 8 % (IEC 60076-5 minimum short-circuit
impedance for 6.3-25 MVA units), vkr = 0.5 % (load losses 100 kW at rating, typical for 20 MVA);
on 11 kV: Z = 0.08 * 11^2/20 = 0.484 ohm, R = 0.005 * 11^2/20 = 0.03025 ohm, X = 0.48305 ohm; no
magnetising branch; max_i_ka = 20 / (sqrt(3) * 11) = 1.0497 kA.

Conductors: pandapower standard types (parameters copied from ``pandapower.std_types``, type
name kept in ``net.line.std_type``), XLPE aluminium cables NA2XS2Y 1x{240,185,150,120,95,70}
RM/25 6/10 kV (U0/U(Um) = 6/10(12) kV, the insulation class for 10-11 kV systems): r 0.122-0.443,
x 0.105-0.123 ohm/km, c 280-456 nF/km, 0.416-0.217 kA. Underground cable throughout (a suburban
network with rooftop PV); cross sections taper from the substation outwards. The three feeder
heads (lines 1, 12, 26) leave the substation in one trench: derating factor df = 0.75 (grouping
factor for three circuits in the ground), so their usable rating is 0.75 x the type's.

Topology (feeder: lines):
- A, buses 2-12: trunk 1-2-3-4-5-9-10-11-12 (lines 1-4, 8-11); lateral 5-6-7-8 (lines 5-7).
  Bus 12 is the far end (the thesis's low-voltage load in hour 19 of scenario 3).
- B, buses 13-26: line 12 (1-13) to a node at 13; bus 14 is a short spur of its own (line 13),
  because the thesis's line-13 loading follows bus 14's own balance (134.9 % -> 98.9 % when that
  balance drops from 3148.8 to 2276.2 kW, ratios 0.733 and 0.723). Trunk 13-15-16-17-18-19-20
  (lines 14-19), bus 20 at its end (the thesis's minimum voltage at hour 12); laterals 16-21-22-23
  (lines 20-22) and 18-24-25-26 (lines 23-25).
- C, buses 27-37: line 26 (1-27), trunk 27-28-29-30-31-32-34-35-36-37 (lines 27-31, 33-36) and a
  spur 28-33 (line 32). The loads sit at 31, 32, 34, 36, 37 in that order from the root, so the
  sensitivity order of the thesis's reactive-power control (37, 36, 34, 32, 31) is reproduced.

Line data (``MV37_LINES``; lengths 0.3-1.0 km, 19.4 km in all):

====  =====  ====  ==========  ====  ====  ==============================================
line  from   to    length km   mm2   df    note
====  =====  ====  ==========  ====  ====  ==============================================
0     0      1     (1.0)       -     1     transformer 20 MVA, vk 8 %, vkr 0.5 %, "trafo"
1-2   1-2-3        0.8, 0.7    240   .75*  *line 1 only (feeder head)
3-4   3-4-5        0.6, 0.6    185   1
5-7   5-6-7-8      0.5 0.6 0.4 95    1     lateral
8-9   5-9-10       0.7, 0.6    150   1
10    10     11    0.8         120   1
11    11     12    1.0         95    1
12    1      13    1.0         150   .75   feeder head
13    13     14    0.8         95    1     spur to bus 14 (wind, CHP, PV, load)
14-15 13-15-16     0.6, 0.5    150   1
16-17 16-17-18     0.5, 0.6    120   1
18-19 18-19-20     0.5, 0.8    95    1
20-22 16-21-22-23  0.4 0.5 0.3 70    1     lateral
23-25 18-24-25-26  0.5 0.4 0.6 70    1     lateral
26    1      27    0.8         150   .75   feeder head (thesis: 98.3 % in hour 20)
27-31 27-...-32    .3 .3 .3 .3 .4  150  1
32    28     33    0.3         70    1     spur
33    32     34    0.4         150   1
34-35 34-35-36     0.3, 0.3    120   1
36    36     37    0.4         95    1
====  =====  ====  ==========  ====  ====  ==============================================

Ratings that matter for the thesis's results:
- line 13 (1x95, 0.249 kA = 4.74 MVA): bus 14's 3148.8 kW (+0.41 Mvar of load) in hour 17 loads
  it at about 67 %, i.e. about 134 % with the capacities halved (thesis: 134.9 %).
- line 26 (1x150 derated, 0.236 kA = 4.50 MVA): 98.3 % in hour 20 needs about 4.2 MW + 1.26
  Mvar of feeder-C demand then (loads at their minimum, 0.7 x base, PV off). Feeder C has no
  generator that works at night, so its net demand must peak in the evening for hour 20 to be the
  day's highest loading, as in the thesis (a profile with a midday/afternoon peak and too little PV
  on feeder C overloads line 26 in the afternoon).

Design-point check with the suggested placement below (loads with tan phi 0.3, generators at unity
power factor unless stated; pandapower AC power flow):
- hour 20 (loads 0.7 x 0.76 x peak base = 10.3 MW, wind 1.3 MW, CHP 1.5 MW, no PV): losses
  1.42 % (thesis 1.41 %), line 26 at 98.9 % (98.3 %), transformer 41.5 % (so congested when its
  rating is divided by 3, thesis scenario 1), vmin 0.961 pu at bus 37;
- the same with line impedances x 3 (scenario 3): losses 4.31 % (thesis 4.50 %), vmin 0.906 pu;
  with load flexibility 60 % (consumption 0.4 x base): vmin 0.950 pu (thesis: 60 % solves it);
- hour 12 (loads 1.3 x peak base = 25.2 MW, PV at 0.95 of its capacity, wind 4 MW, CHP at
  minimum, RES injecting Q = 0.3 P): losses 0.16 %, voltages 0.990-1.006 pu (thesis 0.99-1.00).
  With generators at unity power factor the loads' 7.6 Mvar come from the slack and vmin drops to
  0.955 pu: the thesis's generators supply reactive power (Q <= 0.4 P).

Suggested placement of the thesis's peers (``MV37_PLACEMENT``; the scenario author decides; sizes
are suggestions that fit the ratings above; "peak base" = peak of the baseline load profile):

=========  ========================================================  ===============================
kind       buses                                                     suggested size
=========  ========================================================  ===============================
grid       0 (transformer primary, the thesis's slack)               0-20 MW import
load (22)  A: 3 4 6 8 9 11 12; B: 14 15 16 17 19 20 22 23 25 26;     peak base 1.55 MW each on C,
           C: 31 32 34 36 37                                         1.3 MW at 14 (thesis: 1.16 MW
                                                                     base in hour 17), 0.6-0.75 MW
                                                                     elsewhere; 19.4 MW in all
chp (3)    10, 14 (thesis), 16 (thesis)                              0.1-0.5 MW (thesis)
wind (2)   7, 14 (thesis)                                            4.0 MW each (thesis: 3.23 MW
                                                                     at 14 in hour 17)
pv (22)    one at every load bus (so 14 and feeder C as in the       1.2 kWp per kW of peak base
           thesis; feeder C then has only PV generators)             load, 0.8 at 19 and 20 (bus 20
                                                                     lowest at noon); 22.7 MWp
=========  ========================================================  ===============================
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pandapower as pp
import pandapower.networks as pn
import pandas as pd

from common.grid import GridModel
from common.scenario import FEEDER_BUSES, NetworkSpec

TRAFO_LINE_NAME = "trafo"
UNRATED_MAX_I_KA = 99999.0  # pandapower's "no rating" value (case33bw)

# -- mv37 data -----------------------------------------------------------------------------------
MV37_VN_KV = 11.0
MV37_TRAFO_SN_MVA = 20.0
MV37_TRAFO_VK_PERCENT = 8.0
MV37_TRAFO_VKR_PERCENT = 0.5

# name -> (r_ohm_per_km, x_ohm_per_km, c_nf_per_km, max_i_ka): pandapower std types, 6/10 kV cables
MV37_CABLES = {
    "NA2XS2Y 1x240 RM/25 6/10 kV": (0.122, 0.105, 456.0, 0.416),
    "NA2XS2Y 1x185 RM/25 6/10 kV": (0.161, 0.110, 406.0, 0.358),
    "NA2XS2Y 1x150 RM/25 6/10 kV": (0.206, 0.110, 360.0, 0.315),
    "NA2XS2Y 1x120 RM/25 6/10 kV": (0.253, 0.113, 340.0, 0.280),
    "NA2XS2Y 1x95 RM/25 6/10 kV": (0.313, 0.123, 315.0, 0.249),
    "NA2XS2Y 1x70 RM/25 6/10 kV": (0.443, 0.123, 280.0, 0.217),
}
_C240, _C185, _C150, _C120, _C95, _C70 = MV37_CABLES

# (thesis line number, from bus, to bus, length_km, cable type)
MV37_LINES = (
    # feeder A
    (1, 1, 2, 0.8, _C240),
    (2, 2, 3, 0.7, _C240),
    (3, 3, 4, 0.6, _C185),
    (4, 4, 5, 0.6, _C185),
    (5, 5, 6, 0.5, _C95),
    (6, 6, 7, 0.6, _C95),
    (7, 7, 8, 0.4, _C95),
    (8, 5, 9, 0.7, _C150),
    (9, 9, 10, 0.6, _C150),
    (10, 10, 11, 0.8, _C120),
    (11, 11, 12, 1.0, _C95),
    # feeder B
    (12, 1, 13, 1.0, _C150),
    (13, 13, 14, 0.8, _C95),
    (14, 13, 15, 0.6, _C150),
    (15, 15, 16, 0.5, _C150),
    (16, 16, 17, 0.5, _C120),
    (17, 17, 18, 0.6, _C120),
    (18, 18, 19, 0.5, _C95),
    (19, 19, 20, 0.8, _C95),
    (20, 16, 21, 0.4, _C70),
    (21, 21, 22, 0.5, _C70),
    (22, 22, 23, 0.3, _C70),
    (23, 18, 24, 0.5, _C70),
    (24, 24, 25, 0.4, _C70),
    (25, 25, 26, 0.6, _C70),
    # feeder C
    (26, 1, 27, 0.8, _C150),
    (27, 27, 28, 0.3, _C150),
    (28, 28, 29, 0.3, _C150),
    (29, 29, 30, 0.3, _C150),
    (30, 30, 31, 0.3, _C150),
    (31, 31, 32, 0.4, _C150),
    (32, 28, 33, 0.3, _C70),
    (33, 32, 34, 0.4, _C150),
    (34, 34, 35, 0.3, _C120),
    (35, 35, 36, 0.3, _C120),
    (36, 36, 37, 0.4, _C95),
)
# derating factor (pandapower ``df``) of the three feeder heads, laid in one trench out of the
# substation: grouping factor for three circuits in the ground, ~0.75
MV37_DERATING = {1: 0.75, 12: 0.75, 26: 0.75}

# suggested peers: (id, kind, bus, size); size = peak base load [MW] for loads, capacity [MW] otherwise
_MV37_LOAD_MW = (
    (3, 0.6), (4, 0.6), (6, 0.6), (8, 0.65), (9, 0.6), (11, 0.6), (12, 0.75),
    (14, 1.3), (15, 0.65), (16, 0.75), (17, 0.6), (19, 0.65), (20, 0.75), (22, 0.65), (23, 0.6),
    (25, 0.65), (26, 0.65),
    (31, 1.55), (32, 1.55), (34, 1.55), (36, 1.55), (37, 1.55),
)
_MV37_PV_PER_LOAD = {19: 0.8, 20: 0.8}  # PV kWp per kW of peak base load; 1.2 elsewhere
MV37_PLACEMENT = (
    ("grid", "grid", 0, 20.0),
    *[(f"load{b}", "load", b, s) for b, s in _MV37_LOAD_MW],
    ("chp10", "chp", 10, 0.5), ("chp14", "chp", 14, 0.5), ("chp16", "chp", 16, 0.5),
    ("wind7", "wind", 7, 4.0), ("wind14", "wind", 14, 4.0),
    *[(f"pv{b}", "pv", b, round(_MV37_PV_PER_LOAD.get(b, 1.2) * s, 2)) for b, s in _MV37_LOAD_MW],
)


def build_mv37() -> pp.pandapowerNet:
    """The thesis's 37-bus 11 kV network (module docstring): 38 buses (0 = transformer primary),
    37 branches (line 0 = the 20 MVA transformer as a line, lines 1-36 as in the thesis), no loads
    or generators (the scenario's peers are placed by the market run)."""
    net = pp.create_empty_network(name="mv37", f_hz=50.0, sn_mva=1.0)
    feeder = {0: "HV", 1: "substation"}
    feeder.update({b: "A" for b in range(2, 13)})
    feeder.update({b: "B" for b in range(13, 27)})
    feeder.update({b: "C" for b in range(27, 38)})
    for b in range(38):
        pp.create_bus(net, vn_kv=MV37_VN_KV, name=f"bus {b}", index=b, zone=feeder[b],
                      min_vm_pu=0.95, max_vm_pu=1.05)
    pp.create_ext_grid(net, bus=0, vm_pu=1.0, va_degree=0.0, name="HV grid (slack)")

    z_base = MV37_VN_KV**2 / MV37_TRAFO_SN_MVA
    r_ohm = MV37_TRAFO_VKR_PERCENT / 100 * z_base
    x_ohm = math.sqrt(MV37_TRAFO_VK_PERCENT**2 - MV37_TRAFO_VKR_PERCENT**2) / 100 * z_base
    pp.create_line_from_parameters(
        net, from_bus=0, to_bus=1, length_km=1.0, r_ohm_per_km=r_ohm, x_ohm_per_km=x_ohm, c_nf_per_km=0.0,
        max_i_ka=MV37_TRAFO_SN_MVA / (math.sqrt(3) * MV37_VN_KV), name=TRAFO_LINE_NAME, index=0)
    for no, f, t, length_km, cable in MV37_LINES:
        r, x, c, imax = MV37_CABLES[cable]
        idx = pp.create_line_from_parameters(
            net, from_bus=f, to_bus=t, length_km=length_km, r_ohm_per_km=r, x_ohm_per_km=x, c_nf_per_km=c,
            max_i_ka=imax, name=f"line {no}", index=no, type="cs", df=MV37_DERATING.get(no, 1.0))
        net.line.at[idx, "std_type"] = cable
    return net


# -- building and stressing ----------------------------------------------------------------------
def is_trafo_line(net: pp.pandapowerNet) -> pd.Series:
    """Boolean Series over net.line: True for a transformer modelled as a line (name "trafo")."""
    return net.line["name"].astype(str).str.strip().str.lower().eq(TRAFO_LINE_NAME)


def build_network(spec: NetworkSpec) -> pp.pandapowerNet:
    """A fresh pandapower net for the scenario's network section, stress factors applied."""
    if spec.name == "case33bw":
        net = pn.case33bw()
        if spec.line_max_i_ka is not None:
            net.line["max_i_ka"] = float(spec.line_max_i_ka)
    elif spec.name == "case39":  # IEEE 39-bus New England system (meshed, 345 kV): the full P2P market's AC check
        net = pn.case39()
        if spec.line_max_i_ka is not None:
            net.line["max_i_ka"] = float(spec.line_max_i_ka)
    elif spec.name == "mv37":
        net = build_mv37()
        if spec.line_max_i_ka is not None:
            net.line.loc[~is_trafo_line(net), "max_i_ka"] = float(spec.line_max_i_ka)
    elif spec.name is not None and spec.name in FEEDER_BUSES:  # real LV feeders (common.feeders)
        from common.feeders import build_feeder

        net = build_feeder(spec.name)
        if spec.line_max_i_ka is not None:
            net.line["max_i_ka"] = float(spec.line_max_i_ka)
    elif spec.file is not None:
        net = pp.from_json(spec.file)
        if spec.line_max_i_ka is not None:
            net.line.loc[~is_trafo_line(net), "max_i_ka"] = float(spec.line_max_i_ka)
    else:  # NetworkSpec validates the name; this is a programming error
        raise ValueError(f"unknown network {spec.name!r}")

    dist = ~is_trafo_line(net)
    if spec.line_capacity_scale != 1.0:
        rated = dist & (net.line["max_i_ka"] < UNRATED_MAX_I_KA)
        net.line.loc[rated, "max_i_ka"] = net.line.loc[rated, "max_i_ka"] * spec.line_capacity_scale
    if spec.line_impedance_scale != 1.0:
        for col in ("r_ohm_per_km", "x_ohm_per_km"):
            net.line.loc[dist, col] = net.line.loc[dist, col] * spec.line_impedance_scale
    if spec.trafo_capacity_scale != 1.0:
        s = spec.trafo_capacity_scale
        net.line.loc[~dist, "max_i_ka"] = net.line.loc[~dist, "max_i_ka"] * s
        if len(net.trafo):
            net.trafo["sn_mva"] = net.trafo["sn_mva"] * s
            net.trafo["vk_percent"] = net.trafo["vk_percent"] * s
            net.trafo["vkr_percent"] = net.trafo["vkr_percent"] * s
            net.trafo["i0_percent"] = net.trafo["i0_percent"] / s
    return net


# -- radial branch data ----------------------------------------------------------------------------
def grid_model(net: pp.pandapowerNet, spec: NetworkSpec) -> GridModel:
    """The radial branch data of ``net`` for the branch-flow model, per unit on ``spec.base_mva``.

    Branches: in-service lines (without an open line switch) and in-service two-winding
    transformers; oriented away from the ext_grid bus by breadth-first search. Line impedance
    r, x [ohm/km] * length / parallel; transformer impedance from vk_percent / vkr_percent on
    sn_mva, referred to the low-voltage side (off-nominal ratios and the magnetising branch are
    neglected); shunt capacitance is neglected. Ratings: max_i_ka * df * parallel * vn_kv * sqrt(3)
    for lines (unrated when max_i_ka is NaN or >= 99999), sn_mva * parallel for transformers.
    Raises ValueError when the network is not a single radial tree fed by one ext_grid, or its
    bus index is not 0..n-1.
    """
    n_bus = len(net.bus)
    if not np.array_equal(net.bus.index.to_numpy(), np.arange(n_bus)):
        raise ValueError("the bus index must be 0..n-1 (pandapower.create_continuous_bus_index)")
    if not net.bus["in_service"].all():
        raise ValueError(f"out-of-service buses {list(net.bus.index[~net.bus['in_service']])[:10]} are not supported")
    ext = net.ext_grid[net.ext_grid["in_service"]]
    if len(ext) != 1:
        raise ValueError(f"the branch-flow model needs exactly one in-service ext_grid, found {len(ext)}")
    root = int(ext["bus"].iloc[0])
    if len(net.get("switch", [])) and len(net.switch):
        if (net.switch["et"] == "b").any():
            raise ValueError("bus-bus switches are not supported by the branch-flow model")
    base_mva = float(spec.base_mva)
    vn = net.bus["vn_kv"].to_numpy(dtype=float)

    ends, r_pu, x_pu, s_pu, kind, name, element, source = [], [], [], [], [], [], [], []
    open_lines = set()
    if len(net.get("switch", [])) and len(net.switch):
        sw = net.switch[(net.switch["et"] == "l") & (~net.switch["closed"].astype(bool))]
        open_lines = set(int(e) for e in sw["element"])
    trafo_line = is_trafo_line(net)
    for idx, row in net.line.iterrows():
        if not bool(row["in_service"]) or int(idx) in open_lines:
            continue
        f, t = int(row["from_bus"]), int(row["to_bus"])
        par = float(row.get("parallel", 1) or 1)
        zb = vn[t] ** 2 / base_mva
        r_pu.append(float(row["r_ohm_per_km"]) * float(row["length_km"]) / par / zb)
        x_pu.append(float(row["x_ohm_per_km"]) * float(row["length_km"]) / par / zb)
        imax = float(row["max_i_ka"])
        df = float(row.get("df", 1.0) if pd.notna(row.get("df", 1.0)) else 1.0)
        if not np.isfinite(imax) or imax >= UNRATED_MAX_I_KA:
            s_pu.append(np.inf)
        else:
            s_pu.append(imax * df * par * vn[t] * math.sqrt(3) / base_mva)
        ends.append((f, t))
        kind.append("trafo" if bool(trafo_line.loc[idx]) else "line")
        name.append(_name(row.get("name"), f"line {idx}"))
        element.append(int(idx))
        source.append("line")
    if len(net.trafo):
        for idx, row in net.trafo.iterrows():
            if not bool(row["in_service"]):
                continue
            hv, lv = int(row["hv_bus"]), int(row["lv_bus"])
            par = float(row.get("parallel", 1) or 1)
            sn = float(row["sn_mva"]) * par
            ratio2 = (float(row["vn_lv_kv"]) / vn[lv]) ** 2
            vk, vkr = float(row["vk_percent"]) / 100, float(row["vkr_percent"]) / 100
            r_pu.append(vkr * ratio2 * base_mva / sn)
            x_pu.append(math.sqrt(max(vk**2 - vkr**2, 0.0)) * ratio2 * base_mva / sn)
            s_pu.append(sn / base_mva)
            ends.append((hv, lv))
            kind.append("trafo")
            name.append(_name(row.get("name"), f"trafo {idx}"))
            element.append(int(idx))
            source.append("trafo")
    if len(ends) != n_bus - 1:
        raise ValueError(f"not radial: {n_bus} buses need {n_bus - 1} in-service branches, found {len(ends)}")

    # orient away from the root (breadth-first search)
    adj: list[list[int]] = [[] for _ in range(n_bus)]
    for k, (a, b) in enumerate(ends):
        adj[a].append(k)
        adj[b].append(k)
    frm = np.full(len(ends), -1, dtype=int)
    to = np.full(len(ends), -1, dtype=int)
    seen = np.zeros(n_bus, dtype=bool)
    seen[root] = True
    queue = deque([root])
    while queue:
        u = queue.popleft()
        for k in adj[u]:
            if frm[k] >= 0:
                continue
            a, b = ends[k]
            v = b if a == u else a
            if seen[v]:
                raise ValueError(f"not radial: branch {name[k]} closes a loop")
            frm[k], to[k] = u, v
            seen[v] = True
            queue.append(v)
    if not seen.all():
        raise ValueError(f"buses {list(np.flatnonzero(~seen))[:10]} are not connected to the ext_grid")

    # per-unit impedance is referred to the to-bus voltage; for a transformer hanging the wrong
    # way round (lv nearer the root) the lv reference still holds because vn[lv] was used
    return GridModel(
        n_bus=n_bus, root=root, base_mva=base_mva, base_kv=vn, from_bus=frm, to_bus=to,
        r_pu=np.asarray(r_pu), x_pu=np.asarray(x_pu), s_max_pu=np.asarray(s_pu),
        branch_kind=tuple(kind), branch_name=tuple(name), vm_min_pu=spec.vm_min_pu, vm_max_pu=spec.vm_max_pu,
        branch_element=np.asarray(element, dtype=int), branch_source=tuple(source),
    )


def _name(value, default: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() in ("", "None", "nan"):
        return default
    return str(value)


def branch_lengths_km(net: pp.pandapowerNet, grid: GridModel) -> np.ndarray:
    """Length of each branch of ``grid`` [km] (lines: length_km; transformers: 0), the distance
    measure of the congestion differentiation (thesis 3.2.1.A)."""
    out = np.zeros(grid.n_branch)
    for k, (src, elem) in enumerate(zip(grid.branch_source or (), grid.branch_element if grid.branch_element is not None else ())):
        if src == "line" and grid.branch_kind[k] == "line":
            out[k] = float(net.line.at[int(elem), "length_km"])
    return out


def bus_coordinates(net: pp.pandapowerNet) -> dict[int, list[float]]:
    """{bus: [x, y]} from the network's geodata (``net.bus.geo`` or the older ``bus_geodata``), for
    the buses that have some."""
    import json

    xy: dict[int, list[float]] = {}
    if "geo" in net.bus and net.bus["geo"].notna().any():
        for b, geo in net.bus["geo"].items():
            if isinstance(geo, str) and geo:
                xy[int(b)] = json.loads(geo)["coordinates"][:2]
    elif "bus_geodata" in net and len(net.bus_geodata):
        for b, row in net.bus_geodata.iterrows():
            xy[int(b)] = [float(row["x"]), float(row["y"])]
    return xy


def bus_graph(net: pp.pandapowerNet):
    """The buses and branches as a networkx graph, branch lengths (km) as the edge weight."""
    import pandapower.topology as top

    return top.create_nxgraph(net, calc_branch_impedances=False, respect_switches=True)


def line_distances_km(net: pp.pandapowerNet, buses) -> np.ndarray:
    """(len(buses), len(buses)): the distance along the lines between every two of ``buses``
    (inf where they are not connected)."""
    import networkx as nx

    buses = np.asarray(buses, dtype=int)
    graph = bus_graph(net)
    out = np.zeros((len(buses), len(buses)))
    for b in sorted(set(buses.tolist())):
        dist = nx.single_source_dijkstra_path_length(graph, b, weight="weight")
        out[buses == b] = [dist.get(int(x), np.inf) for x in buses]
    return out
