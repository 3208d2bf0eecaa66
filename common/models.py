"""Peers' private models as plain arrays (one value per market hour).

Every peer is reduced to net-injection bounds and a separable quadratic cost per hour:
``C_t(p) = a_t/2 p^2 + b_t p`` [EUR] with ``p`` in MW, producers positive, consumers negative
(thesis eq. 3.2 with d = 0). A load's utility U(d) = b d - a d^2/2 becomes the cost C(p) = -U(-p).
EVs are the only peers whose hours are coupled (state of charge); they get their own model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

PRODUCER_KINDS = ("pv", "wind", "chp", "grid")
CONSUMER_KINDS = ("load", "virtual_load")
# peers whose net injection may take either sign in the full P2P market (they trade both ways with
# every partner); an external supplier that may also export is one too (``HourlyPeer.two_way``)
PROSUMER_KINDS = ("prosumer",)


@dataclass(frozen=True)
class HourlyPeer:
    """Bounds and cost of one peer's net injection, per hour (arrays of length H)."""

    id: str
    kind: str
    bus: int
    p_min_mw: np.ndarray
    p_max_mw: np.ndarray
    cost_a_eur_per_mw2h: np.ndarray
    cost_b_eur_per_mwh: np.ndarray
    tan_phi: float | np.ndarray  # a float, or one value per hour once the DSO changed it
    # slope of the linear term where p < 0 (an external supplier's export price: what it pays for the
    # energy it takes); None: the same as cost_b (one smooth curve). Must not exceed cost_b (convex).
    cost_b_neg_eur_per_mwh: np.ndarray | None = None
    # product differentiation as data: {partner id: w} with w p_nm the fee this peer pays on its
    # trade with that partner [EUR] (common.differentiation); None: no fees
    trade_weights: dict | None = None

    @property
    def is_producer(self) -> bool:
        return self.kind in PRODUCER_KINDS and not self.two_way

    @property
    def two_way(self) -> bool:
        """Trades in both directions (its injection may be negative or positive)."""
        return self.kind in PROSUMER_KINDS or (self.kind == "grid" and bool(np.any(self.p_min_mw < 0)))

    @property
    def trade_sign(self) -> float:
        """+1 sells only, -1 buys only, 0 both ways (the sign constraint of its trades)."""
        return 0.0 if self.two_way else (1.0 if self.is_producer else -1.0)

    def b_neg(self) -> np.ndarray:
        return self.cost_b_eur_per_mwh if self.cost_b_neg_eur_per_mwh is None else self.cost_b_neg_eur_per_mwh

    def cost_eur(self, p_mw: np.ndarray) -> np.ndarray:
        if self.cost_b_neg_eur_per_mwh is None:
            return 0.5 * self.cost_a_eur_per_mw2h * p_mw**2 + self.cost_b_eur_per_mwh * p_mw
        b = np.where(p_mw < 0, self.cost_b_neg_eur_per_mwh, self.cost_b_eur_per_mwh)
        return 0.5 * self.cost_a_eur_per_mw2h * p_mw**2 + b * p_mw

    def marginal_cost_eur_per_mwh(self, p_mw: np.ndarray) -> np.ndarray:
        b = self.cost_b_eur_per_mwh if self.cost_b_neg_eur_per_mwh is None else \
            np.where(p_mw < 0, self.cost_b_neg_eur_per_mwh, self.cost_b_eur_per_mwh)
        return self.cost_a_eur_per_mw2h * p_mw + b


@dataclass(frozen=True)
class EVModel:
    id: str
    bus: int
    capacity_mwh: float
    soc_initial_mwh: float
    soc_min_mwh: float
    soc_departure_mwh: float
    soc_final_mwh: float
    trip_energy_mwh: float
    p_charge_max_mw: float
    p_discharge_max_mw: float
    eta_charge: float
    eta_discharge: float
    arrival_hour: int
    departure_hour: int
    degradation_eur_per_mwh: float
    plugged: np.ndarray  # bool per hour

    kind: str = "ev"


def reactive_mvar(model, p_mw: np.ndarray, market: str = "p2p") -> np.ndarray:
    """Reactive power of a peer for the AC check: loads draw Q = P tan(phi) (P < 0, so Q < 0 is
    consumption). In the full P2P market CHP and RES supply up to tan(phi) P (thesis eqs. 4.3,
    4.5) and are taken at that limit; in the community market the branch-flow model runs them at
    unity power factor (as the centralized SOCP does), so the AC check does too. EVs and the
    external supplier (the slack) run at unity power factor."""
    if isinstance(model, EVModel) or model.kind == "grid" or (market == "community" and model.kind != "load"):
        return np.zeros_like(p_mw)
    return model.tan_phi * p_mw


def ev_plugged_mask(arrival_hour: int, departure_hour: int, hours: int) -> np.ndarray:
    """True for market hours (1..H) in which the car is plugged in."""
    h = np.arange(1, hours + 1)
    if arrival_hour < departure_hour:
        return (h >= arrival_hour) & (h < departure_hour)
    return (h >= arrival_hour) | (h < departure_hour)


def load_utility_coefficients(d_min_mw: np.ndarray, d_max_mw: np.ndarray, price_at_min: float, price_at_max: float):
    """a, b of U(d) = b d - a d^2 / 2 whose marginal utility is the line through
    (d_min, price_at_min) and (d_max, price_at_max). A load without flexibility gets a = 0 and
    b = price_at_min (its utility is then linear and its demand fixed by its bounds)."""
    span = d_max_mw - d_min_mw
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(span > 1e-12, (price_at_min - price_at_max) / np.where(span > 1e-12, span, 1.0), 0.0)
    b = price_at_min + a * d_min_mw
    return a, b


def hourly_peer(scenario, peer) -> HourlyPeer:
    """The hourly bounds and cost of a non-EV peer of the scenario."""
    H = scenario.market.hours
    kind = peer.kind
    if kind == "load":
        if peer.d_min_mw is not None:  # the range given directly (open demand: d_min 0)
            d_min, d_max = scenario.hourly(peer, "d_min_mw"), scenario.hourly(peer, "d_max_mw")
        else:
            base = scenario.hourly(peer, "p_base_mw")
            d_min = base * (1 - peer.flex_fraction)
            d_max = base * (1 + peer.flex_fraction)
        a, b = load_utility_coefficients(d_min, d_max, peer.price_at_min_eur_per_mwh, peer.price_at_max_eur_per_mwh)
        return HourlyPeer(peer.id, kind, peer.bus, -d_max, -d_min, a, b, peer.tan_phi)
    if kind in ("pv", "wind"):
        fc = scenario.hourly(peer, "p_forecast_mw")
        return HourlyPeer(peer.id, kind, peer.bus, np.zeros(H), fc, np.full(H, peer.cost_a_eur_per_mw2h),
                          np.full(H, peer.cost_b_eur_per_mwh), peer.tan_phi)
    if kind == "chp":
        return HourlyPeer(peer.id, kind, peer.bus, np.full(H, peer.p_min_mw), np.full(H, peer.p_max_mw),
                          np.full(H, peer.cost_a_eur_per_mw2h), np.full(H, peer.cost_b_eur_per_mwh), peer.tan_phi)
    if kind == "virtual_load":  # fixed demand, set by the TSO's request (apply_parameters)
        zero = np.zeros(H)
        return HourlyPeer(peer.id, kind, peer.bus, zero, zero.copy(), zero.copy(), zero.copy(), 0.0)
    if kind == "grid":
        price = scenario.hourly(peer, "import_price_eur_per_mwh")
        if peer.p_export_max_mw > 0 and scenario.market.kind == "p2p":  # imports and exports: trades both ways
            return HourlyPeer(peer.id, kind, peer.bus, np.full(H, -peer.p_export_max_mw), np.full(H, peer.p_import_max_mw),
                              np.full(H, peer.cost_a_eur_per_mw2h), price, 0.0,
                              cost_b_neg_eur_per_mwh=scenario.hourly(peer, "export_price_eur_per_mwh"))
        return HourlyPeer(peer.id, kind, peer.bus, np.zeros(H), np.full(H, peer.p_import_max_mw),
                          np.full(H, peer.cost_a_eur_per_mw2h), price, 0.0)
    if kind == "prosumer":
        return HourlyPeer(peer.id, kind, peer.bus, scenario.hourly(peer, "p_min_mw"), scenario.hourly(peer, "p_max_mw"),
                          np.full(H, peer.cost_a_eur_per_mw2h), np.full(H, peer.cost_b_eur_per_mwh), peer.tan_phi)
    raise ValueError(f"peer {peer.id}: kind {kind!r} has no hourly model")


def ev_model(scenario, peer) -> EVModel:
    return EVModel(
        id=peer.id, bus=peer.bus, capacity_mwh=peer.capacity_mwh, soc_initial_mwh=peer.soc_initial_mwh,
        soc_min_mwh=peer.soc_min_mwh, soc_departure_mwh=peer.soc_departure_mwh,
        soc_final_mwh=peer.soc_initial_mwh if peer.soc_final_mwh is None else peer.soc_final_mwh,
        trip_energy_mwh=peer.trip_energy_mwh, p_charge_max_mw=peer.p_charge_max_mw,
        p_discharge_max_mw=peer.p_discharge_max_mw, eta_charge=peer.eta_charge, eta_discharge=peer.eta_discharge,
        arrival_hour=peer.arrival_hour, departure_hour=peer.departure_hour,
        degradation_eur_per_mwh=peer.degradation_eur_per_mwh,
        plugged=ev_plugged_mask(peer.arrival_hour, peer.departure_hour, scenario.market.hours),
    )


def peer_models(scenario, fees: bool = True) -> list:
    """One model per peer, in scenario order: HourlyPeer, or EVModel for EVs. With ``fees`` (and a
    ``differentiation`` section) every peer carries the fees of its own trades (``trade_weights``)."""
    models = [ev_model(scenario, p) if p.kind == "ev" else hourly_peer(scenario, p) for p in scenario.peers]
    if fees and getattr(scenario, "differentiation", None) is not None:
        from common.differentiation import trade_fees

        weights = trade_fees(scenario, models)
        models = [replace(m, trade_weights=weights.get(m.id, {})) if isinstance(m, HourlyPeer) else m for m in models]
    return models


def hourly_peer_to_dict(peer: HourlyPeer) -> dict:
    """A peer's private model as plain data (what a peer process is given, and nothing else)."""
    return {
        "id": peer.id, "kind": peer.kind, "bus": int(peer.bus), "tan_phi": np.asarray(peer.tan_phi, dtype=float).tolist(),
        "p_min_mw": peer.p_min_mw.tolist(), "p_max_mw": peer.p_max_mw.tolist(),
        "cost_a_eur_per_mw2h": peer.cost_a_eur_per_mw2h.tolist(), "cost_b_eur_per_mwh": peer.cost_b_eur_per_mwh.tolist(),
        **({} if peer.cost_b_neg_eur_per_mwh is None else
           {"cost_b_neg_eur_per_mwh": np.asarray(peer.cost_b_neg_eur_per_mwh, dtype=float).tolist()}),
        **({} if peer.trade_weights is None else
           {"trade_weights_eur_per_mwh": {str(k): float(v) for k, v in peer.trade_weights.items()}}),
    }


def hourly_peer_from_dict(data: dict) -> HourlyPeer:
    arrays = {k: np.asarray(data[k], dtype=float) for k in ("p_min_mw", "p_max_mw", "cost_a_eur_per_mw2h", "cost_b_eur_per_mwh")}
    lengths = {len(v) for v in arrays.values()}
    if len(lengths) != 1 or not all(np.all(np.isfinite(v)) for v in arrays.values()):
        raise ValueError(f"peer model {data.get('id')!r}: hourly arrays must have one finite value per hour")
    if np.any(arrays["p_min_mw"] > arrays["p_max_mw"] + 1e-12):
        raise ValueError(f"peer model {data.get('id')!r}: p_min_mw exceeds p_max_mw")
    tan_phi = data["tan_phi"]
    tan_phi = float(tan_phi) if np.ndim(tan_phi) == 0 else np.asarray(tan_phi, dtype=float)
    b_neg = None
    if data.get("cost_b_neg_eur_per_mwh") is not None:
        b_neg = np.asarray(data["cost_b_neg_eur_per_mwh"], dtype=float)
        if b_neg.shape != arrays["cost_b_eur_per_mwh"].shape or not np.all(np.isfinite(b_neg)) \
                or np.any(b_neg > arrays["cost_b_eur_per_mwh"] + 1e-12):
            raise ValueError(f"peer model {data.get('id')!r}: cost_b_neg_eur_per_mwh must have one finite value per "
                             "hour, not above cost_b_eur_per_mwh")
    weights = data.get("trade_weights_eur_per_mwh")
    if weights is not None:
        if not isinstance(weights, dict) or not all(np.isfinite(float(v)) for v in weights.values()):
            raise ValueError(f"peer model {data.get('id')!r}: trade_weights_eur_per_mwh must map partner ids to finite fees")
        weights = {str(k): float(v) for k, v in weights.items()}
    return HourlyPeer(str(data["id"]), str(data["kind"]), int(data["bus"]), tan_phi=tan_phi,
                      cost_b_neg_eur_per_mwh=b_neg, trade_weights=weights, **arrays)


_EV_FIELDS = ("capacity_mwh", "soc_initial_mwh", "soc_min_mwh", "soc_departure_mwh", "soc_final_mwh", "trip_energy_mwh",
              "p_charge_max_mw", "p_discharge_max_mw", "eta_charge", "eta_discharge", "degradation_eur_per_mwh")


def peer_model_to_dict(model) -> dict:
    """Any peer's private model as plain data (HourlyPeer or EVModel)."""
    if isinstance(model, EVModel):
        out = {"id": model.id, "kind": "ev", "bus": int(model.bus), "arrival_hour": int(model.arrival_hour),
               "departure_hour": int(model.departure_hour), "hours": int(len(model.plugged))}
        out.update({k: float(getattr(model, k)) for k in _EV_FIELDS})
        return out
    return hourly_peer_to_dict(model)


def peer_model_from_dict(data: dict):
    if data.get("kind") != "ev":
        return hourly_peer_from_dict(data)
    values = {k: float(data[k]) for k in _EV_FIELDS}
    if not all(np.isfinite(list(values.values()))):
        raise ValueError(f"EV model {data.get('id')!r}: values must be finite")
    arrival, departure, hours = int(data["arrival_hour"]), int(data["departure_hour"]), int(data["hours"])
    return EVModel(id=str(data["id"]), bus=int(data["bus"]), arrival_hour=arrival, departure_hour=departure,
                   plugged=ev_plugged_mask(arrival, departure, hours), **values)


# ----------------------------------------------------------------------------------------------
# The DSO's and TSO's parameters (outer loop, thesis 3.2-3.4)
# ----------------------------------------------------------------------------------------------

# names of the parameters a PENALTY message may set (common.protocol.market)
PARAMETERS = ("diff_eur_per_mwh", "tan_phi", "flex_down_fraction", "flex_up_fraction", "res_cap_fraction", "virtual_load_mw",
              "beta_eur_per_mwh")


def load_baseline_mw(base: HourlyPeer) -> tuple[np.ndarray, np.ndarray]:
    """(baseline consumption, flexibility fraction) of a load from its benchmark bounds."""
    d_min, d_max = -base.p_max_mw, -base.p_min_mw
    baseline = 0.5 * (d_min + d_max)
    with np.errstate(divide="ignore", invalid="ignore"):
        flex = np.where(baseline > 0, (d_max - d_min) / np.where(baseline > 0, 2 * baseline, 1.0), 0.0)
    return baseline, flex


def apply_parameters(base: HourlyPeer, params: dict) -> HourlyPeer:
    """A peer's market model under the DSO's and TSO's current parameters (pure).

    - ``flex_down_fraction``, ``flex_up_fraction`` (H,), loads: consumption between (1 - f_down) and
      (1 + f_up) times the baseline, the utility line re-drawn through the same prices at the new
      ends (thesis 3.6c: extra flexibility; directed, so that a step always moves consumption the
      way the grid needs: down for low voltage and import congestion, up for the opposite);
    - ``res_cap_fraction`` (H,), PV and wind: at most this fraction of the forecast (RES downward
      flexibility ordered by the DSO, P2P_Full);
    - ``virtual_load_mw`` (H,), the virtual load: its fixed demand (TSO request);
    - ``tan_phi`` (H,): reactive power ratio q/p per hour (reactive-power control).
    Differentiation weights (``diff_eur_per_mwh``) act on the trades, not on this model.
    """
    changes = {}
    H = len(base.p_min_mw)
    if base.kind == "load" and ("flex_down_fraction" in params or "flex_up_fraction" in params):
        baseline, f0 = load_baseline_mw(base)
        fd = np.maximum(np.broadcast_to(np.asarray(params.get("flex_down_fraction", f0), float), (H,)), f0)
        fu = np.maximum(np.broadcast_to(np.asarray(params.get("flex_up_fraction", f0), float), (H,)), f0)
        d_min0, d_max0 = -base.p_max_mw, -base.p_min_mw
        price_at_min = base.cost_b_eur_per_mwh - base.cost_a_eur_per_mw2h * d_min0
        price_at_max = base.cost_b_eur_per_mwh - base.cost_a_eur_per_mw2h * d_max0
        d_min, d_max = baseline * (1 - np.minimum(fd, 1.0)), baseline * (1 + fu)
        a, b = load_utility_coefficients(d_min, d_max, price_at_min, price_at_max)
        keep = (d_max0 - d_min0) <= 1e-12  # a load without flexibility keeps its own (linear) utility
        changes.update(p_min_mw=np.where(keep, base.p_min_mw, -d_max), p_max_mw=np.where(keep, base.p_max_mw, -d_min),
                       cost_a_eur_per_mw2h=np.where(keep, base.cost_a_eur_per_mw2h, a),
                       cost_b_eur_per_mwh=np.where(keep, base.cost_b_eur_per_mwh, b))
    if "res_cap_fraction" in params and base.kind in ("pv", "wind"):
        c = np.clip(np.broadcast_to(np.asarray(params["res_cap_fraction"], float), (H,)), 0.0, 1.0)
        changes["p_max_mw"] = base.p_max_mw * c
    if "virtual_load_mw" in params and base.kind == "virtual_load":
        v = np.broadcast_to(np.asarray(params["virtual_load_mw"], float), (H,))
        changes.update(p_min_mw=-v.copy(), p_max_mw=-v.copy())
    if "tan_phi" in params:
        changes["tan_phi"] = np.broadcast_to(np.asarray(params["tan_phi"], float), (H,)).copy()
    return replace(base, **changes) if changes else base


def flex_penalty_eur(base: HourlyPeer, params: dict) -> np.ndarray:
    """beta times the extra flexibility offered beyond the benchmark's, per hour [EUR]: a load's
    widened range (f - f0) * baseline, a RES unit's ordered cut (1 - cap) * forecast."""
    H = len(base.p_min_mw)
    beta = float(np.asarray(params.get("beta_eur_per_mwh", 0.0)).reshape(-1)[0])
    extra = np.zeros(H)
    if base.kind == "load":
        baseline, f0 = load_baseline_mw(base)
        for name in ("flex_down_fraction", "flex_up_fraction"):
            if name in params:
                extra = extra + np.maximum(np.asarray(params[name], float) - f0, 0.0) * baseline
    if "res_cap_fraction" in params and base.kind in ("pv", "wind"):
        extra = (1.0 - np.clip(np.asarray(params["res_cap_fraction"], float), 0.0, 1.0)) * base.p_max_mw
    return beta * extra
