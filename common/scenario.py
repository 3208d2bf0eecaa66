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

from common.models import CONSUMER_KINDS, PRODUCER_KINDS

BUILTIN_DIR = Path(__file__).parent / "scenarios"

# Number of buses of the built-in networks, so that a scenario can be checked without pandapower.
# the real LV feeders of the scenario families (dso_service.feeders)
FEEDER_BUSES = {"kerber-dorf": 116, "kerber-vorstadt": 294, "ieee-eu-lv": 907}
BUILTIN_NETWORK_BUSES = {"case33bw": 33, "mv37": 38, **FEEDER_BUSES}


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
    acceleration: bool = Field(False, description="Anderson acceleration of the full P2P market's ADMM (relay)")
    aa_memory: int = Field(20, ge=1, le=200, description="Anderson memory (iterations)")
    aa_safeguard: float = Field(1.0, gt=0, description="reject an accelerated point whose fixed-point residual "
                                "grows by more than this factor")
    aa_start: int = Field(0, ge=0, description="iterations of the plain ADMM (rho balancing allowed) before the "
                          "acceleration starts with rho frozen")


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


class _PeerBase(_Strict):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    bus: int = Field(ge=0)


class LoadPeer(_PeerBase):
    """Flexible load: consumption between (1-flex) and (1+flex) times the baseline; utility line
    through A(d_min, price_at_min) and B(d_max, price_at_max) (thesis 4.1.2-4.1.3)."""

    kind: Literal["load"]
    p_base_mw: Hourly
    flex_fraction: float = Field(0.3, ge=0, lt=1)
    price_at_min_eur_per_mwh: float = 58.0
    price_at_max_eur_per_mwh: float = 4.0
    tan_phi: float = 0.3

    @model_validator(mode="after")
    def _prices(self):
        if self.price_at_max_eur_per_mwh > self.price_at_min_eur_per_mwh:
            raise ValueError("price_at_max_eur_per_mwh must not exceed price_at_min_eur_per_mwh (utility is concave)")
        return self


class RESPeer(_PeerBase):
    """PV or wind: 0 <= p <= forecast, cost a/2 p^2 + b p."""

    kind: Literal["pv", "wind"]
    p_forecast_mw: Hourly
    cost_a_eur_per_mw2h: float = Field(0.0, ge=0)
    cost_b_eur_per_mwh: float = 4.0
    tan_phi: float = 0.4


class CHPPeer(_PeerBase):
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


class GridPeer(_PeerBase):
    """External supplier at the substation: imports up to p_import_max_mw at the import price,
    exports up to p_export_max_mw at the export price."""

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


Peer = Annotated[Union[LoadPeer, RESPeer, CHPPeer, GridPeer, EVPeer, VirtualLoadPeer], Field(discriminator="kind")]


class Scenario(_Strict):
    name: str
    description: str = ""
    network: NetworkSpec
    market: MarketSpec
    series: dict[str, list[float]] = Field(default_factory=dict)
    peers: list[Peer] = Field(min_length=2)
    tso: TSOSpec | None = None
    dso: DSOSpec = Field(default_factory=DSOSpec)

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
            # the full P2P market trades producers with consumers only (common.market.trade_graph)
            producers = sum(p.kind in PRODUCER_KINDS for p in self.peers)
            if producers == 0:
                raise _field_error("peers", f"the full P2P market (market.kind 'p2p') has no producer (kind "
                                            f"{', '.join(PRODUCER_KINDS)}): the consumers have no one to trade with")
            if producers == len(self.peers):
                raise _field_error("peers", f"the full P2P market (market.kind 'p2p') has no consumer (kind "
                                            f"{', '.join(CONSUMER_KINDS)}): the producers have no one to trade with")
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


def _field_error(field: str, reason: str) -> ValueError:
    """A cross-field check's error (pydantic reports it as a model-level ValueError)."""
    return ValueError(f"{field}: {reason}")


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


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"])
    msg = first["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    if first["type"] == "union_tag_invalid":
        msg = f"unknown peer kind {first.get('input', {}).get('kind') if isinstance(first.get('input'), dict) else ''!r}; known: load, pv, wind, chp, grid, ev, virtual_load"
    if first["type"] == "missing":
        msg = "missing"
    return f"{loc}: {msg}" if loc else msg


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def resolve_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".toml") or path.exists():
        if not path.exists():
            raise ScenarioError(f"scenario file {str(path)!r} not found")
        return path
    builtin = BUILTIN_DIR / f"{name_or_path}.yaml"
    if builtin.exists():
        return builtin
    raise ScenarioError(f"unknown scenario {str(name_or_path)!r}; built-in: {', '.join(builtin_names())}")


def load_scenario(name_or_path: str | Path, **market_overrides) -> Scenario:
    """Load and validate a scenario (built-in name or file path).

    ``market_overrides`` replace fields of the ``market`` section (command-line options).
    Raises ScenarioError with a one-line reason naming the field.
    """
    path = resolve_path(name_or_path)
    try:
        text = path.read_text()
        raw = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
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
        raise ScenarioError(f"{source}: {_format_validation_error(err)}") from None
    nbus = network_bus_count(scenario.network)
    for i, peer in enumerate(scenario.peers):
        if peer.bus >= nbus:
            raise ScenarioError(f"{source}: peers[{i}] ({peer.id}).bus: unknown bus {peer.bus}; the network has buses 0..{nbus - 1}")
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
