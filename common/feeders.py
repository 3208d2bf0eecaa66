"""Real low-voltage feeders shipped with pandapower, for the scenario families of
``p2pm scenarios make`` (``p2pm.builders.make_scenario``).

Each is a radial feeder fed by one MV/LV transformer from one ext_grid, renumbered to buses 0..n-1
(``pandapower.toolbox.create_continuous_bus_index``), the ext_grid on bus 0 (the transformer's
primary). The pandapower loads and generators of the original files are removed: the peers of the
scenario are the only injections.

- ``kerber-dorf``: Kerber's village network ("Dorfnetz", Kerber 2011, TU Munich), 116 buses,
  0.4 MVA 10/0.4 kV transformer, 57 house connections;
- ``kerber-vorstadt``: Kerber's suburban cable network 1 ("Vorstadtnetz Kabel 1"), 294 buses,
  0.63 MVA 10/0.4 kV transformer, 146 house connections;
- ``ieee-eu-lv``: the IEEE European LV test feeder (IEEE PES 2015), balanced, 907 buses,
  0.8 MVA 11/0.416 kV transformer, 55 house connections on many short cable segments.

``FEEDER_BUSES`` (in ``common.scenario``, importable without pandapower) gives their bus counts.
"""

from __future__ import annotations

import warnings


def _clean(net):
    import pandapower.toolbox as tb

    tb.create_continuous_bus_index(net)
    for table in ("load", "sgen", "asymmetric_load", "asymmetric_sgen", "storage"):
        if table in net and len(net[table]):
            net[table] = net[table].iloc[0:0]
    return net


def house_buses(name: str) -> list[int]:
    """The buses of the feeder's house connections (where its original loads sit), renumbered."""
    net = _raw(name)
    import pandapower.toolbox as tb

    tb.create_continuous_bus_index(net)
    table = "asymmetric_load" if name == "ieee-eu-lv" else "load"
    return sorted(set(int(b) for b in net[table]["bus"]))


def _raw(name: str):
    import pandapower.networks as pn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "kerber-dorf":
            return pn.create_kerber_dorfnetz()
        if name == "kerber-vorstadt":
            return pn.create_kerber_vorstadtnetz_kabel_1()
        if name == "ieee-eu-lv":
            return pn.ieee_european_lv_asymmetric("on_peak_566")
    raise KeyError(name)


def build_feeder(name: str):
    """A fresh pandapower net of a feeder (no loads or generators)."""
    return _clean(_raw(name))


def transformer_mva(name: str) -> float:
    return float(_raw(name).trafo["sn_mva"].sum())
