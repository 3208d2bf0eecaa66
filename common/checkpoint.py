"""The coordinator's checkpoint: the state a clearing goes on from, written atomically.

A checkpoint is ``RESULTS_DIR/checkpoint/state.npz``: the iteration the next ROUND starts, rho,
every pair's trade and price at that point (what the relay coordinator holds anyway: no costs,
no private data), the residual history, the price rounds already spent, and who the market is
(scenario name, peer ids, hours, pairs) so that a checkpoint is never applied to another market.
``command.json`` beside it records the command that started the run, for ``p2pm resume``.

Written to a temporary file in the same folder, flushed to disk, then renamed over the previous
one: a reader sees the old checkpoint or the new one, never half of one. Read without pickle.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT = 1
FOLDER = "checkpoint"
STATE = "state.npz"
COMMAND = "command.json"
# the history's columns: coordinator.clearing.IterationStats, in this order
HISTORY_FIELDS = ("iteration", "primal_residual", "dual_residual", "rho", "solve_s_max", "solve_s_sum",
                  "coordinator_s", "wall_s", "network_s", "open_hours")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or of another market; ``field`` names what."""

    def __init__(self, field_name: str, reason: str):
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name


@dataclass
class ClearingState:
    """Where a P2P clearing stands at the start of iteration ``iteration`` (relay topology)."""

    run_id: str
    scenario: str
    topology: str
    peer_ids: list[str]
    hours: int
    iteration: int
    rho: float
    trades_mw: np.ndarray  # (pairs, hours): each peer's own trades the next ROUND starts from
    prices_eur_per_mwh: np.ndarray  # (pairs, hours): each pair's price after the last update
    history: np.ndarray = field(default_factory=lambda: np.zeros((0, len(HISTORY_FIELDS))))  # (iterations, fields)
    price_rounds: int = 0
    written_s: float = 0.0  # seconds since the run's launch

    def meta(self) -> dict:
        return {"format": FORMAT, "run_id": self.run_id, "scenario": self.scenario, "topology": self.topology,
                "peer_ids": list(self.peer_ids), "hours": int(self.hours), "iteration": int(self.iteration),
                "rho": float(self.rho), "price_rounds": int(self.price_rounds), "written_s": float(self.written_s)}


def folder(results_dir: Path | str) -> Path:
    return Path(results_dir) / FOLDER


def write_state(results_dir: Path | str, state: ClearingState) -> Path:
    """Write ``state`` atomically as the run's checkpoint; returns its path."""
    target_dir = folder(results_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / STATE
    fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".npz", dir=target_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(state.meta())), trades_mw=state.trades_mw,
                     prices_eur_per_mwh=state.prices_eur_per_mwh, history=state.history)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read_state(results_dir: Path | str) -> ClearingState:
    """The checkpoint of ``results_dir``; CheckpointError naming what is wrong."""
    path = folder(results_dir) / STATE
    if not path.is_file():
        raise CheckpointError("checkpoint", f"{path} does not exist (the run wrote none: it ended, or it was stopped "
                                            f"before its first checkpoint)")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            trades, prices, history = (np.array(data[k], dtype=float) for k in
                                       ("trades_mw", "prices_eur_per_mwh", "history"))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError("checkpoint", f"{path} cannot be read: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError("checkpoint.format", f"{meta.get('format')!r}, this version reads {FORMAT}")
    try:
        state = ClearingState(run_id=str(meta["run_id"]), scenario=str(meta["scenario"]),
                              topology=str(meta["topology"]), peer_ids=[str(p) for p in meta["peer_ids"]],
                              hours=int(meta["hours"]), iteration=int(meta["iteration"]), rho=float(meta["rho"]),
                              trades_mw=trades, prices_eur_per_mwh=prices, history=history,
                              price_rounds=int(meta.get("price_rounds", 0)), written_s=float(meta.get("written_s", 0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError("checkpoint", f"{path}: incomplete ({exc})") from exc
    if trades.ndim != 2 or trades.shape != prices.shape or trades.shape[1] != state.hours:
        raise CheckpointError("checkpoint.trades_mw", f"shape {trades.shape} / prices {prices.shape}, "
                                                      f"expected (pairs, {state.hours})")
    if history.ndim != 2 or history.shape[1] != len(HISTORY_FIELDS):
        raise CheckpointError("checkpoint.history", f"shape {history.shape}")
    if not (np.isfinite(trades).all() and np.isfinite(prices).all()) or state.rho <= 0 or state.iteration < 0:
        raise CheckpointError("checkpoint", "non-finite trades or prices, or a bad rho or iteration")
    return state


def check_matches(state: ClearingState, *, scenario: str, topology: str, peer_ids: list[str], hours: int,
                  pairs: int) -> None:
    """CheckpointError unless ``state`` belongs to this market (the same peers, hours and pairs)."""
    if state.scenario != scenario:
        raise CheckpointError("checkpoint.scenario", f"{state.scenario!r}, the run's scenario is {scenario!r}")
    if state.topology != topology:
        raise CheckpointError("checkpoint.topology", f"{state.topology!r}, the run's topology is {topology!r}")
    if list(state.peer_ids) != list(peer_ids):
        missing = sorted(set(peer_ids) ^ set(state.peer_ids))
        raise CheckpointError("checkpoint.peer_ids", f"not the scenario's peers (differ in {', '.join(missing[:5]) or 'order'})")
    if state.hours != hours:
        raise CheckpointError("checkpoint.hours", f"{state.hours}, the scenario has {hours}")
    if state.trades_mw.shape[0] != pairs:
        raise CheckpointError("checkpoint.trades_mw", f"{state.trades_mw.shape[0]} pairs, the market has {pairs}")


def write_command(results_dir: Path | str, argv: list[str], cwd: str | None = None) -> Path:
    """Record the command that started the run (``p2pm resume`` runs it again with ``--resume``)."""
    target_dir = folder(results_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    path = target_dir / COMMAND
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"argv": list(argv), "cwd": cwd or os.getcwd()}, indent=2))
    os.replace(tmp, path)
    return path


def read_command(results_dir: Path | str) -> tuple[list[str], str]:
    path = folder(results_dir) / COMMAND
    if not path.is_file():
        raise CheckpointError("checkpoint", f"{path} does not exist: {results_dir} is not the folder of a run "
                                            f"that checkpoints (p2pm run or p2pm coordinator)")
    try:
        data = json.loads(path.read_text())
        argv, cwd = [str(a) for a in data["argv"]], str(data["cwd"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError("checkpoint.command", f"{path} cannot be read: {exc}") from exc
    if not argv or argv[0] not in ("run", "coordinator"):
        raise CheckpointError("checkpoint.command", f"{path}: not a p2pm run or coordinator command")
    return argv, cwd
