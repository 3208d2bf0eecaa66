"""From solver output to a ``RunResult``: dispatch, trades, prices and economics tables shared by
the centralized clearing and the distributed coordinator. ``scenario`` is the public scenario
(``common.public.PublicScenario``): name, market, roster."""

from __future__ import annotations

import numpy as np
import pandas as pd

from common.market import TradeGraph
from common.models import reactive_mvar
from common.results import RunResult, entity_hour_frame

TRADE_EPS_MW = 1e-6


def dispatch_frame(models: list, p_mw: np.ndarray, q_mvar: np.ndarray | None = None) -> pd.DataFrame:
    p_mw = np.asarray(p_mw, dtype=float)
    if q_mvar is None:
        q_mvar = np.array([reactive_mvar(m, p_mw[i]) for i, m in enumerate(models)], dtype=float).reshape(p_mw.shape)
    return entity_hour_frame("peer", [m.id for m in models], {"p_mw": p_mw, "q_mvar": np.asarray(q_mvar, dtype=float)},
                             kind=[m.kind for m in models], bus=[int(m.bus) for m in models])


def trades_frame(graph: TradeGraph, trades_mw: np.ndarray, prices: np.ndarray, threshold_mw: float = TRADE_EPS_MW,
                 fees_eur: np.ndarray | None = None) -> pd.DataFrame:
    """One row per (seller, buyer, hour) with a traded power above ``threshold_mw``: the seller
    is the side whose own trade is positive (a producer, or a two-way peer selling that hour).
    With ``fees_eur`` (K, H), the differentiation fees each side paid on the trade."""
    k, t_idx = np.nonzero(trades_mw > threshold_mw)
    frame = pd.DataFrame({
        "seller": [graph.peer_ids[i] for i in graph.owner[k]],
        "buyer": [graph.peer_ids[i] for i in graph.partner[k]],
        "hour": t_idx + 1,
        "p_mw": trades_mw[k, t_idx],
        "price_eur_per_mwh": prices[k, t_idx],
    })
    if fees_eur is not None:
        frame["fee_seller_eur"] = fees_eur[k, t_idx]
        frame["fee_buyer_eur"] = fees_eur[graph.reverse[k], t_idx]
    return frame


def p2p_payments(graph: TradeGraph, trades_mw: np.ndarray, prices: np.ndarray) -> pd.DataFrame:
    """Each peer's net payment over the day (positive = pays), sum of -price * p_nm."""
    pay = np.zeros(len(graph.peer_ids))
    np.add.at(pay, graph.owner, -np.sum(prices * trades_mw, axis=1))
    return pd.DataFrame({"peer": list(graph.peer_ids), "payment_eur": pay})


def economics_frame(sw_eur: np.ndarray, diff_eur: np.ndarray | None = None, flex_eur: np.ndarray | None = None) -> pd.DataFrame:
    H = len(sw_eur)
    return pd.DataFrame({
        "hour": np.arange(1, H + 1),
        "social_welfare_eur": sw_eur,
        "differentiation_cost_eur": np.zeros(H) if diff_eur is None else diff_eur,
        "flex_penalty_eur": np.zeros(H) if flex_eur is None else flex_eur,
    })


def p2p_result(scenario, graph: TradeGraph, dispatch: pd.DataFrame, trades_mw, prices, sw, diff, solver: str,
               converged: bool = True, fees_eur: np.ndarray | None = None) -> RunResult:
    threshold = trade_threshold_mw(scenario.market.tolerance)
    trades = trades_frame(graph, trades_mw, prices, threshold, fees_eur)
    result = RunResult(
        scenario=scenario.name, market="p2p", model=scenario.market.model, solver=solver, converged=converged,
        dispatch=dispatch, economics=economics_frame(sw, diff),
        trades=trades, payments=p2p_payments(graph, trades_mw, prices),
    )
    positive = np.clip(trades_mw, 0.0, None)
    result.extra.update({
        "trade_threshold_mw": threshold,
        "trades_listed": int(len(trades)),
        "trades_unlisted_mwh": float(positive[positive <= threshold].sum()),
    })
    if fees_eur is not None:
        result.extra["differentiation_fees_eur"] = float(np.sum(fees_eur))
        result.extra["differentiation_fees_unlisted_eur"] = float(
            np.sum(fees_eur) - trades[["fee_seller_eur", "fee_buyer_eur"]].to_numpy().sum())
    return result


def trade_threshold_mw(tolerance: float) -> float:
    """Smallest trade listed in trades.csv: ten times the ADMM tolerance (the primal residual
    bounds every trade's reciprocity mismatch by the tolerance, so a smaller trade cannot be told
    from zero; with the default 1e-4 this is 1 kW, the dispatch agreement of SPEC 9)."""
    return max(TRADE_EPS_MW, 10.0 * float(tolerance))


def community_result(scenario, models, sol, solver: str, converged: bool = True) -> RunResult:
    H = scenario.market.hours
    dispatch = dispatch_frame(models, sol.p_mw, sol.q_mvar)
    bus_prices = np.asarray(sol.prices_eur_per_mwh, dtype=float)[:, :H]
    prices = entity_hour_frame("bus", range(bus_prices.shape[0]), {"price_eur_per_mwh": bus_prices})
    prices["bus"] = prices["bus"].astype("int64")
    bus_price = sol.prices_eur_per_mwh[[m.bus for m in models]]
    payments = pd.DataFrame({"peer": [m.id for m in models], "payment_eur": -np.sum(bus_price * sol.p_mw, axis=1)})
    ev_soc = entity_hour_frame("peer", list(sol.ev_soc_mwh),
                               {"soc_mwh": np.array([np.asarray(v, dtype=float)[:H] for v in sol.ev_soc_mwh.values()],
                                                    dtype=float).reshape(len(sol.ev_soc_mwh), H)})
    exchange = pd.DataFrame({"hour": np.arange(1, H + 1), "import_mw": sol.import_mw, "export_mw": sol.export_mw})
    result = RunResult(
        scenario=scenario.name, market="community", model=scenario.market.model, solver=solver, converged=converged,
        dispatch=dispatch, economics=economics_frame(sol.social_welfare_eur), prices=prices, ev_soc=ev_soc,
        payments=payments, grid_exchange=exchange,
    )
    # the poster's headline: what the EVs give back, against what the community imports
    ev = dispatch[dispatch["kind"] == "ev"]
    discharge = ev["p_mw"].clip(lower=0).groupby(ev["hour"]).sum()
    imports = float(np.sum(sol.import_mw))
    result.extra.update({
        "ev_discharge_mwh": float(discharge.sum()),
        "ev_discharge_peak_mw": float(discharge.max()) if len(discharge) else 0.0,
        "ev_discharge_hours": [int(h) for h in discharge.index[discharge > 1e-4]],
        "ev_discharge_share_of_imports_pct": 100.0 * float(discharge.sum()) / imports if imports > 0 else None,
    })
    return result


def relaxation_frame(sol, ac) -> pd.DataFrame:
    """How close the SOCP relaxation is to the AC power flow of the same dispatch, per hour."""
    vm_ac = ac.buses.pivot(index="bus", columns="hour", values="vm_pu").sort_index().to_numpy()
    gap = np.nanmax(np.abs(vm_ac - sol.vm_pu[: vm_ac.shape[0]]), axis=0)
    return pd.DataFrame({
        "hour": np.arange(1, len(sol.losses_mw) + 1),
        "losses_socp_mw": sol.losses_mw,
        "losses_ac_mw": ac.hours["losses_mw"].to_numpy(),
        "max_vm_gap_pu": gap,
        "max_cone_gap_pu": sol.max_cone_gap,
    })
