"""Runs in one process: the centralized reference, and any engine set on the in-process driver.

- ``run_centralized``: the reference clearing of a scenario. The benchmark and the community
  market are one centralized solve and an AC check; an outer-loop model (cong, volt, freq, full)
  is the coordinator engine's one outer loop around the centralized clearing, talking to the DSO
  and TSO engines through the in-process driver (the same messages as the distributed run).
- ``run_in_process``: the distributed clearing with every role's engine in this process (the
  same engines as the processes run), messages through the codec, counted as on the wire.
"""

from __future__ import annotations

import numpy as np

from common.engine import InProcessDriver, NetworkModel
from common.public import split_scenario


def _groups(public, private: dict, per_process: int) -> list[list]:
    from common.models import peer_model_from_dict

    ids = [p.id for p in public.roster if not (public.market.kind == "community" and p.kind == "grid")]
    models = [peer_model_from_dict(private[i]) for i in ids]
    return [models[i:i + per_process] for i in range(0, len(models), per_process)]


def engines_for(scenario, *, topology: str = "relay", peers_per_process: int = 1, central: bool = False):
    """(coordinator engine, every engine of the run) for a loaded scenario."""
    from coordinator.engine import CentralizedClearing, CoordinatorEngine
    from dso_service.engine import DSOEngine
    from peer_node.engine import PeerEngine
    from tso_service.engine import TSOEngine

    public, private = split_scenario(scenario)
    clearing = None
    peers = []
    if central:
        from common.models import peer_models

        clearing = CentralizedClearing(peer_models(scenario))
    else:
        peers = [PeerEngine(group, f"h{i:04d}-{group[0].id}")
                 for i, group in enumerate(_groups(public, private, peers_per_process))]
    coordinator = CoordinatorEngine(public, topology=topology, clearing=clearing, progress_every_s=np.inf)
    coordinator.run_id = "inproc"
    return coordinator, [coordinator, *peers, DSOEngine(public), TSOEngine(public.tso_virtual_load_mw)]


def run_in_process(scenario, *, topology: str = "relay", peers_per_process: int = 1, central: bool = False,
                   wire: bool = True, network: NetworkModel | None = None, trace=None):
    """Run every role's engine in this process; returns (RunResult, driver)."""
    from coordinator.results import build_result

    coordinator, engines = engines_for(scenario, topology=topology, peers_per_process=peers_per_process,
                                       central=central)
    driver = InProcessDriver(engines, wire=wire, network=network, trace=trace, run_id=coordinator.run_id)
    outcome = driver.run()
    result = build_result(outcome, coordinator, driver.traffic.rows(), processes=1,
                          rejected=sum(driver.rejected.values()))
    return result, driver


def market_public(models: list, **market):
    """The public part of a market of peer models without a grid (no network: no DSO, no TSO)."""
    from types import SimpleNamespace

    from common.public import RosterEntry
    from common.scenario import DSOSpec, MarketSpec

    spec = MarketSpec(**{"kind": "p2p", "hours": len(models[0].p_min_mw), **market})
    return SimpleNamespace(name="market", market=spec, dso=DSOSpec(), network=None, tariff=None,
                           roster=[RosterEntry(id=m.id, kind=m.kind, bus=m.bus, two_way=getattr(m, "two_way", False)) for m in models])


def clear_market(models: list, *, rho: float = 1.0, tolerance: float = 1e-4, max_iterations: int = 5000,
                 residual_balancing: bool = True, topology: str = "relay", peers_per_process: int = 1,
                 price_init_eur_per_mwh: float = 0.0, wire: bool = True, trace=None, network=None, **market):
    """Clear a full P2P market of peer models without a grid (no DSO, no TSO) with the real
    coordinator and peer engines in process; returns (RunOutcome, coordinator engine, driver).
    ``network``: latency on the simulated clock (``common.network.LinkNetwork``)."""
    from coordinator.engine import CoordinatorEngine
    from peer_node.engine import PeerEngine

    public = market_public(models, rho=rho, tolerance=tolerance, max_iterations=max_iterations,
                           residual_balancing=residual_balancing, price_init_eur_per_mwh=price_init_eur_per_mwh,
                           **market)
    coordinator = CoordinatorEngine(public, topology=topology, progress_every_s=np.inf)
    peers = [PeerEngine(models[i:i + peers_per_process], f"h{i:04d}-{models[i].id}")
             for i in range(0, len(models), peers_per_process)]
    driver = InProcessDriver([coordinator, *peers], wire=wire, trace=trace, network=network)
    return driver.run(), coordinator, driver


def clear_community(models: list, agent, import_price, export_price, p_import_max_mw: float, p_export_max_mw: float, *,
                    rho: float = 100.0, tolerance: float = 1e-4,
                    max_iterations: int = 2000, residual_balancing: bool = True, price_init_eur_per_mwh: float = 0.0,
                    wire: bool = True, trace=None, **market):
    """Clear a community market of peer models against a given network agent (the DSO's) with the
    real coordinator, peer and DSO engines in process, without an AC check; returns
    (RunOutcome, coordinator engine, DSO engine, driver)."""
    from types import SimpleNamespace

    from common.public import RosterEntry, Tariff
    from common.scenario import DSOSpec, MarketSpec
    from coordinator.engine import CoordinatorEngine
    from dso_service.engine import DSOEngine
    from peer_node.engine import PeerEngine

    H = len(np.atleast_1d(import_price))
    spec = MarketSpec(kind="community", hours=H, rho=rho, tolerance=tolerance, max_iterations=max_iterations,
                      residual_balancing=residual_balancing, price_init_eur_per_mwh=price_init_eur_per_mwh, **market)
    tariff = Tariff(import_price_eur_per_mwh=list(np.broadcast_to(import_price, (H,))),
                    export_price_eur_per_mwh=list(np.broadcast_to(export_price, (H,))),
                    p_import_max_mw=p_import_max_mw, p_export_max_mw=p_export_max_mw)
    public = SimpleNamespace(name="community", market=spec, dso=DSOSpec(), network=None, tariff=tariff,
                             roster=[RosterEntry(id=m.id, kind=m.kind, bus=m.bus, two_way=getattr(m, "two_way", False)) for m in models])
    coordinator = CoordinatorEngine(public, progress_every_s=np.inf)
    dso = DSOEngine(public, agent=agent)
    peers = [PeerEngine([m], f"h{i:04d}-{m.id}") for i, m in enumerate(models)]
    driver = InProcessDriver([coordinator, *peers, dso], wire=wire, trace=trace)
    return driver.run(), coordinator, dso, driver


def run_centralized(scenario):
    """Clear the scenario with the centralized reference and validate it with an AC power flow."""
    from common import centralized
    from common.clearing import community_result, dispatch_frame, p2p_result, relaxation_frame
    from common.models import peer_models
    from dso_service.networks import build_network, grid_model
    from common.public import voltage_setpoints
    from dso_service.powerflow import run_ac

    if scenario.market.kind == "p2p" and scenario.market.model != "benchmark":
        result, _ = run_in_process(scenario, central=True, wire=False)
        result.messages = result.messages.iloc[0:0]  # the reference exchanges no market messages
        return result
    public, _ = split_scenario(scenario)
    net = build_network(scenario.network)
    if scenario.market.kind == "p2p":
        peers = peer_models(scenario)
        from common.market import fee_weights

        from common.partners import public_graph

        sol = centralized.solve_p2p(peers, graph=public_graph(public, net))
        w = fee_weights(sol.graph, peers)
        result = p2p_result(public, sol.graph, dispatch_frame(peers, sol.p_mw), sol.trades_mw, sol.prices_eur_per_mwh,
                            sol.social_welfare_eur, sol.differentiation_cost_eur, "centralized",
                            fees_eur=None if w is None else w[:, None] * sol.trades_mw)
        result.ac = run_ac(net, result.dispatch, scenario.network, voltage_setpoints(public.roster))
        return result
    models = [m for m in peer_models(scenario) if m.kind != "grid"]
    t = public.tariff
    sol = centralized.solve_community(models, grid_model(net, scenario.network), np.asarray(t.import_price_eur_per_mwh),
                                      np.asarray(t.export_price_eur_per_mwh), t.p_import_max_mw, t.p_export_max_mw)
    result = community_result(public, models, sol, "centralized")
    result.ac = run_ac(net, result.dispatch, scenario.network, voltage_setpoints(public.roster))
    result.relaxation = relaxation_frame(sol, result.ac)
    result.extra["socp_losses_mwh"] = float(np.sum(sol.losses_mw))
    result.extra["relaxation_max_vm_gap_pu"] = float(result.relaxation["max_vm_gap_pu"].max())
    return result
