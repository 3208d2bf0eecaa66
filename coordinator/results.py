"""From the coordinator engine's outcome to a ``RunResult`` (the tables of the results folder).

Shared by both drivers: the coordinator process (socket shell) and in-process runs (the
centralized outer loop, tests, experiments). ``traffic`` is the run's messages as
``(iteration, type, count, bytes)`` rows, as the driver counted them.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd

from common.clearing import community_result, dispatch_frame, p2p_result, relaxation_frame
from common.outer_loop import finish_outer
from common.report_codec import ac_from_tables, frames_from_tables
from coordinator.engine import CoordinatorEngine, RunOutcome


def build_result(outcome: RunOutcome, engine: CoordinatorEngine, traffic: list[tuple], *, processes: int = 0,
                 rejected: int = 0, rejected_by_role: dict | None = None):
    """``rejected_by_role``: {role: {reason: count}} of every role (coordinator, dso, tso, peers);
    ``rejected``: the total when no breakdown is given."""
    public = engine.public
    last = outcome.clearings[-1]
    if engine.community:
        result, sol = _community(engine, last, outcome)
    else:
        # the market's roster: the public one, less any peer dropped on the way (policy drop)
        result = p2p_result(public, engine.graph, dispatch_frame(engine.roster, last.p_mw, last.q_mvar), last.trades_mw,
                            last.prices_eur_per_mwh, last.sw_eur, last.diff_eur, outcome.solver, converged=last.converged,
                            fees_eur=last.fees_eur)
        result.economics["flex_penalty_eur"] = last.flex_eur
    first = outcome.report_initial.tables if outcome.report_initial is not None else None
    result.ac = ac_from_tables(outcome.report.tables, network=first)
    result.iterations = engine.iteration
    result.extra["price_rounds"] = engine.price_rounds
    result.extra["rounds"] = engine.price_rounds + engine.iteration  # every round trip of the clearings
    result.outer_iterations = len(outcome.clearings)
    if outcome.outer is not None:
        o = outcome.outer
        result.ac_initial = ac_from_tables(outcome.report_initial.tables)
        hours = frames_from_tables(outcome.report.tables, ["outer_hours"])["outer_hours"]
        dispatch_before = dispatch_frame(public.roster, o["p_before"], np.zeros_like(o["p_before"]))
        finish_outer(result, hours.to_dict("records"), o["sw_before"], outcome.virtual_load_mw, o["history"],
                     o["status"], o["reason"], dispatch_before)
        result.converged = result.converged and all(c.converged for c in outcome.clearings)
        result.penalties = pd.DataFrame(outcome.penalty_log, columns=["outer", "source", "host", "peer", "parameters"])
    if engine.community:
        result.relaxation = relaxation_frame(sol, result.ac)
        result.extra["relaxation_max_vm_gap_pu"] = float(result.relaxation["max_vm_gap_pu"].max())
    rounds = [c.rounds for c in outcome.clearings if c.rounds is not None]
    result.primal_residual = rounds[-1].primal_residual if rounds else 0.0
    result.dual_residual = rounds[-1].dual_residual if rounds else 0.0
    result.processes = processes or (len(outcome.hosts) + 1 + len(outcome.services))
    result.admm_history = pd.DataFrame([(o, s.iteration, s.primal_residual, s.dual_residual, s.rho, s.open_hours)
                                        for o, r in enumerate(rounds, start=1) for s in r.history],
                                       columns=["outer", "iteration", "primal_residual", "dual_residual", "rho",
                                                "open_hours"])
    if rounds:  # hour-iterations: the local problems solved, per peer (per-hour stopping cuts them)
        result.extra["hour_iterations"] = int(result.admm_history["open_hours"].sum())
    msgs = pd.DataFrame(traffic, columns=["iteration", "type", "count", "bytes"])
    result.messages = msgs.groupby(["iteration", "type"], as_index=False)[["count", "bytes"]].sum()
    if rejected_by_role is not None:
        rejected = sum(sum(v.values()) for v in rejected_by_role.values())
        result.extra["rejected_by_role"] = {role: dict(sorted(v.items())) for role, v in rejected_by_role.items()}
    if outcome.solver == "admm":
        _timing(result, engine, outcome, rounds, rejected)
        result.extra["on_peer_loss"] = engine.on_peer_loss
        result.extra["dropped_peers"] = list(outcome.dropped)
        result.extra["rejoined_peers"] = list(engine.rejoined)
        if engine.rejoined_services:
            result.extra["rejoined_services"] = list(engine.rejoined_services)
        if engine.resumed_from is not None:
            result.extra["resumed_from"] = dict(engine.resumed_from)
    return result


def _timing(result, engine, outcome, rounds, rejected: int) -> None:
    hist = [s for r in rounds for s in r.history]
    n = max(len(hist), 1)
    if engine.community:
        result.extra["network_agent_ms_per_iteration"] = 1e3 * sum(s.network_s for s in hist) / n
    t = outcome.timing
    result.extra.update({
        "topology": engine.topology,
        "peer_processes": len(outcome.hosts),
        "startup_s": t.get("ready_s"),
        "admm_s": t.get("admm_s"),
        "time_per_iteration_ms": 1e3 * sum(s.wall_s for s in hist) / n,
        "local_solve_ms_per_iteration": 1e3 * sum(s.solve_s_max for s in hist) / n,
        "local_solve_cpu_ms_per_iteration": 1e3 * sum(s.solve_s_sum for s in hist) / n,
        "coordinator_ms_per_iteration": 1e3 * sum(s.coordinator_s for s in hist) / n,
        "dso_s": t.get("dso_s"),
        "rejected_messages": int(rejected),
        "tso_virtual_load_mwh": float(np.sum(outcome.virtual_load_mw)),
    })
    result.extra["messaging_ms_per_iteration"] = max(
        0.0, result.extra["time_per_iteration_ms"] - result.extra["local_solve_ms_per_iteration"]
        - result.extra["coordinator_ms_per_iteration"] - result.extra.get("network_agent_ms_per_iteration", 0.0))


def _community(engine, cleared, outcome):
    """The community market's results from the peers' RESULTs and the network agent's last answer."""
    public = engine.public
    rounds = cleared.rounds
    net = rounds.network.arrays
    ids = engine.roster_ids
    results = cleared.results
    sol = SimpleNamespace(
        p_mw=cleared.p_mw, q_mvar=cleared.q_mvar,
        ev_soc_mwh={i: results[i].soc_mwh for i in ids if results[i].soc_mwh is not None},
        import_mw=net["import_mw"], export_mw=net["export_mw"], prices_eur_per_mwh=net["prices_eur_per_mwh"],
        social_welfare_eur=cleared.sw_eur, losses_mw=net["losses_mw"], vm_pu=net["vm_pu"],
        max_cone_gap=float(net["cone_gap"][0]))
    result = community_result(public, engine.roster, sol, outcome.solver, converged=cleared.converged)
    result.extra["peer_prices_max_abs_eur_per_mwh"] = float(np.abs(rounds.prices_eur_per_mwh).max())
    return result, sol
