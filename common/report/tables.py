"""The CSV tables of the results folder (SPEC section 6): column order, contracts, writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from common.results import RunResult

TABLE_COLUMNS = {
    "dispatch": ["peer", "kind", "bus", "hour", "p_mw", "q_mvar"],
    "trades": ["seller", "buyer", "hour", "p_mw", "price_eur_per_mwh"],
    "prices": ["bus", "peer", "hour", "price_eur_per_mwh"],
    "buses": ["bus", "hour", "vm_pu"],
    "lines": ["line", "hour", "loading_percent"],
    "hours": ["hour"],
    "violations": ["hour", "element", "index", "value", "limit", "kind"],
    "admm_history": ["outer", "iteration", "primal_residual", "dual_residual", "rho"],
    "messages": ["iteration", "type", "count", "bytes"],
    "ev_soc": ["peer", "hour", "soc_mwh"],
    "payments": ["peer", "payment_eur"],
    "relaxation": ["hour", "losses_socp_mw", "losses_ac_mw", "max_vm_gap_pu"],
    "grid_exchange": ["hour", "import_mw", "export_mw"],
    "network_buses": ["bus", "x", "y", "vn_kv", "slack", "source"],
    "network_branches": ["line", "element", "kind", "from_bus", "to_bus"],
}


def _ordered(df: pd.DataFrame, name: str) -> pd.DataFrame:
    first = [c for c in TABLE_COLUMNS.get(name, []) if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


def hours_table(result: RunResult) -> pd.DataFrame:
    econ = result.economics if result.economics is not None else pd.DataFrame(columns=["hour"])
    if result.ac is not None and result.ac.hours is not None and "hour" in result.ac.hours.columns:
        acc = result.ac.hours
        if "hour" not in econ.columns or econ.empty:
            table = acc.copy()
            for c in econ.columns:
                if c not in table.columns:
                    table[c] = np.nan
        else:
            table = acc.merge(econ, on="hour", how="outer", suffixes=("", "_market"))
    else:
        table = econ.copy()
    if "hour" in table.columns and not table.empty:
        table = table.sort_values("hour").reset_index(drop=True)
    return table



# ---------------------------------------------------------------------------------------------------------------
# contracts (pandera): what a researcher may rely on in each table; more columns are welcome
# ---------------------------------------------------------------------------------------------------------------
PEER_KINDS = ("grid", "load", "pv", "wind", "chp", "ev", "virtual_load", "prosumer")
ELEMENTS = ("bus", "line", "trafo", "powerflow")
VIOLATION_KINDS = ("undervoltage", "overvoltage", "overload", "not_converged")


class ResultsContractError(ValueError):
    """Tables of a results folder that break their contract; ``failures``: one line per broken check."""

    def __init__(self, failures: list[str]):
        self.failures = failures
        super().__init__("results tables break their contract:\n  " + "\n  ".join(failures))


_SCHEMAS: dict | None = None


def table_schemas() -> dict:
    """name -> pandera DataFrameSchema (built once; pandera is imported on first use)."""
    global _SCHEMAS
    if _SCHEMAS is not None:
        return _SCHEMAS
    import pandera.pandas as pa
    from pandera.pandas import Check, Column

    def finite(nullable=False, **checks):
        cs = [Check(lambda s: np.isfinite(s) | s.isna(), element_wise=False, name="finite")]
        cs += [getattr(Check, k)(v) if not isinstance(v, tuple) else getattr(Check, k)(*v) for k, v in checks.items()]
        return Column(float, cs, nullable=nullable)

    hour = Column(int, Check.ge(1))
    name = Column(str)

    def schema(columns: dict, unique=None, **kw) -> pa.DataFrameSchema:
        return pa.DataFrameSchema(columns, strict=False, unique=unique, **kw)

    _SCHEMAS = {
        "dispatch": schema({"peer": name, "kind": Column(str, Check.isin(PEER_KINDS)), "bus": Column(int, Check.ge(0)),
                            "hour": hour, "p_mw": finite(), "q_mvar": finite()}, unique=["peer", "hour"]),
        "trades": schema({"seller": name, "buyer": name, "hour": hour, "p_mw": finite(),
                          "price_eur_per_mwh": finite()}, unique=["seller", "buyer", "hour"]),
        "prices": schema({"hour": hour, "price_eur_per_mwh": finite()}),
        "buses": schema({"bus": Column(int, Check.ge(0)), "hour": hour, "vm_pu": finite(nullable=True, gt=0.0)},
                        unique=["bus", "hour"]),
        "lines": schema({"line": Column(int, Check.ge(0)), "hour": hour,
                         "loading_percent": finite(nullable=True, ge=0.0)}),
        "hours": schema({"hour": hour}, unique=["hour"]),
        "violations": schema({"hour": hour, "element": Column(str, Check.isin(ELEMENTS)),
                              "kind": Column(str, Check.isin(VIOLATION_KINDS))}),
        "admm_history": schema({"outer": Column(int, Check.ge(0)), "iteration": Column(int, Check.ge(0)),
                                "primal_residual": finite(nullable=True, ge=0.0),
                                "dual_residual": finite(nullable=True, ge=0.0), "rho": finite(nullable=True, gt=0.0)}),
        "messages": schema({"iteration": Column(int, Check.ge(0)), "type": name, "count": Column(int, Check.ge(0)),
                            "bytes": Column(int, Check.ge(0))}, unique=["iteration", "type"]),
        "ev_soc": schema({"peer": name, "hour": hour, "soc_mwh": finite(ge=-1e-6)}, unique=["peer", "hour"]),
        "payments": schema({"peer": name, "payment_eur": finite()}, unique=["peer"]),
        "relaxation": schema({"hour": hour, "losses_socp_mw": finite(), "losses_ac_mw": finite(nullable=True)}),
        "grid_exchange": schema({"hour": hour, "import_mw": finite(ge=-1e-6), "export_mw": finite(ge=-1e-6)}),
    }
    _SCHEMAS["network_buses"] = schema({"bus": Column(int, Check.ge(0)), "x": finite(), "y": finite(),
                                        "vn_kv": finite(gt=0.0)}, unique=["bus"])
    _SCHEMAS["network_branches"] = schema({"line": Column(int, Check.ge(0)), "element": Column(str, Check.isin(
        ("line", "trafo"))), "from_bus": Column(int, Check.ge(0)), "to_bus": Column(int, Check.ge(0))})
    _SCHEMAS["violations_initial"] = _SCHEMAS["violations"]
    return _SCHEMAS


def check_table(df: pd.DataFrame, name: str) -> list[str]:
    """The broken checks of one table (empty when it keeps its contract), one readable line each:
    table, column, check, how many rows and the first failing values."""
    schema = table_schemas().get(name)
    if schema is None:
        return []
    if name == "prices" and not ({"bus", "peer"} & set(df.columns)):
        return [f"prices.csv: needs a 'bus' or a 'peer' column, has {list(df.columns)}"]
    if df.empty:
        missing = [c for c in schema.columns if c not in df.columns]
        return [f"{name}.csv: missing column(s) {missing}"] if missing else []
    import pandera.errors

    try:
        schema.validate(df, lazy=True)
    except pandera.errors.SchemaErrors as exc:
        return _describe(name, exc.failure_cases, df)
    return []


def _describe(name: str, cases: pd.DataFrame, df: pd.DataFrame) -> list[str]:
    out = []
    for (column, check), group in cases.groupby([cases["column"].astype(str), cases["check"].astype(str)], sort=False):
        def value(i, v):
            if column in df.columns and pd.notna(i) and i in df.index:
                v = df.at[i, column]
            return v.item() if hasattr(v, "item") else v

        shown = ", ".join(f"row {i}: {value(i, v)!r}" if pd.notna(i) else repr(v)
                          for i, v in zip(group["index"].head(3), group["failure_case"].head(3)))
        where = f"column '{column}'" if column not in ("None", "nan") else "table"
        out.append(f"{name}.csv: {where} fails {check} in {len(group)} row(s) ({shown})")
    return out


def write_table(df: pd.DataFrame | None, path: Path, name: str, always: bool = False) -> tuple[bool, list[str]]:
    """Check a table against its contract and write it; an absent or empty table is written (header
    only) only when ``always``. Returns (written, broken checks): a table that breaks its contract
    is still written (it is what the run produced), the caller reports the failures."""
    if df is None:
        if not always:
            return False, []
        cols = [c for c in TABLE_COLUMNS.get(name, []) if not (name == "prices" and c == "peer")]
        df = pd.DataFrame(columns=cols)
    elif df.empty and not always:
        return False, []
    df = _ordered(df, name)
    failures = check_table(df, name)
    df.to_csv(path, index=False)
    return True, failures


TEXT_COLUMNS = ("peer", "kind", "seller", "buyer", "type", "element")


def check_folder(folder: Path) -> list[str]:
    """The broken checks of every known table of a results folder on disk."""
    failures = []
    folder = Path(folder)
    for name in table_schemas():
        path = folder / f"{name}.csv"
        if path.is_file():
            failures += check_table(pd.read_csv(path, dtype={c: str for c in TEXT_COLUMNS}), name)
    return failures
