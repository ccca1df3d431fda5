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
    # nelbo: on every NELBO batch; nelbo_paired: on the exact metrics' tokens, what claims compare
    values = [("ar", "exact_l2r", 20.0, 0.01), ("ar", "nelbo", 16.9, 0.0), ("ar", "nelbo_paired", 20.0, 0.0),
              ("b1", "exact_l2r", 30.0, 0.01),
              ("b05", "exact_sampler", 30.0, 0.01), ("b05", "nelbo_paired", 33.0, 0.01), ("b05", "nelbo", 28.0, 0.01),
              ("b1", "exact_sampler", 29.0, 0.05), ("b1", "nelbo_paired", 36.0, 0.01),
              ("mdlm", "exact_sampler", 25.0, 0.01), ("mdlm", "nelbo_paired", 24.0, 0.2)]
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
    assert by[("b05 < b1", "nelbo paired")][4] == "yes"
    # AR's row uses its NELBO on the exact tokens (20.0), never the NELBO of other tokens (16.9)
    assert by[("ar < b05", "nelbo paired")][2] == "20.0 vs 33.0"
    # exact <= NELBO per diffusion model; MDLM's NELBO is below its exact value here
    assert by[("mdlm: exact <= NELBO", "exact sampler vs nelbo paired")][4] == "no, within noise"
    assert by[("b1: exact <= NELBO", "exact sampler vs nelbo paired")][4] == "yes"
    assert by[("b1: exact <= NELBO", "exact l2r vs nelbo paired")][4] == "yes"
    assert ("ar: exact <= NELBO", "exact sampler vs nelbo paired") not in by  # AR has one order
    assert by[("mdlm < b1", "nelbo paired")][4] == "yes"
    assert len(cols) == len(rows[0]) == 5


def test_training_figure_puts_each_objective_on_its_own_axis(tmp_path, monkeypatch):
    """low_var losses (alpha_0 = 1 under train.objective=low_var) are on another scale than the
    NELBO: the objective is ingested from train.json and each gets its own panel and label."""
    import json

    from esolm import report, report_figures
    from esolm.store import connect, ingest

    for name, objective, loss in [("ar", "nelbo", 3.5), ("mdlm", "low_var", 2.4), ("old", None, 4.0)]:
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        summary = {"family": "ar" if name == "ar" else "mdlm", "steps": 2, "tokens": 64,
                   "final_train_loss": loss, "final_valid_loss": 4.0, "wall_s": 1.0, "tokens_per_s": 64.0}
        if objective:  # "old": a train.json written before the objective was recorded
            summary.update(objective=objective, init="Normal(0, 0.02) weights, zero biases")
        if name == "mdlm":
            summary["mask_warmup"] = {"steps": 200, "start": 0.3}
        (run / "train.json").write_text(json.dumps(summary))
        (run / "train.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 64.0,
                        **({"t_max": 0.5 if s == 1 else 1.0} if name == "mdlm" else {})}) + "\n"
            for s in (1, 2)))  # mdlm: a masking warm-up over its first step; ar, old: no t_max
    db = tmp_path / "results.duckdb"
    params = {"variants": {"ar": {}, "mdlm": {}, "old": {}}, "data": {"out_dir": str(tmp_path / "none")}}
    ingest(params, tmp_path / "runs", tmp_path / "reports", db, rid="r")
    con = connect(db)
    assert dict(con.execute("SELECT variant, objective FROM variants").fetchall()) == {
        "ar": "nelbo", "mdlm": "low_var", "old": "nelbo"}
    con.close()
    figs = []
    monkeypatch.setattr(report_figures, "_save", lambda plt, fig, path: figs.append(fig) or True)
    assert report.fig_training(db, "r", tmp_path / "training.png")
    panels = {ax.get_ylabel(): sorted(line.get_label() for line in ax.get_lines()) for ax in figs[0].axes}
    assert panels == {"training NELBO (nats/token)": ["ar", "old"],
                      "training loss, low_var (nats/token; not a bound)": ["mdlm"]}
    def span(patch):  # x extent in data units (a Polygon before matplotlib 3.9, a Rectangle since)
        box = patch.get_path().transformed(patch.get_patch_transform()).get_extents()
        return patch.get_label(), box.x0, box.x1

    shaded = {ax.get_ylabel(): [span(p) for p in ax.patches] for ax in figs[0].axes}
    # the report's intro says how they were trained ("old" recorded no init)
    assert report.recipe_line(db, "r") == (
        "Training: init Normal(0, 0.02) weights, zero biases / unrecorded; objective low_var (mdlm); "
        "nelbo (ar, old); masking warm-up: the largest diffusion time rose from 0.3 to 1 over the first "
        "200 steps (mdlm). Validation and every likelihood here draw t over [eps, 1].")
    assert shaded == {"training NELBO (nats/token)": [],
                      "training loss, low_var (nats/token; not a bound)": [("masking warm-up (t_max < 1)", 0, 1)]}
