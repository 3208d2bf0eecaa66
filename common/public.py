"""Public scenario and private peer files: a scenario splits on load.

The **public** part is what the coordinator, the DSO and the TSO are built from: the network and
its limits, the market and service settings, the TSO's request, the roster (id, kind, bus) with the
connection data a DSO holds from its connection agreements (power factor tan phi, a load's
contracted flexibility fraction), and, in the community market, the public grid tariff at the root.
The **private** part is one file per peer: its cost or utility curve, bounds, forecasts, EV battery
(``common.models.peer_model_to_dict``). Only the peer's own process reads it.

``p2pm scenarios split SCENARIO --out DIR`` writes ``DIR/public.json`` and ``DIR/peers/<id>.json``
for deployments by hand or in containers; the local launcher does the same in the run's folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.models import EVModel, load_baseline_mw, peer_model_to_dict, peer_models
from common.scenario import DSOSpec, MarketSpec, NetworkSpec, ScenarioError, format_validation_error

PUBLIC_SCHEMA = "p2pm.public/1"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class RosterEntry(_Strict):
    id: str
    kind: str
    bus: int = Field(ge=0)
    tan_phi: float = 0.0  # connection data: the peer's contracted power factor (q = p tan phi)
    flex_fraction: float = Field(0.0, ge=0)  # connection data: a load's contracted flexibility
    two_way: bool = False  # trades both ways (a prosumer, a supplier that may export): who trades with whom is public
    vm_pu: float | None = None  # connection data: a voltage-controlled generator's set point (PV bus in the AC check)


class Tariff(_Strict):
    """The grid tariff at the root (community market): public prices and limits."""

    import_price_eur_per_mwh: list[float]
    export_price_eur_per_mwh: list[float]
    p_import_max_mw: float
    p_export_max_mw: float


class PublicScenario(_Strict):
    schema_: Literal["p2pm.public/1"] = Field(PUBLIC_SCHEMA, alias="schema")
    name: str
    description: str = ""
    network: NetworkSpec
    market: MarketSpec
    dso: DSOSpec
    tso_virtual_load_mw: list[float]
    roster: list[RosterEntry] = Field(min_length=2)
    tariff: Tariff | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, populate_by_name=True)

    def dump(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)


def _roster_entry(model, vm_pu: float | None = None) -> RosterEntry:
    if isinstance(model, EVModel):
        return RosterEntry(id=model.id, kind="ev", bus=int(model.bus))
    tan = float(np.asarray(model.tan_phi).reshape(-1)[0])
    flex = float(np.max(load_baseline_mw(model)[1])) if model.kind == "load" else 0.0
    return RosterEntry(id=model.id, kind=model.kind, bus=int(model.bus), tan_phi=tan, flex_fraction=flex,
                       two_way=model.two_way, vm_pu=vm_pu)


def voltage_setpoints(roster) -> dict[str, float]:
    """{peer id: vm_pu} of the voltage-controlled generators of a roster (PV buses in the AC check)."""
    return {p.id: float(p.vm_pu) for p in roster if getattr(p, "vm_pu", None) is not None}


def _resolved_partners(market, network, roster):
    """A rule of trading partners that needs the network (k nearest, same feeder) resolved into
    explicit lists: the roles build the same trade graph from the public file without loading the
    network (``common.partners``)."""
    spec = market.partners
    if spec is None or spec.rule not in ("k_nearest", "same_feeder"):
        return market
    from common.partners import roster_mask

    mask = roster_mask(market, network, roster)
    ids = [p.id for p in roster]
    lists = {ids[n]: [ids[m] for m in np.flatnonzero(mask[n]) if m > n] for n in range(len(ids))}
    resolved = spec.model_copy(update={"rule": "explicit", "k": None, "lists": {k: v for k, v in lists.items() if v}})
    return market.model_copy(update={"partners": resolved})


def split_scenario(scenario) -> tuple[PublicScenario, dict[str, dict]]:
    """(the public part, {peer id: private model as plain data}) of a loaded scenario."""
    models = peer_models(scenario)
    H = scenario.market.hours
    tariff = None
    if scenario.market.kind == "community":
        grid = next(p for p in scenario.peers if p.kind == "grid")
        tariff = Tariff(import_price_eur_per_mwh=scenario.hourly(grid, "import_price_eur_per_mwh").tolist(),
                        export_price_eur_per_mwh=scenario.hourly(grid, "export_price_eur_per_mwh").tolist(),
                        p_import_max_mw=grid.p_import_max_mw, p_export_max_mw=grid.p_export_max_mw)
    vl = (np.zeros(H) if scenario.tso is None
          else np.broadcast_to(scenario._resolve(scenario.tso.virtual_load_mw, "tso.virtual_load_mw"), (H,)))
    roster = [_roster_entry(m, getattr(p, "vm_pu", None)) for m, p in zip(models, scenario.peers)]
    public = PublicScenario(name=scenario.name, description=scenario.description or "", network=scenario.network,
                            market=_resolved_partners(scenario.market, scenario.network, roster), dso=scenario.dso,
                            tso_virtual_load_mw=[float(v) for v in vl], roster=roster, tariff=tariff)
    private = {m.id: peer_model_to_dict(m) for m in models}
    return public, private


def write_split(scenario, out: Path) -> tuple[Path, dict[str, Path]]:
    """Write ``out/public.json`` and ``out/peers/<id>.json`` (mode 0600); returns their paths."""
    public, private = split_scenario(scenario)
    out = Path(out)
    (out / "peers").mkdir(parents=True, exist_ok=True)
    pub_path = out / "public.json"
    pub_path.write_text(json.dumps(public.dump(), indent=1))
    paths = {}
    for pid, data in private.items():
        path = out / "peers" / f"{pid}.json"
        path.write_text(json.dumps(data))
        path.chmod(0o600)
        paths[pid] = path
    return pub_path, paths


def load_public(path: str | Path) -> PublicScenario:
    """A public scenario file; ScenarioError naming the field otherwise (a full scenario with the
    peers' private data is refused: roles other than peers take only the public part)."""
    path = Path(path)
    refuse = (f"{path}: schema: expected a public scenario ({PUBLIC_SCHEMA!r}; write one with 'p2pm scenarios "
              "split SCENARIO --out DIR' and give DIR/public.json); a full scenario holds every peer's private data "
              "and is not accepted here")
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read the public scenario: {exc.strerror or exc}; {refuse}") from None
    except json.JSONDecodeError:
        raise ScenarioError(refuse) from None
    if not isinstance(raw, dict) or raw.get("schema") != PUBLIC_SCHEMA:
        raise ScenarioError(refuse)
    try:
        return PublicScenario.model_validate(raw)
    except ValidationError as exc:
        raise ScenarioError(f"{path}: {format_validation_error(exc)}") from None

