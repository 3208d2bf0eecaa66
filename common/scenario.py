"""Scenario files: typed, validated on load, refused with a message that names the field.

A scenario is a YAML (or TOML) file with four sections: ``network``, ``market``, ``series``
(named hourly series, one value per market hour) and ``peers``. Every quantity carries its unit
in its name. Sign convention (SPEC 3.1, thesis eq. 3.1e-f): a peer's net injection ``p_mw`` is
positive for producers and negative for consumers; load sizes (``p_base_mw``) are given as
positive consumption.

Hourly inputs accept a constant, a list with one value per hour, or a reference to a named
series ``{series: NAME, scale: FACTOR}``.

This module imports no solver and no power-flow package, so every role can load a scenario.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.models import CONSUMER_KINDS, PRODUCER_KINDS, PROSUMER_KINDS

BUILTIN_DIR = Path(__file__).parent / "scenarios"

# Number of buses of the built-in networks, so that a scenario can be checked without pandapower.
# the real LV feeders of the scenario families (common.feeders)
FEEDER_BUSES = {"kerber-dorf": 116, "kerber-vorstadt": 294, "ieee-eu-lv": 907}
BUILTIN_NETWORK_BUSES = {"case33bw": 33, "mv37": 38, "case39": 39, **FEEDER_BUSES}


class ScenarioError(ValueError):
    """A scenario that cannot be used; ``str()`` is a one-line reason naming the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SeriesRef(_Strict):
    series: str
    scale: float = 1.0


Hourly = Union[float, list[float], SeriesRef]


class NetworkSpec(_Strict):
    """The grid: a built-in network (``name``) or a pandapower JSON file (``file``)."""

    name: str | None = None
    file: str | None = None
    vm_min_pu: float = Field(0.95, gt=0)
    vm_max_pu: float = Field(1.05, gt=0)
    max_loading_percent: float = Field(100.0, gt=0)
    line_max_i_ka: float | None = Field(None, gt=0, description="thermal rating given to every line (case33bw has none)")
    line_capacity_scale: float = Field(1.0, gt=0)
    line_impedance_scale: float = Field(1.0, gt=0)
    trafo_capacity_scale: float = Field(1.0, gt=0)
    base_mva: float = Field(10.0, gt=0, description="per-unit base of the branch-flow model")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.name is None) == (self.file is None):
            raise ValueError("give exactly one of 'name' (built-in network) or 'file' (pandapower JSON)")
        if self.name is not None and self.name not in BUILTIN_NETWORK_BUSES:
            raise ValueError(f"unknown built-in network {self.name!r}; known: {', '.join(BUILTIN_NETWORK_BUSES)}")
        if self.vm_min_pu >= self.vm_max_pu:
            raise ValueError("vm_min_pu must be below vm_max_pu")
        return self


class PartnersSpec(_Strict):
    """Whom each peer of the full P2P market trades with (``common.partners``): every producer with
    every consumer (``full``, the default), each peer with its ``k`` nearest possible partners
    (``k_nearest``: by the length of the path along the lines, or the straight line between the
    buses' coordinates), the peers of the same feeder (``same_feeder``), or explicit lists. The
    ``hubs`` (default: the external supplier) trade with every possible partner whatever the rule."""

    rule: Literal["full", "k_nearest", "same_feeder", "explicit"] = "full"
    k: int | None = Field(None, ge=1, description="k_nearest: partners chosen by each peer (the pair is kept when "
                          "either side chooses it)")
    distance: Literal["network", "straight"] = Field("network", description="k_nearest: 'network' (km along the "
                                                     "lines) or 'straight' (the network's bus coordinates)")
    lists: dict[str, list[str]] | None = Field(None, description="explicit: {peer id: [partner ids]} (a pair listed "
                                               "on either side trades)")
    hubs: list[str] | None = Field(None, description="peers that keep every partner (default: the external "
                                   "supplier, kind grid)")

    @model_validator(mode="after")
    def _rule_fields(self):
        if self.rule == "k_nearest" and self.k is None:
            raise ValueError("k: the rule 'k_nearest' needs k (partners per peer)")
        if self.rule != "k_nearest" and self.k is not None:
            raise ValueError(f"k: only the rule 'k_nearest' takes k (rule is {self.rule!r})")
        if self.rule == "explicit" and not self.lists:
            raise ValueError("lists: the rule 'explicit' needs lists ({peer id: [partner ids]})")
        if self.rule != "explicit" and self.lists is not None:
            raise ValueError(f"lists: only the rule 'explicit' takes lists (rule is {self.rule!r})")
        return self


class MarketSpec(_Strict):
    kind: Literal["p2p", "community"]
    model: Literal["benchmark", "cong", "volt", "freq", "full"] = "benchmark"
    hours: int = Field(24, ge=1, le=168)
    rho: float = Field(1.0, gt=0, description="initial ADMM penalty")
    tolerance: float = Field(1e-4, gt=0, description="stopping tolerance on primal and dual residuals")
    max_iterations: int = Field(5000, ge=1)
    residual_balancing: bool = True
    rb_mu: float = Field(10.0, gt=1)
    rb_tau: float = Field(2.0, gt=1)
    rb_every: int = Field(10, ge=1, description="rho may change only every this many iterations")
    rb_until: int = Field(2000, ge=0, description="rho is frozen after this iteration")
    price_init_eur_per_mwh: float = Field(0.0, description="starting trade price of the ADMM (a public guess)")
    pool_price_start: bool = Field(True, description="full P2P market: start every clearing from scratch at the "
                                   "uniform (pool) price found by price rounds (probed prices, aggregate answers)")
    pool_price_rounds: int = Field(30, ge=1, description="most price rounds of a pool-price start")
    pool_price_points: int = Field(8, ge=2, le=64, description="candidate prices per hour in one price round")
    acceleration: bool = Field(False, description="Anderson acceleration of the ADMM (full P2P market, relay and mesh; community market)")
    aa_memory: int = Field(20, ge=1, le=200, description="Anderson memory (iterations)")
    aa_safeguard: float = Field(1.0, gt=0, description="reject an accelerated point whose fixed-point residual "
                                "grows by more than this factor")
    aa_start: int = Field(0, ge=0, description="iterations of the plain ADMM (rho balancing allowed) before the "
                          "acceleration starts with rho frozen")
    infeasibility_window: int = Field(50, ge=0, description="stop as infeasible when the primal residual stays flat "
                                      "(and far above the tolerance) for this many iterations while the iterates have "
                                      "settled (common.admm.InfeasibilityWatch); 0: never")
    hour_stopping: bool = Field(True, description="full P2P market: an hour whose residuals are below tolerance / "
                                "sqrt(hours) closes; rounds and answers carry the open hours only (every clearing "
                                "opens every hour again)")
    partners: PartnersSpec | None = Field(None, description="full P2P market: whom each peer trades with "
                                          "(default: every producer with every consumer)")
    staleness: int = Field(0, ge=0, le=1000, description="full P2P market, mesh: asynchronous ADMM with bounded "
                           "staleness; a peer goes on with its partners' latest trades when they are at most this "
                           "many iterations old (0: synchronous rounds)")


class TSOSpec(_Strict):
    """The TSO's frequency-regulation request: a virtual load at the transformer's primary (MW per
    hour, positive = regulation up). It joins the market as the scenario's ``virtual_load`` peer."""

    virtual_load_mw: Hourly = 0.0


class DSOSpec(_Strict):
    """Settings of the DSO's outer loop (thesis 3.2-3.4; models cong, volt, full).

    Product differentiation: a consumer n pays ``c * gamma_nm`` EUR per MWh bought from m (thesis
    eq. 3.3 with c_n < 0 and P_nm < 0). Congestion: gamma starts at the distance between the two
    peers' buses along the network [km] and grows by ``up_cong_km`` per outer iteration on the trades
    whose path crosses an overloaded branch. Voltage: gamma starts at the trade's normalised
    sensitivity (shared resistance with the worst bus's path to the slack) and grows by
    ``up_volt`` on the trades that push that bus the wrong way. After ``k_differentiation`` outer
    iterations without success an hour moves on: reactive-power control (volt, full: voltage
    problems only), then flexibility steps of ``flex_step`` (loads' flexibility, or in the full
    model RES downward flexibility for high voltage and export congestion) up to ``flex_max``.
    Loads' flexibility is directed: downward for low voltage and import congestion, upward for
    high voltage and export congestion.
    """

    k_differentiation: int = Field(10, ge=0, description="outer iterations of differentiation before the next stage")
    c_cong_eur_per_km_mwh: float = Field(-1.0, le=0)
    up_cong_km: float = Field(6.0, ge=0)
    c_volt_eur_per_mwh: float = Field(-1.0, le=0)
    up_volt: float = Field(6.0, ge=0)
    q_control: bool = True
    flex_step: float = Field(0.05, gt=0, le=1)
    flex_max: float = Field(0.95, gt=0, le=1, description="loads' total flexibility may not exceed this fraction")
    beta_eur_per_mwh: float = Field(100.0, ge=0, description="penalty on the extra flexibility offered (reported apart from SW)")
    max_outer_iterations: int = Field(60, ge=1)


class GammaPair(_Strict):
    peers: tuple[str, str]
    gamma: float = Field(ge=0)


class ZoneGamma(_Strict):
    zones: tuple[str, str]
    gamma: float = Field(ge=0)


class DifferentiationSpec(_Strict):
    """Product differentiation as data (full P2P market): a fee c_n gamma_nm EUR/MWh on each trade,
    paid by the buyer, the seller or both halves (``common.differentiation`` has the recipes).
    Used from the first clearing; the DSO's congestion and voltage weights come on top."""

    method: Literal["given", "distance", "network_distance", "zonal", "unique", "network_usage"]
    c_eur_per_mwh: float = Field(1.0, ge=0, description="c_n: the fee per unit of gamma [EUR/MWh per gamma unit]")
    c_by_peer_eur_per_mwh: dict[str, float] = Field(default_factory=dict, description="a peer's own c_n")
    side: Literal["buyer", "seller", "shared"] = "buyer"
    gamma: dict[str, dict[str, float]] | list[GammaPair] | None = None
    bus_coordinates_km: dict[int, tuple[float, float]] | None = None
    zones: dict[str, str] | None = None
    zone_gamma: list[ZoneGamma] = Field(default_factory=list)
    intra_zone_gamma: float = Field(0.0, ge=0)
    ptdf_weight: Literal["none", "reactance_ohm", "length_km"] = "none"

    @model_validator(mode="after")
    def _fits_method(self):
        if self.method == "given" and self.gamma is None:
            raise ValueError("gamma: missing (method 'given')")
        if self.method == "zonal" and not self.zone_gamma and self.intra_zone_gamma == 0:
            raise ValueError("zone_gamma: missing (method 'zonal')")
        if any(v < 0 for v in self.c_by_peer_eur_per_mwh.values()):
            raise ValueError("c_by_peer_eur_per_mwh: a fee must not be negative")
        if isinstance(self.gamma, dict) and any(v < 0 for row in self.gamma.values() for v in row.values()):
            raise ValueError("gamma: a value must not be negative")
        return self


class _PeerBase(_Strict):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    bus: int = Field(ge=0)


class _VoltageControlled(_Strict):
    vm_pu: float | None = Field(None, gt=0.5, lt=1.5, description="AC check: a voltage-controlled generator (PV "
                                "bus, pandapower gen) holding this voltage; its reactive power is free")


class LoadPeer(_PeerBase):
    """Flexible load: consumption between (1-flex) and (1+flex) times the baseline; utility line
    through A(d_min, price_at_min) and B(d_max, price_at_max) (thesis 4.1.2-4.1.3).

    Open demand: ``flex_fraction`` 1 gives a minimum consumption of zero (the load may buy
    nothing); or give the range directly with ``d_min_mw`` and ``d_max_mw`` (both, per hour; then
    ``p_base_mw`` may be left out and ``flex_fraction`` is not used)."""

    kind: Literal["load"]
    p_base_mw: Hourly | None = None
    flex_fraction: float = Field(0.3, ge=0, le=1)
    d_min_mw: Hourly | None = None
    d_max_mw: Hourly | None = None
    price_at_min_eur_per_mwh: float = 58.0
    price_at_max_eur_per_mwh: float = 4.0
    tan_phi: float = 0.3

    @model_validator(mode="after")
    def _prices(self):
        if self.price_at_max_eur_per_mwh > self.price_at_min_eur_per_mwh:
            raise ValueError("price_at_max_eur_per_mwh must not exceed price_at_min_eur_per_mwh (utility is concave)")
        if (self.d_min_mw is None) != (self.d_max_mw is None):
            raise ValueError("d_min_mw and d_max_mw: give both or neither")
        if self.d_min_mw is None and self.p_base_mw is None:
            raise ValueError("p_base_mw: missing (or give d_min_mw and d_max_mw)")
        return self


class RESPeer(_PeerBase, _VoltageControlled):
    """PV or wind: 0 <= p <= forecast, cost a/2 p^2 + b p."""

    kind: Literal["pv", "wind"]
    p_forecast_mw: Hourly
    cost_a_eur_per_mw2h: float = Field(0.0, ge=0)
    cost_b_eur_per_mwh: float = 4.0
    tan_phi: float = 0.4


class CHPPeer(_PeerBase, _VoltageControlled):
    kind: Literal["chp"]
    p_min_mw: float = Field(ge=0)
    p_max_mw: float = Field(gt=0)
    cost_a_eur_per_mw2h: float = Field(0.0, ge=0)
    cost_b_eur_per_mwh: float
    tan_phi: float = 0.3

    @model_validator(mode="after")
    def _bounds(self):
        if self.p_min_mw > self.p_max_mw:
            raise ValueError("p_min_mw must not exceed p_max_mw")
        return self


class ProsumerPeer(_PeerBase, _VoltageControlled):
    """A prosumer: net injection between ``p_min_mw`` (< 0: it buys) and ``p_max_mw`` (> 0: it
    sells) under one cost curve a/2 p^2 + b p (for p < 0 the curve is the utility of what it
    consumes). In the full P2P market it trades both ways with every partner; in the community
    market it is one more injection at its bus (unity power factor by default)."""

    kind: Literal["prosumer"]
    p_min_mw: Hourly
    p_max_mw: Hourly
    cost_a_eur_per_mw2h: float = Field(0.0, ge=0)
    cost_b_eur_per_mwh: float = 0.0
    tan_phi: float = 0.0


class GridPeer(_PeerBase):
    """External supplier at the substation: imports up to p_import_max_mw at the import price,
    exports up to p_export_max_mw at the export price. In the full P2P market a supplier with
    ``p_export_max_mw`` > 0 also buys (up to that power, paying the export price): it trades both
    ways, its cost being import price x import - export price x export; the export price must not
    exceed the import price (else buying to re-sell would pay)."""

    kind: Literal["grid"]
    p_import_max_mw: float = Field(gt=0)
    p_export_max_mw: float = Field(0.0, ge=0)
    import_price_eur_per_mwh: Hourly
    export_price_eur_per_mwh: Hourly = 0.0
    cost_a_eur_per_mw2h: float = Field(0.0, ge=0)


class EVPeer(_PeerBase):
    """Electric vehicle with V2G. Plugged in from ``arrival_hour`` (first market hour at home)
    until ``departure_hour`` (first market hour away); when arrival > departure the car is home
    overnight. Hours are market hours 1..24 (hour h covers [h-1, h))."""

    kind: Literal["ev"]
    capacity_mwh: float = Field(gt=0)
    soc_initial_mwh: float = Field(ge=0)
    soc_min_mwh: float = Field(0.0, ge=0)
    soc_departure_mwh: float = Field(ge=0, description="energy required when the car leaves")
    soc_final_mwh: float | None = Field(None, ge=0, description="energy required at the end of the horizon (default: soc_initial_mwh)")
    trip_energy_mwh: float = Field(0.0, ge=0, description="energy used while away, taken at arrival")
    p_charge_max_mw: float = Field(gt=0)
    p_discharge_max_mw: float = Field(ge=0)
    eta_charge: float = Field(0.95, gt=0, le=1)
    eta_discharge: float = Field(0.95, gt=0, le=1)
    arrival_hour: int = Field(ge=1, le=24)
    departure_hour: int = Field(ge=1, le=24)
    degradation_eur_per_mwh: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _energies(self):
        for name in ("soc_initial_mwh", "soc_min_mwh", "soc_departure_mwh"):
            if getattr(self, name) > self.capacity_mwh:
                raise ValueError(f"{name} exceeds capacity_mwh")
        if self.soc_final_mwh is not None and self.soc_final_mwh > self.capacity_mwh:
            raise ValueError("soc_final_mwh exceeds capacity_mwh")
        if self.arrival_hour == self.departure_hour:
            raise ValueError("arrival_hour and departure_hour must differ")
        return self


class VirtualLoadPeer(_PeerBase):
    """The TSO's virtual load at the transformer's primary: a buyer with the fixed demand the TSO
    service asks for (``tso.virtual_load_mw``), zero until it asks."""

    kind: Literal["virtual_load"]


Peer = Annotated[Union[LoadPeer, RESPeer, CHPPeer, GridPeer, EVPeer, VirtualLoadPeer, ProsumerPeer],
                 Field(discriminator="kind")]


class Scenario(_Strict):
    name: str
    description: str = ""
    network: NetworkSpec
    market: MarketSpec
    series: dict[str, list[float]] = Field(default_factory=dict)
    peers: list[Peer] = Field(min_length=2)
    tso: TSOSpec | None = None
    dso: DSOSpec = Field(default_factory=DSOSpec)
    differentiation: DifferentiationSpec | None = None

    @field_validator("series")
    @classmethod
    def _finite_series(cls, value):
        for key, values in value.items():
            if not np.all(np.isfinite(values)):
                raise ValueError(f"series {key!r} has a value that is not a finite number")
        return value

    @model_validator(mode="after")
    def _cross_checks(self):
        hours = self.market.hours
        for key, values in self.series.items():
            if len(values) != hours:
                raise _field_error(f"series.{key}", f"has {len(values)} values, the market has {hours} hours")
        ids: set[str] = set()
        for i, peer in enumerate(self.peers):
            where = f"peers[{i}] ({peer.id})"
            if peer.id in ids:
                raise _field_error(f"{where}.id", "is used by another peer")
            ids.add(peer.id)
            for fname, value in peer:
                if isinstance(value, (SeriesRef, list)):
                    self._resolve(value, f"{where}.{fname}")
            if peer.kind == "ev":
                check_ev_feasible(peer, f"{where}")
        virtual = [p for p in self.peers if p.kind == "virtual_load"]
        if self.tso is not None:
            vl = self._resolve(self.tso.virtual_load_mw, "tso.virtual_load_mw")
            if np.any(vl < 0):
                raise _field_error("tso.virtual_load_mw", "regulation down (a negative virtual load) is not supported")
            if np.any(vl > 0) and len(virtual) != 1:
                raise _field_error("peers", "a TSO request needs exactly one peer of kind 'virtual_load'")
        if len(virtual) > 1:
            raise _field_error("peers", "more than one peer of kind 'virtual_load'")
        if self.market.model in ("freq", "full"):
            if self.market.kind != "p2p":
                raise _field_error("market.model", f"{self.market.model!r} is a model of the full P2P market (kind 'p2p')")
            if self.tso is None or not virtual:
                raise _field_error("tso", f"model {self.market.model!r} needs a tso section and a peer of kind 'virtual_load'")
        elif self.market.model != "benchmark" and self.market.kind != "p2p":
            raise _field_error("market.model", f"{self.market.model!r} is a model of the full P2P market (kind 'p2p')")
        if virtual and self.market.kind != "p2p":
            raise _field_error("peers", "a 'virtual_load' peer belongs to the full P2P market (kind 'p2p')")
        if sum(p.kind == "grid" for p in self.peers) > 1:
            raise _field_error("peers", "more than one peer of kind 'grid'")
        if self.market.kind == "p2p":
            for i, peer in enumerate(self.peers):
                if peer.kind == "ev":
                    raise _field_error(f"peers[{i}] ({peer.id}).kind", "EVs couple the hours; use market.kind 'community'")
            # the full P2P market trades producers with consumers, and prosumers (and a supplier
            # that may export) with everybody (common.market.trade_graph)
            two_way = sum(p.kind in PROSUMER_KINDS or (p.kind == "grid" and p.p_export_max_mw > 0) for p in self.peers)
            producers = sum(p.kind in PRODUCER_KINDS for p in self.peers)
            if producers == 0 and two_way == 0:
                raise _field_error("peers", f"the full P2P market (market.kind 'p2p') has no producer (kind "
                                            f"{', '.join(PRODUCER_KINDS + PROSUMER_KINDS)}): the consumers have no one "
                                            "to trade with")
            if producers == len(self.peers) and two_way == 0:
                raise _field_error("peers", f"the full P2P market (market.kind 'p2p') has no consumer (kind "
                                            f"{', '.join(CONSUMER_KINDS + PROSUMER_KINDS)}): the producers have no one "
                                            "to trade with")
        for i, peer in enumerate(self.peers):
            where = f"peers[{i}] ({peer.id})"
            for fname in ("p_base_mw", "p_forecast_mw"):
                value = getattr(peer, fname, None)
                if value is not None:
                    arr = self._resolve(value, f"{where}.{fname}")
                    if np.any(arr < 0):
                        raise _field_error(f"{where}.{fname}", f"is negative in hour {int(np.argmax(arr < 0)) + 1}")
            for fname, value in peer:
                if fname.endswith(("_mw", "_mwh")) and isinstance(value, (int, float, list, SeriesRef)) \
                        and not isinstance(value, bool):
                    arr = np.abs(self._resolve(value, f"{where}.{fname}"))
                    if np.any(arr > MAX_POWER_MW):
                        raise _field_error(f"{where}.{fname}", f"{float(arr.max()):.3g} is beyond any grid this platform "
                                                               f"models (at most {MAX_POWER_MW:.0e})")
            if peer.kind == "prosumer":
                lo, hi = self.hourly(peer, "p_min_mw"), self.hourly(peer, "p_max_mw")
                bad = np.flatnonzero(lo > hi)
                if len(bad):
                    raise _field_error(f"{where}.p_min_mw", f"exceeds p_max_mw in hour {int(bad[0]) + 1}")
            if peer.kind == "load" and peer.d_min_mw is not None:
                lo, hi = self.hourly(peer, "d_min_mw"), self.hourly(peer, "d_max_mw")
                if np.any(lo < 0):
                    raise _field_error(f"{where}.d_min_mw", f"is negative in hour {int(np.argmax(lo < 0)) + 1}")
                bad = np.flatnonzero(lo > hi)
                if len(bad):
                    raise _field_error(f"{where}.d_min_mw", f"exceeds d_max_mw in hour {int(bad[0]) + 1}")
            if peer.kind == "grid" and peer.p_export_max_mw > 0 and self.market.kind == "p2p":
                imp, exp_ = self.hourly(peer, "import_price_eur_per_mwh"), self.hourly(peer, "export_price_eur_per_mwh")
                bad = np.flatnonzero(exp_ > imp)
                if len(bad):
                    raise _field_error(f"{where}.export_price_eur_per_mwh",
                                       f"exceeds the import price in hour {int(bad[0]) + 1} (buying to re-sell would pay)")
        if self.differentiation is not None:
            d = self.differentiation
            if self.market.kind != "p2p":
                raise _field_error("differentiation", "product differentiation is a feature of the full P2P market (kind 'p2p')")
            named = set(d.c_by_peer_eur_per_mwh) | set(d.zones or {})
            named |= (set(d.gamma) | {m for row in d.gamma.values() for m in row}) if isinstance(d.gamma, dict) else \
                {p for pair in (d.gamma or []) for p in pair.peers}
            unknown = sorted(named - ids)
            if unknown:
                raise _field_error("differentiation", f"unknown peer(s) {', '.join(unknown[:5])}")
        if self.market.kind != "p2p":
            if self.market.partners is not None and self.market.partners.rule != "full":
                raise _field_error("market.partners", "restricted trading partners are a feature of the full P2P market "
                                                      "(kind 'p2p')")
            if self.market.staleness:
                raise _field_error("market.staleness", "the asynchronous ADMM is a feature of the full P2P market "
                                                       "(kind 'p2p')")
        if self.market.staleness and self.market.model != "benchmark":
            raise _field_error("market.staleness", f"the asynchronous ADMM clears once: model 'benchmark', not "
                                                   f"{self.market.model!r} (an outer loop re-clears from a common state)")
        check_balance(self)
        return self

    # -- hourly values -------------------------------------------------------------------
    def _resolve(self, value: Hourly, where: str) -> np.ndarray:
        hours = self.market.hours
        if isinstance(value, SeriesRef):
            if value.series not in self.series:
                raise _field_error(f"{where}.series", f"unknown series {value.series!r}")
            arr = np.asarray(self.series[value.series], dtype=float) * value.scale
        elif isinstance(value, list):
            if len(value) != hours:
                raise _field_error(where, f"has {len(value)} values, the market has {hours} hours")
            arr = np.asarray(value, dtype=float)
        else:
            arr = np.full(hours, float(value))
        if not np.all(np.isfinite(arr)):
            raise _field_error(where, "has a value that is not a finite number")
        return arr

    def hourly(self, peer, field: str) -> np.ndarray:
        """The values of an hourly field of a peer, one per market hour."""
        return self._resolve(getattr(peer, field), f"{peer.id}.{field}")

    def peer(self, peer_id: str):
        for p in self.peers:
            if p.id == peer_id:
                return p
        raise KeyError(peer_id)


# the largest power or energy a scenario may name [MW, MWh]: 100 GW is beyond any grid modelled here, and
# keeps squares and sums of the market's numbers far from overflow
MAX_POWER_MW = 1e5


def _field_error(field: str, reason: str) -> ValueError:
    """A cross-field check's error (pydantic reports it as a model-level ValueError)."""
    return ValueError(f"{field}: {reason}")


def hourly_balance_bounds(scenario) -> tuple[np.ndarray, np.ndarray]:
    """Per hour, the least and the most that the peers' net injections can add up to [MW],
    with the external supplier (its import and export limits) and the TSO's virtual load
    (its largest request) included: a market can balance only if lo <= 0 <= hi."""
    from common.models import peer_models

    H = scenario.market.hours
    lo, hi = np.zeros(H), np.zeros(H)
    vl = (np.zeros(H) if scenario.tso is None
          else np.broadcast_to(scenario._resolve(scenario.tso.virtual_load_mw, "tso.virtual_load_mw"), (H,)))
    for peer, model in zip(scenario.peers, peer_models(scenario, fees=False)):
        if peer.kind == "ev":
            plugged = model.plugged.astype(float)
            lo -= model.p_charge_max_mw * plugged
            hi += model.p_discharge_max_mw * plugged
        elif peer.kind == "grid":
            lo -= peer.p_export_max_mw
            hi += peer.p_import_max_mw
        elif peer.kind == "virtual_load":
            lo -= vl
            hi -= vl
        else:
            lo += model.p_min_mw
            hi += model.p_max_mw
    return lo, hi


def check_balance(scenario, tol_mw: float = 1e-9) -> None:
    """Refuse a market that cannot balance in some hour (SPEC 5: infeasible bounds are refused
    before any process starts), naming the hours: the minimum demand above the maximum supply,
    or the minimum supply above the maximum demand. Network limits and losses are not part of
    this check (the ADMM finds those: ``common.admm.InfeasibilityWatch``)."""
    lo, hi = hourly_balance_bounds(scenario)
    short = np.flatnonzero(hi < -tol_mw)
    excess = np.flatnonzero(lo > tol_mw)
    if len(short) == 0 and len(excess) == 0:
        return
    parts = []
    if len(short):
        t = short[0]
        parts.append(f"hour(s) {_hours(short)}: minimum consumption exceeds the maximum supply (by {-hi[t]:.4g} MW "
                     f"in hour {t + 1})")
    if len(excess):
        t = excess[0]
        parts.append(f"hour(s) {_hours(excess)}: minimum supply exceeds the maximum consumption (by {lo[t]:.4g} MW "
                     f"in hour {t + 1})")
    raise _field_error("peers", "the market cannot balance in " + "; ".join(parts))


def _hours(idx) -> str:
    idx = [int(i) + 1 for i in idx]
    return ", ".join(str(h) for h in idx[:12]) + (f" ... ({len(idx)} hours)" if len(idx) > 12 else "")


def check_ev_feasible(ev: EVPeer, where: str) -> None:
    """Refuse an EV whose departure energy cannot be reached while it is plugged in."""
    if ev.arrival_hour > ev.departure_hour:  # home overnight: charges in hours 1..departure-1
        start_mwh, charge_hours = ev.soc_initial_mwh, ev.departure_hour - 1
    else:  # away first, arrives with the trip energy spent
        start_mwh, charge_hours = ev.soc_initial_mwh - ev.trip_energy_mwh, ev.departure_hour - ev.arrival_hour
        if start_mwh < ev.soc_min_mwh - 1e-12:
            raise _field_error(f"{where}.trip_energy_mwh", "the trip empties the battery below soc_min_mwh")
    reachable = min(ev.capacity_mwh, start_mwh + charge_hours * ev.p_charge_max_mw * ev.eta_charge)
    if reachable + 1e-9 < ev.soc_departure_mwh:
        raise _field_error(
            f"{where}.soc_departure_mwh",
            f"{ev.soc_departure_mwh} MWh cannot be reached: at most {reachable:.4f} MWh after {charge_hours} h of charging",
        )


def format_validation_error(err: ValidationError) -> str:
    """A pydantic error as one line naming the field (the first error)."""
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"])
    msg = first["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    if first["type"] == "union_tag_invalid":
        msg = f"unknown peer kind {first.get('input', {}).get('kind') if isinstance(first.get('input'), dict) else ''!r}; known: load, pv, wind, chp, grid, ev, virtual_load, prosumer"
    if first["type"] == "missing":
        msg = "missing"
    return f"{loc}: {msg}" if loc else msg


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def resolve_named_file(name_or_path: str | Path, builtin_dir: Path, what: str, error: type[Exception],
                       suffixes: tuple[str, ...] = (".yaml", ".yml", ".toml")) -> Path:
    """A file path (it must exist), or the name of a built-in ``builtin_dir/<name>.yaml``; ``error``
    names the missing file or lists the built-ins."""
    path = Path(name_or_path)
    if path.suffix in suffixes or path.exists():
        if not path.exists():
            raise error(f"{what} file {str(path)!r} not found")
        return path
    builtin = builtin_dir / f"{name_or_path}.yaml"
    if builtin.exists():
        return builtin
    names = sorted(p.stem for p in builtin_dir.glob("*.yaml"))
    raise error(f"unknown {what} {str(name_or_path)!r}; built-in: {', '.join(names)}")


def resolve_path(name_or_path: str | Path) -> Path:
    return resolve_named_file(name_or_path, BUILTIN_DIR, "scenario", ScenarioError)


def load_scenario(name_or_path: str | Path, **market_overrides) -> Scenario:
    """Load and validate a scenario (built-in name or file path).

    ``market_overrides`` replace fields of the ``market`` section (command-line options).
    Raises ScenarioError with a one-line reason naming the field.
    """
    path = resolve_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except UnicodeDecodeError:
        raise ScenarioError(f"{path}: cannot be read: not a UTF-8 text file (YAML or TOML)") from None
    except RecursionError:
        raise ScenarioError(f"{path}: cannot be read: nested too deeply") from None
    except (OSError, yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ScenarioError(f"{path}: cannot be read: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ScenarioError(f"{path}: the top level must be a mapping")
    overrides = {k: v for k, v in market_overrides.items() if v is not None}
    if overrides:
        raw = dict(raw)
        raw["market"] = {**(raw.get("market") or {}), **overrides}
    return parse_scenario(raw, source=str(path))


def parse_scenario(raw: dict, source: str = "scenario") -> Scenario:
    try:
        scenario = Scenario.model_validate(raw)
    except ValidationError as err:
        raise ScenarioError(f"{source}: {format_validation_error(err)}") from None
    nbus = network_bus_count(scenario.network)
    for i, peer in enumerate(scenario.peers):
        if peer.bus >= nbus:
            raise ScenarioError(f"{source}: peers[{i}] ({peer.id}).bus: unknown bus {peer.bus}; the network has buses 0..{nbus - 1}")
    if scenario.market.partners is not None and scenario.market.partners.rule != "full":
        from common.partners import PartnersError, scenario_graph  # the trade graph must be buildable before any process starts

        try:
            scenario_graph(scenario)
        except PartnersError as exc:
            raise ScenarioError(f"{source}: {exc}") from None
    if scenario.differentiation is not None:  # the fees must be computable before any process starts
        from common.differentiation import gamma_matrix
        from common.models import peer_models

        try:
            gamma_matrix(scenario, peer_models(scenario, fees=False))
        except (ValueError, KeyError) as exc:
            raise ScenarioError(f"{source}: {exc}") from None
    return scenario


def network_bus_count(spec: NetworkSpec) -> int:
    if spec.name is not None:
        return BUILTIN_NETWORK_BUSES[spec.name]
    import json

    path = Path(spec.file)
    if not path.exists():
        raise ScenarioError(f"network.file: {spec.file!r} not found")
    try:
        data = json.loads(path.read_text())
        bus = data["_object"]["bus"]["_object"]
        return len(json.loads(bus)["index"])
    except Exception:  # noqa: BLE001 - any malformed file is a scenario error
        raise ScenarioError(f"network.file: {spec.file!r} is not a pandapower JSON network") from None
