"""The report's figures compare at a glance: one colour per variant in every figure (family hue,
alpha_0 shade), standard errors as error bars, Eso-LM (A) beside (B), the unigram off the axis,
T on the speed-quality points, lines in the order of their x axis, every panel labelled and with
a legend, validation beside training; drawn from a small database written here."""

import math

import pytest

# variant -> (family, alpha_0)
VARIANTS = {"ar": ("ar", 0.0), "mdlm": ("mdlm", 1.0), "bd3lm_l4": ("bd3lm", 1.0), "eso_a_a025": ("eso_a", 0.25),
            "eso_b_a1": ("eso_b", 1.0), "eso_b_a025": ("eso_b", 0.25), "eso_b_a0125": ("eso_b", 0.125),
            "unigram": ("unigram", None)}
# variant -> {metric base: (PPL, s.e. in nats)}
LIKELIHOOD = {"ar": {"exact_l2r": (18.5, 0.06), "nelbo_paired": (18.5, 0.0)},
              "mdlm": {"exact_sampler": (76.0, 0.04), "nelbo_paired": (65.9, 0.06)},
              "bd3lm_l4": {"exact_sampler": (47.3, 0.05), "nelbo_paired": (44.5, 0.07)},
              "eso_a_a025": {"exact_sampler": (49.2, 0.05), "nelbo_paired": (46.8, 0.04)},
              "eso_b_a1": {"exact_sampler": (72.1, 0.04), "nelbo_paired": (62.9, 0.06)},
              "eso_b_a025": {"exact_sampler": (48.9, 0.05), "nelbo_paired": (46.2, 0.03)},
              "eso_b_a0125": {"exact_sampler": (39.7, 0.05), "nelbo_paired": (38.0, 0.02)},
              "unigram": {"exact_l2r": (192.5, None)}}
for _v, _m in LIKELIHOOD.items():  # left to right too, below the sampler order's
    if "exact_sampler" in _m:
        _m["exact_l2r"] = (_m["exact_sampler"][0] * 0.9, _m["exact_sampler"][1])
CONTESTANTS = [v for v in VARIANTS if v != "unigram"]
LOW_VAR = {"mdlm", "bd3lm_l4", "eso_b_a1"}


@pytest.fixture
def db(tmp_path):
    from esolm.store import connect

    path = tmp_path / "results.duckdb"
    con = connect(path)
    for i, (v, (family, alpha_0)) in enumerate(VARIANTS.items()):
        con.execute("INSERT INTO variants (run_id, variant, family, alpha_0, final_valid_loss, objective) "
                    "VALUES ('r', ?, ?, ?, ?, ?)", [v, family, alpha_0, None if v == "unigram" else 3.0 + 0.1 * i,
                                                    "low_var" if v in LOW_VAR else "nelbo"])
        for base, (ppl, se) in LIKELIHOOD[v].items():
            con.execute("INSERT INTO likelihood VALUES ('r', ?, 'test', ?, ?)", [v, f"{base}_ppl", ppl])
            if se is not None:
                con.execute("INSERT INTO likelihood VALUES ('r', ?, 'test', ?, ?)", [v, f"{base}_stderr", se])
    for i, v in enumerate(CONTESTANTS):
        family, alpha_0 = VARIANTS[v]
        con.execute("INSERT INTO sampling (run_id, variant, family, nfe, seconds_per_sample, gen_ppl, entropy, judge) "
                    "VALUES ('r', ?, ?, 16, ?, ?, 2.7, 'judge')", [v, family, 0.001 * (1 + i / 10), 20.0 + 30 * i])
        for k, nll in enumerate((3.0, 3.4, 3.2, 3.6)):
            con.execute("INSERT INTO generations VALUES ('r', ?, ?, 'text', 2.7, ?)", [v, k, nll + 0.1 * i])
        # the curve over T: seconds not monotone in T, so that drawing in T's order would zigzag
        for steps, nfe, sec, ppl in ((2, 2, 0.003, 400.0), (4, 4, 0.001, 300.0), (8, 7, 0.002, 200.0),
                                     (16, 10, 0.0015, 150.0)):
            con.execute("INSERT INTO curves VALUES ('r', ?, ?, ?, ?, ?, ?, ?, 2.7, 'judge')",
                        [v, family, alpha_0, steps, nfe, sec * (1 + i / 20), ppl * (1 + i / 10)])
        for step in (10, 20, 30):
            con.execute("INSERT INTO training (run_id, variant, step, loss, lr, grad_norm, tokens_per_s, t_max) "
                        "VALUES ('r', ?, ?, ?, 1e-3, 1.0, 100.0, 1.0)", [v, step, 5.0 - step / 10 + i / 10])
    for v, family in (("eso_b", "eso_b"), ("mdlm", "mdlm"), ("ar", "ar"), ("bd3lm_l4", "bd3lm")):
        for length, s in ((256, 1.0), (1024, 3.0)):
            con.execute("INSERT INTO throughput (run_id, variant, family, length, nfe_budget, nfe, batch_size, "
                        "median_s, tokens_per_s, device) VALUES ('r', ?, ?, ?, 'L', ?, 1, ?, 1.0, 'cpu')",
                        [v, family, length, length, s * (1 if v == "eso_b" else 2 + len(v))])
    for trial, (sec, ppl) in enumerate(((0.001, 200.0), (0.002, 100.0), (0.0015, 300.0))):
        con.execute("INSERT INTO search_trials (run_id, variant, trial, state, feasible, gen_ppl, seconds, nfe) "
                    "VALUES ('r', 'eso_b_a025', ?, 'COMPLETE', true, ?, ?, 8)", [trial, ppl, sec])
    con.executemany("INSERT INTO search_points (run_id, variant, kind, point, trial, steps, seconds, gen_ppl, nfe) "
                    "VALUES ('r', 'eso_b_a025', ?, ?, ?, ?, ?, ?, ?)",
                    [("front", 0, 0, None, 0.001, 200.0, 4), ("front", 1, 1, None, 0.002, 100.0, 8),
                     ("default", 0, None, 4, 0.0018, 250.0, 4), ("default", 1, None, 8, 0.0016, 180.0, 8)])
    con.close()
    return path


@pytest.fixture
def drawn(db, tmp_path, monkeypatch):
    """Every report figure of the database, written by ``write_report``: {file name: (figure,
    savefig's keyword arguments)}, each captured as it is saved."""
    from matplotlib.figure import Figure

    from esolm.report import write_report

    figs, real = {}, Figure.savefig

    def savefig(fig, path, *args, **kwargs):
        figs[str(path).rsplit("/", 1)[-1]] = (fig, kwargs)
        return real(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    out = write_report(db, "r", tmp_path / "out")
    assert all((tmp_path / "out" / "figures" / name).stat().st_size > 0 for name in figs)
    assert {p.rsplit("/", 1)[-1] for p in out["figures"]} == set(figs) == {
        "ppl_vs_alpha.png", "speed_quality.png", "pareto.png", "speedup.png", "training.png", "search_pareto.png"}
    return figs


def test_variant_colour_is_one_per_variant_by_family_hue_and_alpha_0_shade():
    from matplotlib.colors import to_hex, to_rgb

    from esolm.families import FAMILIES
    from esolm.plots import OTHER_COLOR, variant_color

    colors = {v: variant_color(f, a) for v, (f, a) in VARIANTS.items()}
    assert len(set(colors.values())) == len(colors)  # distinct per variant
    assert colors == {v: variant_color(f, a) for v, (f, a) in VARIANTS.items()}  # and always the same
    assert colors["unigram"] == variant_color("no such family") == OTHER_COLOR
    assert colors["mdlm"] == to_hex(FAMILIES["mdlm"].color) == variant_color("mdlm", None)  # fixed: the hue
    assert variant_color("eso_b") == to_hex(FAMILIES["eso_b"].color)  # no alpha_0 given: the hue itself

    def lightness(c):
        return sum(to_rgb(c))

    # Eso-LM (B): shades of one hue, lighter as alpha_0 falls
    assert lightness(colors["eso_b_a1"]) < lightness(colors["eso_b_a025"]) < lightness(colors["eso_b_a0125"])
    for c in (colors["eso_b_a1"], colors["eso_b_a0125"]):  # still blue: blue the largest channel
        assert max(range(3), key=lambda k: to_rgb(c)[k]) == 2


def _variant_of(label: str) -> str | None:
    """The variant a legend label names: 'eso_b_a025 (Eso-LM (B))', 'over mdlm', 'mdlm (NELBO ± 3.8)'."""
    words = label.replace("over ", "").split()
    return words[0] if words and words[0] in VARIANTS else None


def test_every_figure_gives_each_variant_its_one_colour_and_every_panel_labels_and_a_legend(drawn):
    from matplotlib.colors import to_hex

    from esolm.plots import variant_color

    seen: dict[str, set[str]] = {}
    for name, (fig, kwargs) in drawn.items():
        assert kwargs.get("bbox_inches") == "tight", name  # no label runs past the figure
        for ax in fig.axes:
            assert ax.get_xlabel() and ax.get_ylabel(), name
            assert ax.get_legend() is not None, name
            for line in ax.get_lines():
                if (v := _variant_of(line.get_label())) is not None:
                    seen.setdefault(v, set()).add(to_hex(line.get_color()))
            for container in ax.containers:
                if (v := _variant_of(container.get_label() or "")) is not None:
                    seen.setdefault(v, set()).add(to_hex(container.lines[0].get_color()))
    expected = {v: {variant_color(*VARIANTS[v])} for v in CONTESTANTS}
    expected["eso_b"] = {variant_color("eso_b")}  # the bench's variant names no alpha_0
    assert {v: seen[v] for v in CONTESTANTS} == {v: expected[v] for v in CONTESTANTS}
    assert seen.keys() <= expected.keys()


def test_perplexity_vs_alpha_has_standard_errors_eso_a_beside_b_and_the_unigram_off_the_axis(drawn):
    from matplotlib.container import ErrorbarContainer

    fig, _ = drawn["ppl_vs_alpha.png"]
    (ax,) = fig.axes
    bars = {}
    for c in ax.containers:
        assert isinstance(c, ErrorbarContainer) and c.has_yerr
        (segments,) = c.lines[2]
        (x0, y0), (_, y1) = segments.get_segments()[0]
        bars.setdefault(c.get_label(), []).append((x0, y0, y1))
    exact = {v: min(b, key=lambda b: b[0]) for v, b in ((k.split()[0], b) for k, b in bars.items()
                                                         if k != "_nolegend_")}
    assert set(exact) == {"eso_a_a025", "eso_b_a1", "eso_b_a025", "eso_b_a0125"}
    for v, (_, lo, hi) in exact.items():  # the exact PPL (sampler order) +- PPL x s.e. in nats
        ppl, se = LIKELIHOOD[v]["exact_sampler"]
        assert (lo, hi) == pytest.approx((ppl - ppl * se, ppl + ppl * se))
    assert len(ax.containers) == 8  # every exact and every NELBO value has its error bar
    assert exact["eso_a_a025"][0] != pytest.approx(exact["eso_b_a025"][0])  # (A) is not hidden under (B)
    assert ax.get_ylim()[1] < 192.5 and any("unigram" in t.get_text() and "above the axis" in t.get_text()
                                            for t in ax.texts)
    assert ax.get_yscale() == "log"


def test_speed_quality_points_carry_their_standard_error_and_their_nfe(drawn):
    fig, _ = drawn["speed_quality.png"]
    (ax,) = fig.axes
    assert len(ax.containers) == len(CONTESTANTS) and all(c.has_yerr for c in ax.containers)
    assert sum(t.get_text() == "NFE 16" for t in ax.texts) == len(CONTESTANTS)


def test_pareto_curves_follow_their_x_axis_and_name_t_at_every_point(drawn):
    fig, _ = drawn["pareto.png"]
    assert len(fig.axes) == 2
    for ax in fig.axes:
        for line in ax.get_lines():
            xs = list(line.get_xdata())
            assert xs == sorted(xs), line.get_label()  # no zigzag back along the axis
        labels = [t.get_text() for t in ax.texts]
        assert all(labels.count(str(t)) == len(CONTESTANTS) for t in (2, 4, 8, 16))


def test_training_shows_each_variants_validation_beside_its_training(drawn):
    fig, _ = drawn["training.png"]
    nelbo, low_var = fig.axes
    assert nelbo.get_ylabel().startswith("training NELBO") and "low_var" in low_var.get_ylabel()
    # a validation marker per variant (validation is the NELBO whatever the objective)
    values = sorted(float(o[1]) for c in nelbo.collections for o in c.get_offsets())
    assert values == pytest.approx(sorted(3.0 + 0.1 * i for i, v in enumerate(VARIANTS) if v != "unigram"))
    assert any("validation" in t.get_text() for t in nelbo.get_legend().get_texts())


def test_search_names_the_searched_model_and_shows_no_legend_entry_without_points(drawn):
    fig, _ = drawn["search_pareto.png"]
    (ax,) = fig.axes
    assert "eso_b_a025" in ax.get_title() and "Eso-LM (B)" in ax.get_title()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert not any("entropy floor" in t or "infeasible" in t for t in legend)  # every trial is feasible here
    assert {"T=4", "T=8"} <= {t.get_text() for t in ax.texts}


def test_log_axes_have_plain_tick_labels():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from esolm.plots import log_axis

    fig, ax = plt.subplots()
    ax.plot([0.0007, 0.0018], [18, 400])
    log_axis(ax, "x", [0.0007, 0.0018])
    log_axis(ax, "y", [18, 400])
    fig.canvas.draw()
    ys = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert ys and all("10^" not in t and "times" not in t for t in ys) and "100" in ys
    assert all(not math.isnan(float(t.get_text())) for t in ax.get_xticklabels() if t.get_text())
    plt.close(fig)
