"""The AC report travels as columns (numeric columns as packed arrays, text columns as lists)
inside a GRID_REPORT message; pandas only, no pandapower, so the coordinator can read it."""

from __future__ import annotations

import numpy as np
import pandas as pd

from common.results import ACReport

TABLES = ("buses", "lines", "hours", "violations")
NETWORK_TABLES = ("network_buses", "network_branches")  # optional: the DSO sends them with its first report


def _column(series: pd.Series):
    if pd.api.types.is_bool_dtype(series):
        return series.to_numpy(dtype=bool)
    if pd.api.types.is_integer_dtype(series):
        return series.to_numpy(dtype=np.int64)
    if pd.api.types.is_float_dtype(series):
        # NaN marks a value a failed power flow could not give; it travels as a flag column
        return series.to_numpy(dtype=float)
    return [str(v) for v in series]


def ac_to_tables(ac: ACReport, network: bool = True) -> dict:
    names = TABLES + (NETWORK_TABLES if network else ())
    return frames_to_tables({name: getattr(ac, name) for name in names if getattr(ac, name) is not None})


def frames_to_tables(frames: dict[str, pd.DataFrame]) -> dict:
    out = {}
    for name, df in frames.items():
        cols = {}
        for col in df.columns:
            value = _column(df[col])
            if isinstance(value, np.ndarray) and value.dtype == float and np.isnan(value).any():
                cols[f"{col}__nan"] = np.isnan(value)
                value = np.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0)
            cols[col] = value
        cols["__columns__"] = [str(c) for c in df.columns]
        out[name] = cols
    return out


def ac_from_tables(tables: dict, network: dict | None = None) -> ACReport:
    """``network``: the tables of the report that carried the network's drawing, when ``tables``
    does not."""
    frames = frames_from_tables(tables, TABLES)
    source = tables if all(n in tables for n in NETWORK_TABLES) else (network or {})
    if all(n in source for n in NETWORK_TABLES):
        frames.update(frames_from_tables(source, NETWORK_TABLES))
    return ACReport(**frames)


def frames_from_tables(tables: dict, names) -> dict[str, pd.DataFrame]:
    frames = {}
    for name in names:
        cols = tables[name]
        data = {}
        for col in cols["__columns__"]:
            value = cols[col]
            if f"{col}__nan" in cols:
                value = np.where(np.asarray(cols[f"{col}__nan"], dtype=bool), np.nan, np.asarray(value, dtype=float))
            data[col] = value
        frames[name] = pd.DataFrame(data, columns=cols["__columns__"])
    return frames
