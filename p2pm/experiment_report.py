"""The HTML report of an experiment (``<out>/report.html`` and ``<out>/figures/*.png``):

- ``scaling.png``: messages, bytes, iterations and wall time against peers (log-log), one line per
  topology and variant (repetitions averaged), converged points filled, others hollow;
- ``per_iteration.png``: messages, bytes and time per ADMM iteration against peers (log-log), which
  compare runs capped at different iteration counts;
- ``residuals_vs_bytes.png``: primal residual of every iteration against the cumulative bytes sent
  up to it (repetition 0 of each cell);
- ``traffic_by_role.png``: the share of each cell's bytes per link (total on top), split by link (coordinator -> peers, peers -> coordinator,
  peer <-> peer, DSO, TSO, control);
- ``latency.png``: time to converge against the injected latency (sync vs async: wall time with
  real processes, the simulated network clock in process), ADMM iterations, and the welfare error
  against the centralized solve, one line per size, topology and variant (the asynchronous variant
  dashed; hollow markers: not converged; only when the grid has more than one latency).
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from p2pm.experiment import LINK_GROUPS



def _save(fig, path: Path) -> bool:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

def _series_label(r) -> str:
    return f"{r['topology']} / {r['variant']}"


def _scaling(df: pd.DataFrame, path: Path) -> bool:
    ok = df[df["status"] == "ok"]
    if ok.empty or ok["peers"].nunique() < 1:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    wall = "wall_s" if ok["driver"].iloc[0] == "processes" else "wall_s"
    for ax, col, title in zip(axes.flat, ["messages", "bytes", "iterations", wall],
                              ["messages per clearing", "bytes per clearing", "ADMM iterations",
                               "wall time [s] (launch to results)"]):
        for key, g in ok.groupby(["topology", "variant", "network"]):
            m = g.groupby("peers").agg(y=(col, "mean"), conv=("converged", "all")).reset_index()
            line, = ax.plot(m["peers"], m["y"].clip(lower=1e-3), "-", label=" / ".join(map(str, key)))
            for conv in (True, False):
                sel = m[m["conv"] == conv]
                ax.plot(sel["peers"], sel["y"].clip(lower=1e-3), "o", color=line.get_color(),
                        mfc=line.get_color() if conv else "none")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("peers")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("scaling (filled: converged; hollow: not)")
    return _save(fig, path)


def _per_iteration(df: pd.DataFrame, path: Path) -> bool:
    """Messages, bytes and time per ADMM iteration against peers: comparable across runs capped at
    different iteration counts."""
    ok = df[df["status"] == "ok"]
    if ok.empty:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
    for ax, col, title in zip(axes, ["messages_per_iteration", "bytes_per_iteration", "time_per_iteration_ms"],
                              ["messages per iteration", "bytes per iteration",
                               "time per iteration [ms] (ADMM loop / iterations)"]):
        for key, g in ok.groupby(["topology", "variant", "network"]):
            m = g.groupby("peers")[col].mean().reset_index()
            ax.plot(m["peers"], m[col].clip(lower=1e-3), "o-", label=" / ".join(map(str, key)))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("peers")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def _residuals(out: Path, df: pd.DataFrame, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[(df["status"] == "ok") & (df["rep"] == 0)]
    if ok.empty:
        return False
    fig, ax = plt.subplots(figsize=(9, 5.5))
    drawn = 0
    for _, r in ok.iterrows():
        folder = out / "cells" / r["cell"] / "rep0"
        try:
            hist = pd.read_csv(folder / "admm_history.csv")
            msgs = pd.read_csv(folder / "messages.csv")
        except (OSError, pd.errors.EmptyDataError):
            continue
        per_it = msgs.groupby("iteration")["bytes"].sum().sort_index().cumsum()
        hist = hist[hist["outer"] == hist["outer"].min()] if "outer" in hist else hist
        x = per_it.reindex(hist["iteration"], method="ffill").to_numpy()
        ax.plot(x, hist["primal_residual"].to_numpy(), "o-" if len(hist) <= 3 else "-", label=f"{r['peers']} peers, {r['topology']}, {r['variant']}, "
                                                               f"{r['network']}")
        drawn += 1
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cumulative bytes sent (every message of the run up to the iteration)")
    ax.set_ylabel("primal residual [MW]")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def _traffic(df: pd.DataFrame, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[(df["status"] == "ok") & (df["rep"] == 0)]
    cols = [f"bytes_{k}" for k in LINK_GROUPS if f"bytes_{k}" in ok]
    if ok.empty or not cols:
        return False
    ok = ok.sort_values(["peers", "topology", "variant"])
    labels = [f"{r['peers']} {r['topology'][:5]} {r['variant']} {r['network']}" for _, r in ok.iterrows()]
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(ok) + 3), 5.5))
    values = ok[cols].fillna(0).to_numpy(dtype=float)
    total = values.sum(axis=1)
    share = 100 * values / np.maximum(total, 1)[:, None]
    bottom = np.zeros(len(ok))
    for j, c in enumerate(cols):
        if values[:, j].sum() == 0:
            continue
        ax.bar(range(len(ok)), share[:, j], bottom=bottom, label=c.removeprefix("bytes_"))
        bottom += share[:, j]
    for i, t in enumerate(total):
        ax.text(i, 101, f"{t / 2**20:.3g}", ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks(range(len(ok)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("share of the bytes [%] (total MiB on top)")
    ax.set_ylim(0, 118)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("traffic by link (sender -> receiver)")
    return _save(fig, path)


def _latency(df: pd.DataFrame, path: Path) -> bool:
    ok = df[df["status"] == "ok"]
    if ok.empty or ok["latency_ms"].nunique() < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inproc = ok["driver"].iloc[0] == "in-process"
    y = "sim_time_s" if inproc else "wall_s"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for key, g in ok.groupby(["peers", "topology", "variant"]):
        m = g.groupby("latency_ms").agg(y=(y, "mean"), it=("iterations", "mean"), conv=("converged", "all"),
                                        err=("welfare_rel_error", "max")).reset_index()
        style = "--" if key[2] == "asynchronous" else "-"
        for ax, col in zip(axes, ("y", "it", "err")):
            line, = ax.plot(m["latency_ms"], m[col].clip(lower=1e-16) if col == "err" else m[col], style,
                            label=" / ".join(map(str, key)))
            for conv in (True, False):
                sel = m[m["conv"] == conv]
                ax.plot(sel["latency_ms"], sel[col].clip(lower=1e-16) if col == "err" else sel[col], "o",
                        color=line.get_color(), mfc=line.get_color() if conv else "none")
    axes[0].set_ylabel("simulated network time to converge [s]" if inproc else "wall time [s]")
    axes[0].set_title("time to converge against latency (sync vs async)")
    axes[1].set_ylabel("ADMM iterations")
    axes[2].set_ylabel("welfare relative error vs centralized")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("latency per message [ms]")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


SHOWN = ["cell", "rep", "status", "peers", "topology", "variant", "peers_per_process", "network", "converged",
         "iterations", "rounds", "messages", "bytes", "wall_s", "startup_s", "time_per_iteration_ms", "sim_time_s",
         "peak_rss_mib_total", "welfare_rel_error", "reason"]


def write_report(out: Path, exp, rows: list[dict]) -> Path:
    out = Path(out)
    figs = out / "figures"
    figs.mkdir(exist_ok=True)
    df = pd.DataFrame(rows)
    made = []
    for name, fn in (("scaling.png", lambda p: _scaling(df, p)),
                     ("per_iteration.png", lambda p: _per_iteration(df, p)),
                     ("residuals_vs_bytes.png", lambda p: _residuals(out, df, p)),
                     ("traffic_by_role.png", lambda p: _traffic(df, p)),
                     ("latency.png", lambda p: _latency(df, p))):
        try:
            if fn(figs / name):
                made.append(name)
        except Exception as exc:  # noqa: BLE001 - a figure that cannot be drawn is named in the page
            made.append(f"!{name}: {type(exc).__name__}: {exc}")
    table = df.reindex(columns=[c for c in SHOWN if c in df.columns]).to_html(index=False, float_format=lambda v: f"{v:.4g}",
                                                                            na_rep="")
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(exp.name)}</title></head><body>",
             f"<h1>Experiment {html.escape(exp.name)}</h1><p>{html.escape(exp.description)}</p>",
             f"<p>driver: {exp.driver}; {len(df)} cell repetitions; full table: results.csv</p>"]
    for name in made:
        if name.startswith("!"):
            parts.append(f"<p>figure not drawn: {html.escape(name[1:])}</p>")
        else:
            parts.append(f"<h2>{name.removesuffix('.png')}</h2><img src='figures/{name}' style='max-width:100%'>")
    parts += ["<h2>Results</h2>", table, "</body></html>"]
    path = out / "report.html"
    path.write_text("\n".join(parts))
    return path
