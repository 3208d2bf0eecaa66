"""``p2pm``: the command line of the platform (typer).

Exit codes: 0 success, 2 bad input (scenario, options), 1 a run that failed.
"""

from __future__ import annotations

import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from common.scenario import ScenarioError, builtin_names, load_scenario, resolve_path

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Peer-to-peer electricity markets cleared by ADMM among separate processes over ZeroMQ.")

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


class Solver(str, Enum):
    admm = "admm"
    centralized = "centralized"


class Model(str, Enum):
    benchmark = "benchmark"
    cong = "cong"
    volt = "volt"
    freq = "freq"
    full = "full"


class Topology(str, Enum):
    relay = "relay"
    mesh = "mesh"


def _fail(message: str, code: int) -> None:
    typer.secho(("bad input: " if code == EXIT_BAD_INPUT else "run failed: ") + message, err=True, fg="red")
    raise typer.Exit(code)


def _version(value: bool):
    if value:
        from importlib.metadata import version

        typer.echo(f"p2pm {version('p2pm')}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                         help="Show the version and exit.")] = None):
    pass


@app.command()
def scenarios():
    """List the built-in scenarios."""
    for name in builtin_names():
        try:
            sc = load_scenario(name)
            typer.echo(f"{name:16s} {sc.market.kind:9s} {len(sc.peers):4d} peers  {sc.description.splitlines()[0] if sc.description else ''}")
        except ScenarioError as exc:  # a broken built-in is still listed, with its reason
            typer.echo(f"{name:16s} INVALID: {exc}")


def _load(scenario: str, **overrides):
    try:
        return load_scenario(scenario, **overrides)
    except ScenarioError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)


ScenarioArg = Annotated[str, typer.Argument(help="Built-in scenario name (see `p2pm scenarios`) or a YAML/TOML file.")]
RhoOpt = Annotated[Optional[float], typer.Option(help="Initial ADMM penalty rho (overrides the scenario).", min=0.0)]
TolOpt = Annotated[Optional[float], typer.Option(help="ADMM stopping tolerance on primal and dual residuals.", min=0.0)]
MaxItOpt = Annotated[Optional[int], typer.Option("--max-iterations", help="ADMM iteration limit.", min=1)]
RbOpt = Annotated[Optional[bool], typer.Option("--residual-balancing/--no-residual-balancing",
                                                help="Adapt rho by residual balancing (Boyd et al. 3.4.1).")]


@app.command()
def run(
    scenario: ScenarioArg,
    solver: Annotated[Solver, typer.Option(help="admm: the distributed system of separate processes; centralized: the reference.")] = Solver.admm,
    model: Annotated[Optional[Model], typer.Option(help="Market model (overrides the scenario).")] = None,
    topology: Annotated[Topology, typer.Option(help="relay: trades go through the coordinator; mesh: peer to peer.")] = Topology.relay,
    out: Annotated[Optional[Path], typer.Option(help="Results folder (default results/<scenario>-<solver>-<time>).")] = None,
    rho: RhoOpt = None,
    tolerance: TolOpt = None,
    max_iterations: MaxItOpt = None,
    residual_balancing: RbOpt = None,
    peers_per_process: Annotated[int, typer.Option(help="Peers hosted by one peer process.", min=1)] = 1,
    timeout_s: Annotated[float, typer.Option(help="Deadline for any single wait (registration, a round, a service answer).", min=0.1)] = 30.0,
    quiet: Annotated[bool, typer.Option(help="No progress display.")] = False,
):
    """Clear a market and write the results folder."""
    t0 = time.time()
    overrides = dict(model=model.value if model else None, rho=rho, tolerance=tolerance,
                     max_iterations=max_iterations, residual_balancing=residual_balancing)
    sc = _load(scenario, **overrides)
    out = out or Path("results") / f"{sc.name}-{solver.value}-{time.strftime('%Y%m%d-%H%M%S')}"
    from common.report import build_summary, format_summary, write_results

    if solver is Solver.centralized:
        from common.centralized import SolveError
        from common.clearing import run_centralized

        try:
            result = run_centralized(sc)
        except SolveError as exc:
            _fail(f"centralized clearing of {sc.name}: {exc}", EXIT_FAILED)
        result.wall_s = time.time() - t0
        write_results(result, out, sc)
        summary = build_summary(result)
        # the summary's wall time covers writing the results too
        result.wall_s = time.time() - t0
        write_results_summary_only(result, out)
        summary = build_summary(result)
    else:
        from common.launcher import LaunchError, run_distributed

        try:
            summary = run_distributed(resolve_path(scenario), sc, out, topology=topology.value, overrides=overrides,
                                      peers_per_process=peers_per_process, timeout_s=timeout_s, t0=t0, quiet=quiet)
        except LaunchError as exc:
            _fail(str(exc), EXIT_FAILED)
    typer.echo(format_summary(summary))
    typer.echo(f"results: {out}")
    if not summary.get("converged", False):
        raise typer.Exit(EXIT_FAILED)


def write_results_summary_only(result, out: Path) -> None:
    import json

    from common.report import build_summary

    (Path(out) / "summary.json").write_text(json.dumps(build_summary(result), indent=2, allow_nan=False))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
