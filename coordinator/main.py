"""The coordinator process: the coordinator engine in the socket shell, then the results folder.
Built from the public scenario only. Progress goes to stdout as JSON lines (read by the launcher);
the log goes to stderr."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

from common.checkpoint import folder as checkpoint_folder
from common.checkpoint import write_state
from common.engine import Note
from common.logs import role_logger, setup_logging
from common.shell import Shell, ShellFailure
from coordinator.engine import CoordinatorEngine, RunOutcome

log = role_logger("coordinator")


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def write_run(outcome: RunOutcome, engine: CoordinatorEngine, out_dir: Path, traffic: list, *, t0: float,
              processes: int = 0, rejected: int = 0, report: bool = True, rejected_by_role: dict | None = None) -> dict:
    """Build the results of a finished run and write its folder; returns the summary."""
    from common.report import build_summary, write_results
    from coordinator.results import build_result

    result = build_result(outcome, engine, traffic, processes=processes, rejected=rejected,
                          rejected_by_role=rejected_by_role)
    result.wall_s = time.time() - t0
    t = time.perf_counter()
    write_results(result, out_dir, engine.public, figures=report)
    log.info(f"results written to {out_dir} in {time.perf_counter() - t:.2f} s"
             + (" (tables, figures and report)" if report else " (tables)"))
    result.wall_s = time.time() - t0
    summary = build_summary(result)
    (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    return summary


def _preload_results(figures: bool) -> None:
    from common.report import preload

    preload(figures)


def rejected_by_role(shell: Shell, engine: CoordinatorEngine) -> dict[str, dict[str, int]]:
    """Every role's refused messages by reason: the coordinator's own (codec and engine), the
    services' and the peer hosts' (summed) as their last heartbeats reported them."""
    out = {"coordinator": dict(shell.transport.rejected + engine.rejected), **{svc: {} for svc in engine.services},
           "peers": {}}
    for role, counts in engine.role_rejected.items():
        key = role if role in ("dso", "tso") else "peers"
        merged = out.setdefault(key, {})
        for reason, n in counts.items():
            merged[reason] = merged.get(reason, 0) + int(n)
    return {role: {k: int(v) for k, v in counts.items() if v} for role, counts in out.items()}


def main(public, bind: str, run_id: str, topology: str, out_dir: str, timeout_s: float, t0: float,
         ready_file: str | None, processes: int = 0, report: bool = True, curve=None, heartbeat_s: float = 1.0,
         on_peer_loss: str = "abort", grace_s: float = 60.0, checkpoint_every: int = 0, checkpoint_s: float = 0.0,
         resume=None) -> int:
    """``checkpoint_every``/``checkpoint_s``: write ``out_dir/checkpoint/state.npz`` every so many
    iterations/seconds (0: never); ``resume``: the checkpoint (``common.checkpoint.ClearingState``)
    to go on from."""
    setup_logging("coordinator")
    engine = CoordinatorEngine(public, topology=topology, timeout_s=timeout_s, heartbeat_s=heartbeat_s,
                               on_peer_loss=on_peer_loss, grace_s=grace_s, checkpoint_every=checkpoint_every,
                               checkpoint_s=checkpoint_s, resume=resume)
    engine.run_id = run_id

    def note(n: Note) -> None:
        fields = dict(n.fields)
        if n.event == "ready":
            fields["startup_s"] = time.time() - t0
        emit(n.event, **fields)

    def checkpoint(state) -> None:
        t = time.perf_counter()
        path = write_state(out_dir, state)
        log.info(f"checkpoint: iteration {state.iteration} written to {path} in {1e3 * (time.perf_counter() - t):.1f} ms")

    shell = Shell(engine, bind=bind, run_id=run_id, timeout_s=timeout_s, t0=t0, notes=note, curve=curve,
                  heartbeat_s=heartbeat_s, checkpoint=checkpoint)
    log.info(f"listening on {shell.address}, run {run_id}"
             + (f", CURVE: {len(curve.roster.keys)} roles in the roster" if curve else ", without CURVE (insecure)"))
    if ready_file:
        Path(ready_file).write_text(shell.address)
    # the results libraries (pandera, matplotlib, Jinja2) load while the peers start
    threading.Thread(target=_preload_results, args=(report,), name="results-preload", daemon=True).start()
    try:
        outcome = shell.run()
        traffic = shell.transport.traffic_rows() + list(engine.extra_traffic)
        by_role = rejected_by_role(shell, engine)
        from common.report import ResultsContractError

        try:
            summary = write_run(outcome, engine, Path(out_dir), traffic, t0=t0, processes=processes,
                                report=report, rejected_by_role=by_role)
        except ResultsContractError as exc:
            reason = f"{exc} (tables written to {out_dir})"
            log.error(f"run failed: {reason}")
            emit("failed", reason=reason, role="coordinator")
            return 1
        shutil.rmtree(checkpoint_folder(out_dir), ignore_errors=True)  # the run ended: nothing to resume
        emit("done", out=str(out_dir), converged=summary["converged"], iterations=summary["iterations"])
        if summary.get("outer_failure"):
            reason = (f"outer loop ({public.market.model}) ended without a feasible grid: {summary['outer_failure']} "
                      f"(results written to {out_dir})")
            log.error(f"run failed: {reason}")
            emit("failed", reason=reason)
            return 1
        return 0
    except ShellFailure as exc:
        log.error(f"run failed: {exc}")
        if not engine.shutdown_sent:  # a failure of the shell itself: everyone still connected is told
            from common.protocol.control import Shutdown

            for to in [*engine.hosts, *engine.services]:
                shell.send_now(to, Shutdown(reason=f"run failed: {exc}"))
        emit("failed", reason=str(exc), role=exc.role)
        return 1
    finally:
        if shell.transport.rejected or engine.rejected:
            log.warning(f"rejected messages: {dict(shell.transport.rejected + engine.rejected)}")
        shell.close()
