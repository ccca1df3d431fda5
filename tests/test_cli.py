"""params.yaml loading, --set overrides, and the CLI verbs that need no trained model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from esolm.cli import main
from esolm.params import apply_sets, load_params


def test_set_overrides_parse_yaml_values():
    params = {"data": {"length": 64, "tokenizer": "bpe:2048"}, "bench": {"lengths": [256]}}
    apply_sets(params, ["data.length=128", "bench.lengths=[32, 64]", "data.tokenizer=gpt2"])
    assert params == {"data": {"length": 128, "tokenizer": "gpt2"}, "bench": {"lengths": [32, 64]}}


@pytest.mark.parametrize("item,match", [
    ("data.lenght=3", "did you mean 'length'"), ("dta.length=3", "did you mean 'data'"),
    ("data.length", "dotted.key=value"),
])
def test_unknown_or_malformed_keys_name_the_closest_valid_one(item, match):
    with pytest.raises(ValueError, match=match):
        apply_sets({"data": {"length": 64}}, [item])


def test_missing_params_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--params"):
        load_params(tmp_path / "nope.yaml")


def test_repo_params_file_loads():
    params = load_params("params.yaml")
    assert {"data", "bench"} <= set(params)


def test_bench_verb_writes_rows_and_figure(tmp_path, capsys):
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["bench"].update(lengths=[16], repeats=1, warmup=0, out=str(tmp_path / "bench.json"),
                           variants=["eso_b", "mdlm", "ar", "bd3lm_l4"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["bench", "--params", str(tmp_path / "params.yaml"), "--quiet", "--device", "cpu"]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert {r["variant"] for r in rows} == {"eso_b", "mdlm", "ar", "bd3lm_l4"}
    for r in rows:
        assert {"variant", "family", "length", "nfe", "batch_size", "median_s", "tokens_per_s", "device"} <= set(r)
        assert r["nfe"] == 16 and r["median_s"] > 0
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert "speedup over" in capsys.readouterr().out


def test_bad_param_in_a_verb_exits_2_with_a_message(capsys):
    assert main(["bench", "--set", "bench.lengthz=[3]"]) == 2
    assert "did you mean 'lengths'" in capsys.readouterr().err


def test_paper_presets_follow_the_reference_recipe():
    """LM1B runs wrap (pack) sentences like the authors'; the training objective is named."""
    from esolm.params import load_params

    lm1b = load_params("params.yaml", ["preset=lm1b-small"])
    assert lm1b["data"]["packing"] == "wrap" and lm1b["data"]["length"] == 128
    # the authors: OWT alpha_0 = 1 runs on low_var, LM1B runs on the ELBO (low_var reaches alpha_0 = 1 only)
    expected = {"tiny-cpu": "low_var", "owt-small": "low_var", "lm1b-small": "nelbo", "cpu-study": "nelbo"}
    for preset, objective in expected.items():
        assert load_params("params.yaml", [f"preset={preset}"])["train"]["objective"] == objective, preset
    # the paper presets and the committed reference study keep the reference's init and t draw;
    # the embedded study alone adds the Normal init and the masking warm-up
    for preset in ("owt-small", "lm1b-small", "cpu-study"):
        p = load_params("params.yaml", [f"preset={preset}"])
        assert (p["model"]["init"], p["train"]["mask_warmup_steps"]) == ("adaln_zero", 0), preset
    p = load_params("params.yaml")
    assert (p["model"]["init"], p["train"]["mask_warmup_steps"]) == ("normal", 200)
    # the embedded study evaluates the report's split only; the reference keeps both and L' = 16
    ref = load_params("params.yaml", ["preset=cpu-study"])
    assert p["evaluate"]["splits"] == ["test"] and ref["evaluate"]["splits"] == ["valid", "test"]
    assert "bd3lm_l16" in ref["bench"]["variants"] and "bd3lm_l16" not in p["bench"]["variants"]


def test_numbers_in_exponent_form_are_numbers(tmp_path):
    """PyYAML reads ``1e-3`` as text; ``train.lr=1e-3`` used to reach the optimizer as a string."""
    params = {"train": {"lr": 2.0e-3, "steps": 3}}
    apply_sets(params, ["train.lr=1e-3", "train.steps=1_000"])
    assert params["train"] == {"lr": 1e-3, "steps": 1000}
    (tmp_path / "p.yaml").write_text("preset: null\ntrain:\n  lr: 3e-4\n  ema: 1E-2\n")
    assert load_params(tmp_path / "p.yaml")["train"] == {"lr": 3e-4, "ema": 1e-2}


@pytest.mark.parametrize("text,match", [("train: [1, 2\n", "is not valid YAML"),
                                        ("- train\n- data\n", "must hold a mapping")])
def test_broken_params_files_are_one_line_errors_naming_the_file(tmp_path, text, match):
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        load_params(tmp_path / "p.yaml")
    assert str(tmp_path / "p.yaml") in str(err.value)


def test_a_mistyped_setting_fails_before_any_file_is_touched(tmp_path, monkeypatch, capsys):
    """``train.lr=fast`` used to reach Lightning after ``train`` had moved ``last.ckpt`` aside
    and deleted ``train.jsonl``; now the typed config refuses it first."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(Path(__file__).parents[1].joinpath("params.yaml").read_text())
    run = tmp_path / "runs" / "mdlm"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"precious")
    (run / "train.jsonl").write_text('{"step": 10}\n')
    assert main(["train", "--variant", "mdlm", "--set", "train.lr=fast", "--quiet"]) == 2
    assert "train.lr='fast' is not a float" in capsys.readouterr().err
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == b"precious"
    assert (run / "train.jsonl").read_text() == '{"step": 10}\n'


def test_query_is_read_only_and_prints_text_verbatim(tmp_path, capsys):
    """``COPY (...) TO 'reports/report.md'`` used to overwrite the report; sample text with
    ``[/Applause]`` crashed the table (Rich markup)."""
    import duckdb

    db = tmp_path / "r.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE generations (text VARCHAR)")
    con.execute("INSERT INTO generations VALUES (?)", ["thanks [/Applause] and [bold]more"])
    con.close()
    target = tmp_path / "report.md"
    target.write_text("the report")
    assert main(["query", "--db", str(db), "SELECT text AS \"[x]\" FROM generations"]) == 0
    out = capsys.readouterr().out
    assert "[/Applause]" in out and "[bold]more" in out and "[x]" in out
    for sql in (f"COPY (SELECT 1) TO '{target}'", f"EXPORT DATABASE '{tmp_path / 'e'}'",
                f"ATTACH '{tmp_path / 'x.db'}'", "INSTALL httpfs", "LOAD httpfs",
                "CREATE TABLE t (a INT)", "DELETE FROM generations"):
        assert main(["query", "--db", str(db), sql]) == 2, sql
        assert "read-only" in capsys.readouterr().err
    assert main(["query", "--db", str(db), f"SELECT * FROM read_csv('{target}')"]) == 2
    assert main(["query", "--db", str(db), "  "]) == 2
    assert "the query is empty" in capsys.readouterr().err
    assert target.read_text() == "the report" and not (tmp_path / "e").exists()


def test_a_search_variant_outside_the_study_is_a_clear_error(tmp_path):
    """Dropping a variant while search.variant still names it fails when params load (every
    verb), naming the closest variant, instead of at the search stage after the trainings."""
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["search"]["variant"] = "eso_b_a05x"
    params["variants"]["eso_b_a05"] = {"family": "eso_b", "alpha_0": 0.5, "batch_split": 0.5}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ValueError, match=r"search.variant='eso_b_a05x' is not a variant .*did you mean 'eso_b_a05'"):
        load_params(tmp_path / "p.yaml")
    assert load_params(tmp_path / "p.yaml", ["search.variant=eso_b_a05"])["search"]["variant"] == "eso_b_a05"
    with pytest.raises(ValueError, match=r"search.variant='zzz' is not a variant .*; variants: \['ar', "):
        load_params(tmp_path / "p.yaml", ["search.variant=zzz"])  # no near miss: the list, by its name
    assert main(["sample", "--params", str(tmp_path / "p.yaml"), "--variant", "ar"]) == 2


@pytest.mark.parametrize("name", ["x;touch pwned", "a b", "../up", "-dash", "$(id)"])
def test_variant_names_that_could_run_commands_are_refused(tmp_path, name):
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["variants"][name] = {"family": "ar"}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ValueError, match="variant name .* is invalid: use letters, digits"):
        load_params(tmp_path / "p.yaml")
@pytest.mark.parametrize("rank,prints", [(0, True), (1, False)])
def test_train_prints_its_summary_on_rank_zero_only(monkeypatch, capsys, rank, prints):
    from lightning.pytorch.utilities import rank_zero_only

    import esolm.stages

    monkeypatch.setattr(esolm.stages, "train_stage", lambda *a, **k: {"steps": 3, "variant": "ar"})
    monkeypatch.setattr(rank_zero_only, "rank", rank)
    assert main(["train", "--variant", "ar", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert ('"steps": 3' in out) is prints


def test_choosing_a_preset_copies_its_variants_for_dvc(tmp_path):
    """dvc.yaml expands one stage per top-level variant: `esolm preset` must copy the preset's
    variants there, keep the rest of the file (comments too), and the verbs must then see the
    same variants as with --set preset=..."""
    from pathlib import Path

    from esolm.cli import main
    from esolm.params import load_params, yaml_load

    src = Path("params.yaml").read_text()
    path = tmp_path / "params.yaml"
    path.write_text(src)
    assert main(["preset", "cpu-study", "--params", str(path)]) == 0
    text = path.read_text()
    chosen = yaml_load(text)
    assert chosen["preset"] == "cpu-study"
    expected = yaml_load(src)["presets"]["cpu-study"]["variants"]
    assert chosen["variants"] == expected
    assert list(load_params(path)["variants"]) == list(expected)
    assert load_params(path)["variants"] == load_params("params.yaml", ["preset=cpu-study"])["variants"]
    assert "# Every tunable of the study" in text  # comments kept
    assert {k for k in chosen if k != "variants" and k != "preset"} == \
        {k for k in yaml_load(src) if k != "variants" and k != "preset"}


def test_an_unknown_preset_names_the_closest(tmp_path, capsys):
    from pathlib import Path

    from esolm.cli import main

    path = tmp_path / "params.yaml"
    path.write_text(Path("params.yaml").read_text())
    assert main(["preset", "cpu-stdy", "--params", str(path)]) == 2
    assert "did you mean 'cpu-study'" in capsys.readouterr().err
    assert path.read_text() == Path("params.yaml").read_text()  # untouched
