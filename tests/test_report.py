"""The report's statement of which of the paper's orderings hold, on a database written here."""

import math

import pytest


@pytest.fixture
def db(tmp_path):
    from esolm.store import connect

    path = tmp_path / "results.duckdb"
    con = connect(path)
    variants = [("ar", "ar", 0.0), ("b1", "eso_b", 1.0), ("b05", "eso_b", 0.5), ("mdlm", "mdlm", 1.0)]
    con.executemany("INSERT INTO variants (run_id, variant, family, alpha_0) VALUES ('r', ?, ?, ?)", variants)
    # (variant, metric base, ppl, stderr in nats)
    values = [("ar", "exact_l2r", 20.0, 0.01), ("b1", "exact_l2r", 30.0, 0.01),
              ("b05", "exact_sampler", 30.0, 0.01), ("b05", "nelbo", 33.0, 0.01),
              ("b1", "exact_sampler", 29.0, 0.05), ("b1", "nelbo", 36.0, 0.01),
              ("mdlm", "exact_sampler", 25.0, 0.01), ("mdlm", "nelbo", 24.0, 0.2)]
    rows = []
    for v, base, ppl, se in values:
        rows += [("r", v, "test", f"{base}_ppl", ppl), ("r", v, "test", f"{base}_stderr", se)]
    con.executemany("INSERT INTO likelihood VALUES (?, ?, ?, ?, ?)", rows)
    con.close()
    return path


def test_orderings_state_each_claim_with_its_margin_in_standard_errors(db):
    from esolm.report import orderings

    cols, rows = orderings(db, "r")
    by = {(r[0], r[1]): r for r in rows}
    # AR < b05 on the exact likelihood: gap log(30/20) over hypot(.01, .01)
    margin = math.log(30 / 20) / math.hypot(0.01, 0.01)
    assert by[("ar < b05", "exact sampler")][3] == f"{margin:+.1f}" and by[("ar < b05", "exact sampler")][4] == "yes"
    # b05 < b1 on the exact likelihood fails: 30 vs 29, -0.69 s.e.: "no, within noise"
    r = by[("b05 < b1", "exact sampler")]
    assert r[3] == f"{math.log(29 / 30) / math.hypot(0.01, 0.05):+.1f}" and r[4] == "no, within noise"
    assert by[("b05 < b1", "nelbo")][4] == "yes"
    # exact <= NELBO per diffusion model; MDLM's NELBO is below its exact value here
    assert by[("mdlm: exact <= NELBO", "exact sampler vs nelbo")][4] == "no, within noise"
    assert by[("b1: exact <= NELBO", "exact sampler vs nelbo")][4] == "yes"
    assert by[("b1: exact <= NELBO", "exact l2r vs nelbo")][4] == "yes"
    assert ("ar: exact <= NELBO", "exact sampler vs nelbo") not in by  # AR has one order
    assert by[("mdlm < b1", "nelbo")][4] == "yes"
    assert len(cols) == len(rows[0]) == 5
