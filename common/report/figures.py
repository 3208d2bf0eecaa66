"""The figures of the report (PNG files in ``figures/``), drawn with matplotlib (Agg backend,
imported only when figures are drawn, so roles that only build summaries stay light)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from common.report.summary import DEMAND, SUPPLY, hourly_energy
from common.report.values import _fmt_bytes, _has_rows
from common.results import ACReport, RunResult

DEFAULT_VM_MIN_PU = 0.95
DEFAULT_VM_MAX_PU = 1.05
DEFAULT_MAX_LOADING_PERCENT = 100.0


_COLORS = {
    "grid_import": "#8c8c8c", "chp": "#a0522d", "wind": "#4c9be8", "pv": "#f4c430", "ev_discharge": "#2ca02c",
    "load": "#d9534f", "ev_charge": "#98df8a", "virtual_load": "#9467bd", "grid_export": "#505050",
    "prosumer_injection": "#17becf", "prosumer_withdrawal": "#ff9f4a", "losses": "#f0a0a0",
}
_LABELS = {key: label for label, key in SUPPLY + DEMAND}


def _limits(scenario) -> dict:
    net = getattr(scenario, "network", None)
    market = getattr(scenario, "market", None)
    return {
        "vm_min_pu": float(getattr(net, "vm_min_pu", DEFAULT_VM_MIN_PU)),
        "vm_max_pu": float(getattr(net, "vm_max_pu", DEFAULT_VM_MAX_PU)),
        "max_loading_percent": float(getattr(net, "max_loading_percent", DEFAULT_MAX_LOADING_PERCENT)),
        "tolerance": getattr(market, "tolerance", None),
    }


def _grid_price(scenario) -> np.ndarray | None:
    """The public import tariff at the root (community market), for reference in the price figure;
    in the full P2P market the external supplier's price is its own private data."""
    tariff = getattr(scenario, "tariff", None)
    return None if tariff is None else np.asarray(tariff.import_price_eur_per_mwh, dtype=float)


def _hour_axis(ax, hours) -> None:
    hours = list(hours)
    if not hours:
        return
    ax.set_xlabel("hour")
    n = len(hours)
    step = 1 if n <= 24 else (2 if n <= 48 else 6)
    ticks = [h for i, h in enumerate(hours) if i % step == 0]
    ax.set_xticks(ticks)
    ax.set_xlim(min(hours) - 0.6, max(hours) + 0.6)


def _new_figure(height: float = 4.2, nrows: int = 1, width: float = 10.0, sharex: bool = True, *,
                right_in: float = 2.1, bottom_in: float = 0.6, left_in: float = 0.85, top_in: float = 0.4,
                hspace_in: float = 0.55, **kw):
    """A figure with fixed margins in inches (``right_in``: room for a legend outside the axes).
    Fixed margins instead of a layout engine: drawing costs half as much."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    axes = fig.subplots(nrows, 1, sharex=sharex, squeeze=False, **kw)[:, 0]
    panel = (height - top_in - bottom_in - hspace_in * (nrows - 1)) / nrows
    fig.subplots_adjust(left=left_in / width, right=1 - right_in / width, bottom=bottom_in / height,
                        top=1 - top_in / height, hspace=hspace_in / max(panel, 0.1))
    return fig, (axes[0] if nrows == 1 else axes)


def _legend(ax, **kw) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize=9, framealpha=0.9, **kw)


def _stacked_bars(ax, hours, energy: pd.DataFrame, keys, sign: float = 1.0, hatched=(), always=()) -> np.ndarray:
    """One bar per hour and key, stacked (upwards, or downwards with ``sign`` -1), skipping keys
    that are zero every hour (unless in ``always``); returns the top of the stack."""
    bottom = np.zeros(len(hours))
    for key in keys:
        v = sign * energy[key].to_numpy()
        if np.any(np.abs(v) > 1e-9) or key in always:
            ax.bar(hours, v, 0.8, bottom=bottom, color=_COLORS[key], label=_LABELS[key],
                   hatch="//" if key in hatched else None, edgecolor="white", linewidth=0.4)
            bottom = bottom + v
    return bottom


def _fig_supply_mix(result: RunResult, energy: pd.DataFrame):
    if energy.empty:
        return None
    fig, ax = _new_figure(4.6)
    hours = energy.index.to_numpy()
    _stacked_bars(ax, hours, energy, tuple(key for _, key in SUPPLY))
    _stacked_bars(ax, hours, energy, tuple(key for _, key in DEMAND), sign=-1.0, hatched=("grid_export",))
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel("power [MW]  (supply > 0, demand < 0)")
    ax.set_title("Supply mix per hour (market dispatch)")
    _hour_axis(ax, hours)
    ax.grid(axis="y", alpha=0.3)
    _legend(ax, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def _fig_load(result: RunResult, energy: pd.DataFrame):
    if energy.empty:
        return None
    fig, ax = _new_figure(4.2)
    hours = energy.index.to_numpy()
    bottom = _stacked_bars(ax, hours, energy, tuple(key for _, key in DEMAND if key != "grid_export"), always=("load",))
    ac = result.ac
    if ac is not None and _has_rows(ac.hours) and {"hour", "losses_mw"} <= set(ac.hours.columns):
        losses = ac.hours.groupby("hour")["losses_mw"].sum().reindex(hours).fillna(0.0).to_numpy(dtype=float)
        if np.any(np.abs(losses) > 1e-9):
            ax.bar(hours, losses, 0.8, bottom=bottom, color=_COLORS["losses"], label="AC losses",
                   edgecolor="white", linewidth=0.4)
    ax.set_ylabel("power [MW]")
    ax.set_title("Load per hour")
    _hour_axis(ax, hours)
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    _legend(ax, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def _fig_prices(result: RunResult, scenario):
    trades, prices = result.trades, result.prices
    grid_price = _grid_price(scenario) if scenario is not None else None
    if _has_rows(trades) and {"hour", "p_mw", "price_eur_per_mwh"} <= set(trades.columns):
        t = trades.copy()
        t["w"] = pd.to_numeric(t["p_mw"], errors="coerce").abs()
        t["price"] = pd.to_numeric(t["price_eur_per_mwh"], errors="coerce")
        t = t[(t["w"] > 1e-6) & t["price"].notna()]
        if t.empty:
            return None
        t["wp"] = t["w"] * t["price"]
        g = t.groupby("hour")
        avg = g["wp"].sum() / g["w"].sum()
        lo, hi = g["price"].min(), g["price"].max()
        hours = avg.index.to_numpy()
        fig, ax = _new_figure(4.2, right_in=0.3)
        ax.fill_between(hours, lo.to_numpy(), hi.to_numpy(), color="#1f77b4", alpha=0.2, step=None,
                        label="min-max over trades")
        ax.plot(hours, avg.to_numpy(), "o-", color="#1f77b4", label="trade-weighted average")
        if grid_price is not None and len(grid_price) >= int(max(hours)):
            ax.plot(hours, grid_price[hours.astype(int) - 1], "--", color="#555555", label="grid import price")
        ax.set_ylabel("price [EUR/MWh]")
        ax.set_title("Trade prices per hour")
        _hour_axis(ax, hours)
        ax.grid(alpha=0.3)
        _legend(ax, loc="best")
        return fig
    if _has_rows(prices) and {"hour", "price_eur_per_mwh"} <= set(prices.columns):
        who = "bus" if "bus" in prices.columns else ("peer" if "peer" in prices.columns else None)
        if who is None:
            return None
        table = prices.pivot_table(index=who, columns="hour", values="price_eur_per_mwh", aggfunc="mean")
        hours = table.columns.to_numpy()
        if len(table) <= 10:
            fig, ax = _new_figure(4.2)
            for name, row in table.iterrows():
                ax.plot(hours, row.to_numpy(dtype=float), "o-", markersize=3, label=f"{who} {name}")
            if grid_price is not None and len(grid_price) >= int(max(hours)):
                ax.plot(hours, grid_price[hours.astype(int) - 1], "--", color="#555555", label="grid import price")
            ax.set_ylabel("price [EUR/MWh]")
            ax.set_title(f"Prices per {who} and hour")
            _hour_axis(ax, hours)
            ax.grid(alpha=0.3)
            _legend(ax, loc="center left", bbox_to_anchor=(1.01, 0.5))
            return fig
        values = table.to_numpy(dtype=float)
        fig, (ax, ax2) = _new_figure(7.6, nrows=2, height_ratios=[1, 1.3], right_in=1.3)
        plural = "buses" if who == "bus" else "peers"
        mean = np.nanmean(values, axis=0)
        ax.fill_between(hours, np.nanmin(values, axis=0), np.nanmax(values, axis=0), color="#1f77b4", alpha=0.2,
                        label=f"min-max over {plural}")
        ax.plot(hours, mean, "o-", color="#1f77b4", markersize=3, label=f"mean over {plural}")
        if grid_price is not None and len(grid_price) >= int(max(hours)):
            ax.plot(hours, grid_price[hours.astype(int) - 1], "--", color="#555555", label="grid import price")
        ax.set_ylabel("price [EUR/MWh]")
        ax.set_title(f"Prices per hour ({len(table)} {plural})")
        ax.grid(alpha=0.3)
        _legend(ax, loc="best")
        # the level is in the upper panel; the map shows where prices differ: deviation from the hourly mean
        dev = values - mean[None, :]
        span = float(np.nanmax(np.abs(dev))) if np.isfinite(dev).any() else 0.0
        span = span if span > 1e-9 else 1.0
        im = ax2.imshow(dev, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-span, vmax=span,
                        interpolation="nearest",
                        extent=(hours.min() - 0.5, hours.max() + 0.5, -0.5, len(table) - 0.5))
        names = [str(x) for x in table.index]
        step = max(1, int(np.ceil(len(names) / 12)))
        ax2.set_yticks(range(0, len(names), step))
        ax2.set_yticklabels(names[::step])
        ax2.set_ylabel(who)
        _hour_axis(ax2, hours)
        ax2.set_title(f"Price per {who} minus the hourly mean over {plural}")
        cax = ax2.inset_axes((1.01, 0.0, 0.015, 1.0))
        cbar = fig.colorbar(im, cax=cax)
        cbar.set_label("deviation [EUR/MWh]")
        return fig
    return None


def _fig_ev_soc(result: RunResult):
    soc = result.ev_soc
    if not _has_rows(soc) or not {"peer", "hour", "soc_mwh"} <= set(soc.columns):
        return None
    fig, ax = _new_figure(4.2)
    peers = list(dict.fromkeys(soc["peer"].tolist()))
    cmap = _cmap("tab20" if len(peers) > 10 else "tab10")
    for i, peer in enumerate(peers):
        s = soc[soc["peer"] == peer].sort_values("hour")
        ax.plot(s["hour"].to_numpy(), pd.to_numeric(s["soc_mwh"]).to_numpy() * 1000.0, "o-", markersize=3,
                color=cmap(i % cmap.N), label=str(peer))
    ax.set_ylabel("state of charge [kWh] (end of hour)")
    ax.set_title("EV state of charge")
    _hour_axis(ax, sorted(soc["hour"].unique()))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if len(peers) <= 20:
        _legend(ax, loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=1 if len(peers) <= 12 else 2)
    return fig


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def _per_hour(ac: ACReport, hour_col: str, bus_col: str, source: pd.DataFrame | None, fn: str) -> pd.Series | None:
    if _has_rows(ac.hours) and hour_col in ac.hours.columns:
        s = pd.to_numeric(ac.hours.set_index("hour")[hour_col], errors="coerce")
        if s.notna().any():
            return s.sort_index()
    if _has_rows(source) and bus_col in source.columns:
        return pd.to_numeric(source[bus_col], errors="coerce").groupby(source["hour"]).agg(fn).sort_index()
    return None


def _fig_voltage(result: RunResult, limits: dict):
    ac = result.ac
    if ac is None:
        return None
    vmin = _per_hour(ac, "vmin_pu", "vm_pu", ac.buses, "min")
    vmax = _per_hour(ac, "vmax_pu", "vm_pu", ac.buses, "max")
    if vmin is None or vmax is None:
        return None
    fig, ax = _new_figure(4.2)
    hours = vmin.index.to_numpy()
    ax.fill_between(hours, vmin.to_numpy(dtype=float), vmax.reindex(vmin.index).to_numpy(dtype=float),
                    color="#1f77b4", alpha=0.12)
    ax.plot(hours, vmax.reindex(vmin.index).to_numpy(dtype=float), "^-", color="#d62728", markersize=4,
            label="max voltage")
    ax.plot(hours, vmin.to_numpy(dtype=float), "v-", color="#1f77b4", markersize=4, label="min voltage")
    ax.axhline(limits["vm_max_pu"], color="#d62728", linestyle="--", linewidth=1.2,
               label=f"limits {limits['vm_min_pu']:.2f} / {limits['vm_max_pu']:.2f} pu")
    ax.axhline(limits["vm_min_pu"], color="#1f77b4", linestyle="--", linewidth=1.2)
    lo = min(limits["vm_min_pu"], float(np.nanmin(vmin.to_numpy(dtype=float)))) if vmin.notna().any() else limits["vm_min_pu"]
    hi = max(limits["vm_max_pu"], float(np.nanmax(vmax.to_numpy(dtype=float)))) if vmax.notna().any() else limits["vm_max_pu"]
    pad = 0.1 * (hi - lo)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_ylabel("voltage [pu]")
    ax.set_title("Minimum and maximum bus voltage per hour (AC power flow)")
    _hour_axis(ax, hours)
    ax.grid(alpha=0.3)
    _legend(ax, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def _fig_loading(result: RunResult, limits: dict):
    ac = result.ac
    if ac is None:
        return None
    lines = ac.lines
    line_src = trafo_src = None
    if _has_rows(lines) and {"hour", "loading_percent"} <= set(lines.columns):
        if "kind" in lines.columns:
            is_trafo = lines["kind"].astype(str) == "trafo"
            line_src, trafo_src = lines[~is_trafo], lines[is_trafo]
        else:
            line_src = lines
    line = _per_hour(ac, "max_line_loading_pct", "loading_percent", line_src, "max")
    trafo = None
    if trafo_src is None or not trafo_src.empty:
        trafo = _per_hour(ac, "max_trafo_loading_pct", "loading_percent", trafo_src, "max")
    if line is None and trafo is None:
        return None
    fig, ax = _new_figure(4.2)
    top = limits["max_loading_percent"]
    hours_all: set = set()
    if line is not None:
        ax.plot(line.index.to_numpy(), line.to_numpy(dtype=float), "o-", color="#ff7f0e", markersize=4,
                label="max line loading")
        hours_all.update(line.index.tolist())
        top = max(top, float(np.nanmax(line.to_numpy(dtype=float))) if line.notna().any() else top)
    if trafo is not None and trafo.notna().any():
        ax.plot(trafo.index.to_numpy(), trafo.to_numpy(dtype=float), "s-", color="#7f3c8d", markersize=4,
                label="max transformer loading")
        hours_all.update(trafo.index.tolist())
        top = max(top, float(np.nanmax(trafo.to_numpy(dtype=float))))
    ax.axhline(limits["max_loading_percent"], color="black", linestyle="--", linewidth=1.2,
               label=f"limit {limits['max_loading_percent']:.0f} %")
    ax.set_ylim(0, top * 1.1)
    ax.set_ylabel("loading [%]")
    ax.set_title("Maximum branch loading per hour (AC power flow)")
    _hour_axis(ax, sorted(hours_all))
    ax.grid(alpha=0.3)
    _legend(ax, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def _integer_locator():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _positive(values) -> np.ndarray:
    arr = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=float)
    return np.where(arr > 0, arr, np.nan)


def _fig_admm(result: RunResult, limits: dict):
    h = result.admm_history
    if not _has_rows(h) or not {"primal_residual", "dual_residual"} <= set(h.columns):
        return None
    sort_cols = [c for c in ("outer", "iteration") if c in h.columns]
    h = h.sort_values(sort_cols, kind="stable").reset_index(drop=True) if sort_cols else h.reset_index(drop=True)
    primal, dual = _positive(h["primal_residual"]), _positive(h["dual_residual"])
    if not (np.isfinite(primal).any() or np.isfinite(dual).any()):
        return None
    multi_outer = "outer" in h.columns and h["outer"].nunique() > 1
    if multi_outer or "iteration" not in h.columns:
        x = np.arange(1, len(h) + 1, dtype=float)
        xlabel = "ADMM iteration (counted over all outer iterations)"
    else:
        x = pd.to_numeric(h["iteration"], errors="coerce").to_numpy(dtype=float)
        xlabel = "ADMM iteration"
    # one segment per outer iteration: lines are not joined across a restart
    segments = [np.arange(len(h))]
    starts: list[int] = []
    if multi_outer:
        starts = h.index[h["outer"].ne(h["outer"].shift())].to_list()[1:]
        segments = np.split(np.arange(len(h)), starts)
    fig, ax = _new_figure(4.6, right_in=0.9, bottom_in=1.05)
    marker = "o" if len(x) <= 40 else None
    series = [(primal, "#1f77b4", "-", "primal residual"), (dual, "#d62728", "-", "dual residual")]
    for values, color, style, label in series:
        for k, seg in enumerate(segments):
            ax.plot(x[seg], values[seg], color=color, linestyle=style, marker=marker, markersize=3,
                    label=label if k == 0 else None)
    tol = limits.get("tolerance")
    if tol is not None:
        ax.axhline(float(tol), color="black", linestyle="--", linewidth=1.0, label=f"tolerance {float(tol):g}")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(_integer_locator())
    ax.set_ylabel("primal [MW], dual [EUR/MWh]")
    ax.set_title("ADMM residuals per iteration")
    ax.grid(alpha=0.3, which="major")
    for i, s in enumerate(starts):
        ax.axvline(x[s] - 0.5, color="#777777", linestyle=":", linewidth=1.2,
                   label="start of an outer iteration" if i == 0 else None)
    handles, labels = ax.get_legend_handles_labels()
    if "rho" in h.columns:
        rho = _positive(h["rho"])
        if np.isfinite(rho).any():
            ax2 = ax.twinx()
            for k, seg in enumerate(segments):
                ax2.plot(x[seg], rho[seg], color="#2ca02c", linestyle="-.", linewidth=1.2,
                         label="penalty rho (right axis)" if k == 0 else None)
            finite = rho[np.isfinite(rho)]
            if finite.max() / finite.min() > 10.0:
                ax2.set_yscale("log")
            else:
                ax2.set_ylim(0, finite.max() * 1.15)
            ax2.set_ylabel("penalty rho [EUR/MW²h]", color="#2ca02c")
            ax2.tick_params(axis="y", which="both", colors="#2ca02c")
            ax2.spines["right"].set_visible(True)
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.17),
              ncol=min(len(labels), 5), frameon=False)
    return fig


def _columns(ax, x: np.ndarray, v: np.ndarray, bottom: np.ndarray, color, label: str, width: float = 0.8) -> None:
    """Stacked columns of one series as one collection (``ax.bar`` makes one artist per column,
    about 20 times slower to draw for a few hundred)."""
    from matplotlib.collections import PolyCollection

    left, right, top = x - width / 2, x + width / 2, bottom + v
    verts = np.stack([np.stack([left, bottom], 1), np.stack([left, top], 1), np.stack([right, top], 1),
                      np.stack([right, bottom], 1)], axis=1)
    ax.add_collection(PolyCollection(verts, facecolors=color, linewidths=0, antialiaseds=False, label=label))


def _fig_messages(result: RunResult):
    m = result.messages
    if not _has_rows(m) or "iteration" not in m.columns:
        return None
    m = m.copy()
    m["count"] = pd.to_numeric(m["count"], errors="coerce").fillna(0.0) if "count" in m.columns else 0.0
    m["bytes"] = pd.to_numeric(m["bytes"], errors="coerce").fillna(0.0) if "bytes" in m.columns else 0.0
    m["type"] = m["type"].astype(str) if "type" in m.columns else "all"
    counts = m.pivot_table(index="iteration", columns="type", values="count", aggfunc="sum", fill_value=0.0)
    nbytes = m.pivot_table(index="iteration", columns="type", values="bytes", aggfunc="sum", fill_value=0.0)
    order = list(counts.sum(axis=0).sort_values(ascending=False).index)
    counts, nbytes = counts[order], nbytes.reindex(columns=order, fill_value=0.0)
    x = counts.index.to_numpy(dtype=float)
    big = float(nbytes.sum(axis=1).max())
    scale, unit = (1e6, "MB") if big >= 1e6 else ((1e3, "kB") if big >= 1e3 else (1.0, "B"))
    fig, (ax1, ax2) = _new_figure(6.6, nrows=2)
    cmap = _cmap("tab10" if len(order) <= 10 else "tab20")
    for ax, table, div in ((ax1, counts, 1.0), (ax2, nbytes, scale)):
        bottom = np.zeros(len(x))
        for i, col in enumerate(order):
            v = table[col].to_numpy(dtype=float) / div
            color = cmap(i % cmap.N)
            if len(x) <= 60:
                _columns(ax, x, v, bottom, color, str(col))
            else:  # stacked areas, one step per iteration
                ax.fill_between(x, bottom, bottom + v, step="mid", color=color, label=str(col), linewidth=0)
            bottom = bottom + v
        ax.autoscale_view()
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    ax1.set_ylabel("messages [count]")
    ax2.set_ylabel(f"bytes [{unit}]")
    ax2.set_xlabel("ADMM iteration")
    ax2.xaxis.set_major_locator(_integer_locator())
    ax1.set_title(f"Messages and bytes per iteration, stacked by type (total {int(m['count'].sum()):,} messages, "
                  f"{_fmt_bytes(float(m['bytes'].sum()))})")
    _legend(ax1, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="message type")
    return fig


def _fig_outer(result: RunResult, limits: dict):
    """Max loading and min/max voltage per hour at the first AC check (before the outer loop) and
    the last one (after): the thesis's before/after figures (e.g. 4.12-4.13, 4.16-4.17)."""
    h = result.outer_hours
    if not _has_rows(h):
        return None
    fig, (ax1, ax2) = _new_figure(7.5, nrows=2)
    hours = h["hour"].to_numpy()
    for col, style, label in (("max_line_loading", "o", "lines"), ("max_trafo_loading", "s", "transformer")):
        before, after = h[f"{col}_before_pct"].to_numpy(float), h[f"{col}_after_pct"].to_numpy(float)
        if np.isfinite(before).any():
            ax1.plot(hours, before, f"{style}--", color="#9e9e9e", markersize=4, label=f"{label}, before")
            ax1.plot(hours, after, f"{style}-", color="#ff7f0e" if label == "lines" else "#7f3c8d", markersize=4,
                     label=f"{label}, after")
    ax1.axhline(limits["max_loading_percent"], color="black", linestyle="--", linewidth=1.2, label="limit")
    ax1.set_ylabel("max loading [%]")
    ax1.set_title("Maximum loading and voltage range per hour, before and after the outer loop")
    ax1.grid(alpha=0.3)
    _legend(ax1, loc="center left", bbox_to_anchor=(1.01, 0.5))
    for col, color in (("vmin", "#1f77b4"), ("vmax", "#d62728")):
        ax2.plot(hours, h[f"{col}_before_pu"].to_numpy(float), "--", color=color, alpha=0.5, label=f"{col[1:]}, before")
        ax2.plot(hours, h[f"{col}_after_pu"].to_numpy(float), "-", color=color, marker=".", label=f"{col[1:]}, after")
    ax2.axhline(limits["vm_min_pu"], color="black", linestyle=":", linewidth=1)
    ax2.axhline(limits["vm_max_pu"], color="black", linestyle=":", linewidth=1, label="limits")
    ax2.set_ylabel("voltage [pu]")
    ax2.grid(alpha=0.3)
    _hour_axis(ax2, hours)
    _legend(ax2, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


# ---------------------------------------------------------------------------------------------------------------
# maps: the network in its worst hour, the trades of one hour, injections per peer and hour
# ---------------------------------------------------------------------------------------------------------------
KIND_ORDER = ("grid", "chp", "wind", "pv", "prosumer", "ev", "load", "virtual_load")


def _natural(text) -> tuple:
    """pv3 before pv26."""
    import re

    return tuple(int(x) if x.isdigit() else x for x in re.split(r"(\d+)", str(text)))


def worst_hour(ac: ACReport, limits: dict) -> tuple[int, float] | None:
    """(hour, score) of the hour closest to (or furthest beyond) a limit: the largest of max
    loading / loading limit and each voltage's distance from 1 pu / the limit's (1 at a limit)."""
    h = ac.hours
    if not _has_rows(h) or "hour" not in h.columns:
        return None
    h = h.set_index("hour")
    cols = []
    for col in ("max_line_loading_pct", "max_trafo_loading_pct"):
        if col in h.columns:
            cols.append(pd.to_numeric(h[col], errors="coerce") / limits["max_loading_percent"])
    if "vmin_pu" in h.columns:
        cols.append((1.0 - pd.to_numeric(h["vmin_pu"], errors="coerce")) / max(1.0 - limits["vm_min_pu"], 1e-6))
    if "vmax_pu" in h.columns:
        cols.append((pd.to_numeric(h["vmax_pu"], errors="coerce") - 1.0) / max(limits["vm_max_pu"] - 1.0, 1e-6))
    if not cols:
        return None
    score = pd.concat(cols, axis=1).max(axis=1)
    if not score.notna().any():
        return None
    return int(score.idxmax()), float(score.max())


def _fig_network_map(result: RunResult, limits: dict):
    ac = result.ac
    if ac is None or not _has_rows(ac.network_buses) or not _has_rows(ac.network_branches):
        return None
    worst = worst_hour(ac, limits)
    if worst is None:
        return None
    hour = worst[0]
    from matplotlib.collections import LineCollection
    from matplotlib.colors import Normalize, TwoSlopeNorm

    nb, br = ac.network_buses, ac.network_branches
    xy = nb.set_index("bus")[["x", "y"]]
    lines_h = ac.lines[ac.lines["hour"] == hour]
    element = lines_h["element"] if "element" in lines_h.columns else pd.Series("line", index=lines_h.index)
    loading = pd.Series(pd.to_numeric(lines_h["loading_percent"], errors="coerce").to_numpy(),
                        index=pd.MultiIndex.from_arrays([element.astype(str).to_numpy(), lines_h["line"].to_numpy()]))
    load_br = loading.reindex(pd.MultiIndex.from_arrays([br["element"].astype(str).to_numpy(),
                                                         br["line"].to_numpy()])).to_numpy(dtype=float)
    vm = ac.buses[ac.buses["hour"] == hour].set_index("bus")["vm_pu"].reindex(nb["bus"]).to_numpy(dtype=float)
    a = xy.reindex(br["from_bus"]).to_numpy(dtype=float)
    b = xy.reindex(br["to_bus"]).to_numpy(dtype=float)
    segments = np.stack([a, b], axis=1)
    lim = limits["max_loading_percent"]
    top = max(lim, float(np.nanmax(load_br)) if np.isfinite(load_br).any() else lim)
    fig, ax = _new_figure(6.8, width=10.0, right_in=0.3, bottom_in=1.0, left_in=0.3, top_in=0.55)
    lnorm = Normalize(0.0, top)
    cmap_l = _cmap("YlOrRd")
    is_trafo = br["kind"].astype(str).eq("trafo").to_numpy()
    colors = [cmap_l(lnorm(v)) if np.isfinite(v) else (0.6, 0.6, 0.6, 1.0) for v in load_br]
    widths = 1.2 + 4.0 * np.clip(np.nan_to_num(load_br) / lim, 0, 1.5)
    lc = LineCollection(segments, colors=colors, linewidths=widths, linestyles=np.where(is_trafo, "--", "-").tolist(),
                        zorder=1, capstyle="round")
    ax.add_collection(lc)
    vnorm = TwoSlopeNorm(vmin=min(limits["vm_min_pu"], float(np.nanmin(vm)) if np.isfinite(vm).any() else 1.0) - 1e-3,
                         vcenter=1.0,
                         vmax=max(limits["vm_max_pu"], float(np.nanmax(vm)) if np.isfinite(vm).any() else 1.0) + 1e-3)
    sc = ax.scatter(nb["x"], nb["y"], c=vm, cmap="coolwarm", norm=vnorm, s=38, edgecolors="black", linewidths=0.5,
                    zorder=2)
    if "slack" in nb.columns and nb["slack"].astype(bool).any():
        sl = nb[nb["slack"].astype(bool)]
        ax.scatter(sl["x"], sl["y"], marker="s", s=110, facecolors="none", edgecolors="black", linewidths=1.4, zorder=3)
        for r in sl.itertuples():
            ax.annotate("slack", (r.x, r.y), xytext=(0, 9), textcoords="offset points", ha="center", fontsize=9)
    ax.margins(0.05)
    ax.autoscale_view()
    if np.isfinite(load_br).any():
        k = int(np.nanargmax(load_br))
        mid = segments[k].mean(axis=0)
        ax.annotate(f"{load_br[k]:.0f} %", mid, xytext=(6, 6), textcoords="offset points", fontsize=9,
                    color="#7f0000", zorder=3)
    if np.isfinite(vm).any():
        dev = np.abs(vm - 1.0)
        k = int(np.nanargmax(dev))
        right = nb["x"].iat[k] > nb["x"].mean()
        ax.annotate(f"bus {int(nb['bus'].iat[k])}: {vm[k]:.3f} pu", (nb["x"].iat[k], nb["y"].iat[k]),
                    xytext=(-6 if right else 6, -13), textcoords="offset points", fontsize=9, color="#08306b", zorder=3,
                    ha="right" if right else "left")
    source = str(nb["source"].iat[0]) if "source" in nb.columns else "coordinates"
    if source == "geodata":
        ax.set_aspect("equal", adjustable="datalim")
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ("left", "bottom"):
        ax.spines[side].set_visible(False)
    cb1 = fig.colorbar(lc, cax=ax.inset_axes((0.0, -0.06, 0.42, 0.025)), orientation="horizontal")
    lc.set_array(np.nan_to_num(load_br))
    lc.set_cmap(cmap_l)
    lc.set_norm(lnorm)
    cb1.set_label(f"branch loading [%] (limit {lim:.0f} %)", fontsize=9)
    cb2 = fig.colorbar(sc, cax=ax.inset_axes((0.56, -0.06, 0.42, 0.025)), orientation="horizontal")
    cb2.set_label(f"bus voltage [pu] (limits {limits['vm_min_pu']:.2f}-{limits['vm_max_pu']:.2f})", fontsize=9)
    for cb in (cb1, cb2):
        cb.ax.tick_params(labelsize=8)
    h = ac.hours.set_index("hour").loc[hour]
    ax.set_title(f"Network in hour {hour}, the hour nearest a limit: max loading {np.nanmax(load_br):.0f} %, "
                 f"voltage {np.nanmin(vm):.3f}-{np.nanmax(vm):.3f} pu"
                 + (f", {int(h['violations'])} violation(s)" if "violations" in h and h["violations"] else "")
                 + ("" if source == "geodata" else "\n(no coordinates in the network: tree layout from the slack, "
                    "transformers dashed)"), fontsize=11)
    return fig


def trade_hour(result: RunResult) -> int | None:
    """The hour with the most traded energy (the trade network figure's default)."""
    t = result.trades
    if not _has_rows(t):
        return None
    per_hour = pd.to_numeric(t["p_mw"], errors="coerce").abs().groupby(t["hour"]).sum()
    return int(per_hour.idxmax()) if len(per_hour) and per_hour.max() > 0 else None


def _fig_trade_network(result: RunResult, hour: int | None = None):
    t = result.trades
    hour = hour if hour is not None else trade_hour(result)
    if not _has_rows(t) or hour is None:
        return None
    from matplotlib.collections import LineCollection
    from matplotlib.colors import Normalize

    t = t[(t["hour"] == hour) & (pd.to_numeric(t["p_mw"], errors="coerce") > 1e-6)]
    if t.empty:
        return None
    kind = result.dispatch.drop_duplicates("peer").set_index("peer")["kind"].astype(str) if _has_rows(
        result.dispatch) else pd.Series(dtype=str)
    rank = {k: i for i, k in enumerate(KIND_ORDER)}

    def order(ids, energy):
        return sorted(ids, key=lambda p: (rank.get(kind.get(p, ""), 99), -round(energy[p], 6), _natural(p)))

    sold = t.groupby("seller")["p_mw"].sum()
    bought = t.groupby("buyer")["p_mw"].sum()
    sellers, buyers = order(sold.index, sold), order(bought.index, bought)
    n = max(len(sellers), len(buyers))
    height = float(np.clip(1.4 + 0.16 * n, 4.0, 12.0))
    fig, ax = _new_figure(height, width=10.0, right_in=1.1, left_in=0.3, bottom_in=0.2, top_in=0.75)

    def ys(ids):
        return {p: (1.0 - (i + 0.5) / len(ids)) for i, p in enumerate(ids)}

    ys_s, ys_b = ys(sellers), ys(buyers)
    t = t.sort_values("p_mw")  # the largest trades drawn last, on top
    seg = np.stack([np.column_stack([np.zeros(len(t)), t["seller"].map(ys_s).to_numpy(dtype=float)]),
                    np.column_stack([np.ones(len(t)), t["buyer"].map(ys_b).to_numpy(dtype=float)])], axis=1)
    p = t["p_mw"].to_numpy(dtype=float)
    price = pd.to_numeric(t["price_eur_per_mwh"], errors="coerce").to_numpy(dtype=float)
    one_price = np.isfinite(price).any() and float(np.nanmax(price) - np.nanmin(price)) < 0.01
    lc = LineCollection(seg, linewidths=0.15 + 4.5 * p / p.max(), alpha=0.45, zorder=1)
    if one_price:  # every trade at one price: the colour tells the seller's kind instead
        lc.set_color([_COLORS.get(kind.get(x, ""), "#777777") for x in t["seller"]])
    else:
        lc.set_array(price)
        lc.set_cmap("viridis")
        lc.set_norm(Normalize(float(np.nanmin(price)), float(np.nanmax(price))))
    ax.add_collection(lc)
    size = 8 if n <= 40 else (6.5 if n <= 70 else 5)
    for ids, x, energy, ha, dx, where in ((sellers, 0.0, sold, "right", -0.03, ys_s), (buyers, 1.0, bought, "left", 0.03,
                                                                                        ys_b)):
        y = [where[i] for i in ids]
        colors = [_COLORS.get(kind.get(i, ""), "#777777") for i in ids]
        ax.scatter(np.full(len(ids), x), y, s=15 + 120 * energy.reindex(ids).to_numpy() / max(energy.max(), 1e-9),
                   c=colors, edgecolors="black", linewidths=0.4, zorder=2)
        for i, yy in zip(ids, y):
            ax.text(x + dx, yy, f"{i} {energy[i]:.2f}", ha=ha, va="center", fontsize=size)
    ax.set_xlim(-0.3, 1.3)
    ax.set_ylim(0, 1)
    ax.axis("off")
    ax.text(-0.03, 1.0, "sellers [MW sold]", ha="right", va="bottom", fontsize=10)
    ax.text(1.03, 1.0, "buyers [MW bought]", ha="left", va="bottom", fontsize=10)
    if one_price:
        how = f"every trade at {np.nanmean(price):.2f} EUR/MWh; colour: the seller's kind"
    else:
        how = "colour: trade price"
        cb = fig.colorbar(lc, cax=ax.inset_axes((1.04, 0.25, 0.02, 0.5)))
        cb.set_label("trade price [EUR/MWh]")
    ax.set_title(f"Trades in hour {hour}, the hour with the most traded energy: {p.sum():.2f} MW in {len(t)} trades\n"
                 f"(line width by energy; {how})", fontsize=11, pad=16)
    return fig


def _fig_dispatch_heatmap(result: RunResult):
    d = result.dispatch
    if not _has_rows(d):
        return None
    from matplotlib.colors import TwoSlopeNorm

    table = d.pivot_table(index="peer", columns="hour", values="p_mw", aggfunc="sum")
    kinds = d.drop_duplicates("peer").set_index("peer")["kind"].astype(str).reindex(table.index)
    rank = {k: i for i, k in enumerate(KIND_ORDER)}
    order = sorted(table.index, key=lambda p: (rank.get(kinds[p], 99), _natural(p)))
    table, kinds = table.loc[order], kinds.loc[order]
    values = table.to_numpy(dtype=float)
    hours = table.columns.to_numpy()
    span = float(np.nanpercentile(np.abs(values), 98)) if np.isfinite(values).any() else 1.0
    span = span if span > 1e-9 else 1.0
    n = len(order)
    height = float(np.clip(1.3 + 0.13 * n, 3.5, 12.0))
    fig, ax = _new_figure(height, width=10.0, right_in=2.1, left_in=1.1, bottom_in=0.55, top_in=0.45)
    im = ax.imshow(values, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(vmin=-span, vcenter=0.0, vmax=span),
                   interpolation="nearest", extent=(hours.min() - 0.5, hours.max() + 0.5, n - 0.5, -0.5))
    step = 1 if n <= 70 else int(np.ceil(n / 60))
    ax.set_yticks(range(0, n, step))
    ax.set_yticklabels([str(p) for p in order[::step]], fontsize=7 if n > 30 else 9)
    _hour_axis(ax, hours)
    bounds = np.flatnonzero(kinds.to_numpy()[1:] != kinds.to_numpy()[:-1]) + 0.5
    for yb in bounds:
        ax.axhline(yb, color="black", linewidth=0.8)
    starts = np.r_[0, np.ceil(bounds).astype(int)]
    ends = np.r_[np.floor(bounds).astype(int), n - 1]
    for s0, e0 in zip(starts, ends):
        ax.text(hours.max() + 0.7, (s0 + e0) / 2, _LABELS.get(kinds.iat[s0], kinds.iat[s0]), va="center", fontsize=8,
                clip_on=False)
    cb = fig.colorbar(im, cax=ax.inset_axes((1.11, 0.0, 0.02, 1.0)), extend="both")
    cb.set_label("net injection [MW]")
    ax.set_title("Net injection per peer and hour (producers > 0, consumers < 0)")
    return fig


# relative drawing time of the figures of a 50-peer day (mv37), to share them between two processes
DRAW_COST = {"trade_network": 3.0, "dispatch_heatmap": 2.5, "admm_residuals": 2.0, "messages": 2.0, "load": 1.5,
             "outer_before_after": 2.0, "prices": 1.5, "network_map": 1.5}


def render_figures(result: RunResult, fig_dir: Path, scenario=None, hour: int | None = None,
                   workers: int | None = None) -> list[dict]:
    """Draw every figure that has data, save each as PNG in ``fig_dir``. ``hour``: the hour of the
    trade network (default: the hour with the most traded energy).

    Returns one dict per figure: name, title, path, png (bytes) or error (a figure that fails to draw is
    reported in the page, it does not stop the results from being written). ``workers``: processes
    that draw (default: 2 where there are two cores or more, the second one forked).
    """
    import matplotlib

    matplotlib.use("Agg")

    fig_dir.mkdir(parents=True, exist_ok=True)
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    energy = hourly_energy(result)
    limits = _limits(scenario)
    builders = [
        ("supply_mix", "Supply mix per hour", lambda: _fig_supply_mix(result, energy)),
        ("load", "Load per hour", lambda: _fig_load(result, energy)),
        ("prices", "Prices per hour", lambda: _fig_prices(result, scenario)),
        ("ev_soc", "EV state of charge", lambda: _fig_ev_soc(result)),
        ("voltage", "Voltage per hour", lambda: _fig_voltage(result, limits)),
        ("loading", "Branch loading per hour", lambda: _fig_loading(result, limits)),
        ("outer_before_after", "Outer loop: grid before and after", lambda: _fig_outer(result, limits)),
        ("admm_residuals", "ADMM residuals per iteration", lambda: _fig_admm(result, limits)),
        ("messages", "Messages and bytes per iteration", lambda: _fig_messages(result)),
        ("network_map", "Network map: line loading and bus voltage in the hour nearest a limit",
         lambda: _fig_network_map(result, limits)),
        ("trade_network", "Trade network: who sells to whom", lambda: _fig_trade_network(result, hour)),
        ("dispatch_heatmap", "Net injection per peer and hour", lambda: _fig_dispatch_heatmap(result)),
    ]
    style = {"font.size": 11, "axes.titlesize": 13, "axes.labelsize": 11, "legend.fontsize": 9,
             "xtick.labelsize": 10, "ytick.labelsize": 10, "axes.spines.top": False, "axes.spines.right": False}

    def draw(part) -> list[dict]:
        done = []
        with matplotlib.rc_context(style):
            for name, title, build in part:
                try:
                    fig = build()
                    if fig is None:
                        continue
                    fig.savefig(fig_dir / f"{name}.png", format="png", pil_kwargs={"compress_level": 3})
                    done.append({"name": name, "title": title})
                except Exception as exc:  # noqa: BLE001 - failures are data: reported in the page
                    done.append({"name": name, "title": title, "error": f"{type(exc).__name__}: {exc}"})
        return done

    # two processes draw half the figures each where there are two cores (fork: the child has the data)
    ours, theirs, load = [], [], [1.5, 0.0]  # this process also writes the page
    for b in sorted(builders, key=lambda b: -DRAW_COST.get(b[0], 1.0)):  # the costliest first, to the idler side
        side = 0 if load[0] <= load[1] else 1
        (ours if side == 0 else theirs).append(b)
        load[side] += DRAW_COST.get(b[0], 1.0)
    if not (workers > 1 and hasattr(os, "fork")):
        ours, theirs = builders, []
    done = _draw_forked(draw, theirs) if theirs else None
    drawn = {f["name"]: f for f in draw(ours)}
    if done is not None:
        drawn.update({f["name"]: f for f in done()})
    out = []
    for name, title, _ in builders:  # the page's order
        f = drawn.get(name)
        if f is not None and "error" not in f:
            path = fig_dir / f"{name}.png"
            f = {**f, "path": path, "png": path.read_bytes()}
        if f is not None:
            out.append(f)
    return out


def _draw_forked(draw, part):
    """Run ``draw(part)`` in a forked child; returns a function that waits for it and returns its
    list (a child that dies reports every figure of its part as an error)."""
    import json

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: draw, report, leave without running the parent's exit handlers
        code = 0
        try:
            os.close(read_fd)
            data = json.dumps(draw(part)).encode()
            with os.fdopen(write_fd, "wb") as pipe:
                pipe.write(data)
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)

    def wait() -> list[dict]:
        with os.fdopen(read_fd, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
        try:
            return json.loads(data) if data else []
        except ValueError:
            pass
        return [{"name": name, "title": title, "error": f"the drawing process ended with status {status}"}
                for name, title, _ in part]

    return wait

