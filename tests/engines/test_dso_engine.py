"""The DSO engine: an hour whose AC power flow does not converge is reported, not fatal, and the
distributed run goes on exactly as the centralized one (both report the hour)."""

from __future__ import annotations

import numpy as np

from common.engine import COORDINATOR, Received
from common.models import peer_models
from common.protocol.grid import Dispatch, GridReport
from common.public import split_scenario
from common.report_codec import ac_from_tables
from common.scenario import load_scenario
from dso_service.engine import DSOEngine


def test_a_dispatch_with_a_collapsing_hour_is_reported_not_fatal():
    sc = load_scenario("mv37")
    public, _ = split_scenario(sc)
    models = peer_models(sc)
    H = sc.market.hours
    p = np.vstack([m.p_min_mw if m.kind == "load" else np.zeros(H) for m in models])
    p[:, 1] *= 100.0  # hour 2: a hundred times the largest consumption, no power-flow solution
    dispatch = Dispatch(peer_ids=tuple(m.id for m in models), kinds=tuple(m.kind for m in models),
                        buses=tuple(m.bus for m in models), p_mw=p, q_mvar=0.3 * p, plan=False)
    dso = DSOEngine(public)
    out = dso.handle(Received(COORDINATOR, dispatch, 7))
    reports = [ins.message for ins in out if hasattr(ins, "message") and isinstance(ins.message, GridReport)]
    assert len(reports) == 1
    report = reports[0]
    assert report.status == "ok"
    ac = ac_from_tables(report.tables)
    converged = ac.hours["converged"].tolist()
    assert not converged[1] and all(converged[:1] + converged[2:]) and len(converged) == H
    assert set(ac.lines["hour"]) == set(range(1, H + 1))
    assert list(ac.violations.loc[ac.violations["hour"] == 2, "kind"]) == ["not_converged"]
    # the wire accepts it (the schema checks every table's hours)
    from common.codec import decode, encode

    decode(encode(report.envelope(run_id="r", sender="dso", iteration=7)), expect_run="r")
