"""Communication-overhead experiments: ``p2pm experiment FILE``.

An experiment file (YAML) is a grid: scenario families and sizes x market x topology x variant x
peers per process x network setting, each cell repeated with seeds. The file is validated (pydantic)
before anything runs; a bad file is refused naming the field. Every cell x repetition runs with
real processes (``driver: processes``, the default: ``p2pm.launcher``) or on the in-process driver
(``driver: in-process``: every engine in one forked child, messages through the codec and counted as
on the wire, the network model on a simulated clock), and leaves its own folder
``<out>/cells/<cell>/rep<r>/`` (the run's results folder and ``row.json``, written last). A finished
repetition (its ``row.json`` exists) is skipped when the experiment is run again: an interrupted
experiment resumes where it stopped.

Results: ``<out>/results.csv`` and ``results.parquet`` (pyarrow, the ``experiments`` extra), one row per cell
and repetition (columns in :data:`COLUMNS` plus ``messages_<type>``, ``bytes_<type>``,
``messages_<link>``, ``bytes_<link>``), and ``<out>/report.html`` with the figures
(:mod:`p2pm.experiment_report`).

Variants (``market`` overrides):

=========================  ==================  ===============  =====================================
variant                    pool_price_start    acceleration     other
=========================  ==================  ===============  =====================================
plain                      false               false
accelerated                false               true  (relay)
pool-price                 true                false
pool-price+accelerated     true                true  (relay)
asynchronous               false               false            staleness (mesh), rho fixed, every
                                                                hour open (``coordinator.clearing.
                                                                AsyncP2PRounds``)
=========================  ==================  ===============  =====================================

Acceleration runs in the relay topology, the asynchronous ADMM in the mesh topology and the
community market in the relay topology only: such cells of a grid are listed as skipped (with the
reason), not run. ``partners`` restricts whom each peer trades with (``market.partners``,
``common.partners``); ``rho`` sets the ADMM's starting penalty of every cell.

The reference: the full P2P benchmark without differentiation has the optimum of the pool market
(any balanced dispatch with producers >= 0 >= consumers is carried by producer-consumer trades), so
the welfare error is against the pool QP per hour (:func:`pool_reference`, N x H variables, cheap at
1 000 peers); the community market against its centralized SOCP.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import traceback
from itertools import product
from pathlib import Path
from typing import Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.network import LINK_KINDS, LinkNetwork, LinkSpec
from common.scenario import PartnersSpec, format_validation_error, resolve_named_file

BUILTIN_DIR = Path(__file__).parent / "experiments"
IN_PROCESS_RUN_ID = "inprocess000"  # as long as the launcher's run ids (uuid hex, 12 characters)
VARIANTS = {
    "plain": dict(pool_price_start=False, acceleration=False),
    "accelerated": dict(pool_price_start=False, acceleration=True),
    "pool-price": dict(pool_price_start=True, acceleration=False),
    "pool-price+accelerated": dict(pool_price_start=True, acceleration=True),
    "asynchronous": dict(pool_price_start=False, acceleration=False, residual_balancing=False, hour_stopping=False),
}
# which role sends each message type to which (measured with the in-process driver's trace);
# hello, welcome and shutdown go both ways between the coordinator and every role: "control"
MESSAGE_LINK = {
    "round": "coordinator-peer", "price_probe": "coordinator-peer", "pool_price": "coordinator-peer",
    "update": "peer-coordinator", "quantity_sum": "peer-coordinator", "pool_quantity": "peer-coordinator",
    "ready": "peer-coordinator", "result": "peer-coordinator", "residuals": "peer-coordinator",
    "trades": "peer-peer",
    "dispatch": "coordinator-dso", "grid_report": "dso-coordinator", "network_request": "coordinator-dso",
    "network_result": "dso-coordinator",
    "freq_query": "coordinator-tso", "freq_request": "tso-coordinator",
    "hello": "control", "welcome": "control", "shutdown": "control",
}
LINK_GROUPS = ("coordinator-peer", "peer-coordinator", "peer-peer", "coordinator-dso", "dso-coordinator",
               "coordinator-tso", "tso-coordinator", "control", "other")
COLUMNS = [
    "experiment", "cell", "rep", "seed", "status", "reason", "driver", "scenario", "family", "market", "peers",
    "producers", "consumers", "trades", "topology", "variant", "peers_per_process", "peer_processes", "network",
    "latency_ms", "jitter", "bandwidth_mbit_s", "converged", "iterations", "rounds", "price_rounds", "messages",
    "bytes", "messages_per_iteration", "bytes_per_iteration", "wall_s", "startup_s", "admm_s",
    "time_per_iteration_ms", "sim_time_s", "peak_rss_mib_total", "peak_rss_mib_coordinator",
    "peak_rss_mib_peer_max", "welfare_eur", "welfare_ref_eur", "welfare_rel_error", "primal_residual",
    "dual_residual", "reference_s",
]


class ExperimentError(ValueError):
    """A bad experiment file; ``str()`` names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LinkSettings(_Strict):
    latency_ms: float = Field(0.0, ge=0)
    jitter: float = Field(0.0, ge=0, le=1, description="fraction of the latency, uniform in [1-j, 1+j]")
    bandwidth_mbit_s: float | None = Field(None, gt=0)


class NetworkSettings(LinkSettings):
    """One network setting of the grid: the default link plus overrides per link kind."""

    name: str | None = None
    links: dict[Literal["coordinator-peer", "peer-peer", "coordinator-service"], LinkSettings] = Field(
        default_factory=dict)

    def label(self) -> str:
        if self.name:
            return self.name
        text = f"{self.latency_ms:g}ms"
        if self.jitter:
            text += f"-j{self.jitter:g}"
        if self.bandwidth_mbit_s:
            text += f"-{self.bandwidth_mbit_s:g}Mbit"
        for kind, s in sorted(self.links.items()):
            text += f"-{kind}{s.latency_ms:g}ms"
        return text

    def model(self, seed: int) -> LinkNetwork:
        spec = lambda s: LinkSpec(s.latency_ms, s.jitter, s.bandwidth_mbit_s)  # noqa: E731
        return LinkNetwork(links={k: spec(v) for k, v in self.links.items()}, default=spec(self), seed=seed)


class ScenarioFamily(_Strict):
    """Scenarios of the grid: a family made by ``p2pm scenarios make`` at each size, or a file."""

    family: str | None = Field(None, description="feeder of p2pm scenarios make: mv37, kerber-dorf, "
                                                   "kerber-vorstadt, ieee-eu-lv")
    base: str = "mv37"
    peers: list[int] = Field(default_factory=list)
    file: str | None = Field(None, description="a scenario (built-in name or file) used as it is")
    market: Literal["p2p", "community"] | None = None

    @model_validator(mode="after")
    def _one(self):
        if (self.family is None) == (self.file is None):
            raise ValueError("give exactly one of 'family' (with 'peers') or 'file'")
        if self.family is not None:
            from p2pm.builders.make_scenario import FEEDERS

            if self.family not in FEEDERS:
                raise ValueError(f"family: unknown feeder {self.family!r}; known: {', '.join(FEEDERS)}")
            if not self.peers:
                raise ValueError("peers: a family needs at least one size")
            if min(self.peers) < 3:
                raise ValueError("peers: every size must be at least 3")
        elif self.peers:
            raise ValueError("peers: a scenario file has its own peers")
        return self


class Experiment(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    driver: Literal["processes", "in-process"] = "processes"
    scenarios: list[ScenarioFamily] = Field(min_length=1)
    topologies: list[Literal["relay", "mesh"]] = Field(["relay"], min_length=1)
    variants: list[Literal["plain", "accelerated", "pool-price", "pool-price+accelerated", "asynchronous"]] = Field(
        ["pool-price"], min_length=1)
    staleness: int = Field(2, ge=1, le=1000, description="variant asynchronous: the bound on the partners' trades' "
                           "age (market.staleness)")
    partners: PartnersSpec | None = Field(None, description="whom each peer trades with (market.partners) in "
                                          "every cell")
    rho: float | None = Field(None, gt=0, description="the ADMM's starting penalty (market.rho) of every cell")
    peers_per_process: list[Union[int, Literal["auto"]]] = Field(["auto"], min_length=1)
    network: list[NetworkSettings] = Field(default_factory=lambda: [NetworkSettings()], min_length=1)
    repetitions: int = Field(1, ge=1, le=100)
    seed: int = 0
    max_iterations: int | dict[int, int] | None = Field(None, description="cap on the ADMM iterations: one "
                                                         "number, or one per size (peers: cap)")
    tolerance: float | None = Field(None, gt=0)
    timeout_s: float = Field(60.0, gt=0)
    cell_timeout_s: float = Field(1800.0, gt=0, description="longest a cell may run (in-process driver)")
    processes_target: int = Field(20, ge=1, description="'auto' peers per process: about this many peer processes")
    security: Literal["curve", "none"] = Field("curve", description="driver processes: CURVE between the roles "
                                               "(throwaway keys per run), or none (no authentication, no encryption)")

    @field_validator("peers_per_process")
    @classmethod
    def _ppp(cls, v):
        for x in v:
            if isinstance(x, int) and x < 1:
                raise ValueError("every value must be 'auto' or at least 1")
        return v

    @field_validator("max_iterations")
    @classmethod
    def _caps(cls, v):
        caps = v.values() if isinstance(v, dict) else [] if v is None else [v]
        if any(c < 1 for c in caps):
            raise ValueError("every cap must be at least 1")
        return v

    def cap(self, peers: int | None) -> int | None:
        if isinstance(self.max_iterations, dict):
            return self.max_iterations.get(peers) if peers is not None else None
        return self.max_iterations

    @model_validator(mode="after")
    def _network_names(self):
        labels = [n.label() for n in self.network]
        if len(set(labels)) != len(labels):
            raise ValueError("network: two settings have the same name; give each a distinct 'name'")
        return self


def resolve(name_or_path: str | Path) -> Path:
    return resolve_named_file(name_or_path, BUILTIN_DIR, "experiment", ExperimentError, (".yaml", ".yml"))


def load_experiment(name_or_path: str | Path) -> Experiment:
    path = resolve(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ExperimentError(f"{path}: cannot be read: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path}: the top level must be a mapping")
    try:
        return Experiment.model_validate(raw)
    except ValidationError as err:
        raise ExperimentError(f"{path}: {format_validation_error(err)}") from None


# ----------------------------------------------------------------------------------------- cells


class Cell(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    scenario_index: int
    family: str  # feeder of a made scenario, or "file"
    source: str  # feeder name or scenario file
    base: str
    peers: int | None  # None: the file's
    market: str | None
    topology: str
    variant: str
    peers_per_process: int | str
    network_index: int
    network_label: str
    skip: str | None = None


def cells(exp: Experiment) -> list[Cell]:
    out = []
    sizes = []
    for i, fam in enumerate(exp.scenarios):
        if fam.family is not None:
            sizes += [(i, fam, n) for n in fam.peers]
        else:
            sizes.append((i, fam, None))
    for (i, fam, n), topo, variant, ppp, (j, net) in product(sizes, exp.topologies, exp.variants,
                                                               exp.peers_per_process, enumerate(exp.network)):
        market = fam.market or "p2p"
        skip = None
        if "accelerated" in variant and topo == "mesh":
            skip = "acceleration runs in the relay topology"
        elif variant == "asynchronous" and topo != "mesh":
            skip = "the asynchronous ADMM runs in the mesh topology"
        elif market == "community" and topo == "mesh":
            skip = "the community market runs in the relay topology"
        src = fam.family or Path(fam.file).stem
        cid = f"{src}-{n if n else 'file'}-{market}-{topo}-{variant.replace('+', '_')}-ppp{ppp}-{net.label()}"
        out.append(Cell(id=cid, scenario_index=i, family=fam.family or "file", source=fam.family or fam.file,
                        base=fam.base, peers=n, market=fam.market, topology=topo, variant=variant,
                        peers_per_process=ppp, network_index=j, network_label=net.label(), skip=skip))
    return out


def _scenario(exp: Experiment, cell: Cell, seed: int, folder: Path):
    """The loaded scenario of a cell and repetition (a made scenario is written once per seed)."""
    from common.scenario import load_scenario
    from p2pm.builders.make_scenario import make_scenario, write

    overrides = dict(VARIANTS[cell.variant])
    if cell.variant == "asynchronous":
        overrides["staleness"] = exp.staleness
    if exp.rho is not None:
        overrides["rho"] = exp.rho
    if exp.cap(cell.peers) is not None:
        overrides["max_iterations"] = exp.cap(cell.peers)
    if exp.tolerance is not None:
        overrides["tolerance"] = exp.tolerance
    if cell.family == "file":
        sc = load_scenario(cell.source)
    else:
        path = folder / f"{cell.base}-{cell.source}-{cell.peers}-{cell.market or 'base'}-seed{seed}.yaml"
        if not path.exists():
            doc = make_scenario(cell.peers, feeder=cell.source, base=cell.base, market=cell.market, seed=seed)
            write(doc, path, f"p2pm scenarios make --peers {cell.peers} --feeder {cell.source} --base {cell.base} "
                             f"--seed {seed}" + (f" --market {cell.market}" if cell.market else ""))
        sc = load_scenario(path)
    if sc.market.kind != "p2p":
        overrides.pop("pool_price_start", None)
        if not overrides.get("acceleration"):
            overrides.pop("acceleration", None)
    elif exp.partners is not None:
        overrides["partners"] = exp.partners
    return sc.model_copy(update={"market": sc.market.model_copy(update=overrides)})


def peers_per_process(exp: Experiment, cell: Cell, n_peers: int) -> int:
    if cell.peers_per_process == "auto":
        return max(1, math.ceil(n_peers / exp.processes_target))
    return int(cell.peers_per_process)


# ------------------------------------------------------------------------------------ reference


def pool_reference(peers) -> tuple[float, "object"]:
    """Social welfare (EUR, summed over hours) of the pool market: per hour, min sum_n C_n(p_n) with
    sum_n p_n = 0 within bounds. Equal to the full P2P benchmark's optimum (no differentiation)."""
    import cvxpy as cp
    import numpy as np

    from common.market import peer_arrays, social_welfare_eur

    p_min, p_max, a, b = peer_arrays(peers)
    P = cp.Variable(p_min.shape)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum(cp.multiply(a, cp.square(P))) + cp.sum(cp.multiply(b, P))),
                      [cp.sum(P, axis=0) == 0, P >= p_min, P <= p_max])
    prob.solve(solver="CLARABEL")
    if prob.status not in ("optimal", "optimal_inaccurate"):
        raise RuntimeError(f"pool reference: {prob.status}")
    p = np.asarray(P.value)
    return float(np.sum(social_welfare_eur(peers, p))), p


def reference_welfare(sc, cache: Path) -> tuple[float, float]:
    """(welfare of the centralized optimum, seconds to solve it), cached in ``cache`` (JSON)."""
    if cache.exists():
        d = json.loads(cache.read_text())
        return d["welfare_eur"], d["seconds"]
    import numpy as np

    t = time.perf_counter()
    if sc.market.kind == "p2p":
        from common.models import peer_models

        if sc.market.model != "benchmark":
            raise ExperimentError(f"{sc.name}: market.model {sc.market.model!r}: experiments clear the benchmark")
        if sc.market.partners is not None and sc.market.partners.rule != "full":  # restricted: the P2P QP itself
            from common.centralized import solve_p2p
            from common.partners import scenario_graph

            sw = float(np.sum(solve_p2p(peer_models(sc), graph=scenario_graph(sc)).social_welfare_eur))
        else:
            sw, _ = pool_reference(peer_models(sc))
    else:
        from p2pm.compare import solve_community_reference

        _, sol = solve_community_reference(sc)
        sw = float(np.sum(sol.social_welfare_eur))
    seconds = time.perf_counter() - t
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"welfare_eur": sw, "seconds": seconds}))
    return sw, seconds


# ---------------------------------------------------------------------------------------- running


def _traffic_columns(messages_csv: Path) -> dict:
    import pandas as pd

    df = pd.read_csv(messages_csv)
    out = {}
    for t, g in df.groupby("type"):
        out[f"messages_{t}"] = int(g["count"].sum())
        out[f"bytes_{t}"] = int(g["bytes"].sum())
    link = df["type"].map(lambda t: MESSAGE_LINK.get(t, "other"))
    for k in LINK_GROUPS:
        sel = df[link == k]
        out[f"messages_{k}"] = int(sel["count"].sum())
        out[f"bytes_{k}"] = int(sel["bytes"].sum())
    return out


def _in_process_child(sc, topology: str, ppp: int, network: LinkNetwork, folder: str, conn) -> None:
    """Runs in a forked child: the cell on the in-process driver; sends progress and the summary."""
    import resource

    from common.engine import InProcessDriver
    from common.public import split_scenario
    from common.report import write_results
    from coordinator.results import build_result
    from p2pm.local import engines_for

    try:
        last = [0, time.monotonic()]

        def trace(now_s, sender, to, iteration, message):
            if iteration != last[0] and time.monotonic() - last[1] > 0.2:
                last[:] = [iteration, time.monotonic()]
                conn.send(("iteration", iteration))

        t0 = time.perf_counter()
        coordinator, engines = engines_for(sc, topology=topology, peers_per_process=ppp)
        # a run id as long as the launcher's (12 characters), so that every message has the same size
        coordinator.run_id = IN_PROCESS_RUN_ID
        driver = InProcessDriver(engines, network=network, trace=trace, run_id=IN_PROCESS_RUN_ID)
        outcome = driver.run()
        result = build_result(outcome, coordinator, driver.traffic.rows(), processes=1,
                              rejected=sum(driver.rejected.values()))
        wall = time.perf_counter() - t0
        result.wall_s = wall
        write_results(result, Path(folder), split_scenario(sc)[0], figures=False)
        summary = json.loads((Path(folder) / "summary.json").read_text())
        summary["sim_time_s"] = driver.now_s
        summary["peak_rss_mib_total"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        summary["peer_processes"] = math.ceil(len([p for p in sc.peers if not (sc.market.kind == "community"
                                                                                and p.kind == "grid")]) / ppp)
        conn.send(("done", summary))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        conn.send(("failed", f"{type(exc).__name__}: {exc}", traceback.format_exc()[-2000:]))
    finally:
        conn.close()


def _run_in_process(sc, topology, ppp, network, folder: Path, timeout_s: float, on_iteration) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_in_process_child, args=(sc, topology, ppp, network, str(folder), child), daemon=True)
    proc.start()
    child.close()
    end = time.monotonic() + timeout_s
    try:
        while True:
            if parent.poll(0.2):
                try:
                    msg = parent.recv()
                except EOFError:
                    raise RuntimeError(f"the in-process run died (exit code {proc.exitcode})") from None
                if msg[0] == "iteration":
                    on_iteration(msg[1])
                elif msg[0] == "done":
                    return msg[1]
                else:
                    raise RuntimeError(msg[1])
            elif not proc.is_alive():
                raise RuntimeError(f"the in-process run died (exit code {proc.exitcode})")
            if time.monotonic() > end:
                raise RuntimeError(f"the cell ran longer than cell_timeout_s = {timeout_s:g} s")
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(5)


def run_cell(exp: Experiment, cell: Cell, rep: int, out: Path, on_iteration=lambda i: None) -> dict:
    """Run one repetition of one cell; returns its table row (also written as row.json)."""
    seed = exp.seed + rep
    folder = out / "cells" / cell.id / f"rep{rep}"
    row = {c: None for c in COLUMNS}
    net = exp.network[cell.network_index]
    row.update(experiment=exp.name, cell=cell.id, rep=rep, seed=seed, driver=exp.driver, family=cell.family,
               market=cell.market or "p2p", topology=cell.topology, variant=cell.variant, network=cell.network_label,
               latency_ms=net.latency_ms, jitter=net.jitter, bandwidth_mbit_s=net.bandwidth_mbit_s)
    if cell.skip:
        row.update(status="skipped", reason=cell.skip)
        return row
    if folder.exists():  # a repetition that did not finish: start it again
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    try:
        sc = _scenario(exp, cell, seed, out / "scenarios")
        from common.models import PRODUCER_KINDS

        producers = sum(p.kind in PRODUCER_KINDS for p in sc.peers)
        row.update(scenario=sc.name, market=sc.market.kind, peers=len(sc.peers), producers=producers,
                   consumers=len(sc.peers) - producers, trades=producers * (len(sc.peers) - producers))
        ppp = peers_per_process(exp, cell, len(sc.peers))
        row["peers_per_process"] = ppp
        from p2pm.sizing import check_message_size

        too_big = check_message_size(sc, ppp)
        if too_big:
            raise RuntimeError(too_big)
        restricted = sc.market.partners is not None and sc.market.partners.rule != "full"
        if restricted:  # the pairs of the restricted market
            from common.partners import scenario_graph

            row["trades"] = scenario_graph(sc).n_pairs // 2
        tag = "" if not restricted else "-" + "-".join(f"{k}{v}" for k, v in sc.market.partners.model_dump(
            exclude_none=True).items() if k not in ("lists",))
        ref_sw, ref_s = reference_welfare(sc, out / "scenarios" / f"{sc.name}-seed{seed}{tag}.reference.json")
        row["welfare_ref_eur"], row["reference_s"] = ref_sw, ref_s
        model = net.model(seed)
        if exp.driver == "processes":
            from p2pm.launcher import run_distributed

            def on_event(ev):
                if ev.get("event") == "iteration":
                    on_iteration(ev.get("iteration", 0))

            old = os.environ.get("P2PM_NETWORK")
            os.environ["P2PM_NETWORK"] = model.to_json()
            try:
                s = run_distributed(sc, folder, topology=cell.topology, peers_per_process=ppp,
                                    timeout_s=exp.timeout_s, quiet=True, report=False, on_event=on_event,
                                    security=exp.security == "curve")
            finally:
                if old is None:
                    os.environ.pop("P2PM_NETWORK", None)
                else:
                    os.environ["P2PM_NETWORK"] = old
        else:
            s = _run_in_process(sc, cell.topology, ppp, model, folder, exp.cell_timeout_s, on_iteration)
        it = max(int(s.get("iterations", 0)), 1)
        row.update(
            status="ok", converged=bool(s.get("converged")), iterations=s.get("iterations"),
            rounds=s.get("rounds", s.get("iterations")), price_rounds=s.get("price_rounds", 0),
            messages=s.get("messages"), bytes=s.get("bytes"),
            messages_per_iteration=s.get("messages", 0) / it, bytes_per_iteration=s.get("bytes", 0) / it,
            wall_s=s.get("wall_s"), startup_s=s.get("startup_s"), admm_s=s.get("admm_s"),
            time_per_iteration_ms=s.get("time_per_iteration_ms"), sim_time_s=s.get("sim_time_s"),
            peak_rss_mib_total=s.get("peak_rss_mib_total"), peak_rss_mib_coordinator=s.get("peak_rss_mib_coordinator"),
            peak_rss_mib_peer_max=s.get("peak_rss_mib_peer_max"), peer_processes=s.get("peer_processes"),
            welfare_eur=s.get("social_welfare_eur"), primal_residual=s.get("primal_residual"),
            dual_residual=s.get("dual_residual"))
        if row["welfare_eur"] is not None:
            row["welfare_rel_error"] = abs(row["welfare_eur"] - ref_sw) / max(abs(ref_sw), 1e-9)
        row.update(_traffic_columns(folder / "messages.csv"))
    except Exception as exc:  # noqa: BLE001 - a failed cell is a row, the experiment goes on
        if str(exc).startswith("interrupted"):  # Ctrl-C or SIGTERM during a run: not finished, resume runs it
            raise KeyboardInterrupt(str(exc)) from None
        row.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:2000])
        (folder / "error.txt").write_text(traceback.format_exc())
    (folder / "row.json").write_text(json.dumps(row, indent=1, default=float))
    return row


def row_path(out: Path, cell: Cell, rep: int) -> Path:
    return out / "cells" / cell.id / f"rep{rep}" / "row.json"


def write_table(out: Path, rows: list[dict]) -> list[Path]:
    import pandas as pd

    df = pd.DataFrame(rows)
    extra = sorted(c for c in df.columns if c not in COLUMNS)
    df = df.reindex(columns=[*COLUMNS, *extra])
    paths = [out / "results.csv"]
    df.to_csv(paths[0], index=False)
    try:
        import pyarrow  # noqa: F401  (the "experiments" extra; make install has it)
    except ImportError:
        (out / "results.parquet.txt").write_text("pyarrow is not installed (pip install 'p2pm[experiments]'): "
                                                 "results.csv only\n")
        return paths
    try:
        _typed_columns(df).to_parquet(out / "results.parquet", index=False)
    except Exception as exc:  # noqa: BLE001 - a broken pyarrow/pandas pair must not lose the experiment
        (out / "results.parquet.txt").write_text(f"results.parquet not written: {type(exc).__name__}: {exc}\n")
        return paths
    paths.append(out / "results.parquet")
    return paths


def _typed_columns(df):
    """Parquet columns have one type: a column of mixed values (numbers in some rows, text in
    others, e.g. an error message) is written as text, a column of numbers and blanks as numbers."""
    import numpy as np
    import pandas as pd

    out = df.copy()
    for col in out.columns[out.dtypes == object]:
        values = out[col]
        numeric = pd.to_numeric(values, errors="coerce")
        if numeric.notna().sum() == values.notna().sum():
            out[col] = numeric
        else:
            out[col] = values.map(lambda v: None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
    return out


class _Bar:
    """Progress: cells done of all, the current cell and its iteration, ETA (rich, on a terminal)."""

    def __init__(self, total: int, quiet: bool):
        self.progress = None
        self.quiet = quiet
        self.last_print = 0.0
        self.total = total
        if not quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                     TextColumn("{task.fields[detail]}"), transient=False)
            self.progress.start()
            self.task = self.progress.add_task("cells", total=total, detail="")

    def cell(self, text: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, detail=text)

    def iteration(self, text: str, i: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, detail=f"{text}: iteration {i}")

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def run_experiment(exp: Experiment, out: Path, *, quiet: bool = False, report: bool = True,
                   only: int | None = None) -> tuple[list[dict], dict]:
    """Run every cell x repetition not finished yet; write the table (and the report). ``only``:
    stop after running that many (tests of resume). Returns (rows, counts)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.json").write_text(exp.model_dump_json(indent=1))
    todo = [(c, r) for c in cells(exp) for r in range(exp.repetitions)]
    counts = {"cells": len(todo), "resumed": 0, "ran": 0, "skipped": 0, "failed": 0}
    bar = _Bar(len(todo), quiet)
    rows = []
    try:
        for cell, rep in todo:
            path = row_path(out, cell, rep)
            if path.exists():
                rows.append(json.loads(path.read_text()))
                counts["resumed"] += 1
                bar.advance()
                continue
            if only is not None and counts["ran"] >= only:
                break
            label = f"{cell.id} rep {rep}"
            bar.cell(label)
            row = run_cell(exp, cell, rep, out, on_iteration=lambda i, label=label: bar.iteration(label, i))
            if row["status"] == "skipped":
                counts["skipped"] += 1
            else:
                counts["ran"] += 1
                counts["failed"] += row["status"] == "failed"
            rows.append(row)
            bar.advance()
            write_table(out, rows)  # the table so far, after every cell
    finally:
        bar.close()
    write_table(out, rows)
    if report and rows:
        from p2pm.experiment_report import write_report

        write_report(out, exp, rows)
    return rows, counts
