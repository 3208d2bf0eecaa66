"""The DSO validation service process: answers every DISPATCH with the AC power flow of it."""

from __future__ import annotations

import os
import time
from dataclasses import replace

import numpy as np
import pandas as pd

from common.protocol import MsgType
from common.protocol.grid import Dispatch, GridReport, NetworkResult, NetworkUpdate
from common.service import run_service, service_log

log = service_log("dso")


def dispatch_to_frame(msg: Dispatch) -> pd.DataFrame:
    n, H = msg.p_mw.shape
    return pd.DataFrame({
        "peer": np.repeat(list(msg.peer_ids), H), "kind": np.repeat(list(msg.kinds), H),
        "bus": np.repeat(list(msg.buses), H), "hour": np.tile(np.arange(1, H + 1), n),
        "p_mw": msg.p_mw.reshape(-1), "q_mvar": msg.q_mvar.reshape(-1),
    })


def grid_report(ac) -> GridReport:
    from dso_service.report_codec import ac_to_tables

    vm = ac.buses.pivot(index="bus", columns="hour", values="vm_pu").sort_index()
    loading = ac.lines.pivot_table(index="line", columns="hour", values="loading_percent", aggfunc="max").sort_index()
    violations = tuple({"kind": str(r.kind), "element": str(r.element), "hour": int(r.hour) - 1,
                        "value": float(np.nan_to_num(r.value)), "limit": float(np.nan_to_num(r.limit))}
                       for r in ac.violations.itertuples())
    return GridReport(
        vm_pu=np.nan_to_num(vm.to_numpy(dtype=float)), loading_percent=np.nan_to_num(loading.to_numpy(dtype=float)),
        losses_mw=np.nan_to_num(ac.hours["losses_mw"].to_numpy(dtype=float)), violations=violations,
        converged=tuple(bool(c) for c in ac.hours["converged"]), bus_ids=tuple(int(b) for b in vm.index),
        tables=ac_to_tables(ac),
    )


def serve(scenario_path: str, coordinator: str, timeout_s: float, idle_timeout_s: float) -> int:
    log(f"pid {os.getpid()} connecting to {coordinator}")
    from common.scenario import load_scenario
    from dso_service.networks import build_network
    from dso_service.powerflow import run_ac
    from dso_service.report_codec import frames_to_tables

    scenario = load_scenario(scenario_path)
    net = build_network(scenario.network)
    agent = network_agent(scenario, net) if scenario.market.kind == "community" else None

    def on_network_update(env):
        msg = NetworkUpdate.from_envelope(env)
        try:
            sol = agent.solve(msg.arrays["v_mw"], msg.rho)
        except Exception as exc:  # noqa: BLE001 - a failed SOCP is an outcome: reported, the coordinator decides
            log(f"network agent failed at iteration {env.iteration}: {exc}")
            return NetworkResult(arrays={}, status=f"network agent SOCP failed: {exc}")
        return NetworkResult(arrays={"z_mw": sol.z_mw, "import_mw": sol.import_mw, "export_mw": sol.export_mw,
                                     "vm_pu": sol.vm_pu, "prices_eur_per_mwh": sol.prices_eur_per_mwh,
                                     "losses_mw": sol.losses_mw, "cone_gap": np.array([sol.max_cone_gap])},
                             solve_s=sol.solve_time_s, status="ok")

    planner = None

    def on_dispatch(env):
        nonlocal planner
        t = time.perf_counter()
        msg = Dispatch.from_envelope(env)
        ac = run_ac(net, dispatch_to_frame(msg), scenario.network)
        log(f"AC power flow of {ac.hours.shape[0]} hours in {time.perf_counter() - t:.2f} s, "
            f"{len(ac.violations)} violation(s)")
        report = grid_report(ac)
        if not msg.plan:
            return report
        if planner is None:
            planner = outer_planner(scenario, net, msg)
        plan = planner.step(msg.p_mw, ac)
        for line in plan.actions:
            log(f"outer loop: {line}")
        if plan.reason:
            log(f"outer loop {plan.status}: {plan.reason}")
        tables = dict(report.tables)
        tables.update(frames_to_tables({"outer_hours": pd.DataFrame(planner.hour_table())}))
        return replace(report, penalties=plan.updates, outer_status=plan.status, outer_reason=plan.reason,
                       actions=tuple(plan.actions), tables=tables)

    handlers = {MsgType.DISPATCH: on_dispatch}
    if agent is not None:
        handlers[MsgType.NETWORK_UPDATE] = on_network_update
    return run_service("dso", coordinator, timeout_s, idle_timeout_s, handlers)


def outer_planner(scenario, net, msg: Dispatch):
    """The DSO's outer-loop planner for the roster of the first dispatch it is asked to plan for.
    The peers' benchmark tan phi and flexibility are the DSO's connection data (here: the scenario)."""
    from common.models import peer_models
    from common.outer_loop import initial_q_and_flex, planner_for

    by_id = {m.id: m for m in peer_models(scenario)}
    unknown = [p for p in msg.peer_ids if p not in by_id]
    if unknown:
        raise ValueError(f"dispatch names peers the DSO does not know: {', '.join(unknown[:5])}")
    tan0, flex0 = initial_q_and_flex([by_id[p] for p in msg.peer_ids])
    return planner_for(scenario, net, list(msg.peer_ids), list(msg.kinds), list(msg.buses), tan0, flex0)


def network_agent(scenario, net):
    """The network agent of the community market, built once (DPP) from the network and the
    roster's buses (and loads' power factor)."""
    from common.clearing import community_inputs
    from common.community import NetworkAgent
    from dso_service.networks import grid_model

    t = time.perf_counter()
    models, grid_peer = community_inputs(scenario)
    agent = NetworkAgent.from_models(
        grid_model(net, scenario.network), models, scenario.hourly(grid_peer, "import_price_eur_per_mwh"),
        scenario.hourly(grid_peer, "export_price_eur_per_mwh"), grid_peer.p_import_max_mw, grid_peer.p_export_max_mw)
    log(f"network agent built in {time.perf_counter() - t:.2f} s ({len(models)} peers, DPP: {agent.is_dpp()})")
    return agent
