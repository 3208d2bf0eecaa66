"""The results folder of a run (SPEC section 6): ``summary.json``, the tables as CSV, the figures and
``report.html``.

- ``summary``: ``build_summary`` (the summary.json dictionary, checked against the pydantic model
  ``Summary`` whose JSON Schema is published by ``p2pm schema summary``), ``format_summary``.
- ``tables``: column order and the pandera contract of every CSV table, checked when written.
- ``figures``: the PNG figures (matplotlib, imported only when figures are drawn).
- ``page``: ``report.html`` from the Jinja2 template ``templates/report.html.j2``.

``write_results`` writes the whole folder; ``check_results`` checks a folder on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.report.summary import (ENERGY_KEYS, SUMMARY_KEYS, Summary, SummaryContractError, build_summary,
                                   check_summary, check_summary_file, format_summary, hourly_energy,
                                   summary_json_schema)
from common.report.tables import TABLE_COLUMNS, ResultsContractError, check_folder, hours_table, write_table
from common.report.values import _py
from common.results import RunResult

__all__ = ["ENERGY_KEYS", "SUMMARY_KEYS", "TABLE_COLUMNS", "ResultsContractError", "Summary", "SummaryContractError",
           "build_summary", "check_results", "check_summary", "format_summary", "hourly_energy", "preload",
           "summary_json_schema", "write_results"]


def preload(figures: bool = True) -> None:
    """Import the results libraries (pandera; matplotlib and Jinja2 with ``figures``) now, e.g. in a
    background thread of a process that will write a results folder while it waits for something
    else (the coordinator, while the peers start)."""
    from common.report.tables import table_schemas

    table_schemas()
    if figures:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.figure  # noqa: F401

        from common.report.page import _template

        _template()


def write_results(result: RunResult, out_dir: Path, scenario=None, figures: bool = True) -> Path:
    """Write the results folder of a run (SPEC section 6) and return it.

    ``scenario`` (optional, the public scenario, ``common.public.PublicScenario``) gives the voltage
    and loading limits and the tolerance drawn in the figures, the grid tariff drawn with the prices,
    the network drawn on the map, and is saved as ``scenario.json``. ``figures=False`` writes the
    tables only (no figures, no page). Every table is checked against its contract as it is
    written; a table that breaks it is still written, and ResultsContractError is raised once the
    whole folder is written, naming each broken check.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = build_summary(result)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    files = ["summary.json"]
    failures: list[str] = []

    def table(df, name, always=False):
        written, broken = write_table(df, out_dir / f"{name}.csv", name, always=always)
        failures.extend(broken)
        if written:
            files.append(f"{name}.csv")

    ac = result.ac
    table(result.dispatch, "dispatch", always=True)
    table(result.trades, "trades")
    table(result.prices, "prices")
    table(ac.buses if ac is not None else None, "buses", always=True)
    table(ac.lines if ac is not None else None, "lines", always=True)
    table(hours_table(result), "hours", always=True)
    table(ac.violations if ac is not None else None, "violations", always=True)
    table(ac.network_buses if ac is not None else None, "network_buses")
    table(ac.network_branches if ac is not None else None, "network_branches")
    if result.ac_initial is not None:
        table(result.ac_initial.violations, "violations_initial", always=True)
    table(result.admm_history, "admm_history", always=True)
    table(result.messages, "messages", always=True)
    table(result.ev_soc, "ev_soc")
    table(result.payments, "payments")
    table(result.relaxation, "relaxation")
    table(result.grid_exchange, "grid_exchange")
    table(result.outer_hours, "outer_hours")
    table(result.outer_history, "outer_history")
    table(result.outer_day, "outer_day")
    table(result.penalties, "penalties")
    if scenario is not None and hasattr(scenario, "dump"):  # the public part only: no peer's private data
        (out_dir / "scenario.json").write_text(json.dumps(_py(scenario.dump()), indent=2) + "\n")
        files.append("scenario.json")

    if figures:
        from common.report.figures import render_figures
        from common.report.page import render_page

        drawn = render_figures(result, out_dir / "figures", scenario)
        files += [f"figures/{f['name']}.png" for f in drawn if "png" in f]
        files.append("report.html")
        (out_dir / "report.html").write_text(render_page(result, summary, drawn, scenario, files, failures),
                                             encoding="utf-8")
    if failures:
        raise ResultsContractError(failures)
    return out_dir


def check_results(folder: Path) -> list[str]:
    """Every broken contract of a results folder on disk: summary.json against the Summary model,
    each known CSV table against its pandera schema. Empty: the folder keeps its contract."""
    folder = Path(folder)
    failures = []
    if not (folder / "summary.json").is_file():
        return [f"{folder}: no summary.json"]
    try:
        check_summary_file(folder / "summary.json")
    except SummaryContractError as exc:
        failures += str(exc).splitlines()
    return failures + check_folder(folder)
