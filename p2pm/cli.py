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

from common.scenario import ScenarioError, builtin_names, load_scenario

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Peer-to-peer electricity markets cleared by ADMM among separate processes over ZeroMQ.")

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2
BENCH_MAX_PAIRS = 30_000  # the largest full P2P market p2pm bench solves centrally for its comparison


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


class Launch(str, Enum):
    local = "local"
    podman = "podman"


class Security(str, Enum):
    curve = "curve"
    none = "none"
    compare = "compare"


class PeerLoss(str, Enum):
    abort = "abort"
    drop = "drop"
    wait = "wait"


PeerLossOpt = Annotated[PeerLoss, typer.Option(
    "--on-peer-loss", envvar="P2PM_ON_PEER_LOSS",
    help="When a peer host is lost (killed, stopped, disconnected): abort the run naming it; drop its peers and "
         "clear on without them, warm-started; or wait up to --grace-s for it to come back (`p2pm peer` started again "
         "with the same --host-id) and go on from where it was lost (wait also lets a lost DSO or TSO started by hand "
         "come back; a request it had not answered is sent again). drop and wait: full P2P market, relay topology, "
         "benchmark model; summary.json says who was dropped or came back, and when.")]
GraceOpt = Annotated[float, typer.Option(
    "--grace-s", envvar="P2PM_GRACE_S", min=0.1, max=86400.0,
    help="--on-peer-loss wait: how long a lost peer host may take to come back.")]
CheckpointSOpt = Annotated[float, typer.Option(
    "--checkpoint-s", envvar="P2PM_CHECKPOINT_S", min=0.0, max=86400.0,
    help="Write the coordinator's checkpoint (RESULTS/checkpoint/state.npz) at most this often during a clearing "
         "(0: never); 'p2pm resume RESULTS' goes on from it. Relay topology, benchmark P2P market.")]
CheckpointEveryOpt = Annotated[int, typer.Option(
    "--checkpoint-every", envvar="P2PM_CHECKPOINT_EVERY", min=0, max=10**9,
    help="Also write the checkpoint every this many ADMM iterations (0: by --checkpoint-s only).")]
ResumeOpt = Annotated[Optional[Path], typer.Option(
    "--resume", hidden=True, help="Go on from the checkpoint in this results folder (what 'p2pm resume' runs).")]
HeartbeatOpt = Annotated[float, typer.Option(
    "--heartbeat-s", envvar="P2PM_HEARTBEAT_S", min=0.05, max=60.0,
    help="Heartbeat interval of every role (ZeroMQ and application heartbeats); a role silent for 5 intervals is lost.")]


def _check_peer_loss(policy: PeerLoss, market, topology: str) -> None:
    """--on-peer-loss drop where it cannot apply is refused before any process starts (exit 2)."""
    from coordinator.engine import drop_unsupported

    why = drop_unsupported(market, topology) if policy is not PeerLoss.abort else None
    if why:
        _fail(f"--on-peer-loss {policy.value}: not available for {why}", EXIT_BAD_INPUT)


def _resume_state(resume: Optional[Path], public, topology: str):
    """The checkpoint ``--resume`` names, checked against this market (exit 2 naming the field), or None."""
    if resume is None:
        return None
    from common.checkpoint import CheckpointError, check_matches, read_state
    from common.partners import public_graph
    from coordinator.engine import resume_unsupported

    why = resume_unsupported(public.market, topology)
    if why is not None:
        _fail(f"--resume: a run cannot resume in {why}", EXIT_BAD_INPUT)
    try:
        state = read_state(resume)
        graph = public_graph(public)
        check_matches(state, scenario=public.name, topology=topology, peer_ids=list(graph.peer_ids),
                      hours=public.market.hours, pairs=graph.n_pairs)
    except CheckpointError as exc:
        _fail(f"--resume {resume}: {exc}", EXIT_BAD_INPUT)
    return state


def _command_argv(ctx: typer.Context, **replace) -> list[str]:
    """The command line that gives this command's parameters (those not at their default), with
    ``replace`` overriding some: what a checkpointing run records for ``p2pm resume``."""
    argv = [ctx.info_name]
    for param in ctx.command.params:
        value = replace.get(param.name, ctx.params.get(param.name))
        if param.name in replace and value is None:
            continue
        if param.param_type_name == "argument":
            argv.append(str(value))
            continue
        if value is None or (param.name not in replace and value == param.default) or param.name == "resume":
            continue
        if getattr(param, "is_flag", False):
            names = param.opts if value else param.secondary_opts
            if names:
                argv.append(names[0])
            continue
        for v in (value if param.multiple else [value]):
            argv += [param.opts[0], str(v.value if isinstance(v, Enum) else v)]
    return argv


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


scenarios_app = typer.Typer(no_args_is_help=False, invoke_without_command=True,
                             help="The built-in scenarios; split a scenario into its public and private files.")
app.add_typer(scenarios_app, name="scenarios")


@scenarios_app.callback()
def scenarios(ctx: typer.Context):
    """List the built-in scenarios (or run a subcommand)."""
    if ctx.invoked_subcommand is not None:
        return
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


@scenarios_app.command("split")
def split(scenario: Annotated[str, typer.Argument(help="Built-in scenario name or a YAML/TOML file.")],
          out: Annotated[Path, typer.Option(help="Folder to write public.json and peers/<id>.json to.")]):
    """Split a scenario into its public part (for the coordinator, DSO and TSO) and one private file
    per peer (for that peer's process only)."""
    from common.public import write_split

    public, private = write_split(_load(scenario), out)
    typer.echo(f"public part: {public}\nprivate files: {len(private)} in {out / 'peers'} (give each peer only its own)")


@scenarios_app.command("make")
def make(peers: Annotated[int, typer.Option("--peers", help="Number of peers (the external supplier included).", min=3)],
         out: Annotated[Path, typer.Option(help="Scenario file to write (YAML).")],
         feeder: Annotated[str, typer.Option(help="mv37 (the base network) or a real LV feeder: kerber-dorf (116 buses), "
                                                  "kerber-vorstadt (294), ieee-eu-lv (907).")] = "mv37",
         base: Annotated[str, typer.Option(help="Scenario whose mix, series and market settings are replicated.")] = "mv37",
         market: Annotated[Optional[str], typer.Option(help="p2p or community (default: the base's).")] = None,
         seed: Annotated[int, typer.Option(help="Seed of the size factors and the bus shuffle.")] = 0,
         jitter: Annotated[float, typer.Option(help="Each replica's size x U[1-jitter, 1+jitter].")] = 0.2):
    """Make a scenario of N peers from a base mix on a feeder (a scenario family that scales;
    common/scenarios/families.md)."""
    from p2pm.builders.make_scenario import make_scenario, write

    try:
        doc = make_scenario(peers, feeder=feeder, base=base, market=market, seed=seed, jitter=jitter)
    except ScenarioError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    command = f"p2pm scenarios make --peers {peers} --feeder {feeder} --base {base} --seed {seed}" + \
        (f" --market {market}" if market else "") + (f" --jitter {jitter:g}" if jitter != 0.2 else "")
    path = write(doc, out, command)
    producers = sum(p["kind"] in ("pv", "wind", "chp") for p in doc["peers"])
    typer.echo(f"{path}: {len(doc['peers'])} peers ({producers} producers) on {feeder}, {doc['market']['kind']} market")


def _load_public(path: str, **market_overrides):
    """A role's public scenario (exit 2 on a bad or full scenario file), with market overrides."""
    from common.public import load_public

    try:
        public = load_public(path)
    except ScenarioError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    changes = {k: v for k, v in market_overrides.items() if v is not None}
    if changes:
        public = public.model_copy(update={"market": public.market.model_copy(update=changes)})
    return public


def _positive(value):
    """Bounds of the scenario's market settings that typer cannot say (> 0)."""
    if value is not None and not value > 0:
        raise typer.BadParameter(f"{value:g} is not > 0")
    return value


class LogLevel(str, Enum):
    debug = "DEBUG"
    info = "INFO"
    warning = "WARNING"
    error = "ERROR"


def _log_level(value):
    """--log-level: for this process and every process it starts (P2PM_LOG_LEVEL)."""
    if value is not None:
        import os

        os.environ["P2PM_LOG_LEVEL"] = value.value
    return value


LogLevelOpt = Annotated[Optional[LogLevel], typer.Option(
    "--log-level", case_sensitive=False, callback=_log_level,
    help="Log level of the processes (default: the environment's P2PM_LOG_LEVEL, else INFO); DEBUG traces every "
         "message sent and received (type, iteration, size).")]
ScenarioArg = Annotated[str, typer.Argument(help="Built-in scenario name (see `p2pm scenarios`) or a YAML/TOML file.")]
RhoOpt = Annotated[Optional[float], typer.Option(help="Initial ADMM penalty rho, > 0 (overrides the scenario).",
                                                 callback=_positive)]
TolOpt = Annotated[Optional[float], typer.Option(help="ADMM stopping tolerance on primal and dual residuals, > 0.",
                                                 callback=_positive)]
MaxItOpt = Annotated[Optional[int], typer.Option("--max-iterations", help="ADMM iteration limit.", min=1)]
RbOpt = Annotated[Optional[bool], typer.Option("--residual-balancing/--no-residual-balancing",
                                                help="Adapt rho by residual balancing (Boyd et al. 3.4.1).")]
PoolOpt = Annotated[Optional[bool], typer.Option("--pool-price/--no-pool-price",
                                                 help="Full P2P market: start each clearing from scratch at the pool price "
                                                      "found by price rounds (overrides the scenario).")]
HourStopOpt = Annotated[Optional[bool], typer.Option("--hour-stopping/--no-hour-stopping",
                                                    help="Full P2P market: close each hour once its residuals are "
                                                         "below tolerance (overrides the scenario).")]
AccelOpt = Annotated[Optional[bool], typer.Option("--acceleration/--no-acceleration",
                                                  help="Anderson acceleration of the ADMM (full P2P market, relay and mesh; community market) "
                                                       "(overrides the scenario).")]


@app.command()
def run(
    ctx: typer.Context,
    scenario: ScenarioArg,
    solver: Annotated[Solver, typer.Option(help="admm: the distributed system of separate processes; centralized: the reference.")] = Solver.admm,
    model: Annotated[Optional[Model], typer.Option(help="Market model (overrides the scenario).")] = None,
    topology: Annotated[Topology, typer.Option(help="relay: trades go through the coordinator; mesh: peer to peer.")] = Topology.relay,
    out: Annotated[Optional[Path], typer.Option(help="Results folder (default results/<scenario>-<solver>-<time>).")] = None,
    rho: RhoOpt = None,
    tolerance: TolOpt = None,
    max_iterations: MaxItOpt = None,
    residual_balancing: RbOpt = None,
    pool_price: PoolOpt = None,
    acceleration: AccelOpt = None,
    hour_stopping: HourStopOpt = None,
    peers_per_process: Annotated[int, typer.Option(help="Peers hosted by one peer process.", min=1)] = 1,
    timeout_s: Annotated[float, typer.Option(help="Deadline for any single wait (registration, a round, a service answer).", min=0.1, max=86400.0)] = 30.0,
    quiet: Annotated[bool, typer.Option(help="No progress display.")] = False,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Render the figures and report.html (tables are always written).")] = True,
    log_level: LogLevelOpt = None,
    launch: Annotated[Launch, typer.Option(help="local: one OS process per role on this machine; podman: one container per "
                                                "role (peers grouped by --peers-per-process) on a podman network.")] = Launch.local,
    image: Annotated[Optional[str], typer.Option(help="--launch podman: the p2pm image to run (default: built from this "
                                                      "source tree, or reused when built already).", envvar="P2PM_IMAGE")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Without CURVE: no authentication and no encryption "
                                                              "between the roles (by default every role has a throwaway "
                                                              "key pair made for the run).")] = False,
    keys: Annotated[Optional[Path], typer.Option("--keys", help="The run's key folder from 'p2pm keys SCENARIO --out DIR' "
                                                                "(same --peers-per-process) instead of throwaway keys.")] = None,
    on_peer_loss: PeerLossOpt = PeerLoss.abort,
    heartbeat_s: HeartbeatOpt = 1.0,
    grace_s: GraceOpt = 60.0,
    checkpoint_s: CheckpointSOpt = 10.0,
    checkpoint_every: CheckpointEveryOpt = 0,
    resume: ResumeOpt = None,
):
    """Clear a market and write the results folder."""
    t0 = time.time()
    overrides = dict(model=model.value if model else None, rho=rho, tolerance=tolerance,
                     max_iterations=max_iterations, residual_balancing=residual_balancing,
                     pool_price_start=pool_price, acceleration=acceleration,
                     hour_stopping=hour_stopping)
    sc = _load(scenario, **overrides)
    if sc.market.kind == "community" and topology is Topology.mesh and solver is Solver.admm:
        _fail("--topology mesh: the community market runs in the relay topology (the network agent couples every peer)",
              EXIT_BAD_INPUT)
    if sc.market.staleness and topology is not Topology.mesh and solver is Solver.admm:
        _fail("market.staleness: the asynchronous ADMM runs in the mesh topology (--topology mesh)", EXIT_BAD_INPUT)
    if launch is Launch.podman and solver is Solver.centralized:
        _fail("--launch podman: the centralized reference runs in this process (use --solver admm)", EXIT_BAD_INPUT)
    if insecure and keys is not None:
        _fail("--keys and --insecure: give one of them", EXIT_BAD_INPUT)
    if keys is not None and not (keys / "roster.json").is_file():
        _fail(f"--keys: {keys}/roster.json does not exist (make the keys with 'p2pm keys {scenario} --out {keys}')",
              EXIT_BAD_INPUT)
    if solver is Solver.admm:
        _check_peer_loss(on_peer_loss, sc.market, topology.value)
    if resume is not None and (solver is Solver.centralized or launch is Launch.podman):
        _fail("--resume: a run resumes with --solver admm --launch local", EXIT_BAD_INPUT)
    out = out or Path("results") / f"{sc.name}-{solver.value}-{time.strftime('%Y%m%d-%H%M%S')}"
    _check_out(out)
    checkpoints = solver is Solver.admm and launch is Launch.local and (checkpoint_s > 0 or checkpoint_every > 0)
    if checkpoints or resume is not None:
        from common.public import split_scenario
        from coordinator.engine import resume_unsupported

        public = split_scenario(sc)[0]
        _resume_state(resume, public, topology.value)
        checkpoints = checkpoints and resume_unsupported(public.market, topology.value) is None
    if checkpoints:
        from common.checkpoint import write_command

        write_command(out, _command_argv(ctx, out=str(out)))
    from common.report import format_summary, write_results

    if solver is Solver.centralized:
        from common.centralized import SolveError
        from common.engine import RunFailed
        from common.public import split_scenario
        from p2pm.local import run_centralized

        try:
            result = run_centralized(sc)
        except SolveError as exc:
            _fail(f"centralized clearing of {sc.name}: {exc}", EXIT_FAILED)
        except RunFailed as exc:
            _fail(f"centralized clearing of {sc.name}: {exc}", EXIT_FAILED)
        from common.report import ResultsContractError

        try:
            write_results(result, out, split_scenario(sc)[0], figures=report)
        except ResultsContractError as exc:
            _fail(f"{exc} (tables written to {out})", EXIT_FAILED)
        # the summary's wall time covers writing the results too
        result.wall_s = time.time() - t0
        summary = write_results_summary_only(result, out)
    else:
        from p2pm.launcher import LaunchError, run_distributed

        try:
            if launch is Launch.podman:
                from p2pm.containers import run_podman

                summary = run_podman(sc, out, topology=topology.value, peers_per_process=peers_per_process,
                                     timeout_s=timeout_s, t0=t0, quiet=quiet, report=report, image=image,
                                     security=not insecure, keys=keys)
            else:
                summary = run_distributed(sc, out, topology=topology.value, peers_per_process=peers_per_process,
                                          timeout_s=timeout_s, t0=t0, quiet=quiet, report=report,
                                          security=not insecure, keys=keys, on_peer_loss=on_peer_loss.value,
                                          heartbeat_s=heartbeat_s, grace_s=grace_s,
                                          checkpoint_s=checkpoint_s if checkpoints else 0.0,
                                          checkpoint_every=checkpoint_every if checkpoints else 0, resume=resume)
        except LaunchError as exc:
            _fail(str(exc), EXIT_FAILED)
    typer.echo(format_summary(summary))
    typer.echo(f"results: {out}")
    if summary.get("outer_failure"):
        _fail(f"outer loop ({sc.market.model}) ended without a feasible grid: {summary['outer_failure']}; "
              f"the results of the last outer iteration are in {out}", EXIT_FAILED)
    if not summary.get("converged", False):
        _fail(f"ADMM did not converge within {summary.get('iterations')} iterations (primal residual "
              f"{summary.get('primal_residual'):.3g} MW, dual {summary.get('dual_residual'):.3g} EUR/MWh, tolerance "
              f"{sc.market.tolerance:g}); the results of the last iterate are in {out}", EXIT_FAILED)


KeysOpt = Annotated[Optional[Path], typer.Option(
    "--keys", envvar="P2PM_KEYS",
    help="This role's CURVE key folder (DIR/<role> from 'p2pm keys SCENARIO --out DIR': its secret key and the "
         "public roster). Required unless --insecure.")]
InsecureOpt = Annotated[bool, typer.Option(
    "--insecure", envvar="P2PM_INSECURE",
    help="Without CURVE: no authentication and no encryption; anyone who reaches the sockets can join or forge "
         "messages (experiments only).")]


def _identity(keys: Optional[Path], insecure: bool, role: Optional[str]):
    """A role's CURVE identity from --keys (None with --insecure); exit 2 naming the option otherwise."""
    from common.security import KeysError, load_identity

    if insecure:
        if keys is not None:
            _fail("--keys and --insecure: give one of them", EXIT_BAD_INPUT)
        return None
    if keys is None:
        _fail("--keys: a role started by hand authenticates with CURVE: give its key folder (p2pm keys SCENARIO --out "
              "DIR, then --keys DIR/<role>), or --insecure to run without authentication and encryption",
              EXIT_BAD_INPUT)
    try:
        me = load_identity(keys)
    except KeysError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    if role is not None and me.role != role:
        _fail(f"--keys: {keys} holds the key of {me.role!r}, not of the {role}", EXIT_BAD_INPUT)
    return me


@app.command()
def keys(scenario: ScenarioArg,
         out: Annotated[Path, typer.Option(help="Folder to write roster.json and one folder per role to.")],
         peers_per_process: Annotated[int, typer.Option(help="Peers hosted by one peer process (names the peer "
                                                             "hosts as the launcher does: h0000-<first peer>, ...).",
                                                        min=1)] = 1):
    """Make a CURVE key pair per role of a scenario's run: the coordinator, the DSO, the TSO and each
    peer host. OUT/roster.json is the public roster (every role's public key; anyone may read it);
    OUT/<role>/ holds the role's secret key (0600, folder 0700) and a copy of the roster: give each
    role only its own folder (p2pm coordinator|dso|tso|peer --keys OUT/<role>)."""
    from common.security import write_keys
    from p2pm.launcher import peer_hosts

    sc = _load(scenario)
    if out.exists() and not out.is_dir():
        _fail(f"--out: {out} exists and is not a folder", EXIT_BAD_INPUT)
    hosts = peer_hosts(sc, peers_per_process)
    try:
        write_keys(out, ["coordinator", "dso", "tso", *hosts], hosts, sc.name)
    except OSError as exc:
        _fail(f"--out: cannot write to {out}: {exc.strerror or exc}", EXIT_BAD_INPUT)
    first = next(iter(hosts))
    typer.echo(f"{out / 'roster.json'}: public keys of the coordinator, dso, tso and {len(hosts)} peer hosts\n"
               f"secret keys: {out}/<role>/<role>.key_secret (give each role only its own folder, e.g. "
               f"p2pm peer --keys {out / first} --model ... for peers {', '.join(hosts[first])})")


PublicOpt = Annotated[str, typer.Option(
    "--scenario", envvar="P2PM_SCENARIO",
    help="The public scenario file (public.json from 'p2pm scenarios split'); a full scenario is refused.")]


@app.command()
def coordinator(
    ctx: typer.Context,
    scenario: PublicOpt,
    bind: Annotated[str, typer.Option(help="Address to listen on (use tcp://0.0.0.0:PORT in containers).", envvar="P2PM_BIND")] = "tcp://127.0.0.1:5555",
    run_id: Annotated[Optional[str], typer.Option(help="Run id carried by every message (default: random).", envvar="P2PM_RUN_ID")] = None,
    topology: Annotated[Topology, typer.Option(help="relay: trades go through the coordinator; mesh: peer to peer.", envvar="P2PM_TOPOLOGY")] = Topology.relay,
    out: Annotated[Path, typer.Option(help="Results folder.", envvar="P2PM_OUT")] = Path("results/run"),
    timeout_s: Annotated[float, typer.Option(help="Deadline for any single wait.", min=0.1, max=86400.0, envvar="P2PM_TIMEOUT_S")] = 30.0,
    ready_file: Annotated[Optional[Path], typer.Option(help="Write the bound address here once listening.", hidden=True)] = None,
    t0: Annotated[Optional[float], typer.Option(help="Launch time (epoch s) for the run's wall time.", hidden=True)] = None,
    processes: Annotated[int, typer.Option(help="Processes of the run, for the summary (0: count the registered roles).", hidden=True)] = 0,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Render the figures and report.html.", envvar="P2PM_REPORT")] = True,
    model: Annotated[Optional[Model], typer.Option(help="Market model (overrides the scenario).")] = None,
    rho: RhoOpt = None,
    tolerance: TolOpt = None,
    max_iterations: MaxItOpt = None,
    residual_balancing: RbOpt = None,
    log_level: LogLevelOpt = None,
    keys: KeysOpt = None,
    insecure: InsecureOpt = False,
    on_peer_loss: PeerLossOpt = PeerLoss.abort,
    heartbeat_s: HeartbeatOpt = 1.0,
    grace_s: GraceOpt = 60.0,
    checkpoint_s: CheckpointSOpt = 10.0,
    checkpoint_every: CheckpointEveryOpt = 0,
    resume: ResumeOpt = None,
    record_command: Annotated[bool, typer.Option("--record-command/--no-record-command", hidden=True,
                                                 help="Record this command for 'p2pm resume' (the launcher records "
                                                      "its own).")] = True,
):
    """Start the coordinator: registration, ADMM rounds, DSO/TSO dialogs, results. It reads only the
    public scenario."""
    import uuid

    from coordinator.main import main as coordinator_main

    public = _load_public(scenario, model=model.value if model else None, rho=rho, tolerance=tolerance,
                          max_iterations=max_iterations, residual_balancing=residual_balancing)
    if public.market.kind == "community" and topology is Topology.mesh:
        _fail("--topology mesh: the community market runs in the relay topology", EXIT_BAD_INPUT)
    curve = _identity(keys, insecure, "coordinator")
    _check_peer_loss(on_peer_loss, public.market, topology.value)
    if public.market.staleness and topology is not Topology.mesh:
        _fail("market.staleness: the asynchronous ADMM runs in the mesh topology (--topology mesh)", EXIT_BAD_INPUT)
    state = _resume_state(resume, public, topology.value)
    from coordinator.engine import resume_unsupported

    if resume_unsupported(public.market, topology.value) is not None:
        checkpoint_s, checkpoint_every = 0.0, 0
    _check_out(out)
    if record_command and (checkpoint_s > 0 or checkpoint_every > 0):
        from common.checkpoint import write_command

        write_command(out, _command_argv(ctx))
    code = coordinator_main(public, bind, run_id or uuid.uuid4().hex[:12], topology.value, str(out), timeout_s,
                            t0 or time.time(), str(ready_file) if ready_file else None, processes, report, curve=curve,
                            heartbeat_s=heartbeat_s, on_peer_loss=on_peer_loss.value, grace_s=grace_s,
                            checkpoint_every=checkpoint_every, checkpoint_s=checkpoint_s, resume=state)
    raise typer.Exit(code)


@app.command()
def peer(
    coordinator: Annotated[str, typer.Option(help="Coordinator address, e.g. tcp://10.0.0.1:5555.", envvar="P2PM_COORDINATOR")],
    model_file: Annotated[list[Path], typer.Option("--model", help="A hosted peer's private file (peers/<id>.json from 'p2pm scenarios split'); repeat to host several.", envvar="P2PM_MODELS")],
    host_id: Annotated[Optional[str], typer.Option(help="This process's identity (default: host-<first peer>).", envvar="P2PM_HOST_ID")] = None,
    timeout_s: Annotated[float, typer.Option(help="The coordinator's deadline (a peer waits twice as long for a round).", min=0.1, max=86400.0, envvar="P2PM_TIMEOUT_S")] = 30.0,
    bind_host: Annotated[str, typer.Option(help="Interface for the mesh socket.", envvar="P2PM_BIND_HOST")] = "127.0.0.1",
    advertise_host: Annotated[Optional[str], typer.Option(help="Address the partners use to reach this peer (mesh).", envvar="P2PM_ADVERTISE_HOST")] = None,
    log_level: LogLevelOpt = None,
    keys: KeysOpt = None,
    insecure: InsecureOpt = False,
):
    """Start one peer process (hosting one or more peers) that connects to the coordinator. It reads
    only its own peers' private files."""
    from peer_node.main import load_models, main as peer_main

    try:
        models = load_models([str(f) for f in model_file])
    except (KeyError, ValueError, TypeError, OSError) as exc:
        _fail(f"peer: {exc}", EXIT_BAD_INPUT)
    curve = _identity(keys, insecure, None)
    if curve is not None and curve.role in ("coordinator", "dso", "tso"):
        _fail(f"--keys: {keys} holds the key of the {curve.role}, not of a peer host", EXIT_BAD_INPUT)
    if curve is not None and host_id is not None and host_id != curve.role:
        _fail(f"--host-id: {host_id!r}, but --keys {keys} holds the key of {curve.role!r} (the host id is the key's "
              "role; leave --host-id out)", EXIT_BAD_INPUT)
    hosted = curve.roster.hosts.get(curve.role) if curve is not None else None
    if hosted is not None and sorted(hosted) != sorted(m.id for m in models):
        _fail(f"--model: the roster gives host {curve.role!r} the peers {', '.join(hosted)}; the models are of "
              f"{', '.join(m.id for m in models)}", EXIT_BAD_INPUT)
    raise typer.Exit(peer_main(models, coordinator, host_id, timeout_s, bind_host, advertise_host, curve=curve))


CoordinatorAddr = Annotated[str, typer.Option(help="Coordinator address.", envvar="P2PM_COORDINATOR")]
ServiceTimeout = Annotated[float, typer.Option(help="How long to wait for the coordinator's welcome (the service "
                                                     "then stops, naming it).", min=0.1, max=86400.0, envvar="P2PM_TIMEOUT_S")]
IdleTimeout = Annotated[float, typer.Option(help="Longest wait for the next request.", min=1.0, max=604800.0)]


@app.command()
def dso(scenario: PublicOpt, coordinator: CoordinatorAddr, timeout_s: ServiceTimeout = 30.0,
        idle_timeout_s: IdleTimeout = 3600.0, log_level: LogLevelOpt = None, keys: KeysOpt = None,
        insecure: InsecureOpt = False):
    """Start the DSO service: AC power-flow validation of every dispatch (and the network agent of
    the community market). It reads only the public scenario."""
    from dso_service.main import main as dso_main

    public = _load_public(scenario)
    curve = _identity(keys, insecure, "dso")
    raise typer.Exit(dso_main(public, coordinator, timeout_s, idle_timeout_s, curve=curve))


@app.command()
def tso(scenario: PublicOpt, coordinator: CoordinatorAddr, timeout_s: ServiceTimeout = 30.0,
        idle_timeout_s: IdleTimeout = 3600.0, log_level: LogLevelOpt = None, keys: KeysOpt = None,
        insecure: InsecureOpt = False):
    """Start the TSO service: frequency-regulation requests (virtual load per hour). It reads only
    the public scenario."""
    from tso_service.main import main as tso_main

    public = _load_public(scenario)
    curve = _identity(keys, insecure, "tso")
    raise typer.Exit(tso_main(public, coordinator, timeout_s, idle_timeout_s, curve=curve))


@app.command()
def resume(
    results: Annotated[Path, typer.Argument(help="The results folder of an interrupted run (p2pm run, or p2pm "
                                                 "coordinator) that wrote a checkpoint.")],
):
    """Go on with an interrupted run from its last checkpoint: the same command again (same scenario,
    options and results folder), its coordinator starting from the checkpoint's iteration, trades and
    prices. A run started by 'p2pm run' starts its peers and services again; for a coordinator started
    by hand, start the other roles again as before (they stop soon after losing their coordinator)."""
    import subprocess

    from common.checkpoint import CheckpointError, read_command, read_state

    try:
        argv, cwd = read_command(results)
        state = read_state(results)
    except CheckpointError as exc:
        _fail(f"{results}: {exc}", EXIT_BAD_INPUT)
    typer.echo(f"resuming run {state.run_id} of {state.scenario} from iteration {state.iteration} "
               f"({len(state.peer_ids)} peers): p2pm {' '.join(argv)}", err=True)
    cmd = [sys.executable, "-m", "p2pm", *argv, "--resume", str(results.resolve())]
    child = subprocess.Popen(cmd, cwd=cwd)
    while True:
        try:
            raise typer.Exit(child.wait())
        except KeyboardInterrupt:  # the run (same process group) got the Ctrl-C too; it stops its processes
            continue


@app.command()
def bench(
    scenario: ScenarioArg,
    topology: Annotated[Topology, typer.Option(help="relay: trades go through the coordinator; mesh: peer to peer.")] = Topology.relay,
    peers_per_process: Annotated[int, typer.Option(help="Peers hosted by one peer process.", min=1)] = 1,
    out: Annotated[Optional[Path], typer.Option(help="Folder of the benchmark's distributed run.")] = None,
    timeout_s: Annotated[float, typer.Option(help="Deadline for any single wait (registration, a round, a service answer).", min=0.1, max=86400.0)] = 30.0,
    rho: RhoOpt = None,
    tolerance: TolOpt = None,
    max_iterations: MaxItOpt = None,
    residual_balancing: RbOpt = None,
    pool_price: PoolOpt = None,
    acceleration: AccelOpt = None,
    hour_stopping: HourStopOpt = None,
    security: Annotated[Security, typer.Option(help="curve: CURVE between the roles (the default of every run); none: "
                                                    "without (--insecure); compare: the cost of CURVE, runs alternating "
                                                    "without and with CURVE (--pairs of them).")] = Security.curve,
    pairs: Annotated[int, typer.Option(help="--security compare: pairs of runs (without, with CURVE).", min=1)] = 2,
):
    """Benchmark the distributed clearing: start-up, iterations, time per iteration and where it
    goes, peak memory per process, messages, and the comparison with the centralized solve."""
    import tempfile

    from common.centralized import SolveError, solve_p2p
    from common.models import peer_models
    from p2pm.compare import compare_community, compare_p2p, solve_community_reference

    overrides = dict(rho=rho, tolerance=tolerance, max_iterations=max_iterations, residual_balancing=residual_balancing,
                     pool_price_start=pool_price, acceleration=acceleration,
                     hour_stopping=hour_stopping)
    sc = _load(scenario, **overrides)
    graph = None
    if sc.market.kind == "p2p":
        from common.partners import scenario_graph

        graph = scenario_graph(sc)
        trading_pairs = graph.n_pairs // 2
        if trading_pairs > BENCH_MAX_PAIRS:
            _fail(f"{sc.name}: {trading_pairs:,} trading pairs; p2pm bench compares every trade with the centralized QP, which "
                  f"holds about 90 kB per pair (a 247 399-pair market passed 21 GB) and takes at most "
                  f"{BENCH_MAX_PAIRS:,} pairs. Run it with p2pm run, or measure it with p2pm experiment (welfare "
                  f"against the pool-market reference); or restrict the partners (market.partners)", EXIT_BAD_INPUT)
    out = out or Path(tempfile.mkdtemp(prefix="p2pm-bench-"))
    _check_out(out)
    if security is Security.compare:
        return _bench_security(sc, out, topology.value, peers_per_process, timeout_s, pairs)
    secure = security is Security.curve
    if sc.market.model != "benchmark":
        return _bench_outer(sc, out, topology.value, peers_per_process, timeout_s, secure)
    community = sc.market.kind == "community"
    t = time.perf_counter()
    try:
        ref = solve_community_reference(sc) if community else solve_p2p(peer_models(sc), graph=graph)
    except SolveError as exc:
        _fail(str(exc), EXIT_FAILED)
    central_s = time.perf_counter() - t
    s = _bench_run(sc, out, topology.value, peers_per_process, timeout_s, secure)
    cmp = compare_community(out, sc, ref) if community else compare_p2p(out, sc, ref)
    lines = [
        f"benchmark {sc.name}: {len(sc.peers)} peers, {sc.market.hours} h, topology {topology.value}, "
        f"{s['peer_processes']} peer processes ({s['processes']} processes in all), "
        f"{'CURVE' if secure else 'without CURVE (insecure)'}",
        *_bench_lines_common(s),
        f"  centralized solve ({'SOCP' if community else 'QP'}, cvxpy + Clarabel) {central_s:6.2f} s   -> distributed wall / centralized = "
        f"{s['wall_s'] / central_s:.1f}",
        f"  agreement: dispatch max |diff| {cmp['dispatch_max_abs_diff_mw']:.2e} MW, social welfare rel. diff "
        f"{cmp['social_welfare_rel_diff']:.2e}",
        (f"  prices: bus prices max |diff| {cmp['bus_price_max_abs_diff_eur_per_mwh']:.4f} EUR/MWh" if community else
         f"  prices: {cmp['prices_within_0.01_of_dual']}/{cmp['traded_pairs_checked']} traded pairs within 0.01 EUR/MWh "
         f"of the centralized dual; " + (
             f"{cmp['prices_within_interval']}/{cmp['traded_pairs_checked']} within the interval of supporting prices "
             f"(hours with a non-unique dual: {cmp['hours_with_price_interval'] or 'none'})"
             if cmp["prices_within_interval"] is not None else
             "no uniform price to compare with (fees or restricted partners: the pairs' prices differ)")),
    ]
    _bench_print(out, lines, s, cmp, central_s)


def _bench_run(sc, out: Path, topology: str, peers_per_process: int, timeout_s: float, secure: bool = True) -> dict:
    """The benchmark's distributed run (real processes); its summary."""
    from p2pm.launcher import LaunchError, run_distributed

    try:
        return run_distributed(sc, out, topology=topology, peers_per_process=peers_per_process, timeout_s=timeout_s,
                               t0=time.time(), quiet=True, security=secure)
    except LaunchError as exc:
        _fail(str(exc), EXIT_FAILED)


def _bench_security(sc, out: Path, topology: str, peers_per_process: int, timeout_s: float, pairs: int) -> None:
    """The cost of CURVE: ``pairs`` pairs of runs alternating without and with CURVE on the same
    machine in one go, in the order without-with, with-without, ... (a drift of the machine's load
    over the runs weighs on both alike); time per iteration and start-up of each, the ratio of
    their medians and the ratio within each pair."""
    import json
    import statistics

    runs = []
    for i in range(pairs):
        for secure in ((False, True) if i % 2 == 0 else (True, False)):
            folder = out / f"{i:02d}-{'curve' if secure else 'plain'}"
            s = _bench_run(sc, folder, topology, peers_per_process, timeout_s, secure)
            runs.append({"pair": i, "curve": secure, "iterations": s["iterations"], "converged": s["converged"],
                         "time_per_iteration_ms": s["time_per_iteration_ms"], "startup_s": s["startup_s"],
                         "wall_s": s["wall_s"], "social_welfare_eur": s["social_welfare_eur"],
                         "messaging_ms_per_iteration": s["messaging_ms_per_iteration"], "out": str(folder),
                         "cpu_s_coordinator": s.get("cpu_s_coordinator", float("nan")),
                         "cpu_s_total": s.get("cpu_s_total", float("nan"))})
            typer.echo(f"  run {len(runs)}: {'CURVE  ' if secure else 'without'}  {s['iterations']:6d} iterations  "
                       f"{s['time_per_iteration_ms']:8.2f} ms per iteration  start-up {s['startup_s']:6.2f} s  "
                       f"CPU coordinator {runs[-1]['cpu_s_coordinator']:6.2f} s, all {runs[-1]['cpu_s_total']:7.2f} s  "
                       f"welfare {s['social_welfare_eur']:.6f} EUR", err=True)

    def median(key: str, secure: bool) -> float:
        return statistics.median(r[key] for r in runs if r["curve"] is secure)

    tpi = {c: median("time_per_iteration_ms", c) for c in (False, True)}
    up = {c: median("startup_s", c) for c in (False, True)}
    cpu_coord = {c: median("cpu_s_coordinator", c) for c in (False, True)}
    cpu_all = {c: median("cpu_s_total", c) for c in (False, True)}
    pair_ratios = []
    for a, b in zip(runs[::2], runs[1::2]):
        off, on = (a, b) if b["curve"] else (b, a)
        pair_ratios.append(on["time_per_iteration_ms"] / off["time_per_iteration_ms"])
    result = {"scenario": sc.name, "topology": topology, "peers_per_process": peers_per_process, "pairs": pairs,
              "runs": runs, "time_per_iteration_ms": {"plain": tpi[False], "curve": tpi[True]},
              "time_per_iteration_ratio": tpi[True] / tpi[False], "pair_ratios": pair_ratios,
              "startup_s": {"plain": up[False], "curve": up[True]}, "startup_ratio": up[True] / up[False],
              "cpu_s_coordinator": {"plain": cpu_coord[False], "curve": cpu_coord[True]},
              "cpu_s_total": {"plain": cpu_all[False], "curve": cpu_all[True]},
              "same_results": len({(r["iterations"], round(r["social_welfare_eur"], 6)) for r in runs}) == 1}
    typer.echo("\n".join([
        f"cost of CURVE on {sc.name}: topology {topology}, {len(sc.peers)} peers, {pairs} pairs of runs alternating "
        f"without / with CURVE (ABBA order)",
        f"  time per iteration (median)   without {tpi[False]:8.2f} ms   with {tpi[True]:8.2f} ms   ratio "
        f"{result['time_per_iteration_ratio']:.3f}   (per pair: {', '.join(f'{r:.3f}' for r in pair_ratios)})",
        f"  start-up (median)             without {up[False]:8.2f} s    with {up[True]:8.2f} s    ratio "
        f"{result['startup_ratio']:.3f}",
        f"  CPU, coordinator (median)     without {cpu_coord[False]:8.2f} s    with {cpu_coord[True]:8.2f} s    ratio "
        f"{cpu_coord[True] / cpu_coord[False]:.3f}",
        f"  CPU, all processes (median)   without {cpu_all[False]:8.2f} s    with {cpu_all[True]:8.2f} s    ratio "
        f"{cpu_all[True] / cpu_all[False]:.3f}",
        f"  same iterations and welfare in every run: {result['same_results']}",
        f"  results: {out}"]))
    (out / "bench-security.json").write_text(json.dumps(result, indent=2))


def _bench_print(out: Path, lines: list[str], s: dict, cmp: dict, central_s: float) -> None:
    """Print the benchmark's lines (and where the results are) and write ``bench.json``."""
    import json

    typer.echo("\n".join([*lines, f"  results: {out}"]))
    (out / "bench.json").write_text(json.dumps({"summary": s, "comparison": cmp, "centralized_s": central_s}, indent=2))


@app.command()
def experiment(
    file: Annotated[str, typer.Argument(help="Experiment file (YAML) or a built-in experiment: scaling, latency, smoke.")],
    out: Annotated[Optional[Path], typer.Option(help="Results folder (default results/experiment-<name>); an existing "
                                                     "one is resumed: finished cells are skipped.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Render the figures and report.html.")] = True,
    dry_run: Annotated[bool, typer.Option(help="Validate the file and list the cells; run nothing.")] = False,
):
    """Run a communication-overhead experiment: a grid of scenario sizes, topologies, variants, peers per
    process and network settings (latency, jitter, bandwidth), with repetitions; one table, one folder per
    cell, an HTML report with figures."""
    from p2pm.experiment import ExperimentError, cells, load_experiment, run_experiment

    try:
        exp = load_experiment(file)
    except ExperimentError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    grid = cells(exp)
    if dry_run:
        for c in grid:
            typer.echo(f"{c.id}" + (f"  (skipped: {c.skip})" if c.skip else ""))
        typer.echo(f"{len(grid)} cells x {exp.repetitions} repetitions, driver {exp.driver}")
        return
    out = out or Path("results") / f"experiment-{exp.name}"
    rows, counts = run_experiment(exp, out, quiet=quiet, report=report)
    typer.echo(f"{counts['cells']} cell repetitions: {counts['ran']} run, {counts['resumed']} already done, "
               f"{counts['skipped']} skipped, {counts['failed']} failed")
    typer.echo(f"results: {out / 'results.csv'}" + (f", {out / 'report.html'}" if report else ""))
    if counts["failed"]:
        raise typer.Exit(EXIT_FAILED)


def _check_out(out: Path) -> None:
    """Refuse a results folder that cannot be written before any process starts (exit 2)."""
    if out.exists() and not out.is_dir():
        _fail(f"--out: {out} exists and is not a folder", EXIT_BAD_INPUT)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".p2pm-write-check"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        _fail(f"--out: cannot write to {out}: {exc.strerror or exc}", EXIT_BAD_INPUT)


def _bench_lines_common(s: dict) -> list[str]:
    it = max(s["iterations"], 1)
    return [
        f"  start-up (launch to all peers ready)   {s['startup_s']:8.2f} s",
        f"  rounds (price rounds + ADMM iterations) {s.get('rounds', s['iterations']):7d}   = {s.get('price_rounds', 0)} + "
        f"{s['iterations']}   converged: {s['converged']}",
        f"  wall time (launch to results written)  {s['wall_s']:8.2f} s   ADMM loop {s['admm_s']:.2f} s",
        f"  time per iteration                     {s['time_per_iteration_ms']:8.2f} ms",
        f"    local solves (slowest process)       {s['local_solve_ms_per_iteration']:8.3f} ms   "
        f"(all peers' CPU {s['local_solve_cpu_ms_per_iteration']:.3f} ms)",
        *([f"    network agent (DSO, SOCP)            {s['network_agent_ms_per_iteration']:8.3f} ms"]
          if s.get("network_agent_ms_per_iteration") else []),
        f"    coordinator (residuals, rho)         {s['coordinator_ms_per_iteration']:8.3f} ms",
        f"    messages, price updates and waiting  {s['messaging_ms_per_iteration']:8.3f} ms",
        f"  AC validation (DSO service)            {s['dso_s']:8.2f} s",
        f"  messages {s['messages']:,} ({s['messages'] / it:.1f} per iteration), bytes {s['bytes']:,} "
        f"({s['bytes'] / it / 1024:.1f} KiB per iteration)",
        f"  peak memory per peer process           max {s.get('peak_rss_mib_peer_max', float('nan')):.1f} MiB, "
        f"median {s.get('peak_rss_mib_peer_median', float('nan')):.1f} MiB",
        f"  peak memory coordinator / dso / tso    {s.get('peak_rss_mib_coordinator', float('nan')):.1f} / "
        f"{s.get('peak_rss_mib_dso', float('nan')):.1f} / {s.get('peak_rss_mib_tso', float('nan')):.1f} MiB",
    ]


def _bench_outer(sc, out: Path, topology: str, peers_per_process: int, timeout_s: float, secure: bool = True) -> None:
    """``p2pm bench`` of an outer-loop scenario: the distributed outer loop against the centralized
    one (same outer steps, violations, final dispatch and welfare) and the cost of its re-clears."""
    from p2pm.compare import compare_outer
    from p2pm.local import run_centralized

    t = time.perf_counter()
    ref = run_centralized(sc)
    central_s = time.perf_counter() - t
    s = _bench_run(sc, out, topology, peers_per_process, timeout_s, secure)
    cmp = compare_outer(out, ref)
    clearings = max(cmp["outer_iterations"], 1)
    lines = [
        f"benchmark {sc.name} (model {sc.market.model}): {len(sc.peers)} peers, {sc.market.hours} h, topology {topology}, "
        f"{s['peer_processes']} peer processes ({s['processes']} processes in all)",
        *_bench_lines_common(s),
        f"  outer iterations                       {cmp['outer_iterations']:8d}   (centralized loop: "
        f"{cmp['outer_iterations_ref']}; same steps: {cmp['same_outer_steps']}, same violations: {cmp['same_violations']})",
        f"  ADMM iterations: first clearing {cmp['first_clearing_iterations']}, re-clears median "
        f"{cmp['reclear_iterations_median']:.0f}, max {cmp['reclear_iterations_max']}",
        f"  bytes per clearing                     {s['bytes'] / clearings / 1e6:8.2f} MB",
        f"  centralized outer loop (in process)    {central_s:8.2f} s   -> distributed wall / centralized = "
        f"{s['wall_s'] / central_s:.1f}",
        f"  agreement: final dispatch max |diff| {cmp['dispatch_max_abs_diff_mw']:.2e} MW, social welfare rel. diff "
        f"{cmp['social_welfare_rel_diff']:.2e}; violations {s['violations']} (initial {s['violations_initial']})",
    ]
    _bench_print(out, lines, s, cmp, central_s)


@app.command()
def compare(
    run_a: Annotated[Path, typer.Argument(help="Results folder A (e.g. the centralized reference).")],
    run_b: Annotated[Path, typer.Argument(help="Results folder B (e.g. the distributed run); differences are B - A.")],
    out: Annotated[Optional[Path], typer.Option(help="Folder for compare.json and the compare_*.csv tables "
                                                     "(default: RUN_B/compare-with-<name of RUN_A>).")] = None,
):
    """Side by side of two results folders: welfare, energy, grid figures, iterations, dispatch per
    peer and hour, prices and messages per type. Prints it and writes it as JSON and CSV."""
    from p2pm.compare import CompareError, compare_runs, format_comparison, write_comparison

    try:
        cmp = compare_runs(run_a, run_b)
    except CompareError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    out = out or Path(run_b) / f"compare-with-{Path(run_a).resolve().name}"
    write_comparison(cmp, out)
    typer.echo(format_comparison(cmp))
    typer.echo(f"comparison: {out}")


schema_app = typer.Typer(no_args_is_help=True, help="The contracts of the results folder: JSON Schema of summary.json, "
                                                    "the CSV tables' columns and checks.")
app.add_typer(schema_app, name="schema")


@schema_app.command("summary")
def schema_summary(
    check: Annotated[Optional[list[Path]], typer.Option(
        "--check", help="A results folder to check (summary.json against the schema, every known CSV table against "
                        "its contract) instead of printing the schema; repeat for several.")] = None,
):
    """Print the JSON Schema of summary.json (schema p2pm.run/1), or check results folders against
    the contracts (exit 1 when one breaks them, naming each broken field and table)."""
    import json

    from common.report import check_results, summary_json_schema

    if not check:
        typer.echo(json.dumps(summary_json_schema(), indent=2))
        return
    broken = 0
    for folder in check:
        failures = check_results(folder)
        if failures:
            broken += 1
            typer.echo(f"{folder}: breaks the contract:\n  " + "\n  ".join(failures))
        else:
            typer.echo(f"{folder}: ok")
    if broken:
        raise typer.Exit(EXIT_FAILED)


@schema_app.command("tables")
def schema_tables():
    """List the CSV tables of a results folder with their checked columns (pandera contracts)."""
    from common.report.tables import table_schemas

    for name, schema in table_schemas().items():
        cols = []
        for col, c in schema.columns.items():
            checks = ", ".join(str(k.error or k.name) for k in c.checks)
            cols.append(f"{col} ({c.dtype}{', ' + checks if checks else ''}{', nullable' if c.nullable else ''})")
        unique = f"; unique: {', '.join(schema.unique)}" if schema.unique else ""
        typer.echo(f"{name}.csv: " + "; ".join(cols) + unique)


def write_results_summary_only(result, out: Path) -> dict:
    import json

    from common.report import build_summary

    summary = build_summary(result)
    (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    return summary


from p2pm.deploy import deploy_app  # noqa: E402

app.add_typer(deploy_app, name="deploy")

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
