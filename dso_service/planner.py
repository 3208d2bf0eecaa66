"""The DSO's side of the outer loop (thesis 3.2-3.4): from an AC check of the cleared dispatch to
the parameter updates that go back into the market. Pure: no sockets, no solver; the DSO service
process and the centralized reference loop drive the same ``OuterPlanner``.

Per hour, independently (the hours of the full P2P market are independent):

1. **differentiation** (``k_differentiation`` outer iterations). A consumer n pays
   ``w_nm = c * gamma_nm`` EUR per MWh bought from producer m (thesis eq. 3.3, c < 0, p_nm < 0).
   - congestion (cong, full): gamma starts at the distance between the two peers' buses along the
     network [km] for every trade, then grows by ``up_cong_km`` on the trades whose path crosses an
     overloaded branch;
   - voltage (volt, full): for the worst bus i, s_x is the resistance shared by bus(x)'s path to
     the slack and i's path (pu). A trade from m to n moves v_i by about (s_n - s_m) P: for low
     voltage its impact is s_n - s_m, for high voltage s_m - s_n; gamma starts at the impact
     normalised to [0, 1] (0 where it helps) and grows by ``up_volt`` where the impact is positive.
2. **reactive-power control** (volt, full; hours with voltage problems only): one peer per outer
   iteration, most sensitive first, only on the feeder of the worst bus: loads' tan phi to 0, then
   to minus its initial value (low voltage); RES tan phi to 0 (high voltage).
3. **flexibility**, one step of ``flex_step`` per outer iteration, the hour's differentiation kept:
   the loads concerned (downstream of an overloaded branch, or on the feeder of the worst bus)
   offer more downward flexibility (low voltage, import congestion) or upward flexibility (high
   voltage, export congestion); in the full model high voltage and export congestion cut the RES
   concerned instead (RES downward flexibility). Beyond ``flex_max`` the hour is exhausted.

An hour with no violation keeps its parameters. The planner sends only what changed, and only to
the peers concerned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from common.grid import GridModel
from common.market import TradeGraph, trade_graph_from_roster
from common.models import PRODUCER_KINDS

RES_KINDS = ("pv", "wind")
HANDLES = {"cong": {"overload"}, "volt": {"undervoltage", "overvoltage"},
           "full": {"overload", "undervoltage", "overvoltage"}, "freq": {"overload", "undervoltage", "overvoltage"},
           "benchmark": set()}


@dataclass
class HourState:
    stage: str = "clean"  # clean | diff | q | flex | solved | exhausted
    diff_iterations: int = 0
    q_queue: list = field(default_factory=list)  # (peer index, new tan phi)
    q_changes: list = field(default_factory=list)  # peer ids whose tan phi changed
    flex_steps: int = 0
    flex_down: float = 0.0  # loads' downward flexibility fraction now offered (0: untouched)
    flex_up: float = 0.0  # loads' upward flexibility fraction now offered (0: untouched)
    res_cap: float = 1.0  # fraction of forecast the RES concerned may produce
    flex_peers: set = field(default_factory=set)
    problems: str = ""  # what the last AC check found in this hour


@dataclass
class Plan:
    status: str  # "feasible" | "continue" | "exhausted" | "unhandled"
    updates: dict[str, dict[str, np.ndarray]]  # peer id -> parameter name -> array (changed ones only)
    actions: list[str]  # one line per hour acted on
    reason: str = ""


class OuterPlanner:
    def __init__(self, grid: GridModel, peer_ids, kinds, buses, model: str, settings, branch_length_km: np.ndarray,
                 tan_phi0, flex0, hours: int, max_loading_percent: float = 100.0, two_way=None, allowed=None):
        self.grid = grid
        self.ids = list(peer_ids)
        self.kinds = np.asarray(kinds)
        self.buses = np.asarray(buses, dtype=int)
        self.model = model
        self.s = settings
        self.H = hours
        self.max_loading_percent = max_loading_percent
        two_way = [False] * len(self.ids) if two_way is None else [bool(w) for w in two_way]
        self.graph: TradeGraph = trade_graph_from_roster(
            self.ids, [k in PRODUCER_KINDS and not w for k, w in zip(self.kinds, two_way)], two_way, allowed)
        g = self.graph
        self.consumer_trade = g.sign[:] < 0  # trades owned by consumers carry the weights
        N, K = len(self.ids), g.n_pairs
        # branches on each trade's path, and the distance along the network [km]
        on_path = np.zeros((K, grid.n_branch), dtype=bool)
        paths = {}
        for k in range(K):
            a, b = self.buses[g.owner[k]], self.buses[g.partner[k]]
            key = (min(a, b), max(a, b))
            if key not in paths:
                paths[key] = grid.path_between(a, b)
            on_path[k, paths[key]] = True
        self.on_path = on_path
        self.distance_km = on_path.astype(float) @ np.asarray(branch_length_km, float)
        self.gamma_cong = np.zeros((K, hours))
        self.gamma_volt = np.zeros((K, hours))
        self.tan_phi0 = np.asarray(tan_phi0, float)
        self.tan_phi = np.repeat(self.tan_phi0[:, None], hours, axis=1)
        self.flex0 = np.asarray(flex0, float)  # (N,) loads' own flexibility fraction (0 for others)
        self.flex_down = np.repeat(self.flex0[:, None], hours, axis=1)
        self.flex_up = self.flex_down.copy()
        self.res_cap = np.ones((N, hours))
        self.hours = [HourState() for _ in range(hours)]
        # each peer's feeder (first branch out of the root) and path to the slack
        self.feeder = np.array([grid.feeder_of(int(b)) for b in self.buses])
        self.root_paths = [set(grid.path_to_root(int(b))) for b in self.buses]
        # (pandapower table, element index) of the AC report -> branch of the grid model
        src = grid.branch_source or ("line",) * grid.n_branch
        elem = grid.branch_element if grid.branch_element is not None else np.arange(grid.n_branch)
        self.branch_of = {(s, int(e)): k for k, (s, e) in enumerate(zip(src, elem))}
        # what each peer was last told; the initial values are its own model's, so nothing is sent
        # until they change
        self._sent = {(pid, name): arr.copy() for pid, p in self.parameters().items() for name, arr in p.items()}

    # -- helpers ------------------------------------------------------------------------------
    def weights(self) -> np.ndarray:
        """(K, H) differentiation cost per MWh of each ordered trade (zero for producers' rows)."""
        w = self.s.c_cong_eur_per_km_mwh * self.gamma_cong + self.s.c_volt_eur_per_mwh * self.gamma_volt
        return np.where(self.consumer_trade[:, None], w, 0.0)

    def _shared_r(self, bus: int) -> np.ndarray:
        """Per peer: resistance shared by its bus's path to the slack and ``bus``'s path (pu)."""
        ref = set(self.grid.path_to_root(bus))
        return np.array([self.grid.path_r_pu(path & ref) for path in self.root_paths])

    # -- one outer iteration --------------------------------------------------------------------
    def step(self, p_mw: np.ndarray, ac) -> Plan:
        """Decide the next parameters from the dispatch ``p_mw`` (N, H) and its AC check."""
        handles = HANDLES[self.model]
        limit = self.max_loading_percent
        actions, exhausted, unhandled = [], [], []
        lines = ac.lines
        for t in range(self.H):
            hour = t + 1
            st = self.hours[t]
            viol = ac.violations[ac.violations["hour"] == hour]
            kinds = set(viol["kind"])
            if "not_converged" in kinds:
                kinds = (kinds - {"not_converged"}) | {"undervoltage"}  # a collapsed power flow: too much load
            mine = kinds & handles
            st.problems = ", ".join(sorted(kinds))
            if not kinds:
                if st.stage not in ("clean", "solved"):
                    st.stage = "solved"
                continue
            if not mine:
                unhandled.append(f"hour {hour}: {', '.join(sorted(kinds))}")
                continue
            # what is wrong in this hour
            over = []
            if "overload" in mine:
                rows = lines[(lines["hour"] == hour)]
                for r in rows[rows["loading_percent"] > limit + 1e-9].itertuples():
                    k = self.branch_of.get((str(r.element), int(r.line)))
                    if k is not None:
                        over.append(k)
            vbus, vkind = None, None
            vrows = viol[viol["kind"].isin(mine & {"undervoltage", "overvoltage"})]
            if len(vrows):
                dev = np.where(vrows["kind"] == "undervoltage", vrows["limit"] - vrows["value"], vrows["value"] - vrows["limit"])
                worst = vrows.iloc[int(np.argmax(dev))]
                vbus, vkind = int(worst["index"]), str(worst["kind"])
            elif "undervoltage" in mine:  # power flow did not converge: the far end of the longest feeder
                vbus, vkind = int(np.argmax(self.grid.depth)), "undervoltage"
            act = self._act(t, st, p_mw, over, vbus, vkind)
            if act is None:
                res = ", RES cut at most to 0 % of forecast" if self.model == "full" else ""
                exhausted.append(f"hour {hour} ({st.problems}): flexibility exhausted (loads' flexibility at most "
                                 f"{100 * self.s.flex_max:.0f} % of their baseline{res}) and still infeasible")
            else:
                actions.append(f"hour {hour} [{st.problems}]: {act}")
        updates = self._changed()
        if exhausted:
            return Plan("exhausted", updates, actions, "; ".join(exhausted))
        if actions:
            return Plan("continue", updates, actions)
        if unhandled:
            return Plan("unhandled", updates, actions,
                        f"model {self.model!r} does not address: " + "; ".join(unhandled))
        return Plan("feasible", updates, actions)

    def _act(self, t: int, st: HourState, p_mw, over: list, vbus, vkind) -> str | None:
        s, g = self.s, self.graph
        voltage_only = not over and vbus is not None
        if st.stage in ("clean", "solved"):
            st.stage, st.diff_iterations = "diff", 0
        if st.stage == "diff" and st.diff_iterations < s.k_differentiation:
            first = st.diff_iterations == 0
            st.diff_iterations += 1
            parts = []
            if over:
                crossing = self.on_path[:, over].any(axis=1) & self.consumer_trade
                if first and not self.gamma_cong[:, t].any():
                    self.gamma_cong[:, t] = self.distance_km
                    parts.append(f"distance weights (c = {s.c_cong_eur_per_km_mwh:g} EUR/(km MWh))")
                else:
                    self.gamma_cong[crossing, t] += s.up_cong_km
                    parts.append(f"+{s.up_cong_km:g} km on {int(crossing.sum())} trades crossing "
                                 + ", ".join(self.grid.branch_name[k] for k in over))
            if vbus is not None:
                sr = self._shared_r(vbus)
                impact = sr[g.owner] - sr[g.partner]  # consumer's minus producer's shared resistance
                if vkind == "overvoltage":
                    impact = -impact
                impact = np.where(self.consumer_trade, np.maximum(impact, 0.0), 0.0)
                if first and not self.gamma_volt[:, t].any() and impact.max() > 0:
                    self.gamma_volt[:, t] = impact / impact.max()
                    parts.append(f"sensitivity weights for bus {vbus} ({vkind})")
                else:
                    self.gamma_volt[impact > 0, t] += s.up_volt
                    parts.append(f"+{s.up_volt:g} on {int((impact > 0).sum())} trades lowering bus {vbus}"
                                 if vkind == "undervoltage" else
                                 f"+{s.up_volt:g} on {int((impact > 0).sum())} trades raising bus {vbus}")
            return f"differentiation {st.diff_iterations}/{s.k_differentiation}: " + "; ".join(parts)
        if st.stage == "diff":
            st.stage = "q" if (voltage_only and s.q_control and self.model in ("volt", "freq", "full")) else "flex"
            if st.stage == "q":
                st.q_queue = self._q_queue(vbus, vkind, t)
        if st.stage == "q":
            if st.q_queue:
                n, value = st.q_queue.pop(0)
                self.tan_phi[n, t] = value
                st.q_changes.append(f"{self.ids[n]}:{value:g}")
                return f"reactive control: {self.ids[n]} (bus {self.buses[n]}) tan phi -> {value:g}"
            st.stage = "flex"
        # flexibility step; the hour's differentiation stays in place
        return self._flex_step(t, st, p_mw, over, vbus, vkind)

    def _q_queue(self, vbus: int, vkind: str, t: int) -> list:
        sr = self._shared_r(vbus)
        on_feeder = self.feeder == self.grid.feeder_of(vbus)
        if vkind == "undervoltage":
            cand = [n for n in np.argsort(-sr, kind="stable") if on_feeder[n] and self.kinds[n] == "load" and sr[n] > 0]
            return [(n, 0.0) for n in cand if self.tan_phi[n, t] > 0] + [(n, -abs(self.tan_phi0[n])) for n in cand
                                                                       if self.tan_phi0[n] != 0]
        cand = [n for n in np.argsort(-sr, kind="stable") if on_feeder[n] and self.kinds[n] in RES_KINDS and sr[n] > 0]
        return [(n, 0.0) for n in cand if self.tan_phi[n, t] != 0]

    def _flex_step(self, t: int, st: HourState, p_mw, over: list, vbus, vkind) -> str | None:
        """One flexibility step for the peers concerned: loads shed (downward flexibility) for low
        voltage and import congestion, consume more (upward) for high voltage and export
        congestion; in the full model RES are cut instead for the latter two."""
        s = self.s
        down, up, res = set(), set(), set()
        for k in over:
            inside = np.isin(self.buses, self.grid.downstream_buses(k))
            export = float(p_mw[inside, t].sum()) > 0  # the downstream side feeds the upstream one
            if export and self.model == "full":
                res |= set(np.flatnonzero(inside & np.isin(self.kinds, RES_KINDS)).tolist())
            else:
                (up if export else down).update(np.flatnonzero(inside & (self.kinds == "load")).tolist())
        if vbus is not None:
            on_feeder = self.feeder == self.grid.feeder_of(vbus)
            if vkind == "overvoltage" and self.model == "full":
                res |= set(np.flatnonzero(on_feeder & np.isin(self.kinds, RES_KINDS)).tolist())
            else:
                (up if vkind == "overvoltage" else down).update(np.flatnonzero(on_feeder & (self.kinds == "load")).tolist())
        parts = []
        st.flex_steps += 1
        for peers, attr, arr, word in ((down, "flex_down", self.flex_down, "down"), (up, "flex_up", self.flex_up, "up")):
            if not peers:
                continue
            level = max(getattr(st, attr), float(self.flex0[list(peers)].max())) + s.flex_step
            if level > s.flex_max + 1e-9:
                st.stage = "exhausted"
                return None
            setattr(st, attr, level)
            st.flex_peers |= peers
            for n in peers:
                arr[n, t] = max(arr[n, t], level)
            parts.append(f"loads' {word}ward flexibility {100 * level:.0f} % at {len(peers)} load(s)")
        if res:
            cap = st.res_cap - s.flex_step
            if cap < -1e-9:
                st.stage = "exhausted"
                return None
            st.res_cap = max(cap, 0.0)
            st.flex_peers |= res
            for n in res:
                self.res_cap[n, t] = min(self.res_cap[n, t], st.res_cap)
            parts.append(f"RES cut to {100 * st.res_cap:.0f} % of forecast at {len(res)} unit(s)")
        if not parts:
            st.stage = "exhausted"
            return None
        st.stage = "flex"
        return f"flexibility step {st.flex_steps}: " + "; ".join(parts)

    # -- what to send -------------------------------------------------------------------------
    def parameters(self) -> dict[str, dict[str, np.ndarray]]:
        """Every peer's current parameters (what the centralized loop applies)."""
        w = self.weights()
        out = {}
        for n, pid in enumerate(self.ids):
            p = {"tan_phi": self.tan_phi[n], "beta_eur_per_mwh": np.array([self.s.beta_eur_per_mwh])}
            if self.kinds[n] == "load":
                p["flex_down_fraction"] = self.flex_down[n]
                p["flex_up_fraction"] = self.flex_up[n]
                p["diff_eur_per_mwh"] = w[self.graph.partners_of(n)]
            elif self.kinds[n] in RES_KINDS:
                p["res_cap_fraction"] = self.res_cap[n]
            elif self.kinds[n] == "virtual_load":
                p["diff_eur_per_mwh"] = w[self.graph.partners_of(n)]
            out[pid] = p
        return out

    def _changed(self) -> dict[str, dict[str, np.ndarray]]:
        out: dict[str, dict[str, np.ndarray]] = {}
        for pid, params in self.parameters().items():
            for name, arr in params.items():
                if np.array_equal(self._sent[(pid, name)], arr):
                    continue
                self._sent[(pid, name)] = arr.copy()
                out.setdefault(pid, {})[name] = arr.copy()
        # a peer whose flexibility changes learns beta with it
        for pid, p in out.items():
            if {"flex_down_fraction", "flex_up_fraction", "res_cap_fraction"} & set(p):
                p["beta_eur_per_mwh"] = np.array([self.s.beta_eur_per_mwh])
        return out

    # -- results ------------------------------------------------------------------------------
    def hour_table(self) -> list[dict]:
        rows = []
        for t, st in enumerate(self.hours):
            rows.append({
                "hour": t + 1, "stage": st.stage, "differentiation_iterations": st.diff_iterations,
                "load_flex_down_pct": 100 * st.flex_down if st.flex_down else np.nan,
                "load_flex_up_pct": 100 * st.flex_up if st.flex_up else np.nan,
                "res_cap_pct": 100 * st.res_cap if st.res_cap < 1 else np.nan,
                "flex_peers": len(st.flex_peers), "tan_phi_changes": " ".join(st.q_changes),
            })
        return rows
