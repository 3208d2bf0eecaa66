"""The fault matrix tool's table (tools/fault_matrix.py): one line per cell from the runs' rows."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("fault_matrix", Path(__file__).parent.parent / "tools" / "fault_matrix.py")
fault_matrix = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fault_matrix)


def _row(cell, code, detect_s, exit_s, equal, rel, left, message, named=True):
    return {"cell": cell, "code": code, "detect_s": detect_s, "exit_s": exit_s, "equal": equal, "rel_diff": rel,
            "left": left, "message": message, "named": named}


def test_a_cell_line_counts_codes_results_and_leftovers():
    rows = [
        _row("peer-kill9-drop", 0, 0.5, 9.0, True, 2e-8, 0, "converged; dropped h0006-load2 (load2) at iteration 12"),
        _row("peer-kill9-drop", 0, 0.25, 8.0, False, 3e-6, 1, "converged; dropped h0006-load2 (load2) at iteration 40"),
        _row("peer-kill9-drop", 1, None, None, False, None, 0, "run failed: the coordinator stopped the run",
             named=False),
        _row("peer-kill9-abort", 1, 0.4, 0.4, None, None, 0, "run failed: peer load2 exited with code -9"),
    ]
    drop, abort = fault_matrix.summarize(rows)
    assert drop["runs"] == 3 and drop["exit_codes"] == "0:2 1:1"
    assert drop["detect_median_s"] == 0.375 and drop["detect_max_s"] == 0.5 and drop["exit_max_s"] == 9.0
    assert drop["equal"] == "1/3" and drop["max_rel_diff"] == 3e-6 and drop["named"] == "2/3" and drop["left"] == 1
    assert drop["messages"] == [("converged; dropped h0006-load2 (load2) at iteration 12", 2),
                                ("run failed: the coordinator stopped the run", 1)]
    assert abort["equal"] == "-" and abort["left"] == 0
    text = fault_matrix.render([drop, abort], "header")
    assert "| peer-kill9-drop | 3 | 0:2 1:1 | 0.38 / 0.50 | 9.00 | 1/3 (3.0e-06) | 2/3 | - | 1 |" in text
    assert "| peer-kill9-abort | 1 | 1:1 | 0.40 / 0.40 | 0.40 | - | 1/1 | - | 0 |" in text
