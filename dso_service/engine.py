"""The DSO engine: AC power-flow check of every dispatch (and, in the outer loop, the planner's
next parameters), and the network agent of the community market.

Built from the public scenario only: the network and its limits, the roster's buses and the
connection data (tan phi, contracted flexibility), the outer-loop settings, the root tariff. It never
holds a peer's costs. A request it cannot answer is answered with a status saying why, never by
dying: the coordinator decides.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec
import numpy as np
import pandas as pd

from common.engine import COORDINATOR, Finish, Log, Received, Send, Started
from common.protocol.control import Hello, Shutdown, Welcome
from common.protocol.grid import Dispatch, GridReport, NetworkResult, NetworkUpdate, Violation
from common.public import voltage_setpoints
from common.report_codec import ac_to_tables, frames_to_tables


def dispatch_to_frame(msg: Dispatch) -> pd.DataFrame:
    n, H = msg.p_mw.shape
    return pd.DataFrame({
        "peer": np.repeat(list(msg.peer_ids), H), "kind": np.repeat(list(msg.kinds), H),
        "bus": np.repeat(list(msg.buses), H), "hour": np.tile(np.arange(1, H + 1), n),
        "p_mw": msg.p_mw.reshape(-1), "q_mvar": msg.q_mvar.reshape(-1),
    })


def grid_report(ac, network: bool = True) -> GridReport:
    """``network``: send the network's drawing (bus coordinates, branch ends) too."""
    violations = tuple(Violation(kind=str(r.kind), element=str(r.element), hour=int(r.hour) - 1,
                                 value=float(np.nan_to_num(r.value)), limit=float(np.nan_to_num(r.limit)))
                       for r in ac.violations.itertuples())
    return GridReport(violations=violations, tables=ac_to_tables(ac, network=network))


def _failed_report(reason: str) -> GridReport:
    return GridReport(violations=(), tables={}, status=reason)


class DSOEngine:
    name = "dso"

    def __init__(self, public, timer: Callable[[], float] = time.perf_counter, pid: int = 0, host: str = "",
                 agent=None):
        """``agent``: a network agent built elsewhere (a feeder given as a ``GridModel``, in tests and
        studies); by default it is built from the public scenario's network."""
        self.public = public
        self.timer = timer
        self.pid, self.host = pid, host
        self.planner = None
        self.network_sent = False  # the network's drawing goes with the first GRID_REPORT only
        self.last_network = None  # the network agent's last solution
        self.net = None
        if public.network is not None:
            from dso_service.networks import build_network

            self.net = build_network(public.network)
        self.agent = agent if agent is not None or public.market.kind != "community" else self._network_agent()

    def _network_agent(self):
        """The network agent of the community market, built once (DPP) from the network, the
        roster's buses, loads' power factor and the root tariff."""
        from dso_service.network_agent import NetworkAgent
        from dso_service.networks import grid_model

        peers = [p for p in self.public.roster if p.kind != "grid"]
        t = self.tariff = self.public.tariff
        return NetworkAgent(grid_model(self.net, self.public.network), [p.bus for p in peers],
                            [p.tan_phi if p.kind == "load" else 0.0 for p in peers],
                            np.asarray(t.import_price_eur_per_mwh), np.asarray(t.export_price_eur_per_mwh),
                            t.p_import_max_mw, t.p_export_max_mw)

    def _outer_planner(self, msg: Dispatch):
        from dso_service.networks import branch_lengths_km, grid_model
        from common.partners import roster_mask
        from dso_service.planner import OuterPlanner

        roster = {p.id: p for p in self.public.roster}
        unknown = [p for p in msg.peer_ids if p not in roster]
        if unknown:
            raise ValueError(f"dispatch names peers the DSO does not know: {', '.join(unknown[:5])}")
        entries = [roster[p] for p in msg.peer_ids]
        pub = self.public
        grid = grid_model(self.net, pub.network)
        return OuterPlanner(grid, list(msg.peer_ids), list(msg.kinds), list(msg.buses), pub.market.model, pub.dso,
                            branch_lengths_km(self.net, grid), [e.tan_phi for e in entries],
                            [e.flex_fraction if e.kind == "load" else 0.0 for e in entries], pub.market.hours,
                            pub.network.max_loading_percent, two_way=[e.two_way for e in entries],
                            allowed=roster_mask(pub.market, pub.network, entries, self.net))

    def handle(self, event) -> list:
        if isinstance(event, Started):
            return [Send(COORDINATOR, Hello(role="dso", peer_ids=(), pid=self.pid, host=self.host))]
        if not isinstance(event, Received) or event.sender != COORDINATOR:
            return []
        msg, k = event.message, event.iteration
        if isinstance(msg, Welcome):
            return []
        if isinstance(msg, Shutdown):
            return [Log(f"shutdown: {msg.reason}"), Finish()]
        if isinstance(msg, Dispatch):
            return self._on_dispatch(msg, k)
        if isinstance(msg, NetworkUpdate):
            return self._on_network_update(msg, k)
        return [Log(f"ignored an unexpected {msg.TYPE.value}")]

    def _on_network_update(self, msg: NetworkUpdate, k: int) -> list:
        if self.agent is None:
            return [Send(COORDINATOR, NetworkResult(arrays={}, status="no network agent: not a community market"), k)]
        try:
            sol = self.last_network = self.agent.solve(msg.arrays["v_mw"], msg.rho)
        except Exception as exc:  # noqa: BLE001 - a failed SOCP is an outcome: reported, the coordinator decides
            return [Log(f"network agent failed at iteration {k}: {exc}", "error"),
                    Send(COORDINATOR, NetworkResult(arrays={}, status=f"network agent SOCP failed: {exc}"), k)]
        return [Send(COORDINATOR, NetworkResult(arrays={"z_mw": sol.z_mw, "import_mw": sol.import_mw,
                                                        "export_mw": sol.export_mw, "vm_pu": sol.vm_pu,
                                                        "prices_eur_per_mwh": sol.prices_eur_per_mwh,
                                                        "losses_mw": sol.losses_mw,
                                                        "cone_gap": np.array([sol.max_cone_gap])}), k)]

    def _on_dispatch(self, msg: Dispatch, k: int) -> list:
        from dso_service.powerflow import run_ac

        t = self.timer()
        try:
            ac = run_ac(self.net, dispatch_to_frame(msg), self.public.network, voltage_setpoints(self.public.roster))
            report = grid_report(ac, network=not self.network_sent)
            self.network_sent = True
            out = [Log(f"AC power flow of {ac.hours.shape[0]} hours in {self.timer() - t:.2f} s, "
                       f"{len(ac.violations)} violation(s)")]
            if msg.plan:
                if self.planner is None:
                    self.planner = self._outer_planner(msg)
                plan = self.planner.step(msg.p_mw, ac)
                out += [Log(f"outer loop: {line}") for line in plan.actions]
                if plan.reason:
                    out.append(Log(f"outer loop {plan.status}: {plan.reason}"))
                tables = dict(report.tables)
                tables.update(frames_to_tables({"outer_hours": pd.DataFrame(self.planner.hour_table())}))
                report = msgspec.structs.replace(report, penalties=plan.updates, tables=tables, outer_status=plan.status,
                                                 outer_reason=plan.reason, actions=tuple(plan.actions))
        except Exception as exc:  # noqa: BLE001 - the coordinator gets the reason, the service lives on
            return [Log(f"could not check the dispatch of iteration {k}: {type(exc).__name__}: {exc}", "error"),
                    Send(COORDINATOR, _failed_report(f"{type(exc).__name__}: {exc}"), k)]
        return out + [Send(COORDINATOR, report, k)]
