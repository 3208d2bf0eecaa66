"""AC power-flow validation of a market dispatch (thesis sections 3.1.2 and 4.1.4).

``run_ac(net, dispatch, spec)`` places every peer of the dispatch in a copy of the network and runs
a Newton-Raphson power flow (pandapower) for each hour:

- producers (kind pv, wind, chp) become one ``sgen`` each, everything else (loads, EVs, the TSO's
  virtual load, ...) one ``load`` each, created once and updated in place every hour. The
  dispatch's ``p_mw`` / ``q_mvar`` are net injections (producers positive, consumers negative);
  pandapower's loads take consumption, so a load element gets ``-p_mw`` and ``-q_mvar``.
- kind ``grid`` rows are not placed: the ext_grid (slack, on the transformer's primary in mv37)
  supplies them and the losses, which the market ignores (thesis 4.1.4).
- a generator with p == 0 in an hour is out of service in that hour (the thesis removes the PV
  units at night, section 4.1.4).
- the network's own loads, static generators, generators and storage units are switched off: the
  dispatch describes every injection.

Limits (thesis eqs. 3.4-3.5): loading_percent of every line and transformer <=
``spec.max_loading_percent``; ``spec.vm_min_pu`` <= vm_pu <= ``spec.vm_max_pu`` at every bus.
A power flow that does not converge is an outcome: the hour is reported with ``converged`` False,
NaN results and a violation of kind "not_converged"; nothing is raised.

``base_case(net)`` runs the network as shipped (its own loads), e.g. the Baran & Wu check of
case33bw (202.68 kW, 0.91309 pu at bus index 17).
"""

from __future__ import annotations

import copy

import numpy as np
import pandapower as pp
import pandas as pd

from common.results import ACReport
from common.scenario import NetworkSpec
from dso_service.networks import is_trafo_line

SGEN_KINDS = ("pv", "wind", "chp")
NOT_PLACED_KINDS = ("grid",)
_TOL = 1e-9  # limits are checked as value > limit + _TOL (and < limit - _TOL)
_PF_OPTIONS = dict(algorithm="nr", calculate_voltage_angles=True, numba=False, max_iteration=30)

BUS_COLUMNS = ["bus", "hour", "vm_pu"]
LINE_COLUMNS = ["line", "hour", "loading_percent", "kind", "name", "element"]
HOUR_COLUMNS = ["hour", "converged", "losses_mw", "losses_pct", "load_mw", "slack_p_mw", "vmin_pu", "vmax_pu",
                "max_line_loading_pct", "max_trafo_loading_pct", "violations"]
VIOLATION_COLUMNS = ["hour", "element", "index", "value", "limit", "kind"]


_RECYCLE = dict(bus_pq=True, trafo=False, gen=False)


def _runpp(net, init: str) -> bool:
    """One power flow; False when it does not converge (never raises for a failed solve).

    ``init`` "recycle": reuse the previous hour's admittance matrices and solution (pandapower's
    time-series ``recycle`` option; only the bus P/Q are rebuilt from the load and sgen tables,
    in_service flags included), else "dc" / "results" / "auto" / "flat".
    """
    kwargs = dict(recycle=_RECYCLE) if init == "recycle" else dict(init=init)
    try:
        pp.runpp(net, **kwargs, **_PF_OPTIONS)
    except (pp.LoadflowNotConverged, np.linalg.LinAlgError, FloatingPointError):
        return False
    except pp.ppException:  # other solver failures of pandapower are outcomes too
        return False
    return bool(net.converged) and bool(np.all(np.isfinite(net.res_bus["vm_pu"].to_numpy()[net.bus["in_service"].to_numpy()])))


def _branches(net) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The in-service branches reported in ``lines``: (frame with line/kind/name/element, index in
    net.line or -1, index in net.trafo or -1)."""
    line_ok = net.line["in_service"].to_numpy(dtype=bool)
    if len(net.switch):
        open_lines = net.switch.loc[(net.switch["et"] == "l") & ~net.switch["closed"].astype(bool), "element"]
        line_ok &= ~net.line.index.isin(open_lines.astype(int))
    trafo_line = is_trafo_line(net).to_numpy()
    li = net.line.index.to_numpy()[line_ok]
    names_l = [_label(n, f"line {i}") for n, i in zip(net.line["name"].to_numpy()[line_ok], li)]
    kinds_l = np.where(trafo_line[line_ok], "trafo", "line")
    ti = net.trafo.index.to_numpy()[net.trafo["in_service"].to_numpy(dtype=bool)] if len(net.trafo) else np.array([], int)
    names_t = [_label(n, f"trafo {i}") for n, i in zip(net.trafo.loc[ti, "name"].to_numpy(), ti)] if len(ti) else []
    frame = pd.DataFrame({
        "line": np.r_[li, ti].astype(int),
        "kind": np.r_[kinds_l, np.full(len(ti), "trafo")],
        "name": names_l + names_t,
        "element": ["line"] * len(li) + ["trafo"] * len(ti),
    })
    return frame, li, ti


def _label(value, default: str) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() in ("", "None", "nan"):
        return default
    return str(value)


def _disable_injections(net) -> None:
    for table in ("load", "sgen", "gen", "storage", "asymmetric_load", "asymmetric_sgen"):
        if table in net and len(net[table]):
            net[table]["in_service"] = False


def run_ac(net: pp.pandapowerNet, dispatch: pd.DataFrame, spec: NetworkSpec,
           voltage_setpoints: dict[str, float] | None = None) -> ACReport:
    """AC power flow of every hour of ``dispatch`` (columns peer, kind, bus, hour, p_mw, q_mvar).

    ``voltage_setpoints`` {peer id: vm_pu}: those producers are voltage-controlled generators
    (pandapower ``gen``, a PV bus: the dispatch's p_mw at the set voltage, reactive power free)
    instead of fixed-Q injections; like a static generator, one with p == 0 is out of service.
    ``net`` is not modified (the power flows run on a copy). Raises ValueError only for a malformed
    dispatch (missing column, unknown bus).
    """
    setpoints = dict(voltage_setpoints or {})
    missing = [c for c in ("peer", "kind", "bus", "hour", "p_mw", "q_mvar") if c not in dispatch.columns]
    if missing:
        raise ValueError(f"dispatch lacks column(s) {', '.join(missing)}")
    work = copy.deepcopy(net)
    _disable_injections(work)

    hours = np.sort(pd.unique(dispatch["hour"].astype(int)))
    placed = dispatch[~dispatch["kind"].isin(NOT_PLACED_KINDS)]
    peers = placed.drop_duplicates("peer")[["peer", "kind", "bus"]].reset_index(drop=True)
    unknown = sorted(set(peers["bus"].astype(int)) - set(work.bus.index.astype(int)))
    if unknown:
        raise ValueError(f"dispatch places peers at unknown bus(es) {unknown[:10]}")
    placed = placed.assign(hour=placed["hour"].astype(int), p_mw=placed["p_mw"].astype(float),
                           q_mvar=placed["q_mvar"].astype(float))
    if len(placed):
        tabs = [placed.pivot_table(index="peer", columns="hour", values=col, aggfunc="sum").reindex(
            index=peers["peer"], columns=hours).fillna(0.0).to_numpy(dtype=float) for col in ("p_mw", "q_mvar")]
    else:
        tabs = [np.zeros((0, len(hours))), np.zeros((0, len(hours)))]
    p_tab, q_tab = tabs  # (peers, hours), net injections

    is_gen = peers["peer"].astype(str).isin(setpoints).to_numpy()
    is_sgen = peers["kind"].isin(SGEN_KINDS).to_numpy() & ~is_gen
    gen_idx = np.array([], dtype=int)
    if is_gen.any():
        gen_idx = np.asarray(pp.create_gens(work, peers.loc[is_gen, "bus"].astype(int).tolist(), p_mw=0.0,
                                            vm_pu=[setpoints[str(p)] for p in peers.loc[is_gen, "peer"]],
                                            name=peers.loc[is_gen, "peer"].astype(str).tolist()), dtype=int)
    p_gen = p_tab[is_gen]
    sgen_idx, load_idx = np.array([], dtype=int), np.array([], dtype=int)
    if is_sgen.any():
        sgen_idx = np.asarray(pp.create_sgens(work, peers.loc[is_sgen, "bus"].astype(int).tolist(), p_mw=0.0,
                                              name=peers.loc[is_sgen, "peer"].astype(str).tolist()), dtype=int)
    is_load = ~is_sgen & ~is_gen
    if is_load.any():
        load_idx = np.asarray(pp.create_loads(work, peers.loc[is_load, "bus"].astype(int).tolist(), p_mw=0.0,
                                              name=peers.loc[is_load, "peer"].astype(str).tolist()), dtype=int)
    p_sgen, q_sgen = p_tab[is_sgen], q_tab[is_sgen]
    p_load, q_load = -p_tab[is_load], -q_tab[is_load]
    # consumption of each hour: what the placed peers draw (thesis: losses relative to consumption)
    load_mw = np.clip(-p_tab, 0.0, None).sum(axis=0)

    branches, li, ti = _branches(work)
    is_trafo_branch = branches["kind"].to_numpy() == "trafo"
    bus_ok = work.bus["in_service"].to_numpy(dtype=bool)
    bus_ids = work.bus.index.to_numpy()[bus_ok]
    vmin_lim, vmax_lim, lmax = spec.vm_min_pu, spec.vm_max_pu, spec.max_loading_percent

    vm_rows, load_rows, hour_rows, viol_rows = [], [], [], []
    if len(load_idx):
        work.load.loc[load_idx, "in_service"] = True
    prev_ok, prev_on = False, None
    for h_i, hour in enumerate(hours):
        hour = int(hour)
        on = np.r_[p_sgen[:, h_i] != 0.0, p_gen[:, h_i] != 0.0]
        if len(gen_idx):
            work.gen.loc[gen_idx, "p_mw"] = p_gen[:, h_i]
            if prev_on is None or not np.array_equal(on, prev_on):
                work.gen.loc[gen_idx, "in_service"] = p_gen[:, h_i] != 0.0
        if len(sgen_idx):
            work.sgen.loc[sgen_idx, "p_mw"] = p_sgen[:, h_i]
            work.sgen.loc[sgen_idx, "q_mvar"] = q_sgen[:, h_i]
            if prev_on is None or not np.array_equal(on, prev_on):
                work.sgen.loc[sgen_idx, "in_service"] = on[:len(sgen_idx)]
        if len(load_idx):
            work.load.loc[load_idx, "p_mw"] = p_load[:, h_i]
            work.load.loc[load_idx, "q_mvar"] = q_load[:, h_i]
        # warm start from the previous hour; pandapower's recycle reuses the internal model, which
        # only knows the elements that were in service when it was built: rebuild when they change
        if not prev_ok:
            init = "dc"
        elif prev_on is not None and np.array_equal(on, prev_on) and not len(gen_idx):
            init = "recycle"  # (pandapower's recycle keeps the generators' old set points: not with PV buses)
        else:
            init = "results"
        ok = _runpp(work, init)
        if not ok and init != "dc":
            ok = _runpp(work, "dc")  # a bad warm start should not decide the outcome
        prev_ok, prev_on = ok, on

        if not ok:
            vm_rows.append(np.full(len(bus_ids), np.nan))
            load_rows.append(np.full(len(branches), np.nan))
            hour_rows.append((hour, False, np.nan, np.nan, load_mw[h_i], np.nan, np.nan, np.nan, np.nan, np.nan, 1))
            viol_rows.append((hour, "powerflow", -1, np.nan, np.nan, "not_converged"))
            continue

        vm = work.res_bus["vm_pu"].to_numpy(dtype=float)[bus_ok]
        loading = np.r_[work.res_line["loading_percent"].to_numpy(dtype=float)[work.line.index.get_indexer(li)],
                        work.res_trafo["loading_percent"].to_numpy(dtype=float)[work.trafo.index.get_indexer(ti)]
                        if len(ti) else np.array([])]
        losses = float(work.res_line["pl_mw"].sum()) + (float(work.res_trafo["pl_mw"].sum()) if len(work.trafo) else 0.0)
        slack = float(work.res_ext_grid["p_mw"].sum())
        vm_rows.append(vm)
        load_rows.append(loading)

        n_viol = 0
        for k in np.flatnonzero(vm < vmin_lim - _TOL):
            viol_rows.append((hour, "bus", int(bus_ids[k]), float(vm[k]), vmin_lim, "undervoltage"))
            n_viol += 1
        for k in np.flatnonzero(vm > vmax_lim + _TOL):
            viol_rows.append((hour, "bus", int(bus_ids[k]), float(vm[k]), vmax_lim, "overvoltage"))
            n_viol += 1
        for k in np.flatnonzero(loading > lmax + _TOL):
            viol_rows.append((hour, "trafo" if is_trafo_branch[k] else "line", int(branches["line"].iat[k]),
                              float(loading[k]), lmax, "overload"))
            n_viol += 1
        line_part, trafo_part = loading[~is_trafo_branch], loading[is_trafo_branch]
        hour_rows.append((
            hour, True, losses, 100.0 * losses / load_mw[h_i] if load_mw[h_i] > 0 else np.nan, float(load_mw[h_i]),
            slack, float(vm.min()), float(vm.max()),
            float(line_part.max()) if line_part.size else np.nan,
            float(trafo_part.max()) if trafo_part.size else np.nan, n_viol,
        ))

    nh, nb, nl = len(hours), len(bus_ids), len(branches)
    buses = pd.DataFrame({
        "bus": np.tile(bus_ids.astype(int), nh), "hour": np.repeat(hours.astype(int), nb),
        "vm_pu": np.concatenate(vm_rows) if vm_rows else np.array([], float),
    }, columns=BUS_COLUMNS)
    lines = pd.DataFrame({
        "line": np.tile(branches["line"].to_numpy(), nh), "hour": np.repeat(hours.astype(int), nl),
        "loading_percent": np.concatenate(load_rows) if load_rows else np.array([], float),
        "kind": np.tile(branches["kind"].to_numpy(), nh), "name": np.tile(np.asarray(branches["name"], dtype=object), nh),
        "element": np.tile(branches["element"].to_numpy(), nh),
    }, columns=LINE_COLUMNS)
    hours_df = pd.DataFrame(hour_rows, columns=HOUR_COLUMNS).astype({"hour": int, "converged": bool, "violations": int})
    violations = pd.DataFrame(viol_rows, columns=VIOLATION_COLUMNS).astype({"hour": int, "index": int})
    from dso_service.layout import network_tables

    net_buses, net_branches = network_tables(net, branches, li, ti)
    return ACReport(buses=buses, lines=lines, hours=hours_df, violations=violations, network_buses=net_buses,
                    network_branches=net_branches)


def base_case(net: pp.pandapowerNet) -> tuple[float, float, int]:
    """Run the network as shipped: (losses_kw, vmin_pu, vmin_bus). Raises LoadflowNotConverged
    when the shipped case itself does not solve (a broken network file, not a market outcome)."""
    pp.runpp(net, init="auto", **_PF_OPTIONS)
    losses_kw = 1000.0 * (float(net.res_line["pl_mw"].sum()) + (float(net.res_trafo["pl_mw"].sum()) if len(net.trafo) else 0.0))
    vm = net.res_bus["vm_pu"][net.bus["in_service"]]
    return losses_kw, float(vm.min()), int(vm.idxmin())
