"""Stage verbs end to end on tiny shards: train -> evaluate -> sample -> search -> report."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import yaml

from esolm.config import ScheduleSettings
from tests.data.conftest import write_txt_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A working folder with tiny params and prepared shards; the verbs run inside it."""
    from esolm.data import DataConfig, prepare

    tmp = tmp_path_factory.mktemp("stages")
    corpus = write_txt_corpus(tmp / "docs", n_docs=60)
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["data"].update(dataset="tiny", source=f"files:{corpus}/*.txt", tokenizer="bpe:300", length=16,
                     out_dir=str(tmp / "data"), cache_dir=str(tmp / "raw"))
    p["model"].update(d_model=32, n_heads=4, cond_dim=32)
    p["variants"] = {"ar": {"family": "ar"}, "mdlm": {"family": "mdlm"},
                     "eso_b_a05": {"family": "eso_b", "alpha_0": 0.5, "batch_split": 0.5}}
    p["train"].update(steps=10, batch_size=8, val_every=5, ckpt_every=5, log_every=5, warmup_steps=2)
    p["evaluate"].update(splits=["valid", "test"], batch_size=4, nelbo_batches=2, exact_batches=1, nelbo_draws=2,
                         iw_orders=[1, 2])
    p["sample"].update(num_samples=4, steps=4)
    p["judge"]["train"] = {"steps": 12}
    p["curve"] = {"steps": [2, 4], "num_samples": 2}
    p["search"].update(variant="eso_b_a05", n_trials=3, num_samples=2, default_steps=[2, 4], space={"steps": [2, 8]},
                       out_dir=str(tmp / "search"))
    (tmp / "params.yaml").write_text(yaml.safe_dump(p))
    prepare(DataConfig.from_dict(p["data"]), progress=False)
    cwd = os.getcwd()
    os.chdir(tmp)
    yield tmp
    os.chdir(cwd)


def _params(project: Path) -> dict:
    from esolm.params import load_params

    return load_params(project / "params.yaml")


def test_train_evaluate_sample_write_every_field(project):
    from esolm.stages import evaluate_stage, judge_stage, sample_stage, train_stage

    params = _params(project)
    for name in ("ar", "mdlm", "eso_b_a05"):
        summary = train_stage(params, name, fresh=False, progress=False)
        assert summary["steps"] == 10
    for name in ("ar", "mdlm", "eso_b_a05"):
        result = evaluate_stage(params, name, progress=False)
        for split in ("valid", "test"):
            r = result[split]
            expected = {"nelbo_ppl", "nelbo_stderr", "exact_l2r_ppl", "iw1_ppl", "iw2_ppl", "nats_per_token",
                        "bits_per_byte", "tokens"} | ({"exact_sampler_ppl"} if name != "ar" else set())
            assert expected <= set(r), f"{name} {split} misses {expected - set(r)}"
            assert not any(math.isnan(v) for v in r.values())
        saved = json.loads((project / "runs" / name / "likelihood.json").read_text())
        assert saved["test"]["exact_l2r_ppl"] == pytest.approx(result["test"]["exact_l2r_ppl"])
    ar = json.loads((project / "runs" / "ar" / "likelihood.json").read_text())["test"]
    # AR: IW over left-to-right orders only is the exact likelihood itself
    assert ar["iw2_ppl"] == pytest.approx(ar["exact_l2r_ppl"], rel=1e-5)
    judge = judge_stage(params, fresh=False, progress=False)  # the dedicated judge: longer, never a contestant
    assert judge["train"]["steps"] == 12 and judge["test_ppl"] > 1
    assert json.loads((project / "runs" / "judge" / "likelihood.json").read_text())["family"] == "ar"
    for name in ("ar", "mdlm", "eso_b_a05"):
        s = sample_stage(params, name, progress=False, out=project / "runs" / name)
        assert s["nfe"] > 0 and s["gen_ppl"] > 1 and s["entropy"] > 0 and s["judge"] == "judge"
        rows = (project / "runs" / name / "samples.jsonl").read_text().splitlines()
        assert len(rows) == 4 and {"text", "ids", "settings"} <= set(json.loads(rows[0]))


def test_search_then_sample_with_the_best_schedule_then_report(project):
    from esolm.params import apply_sets
    from esolm.report import write_report
    from esolm.stages import curve_stage, sample_stage, search_stage
    from esolm.store import ingest, query, run_id

    params = _params(project)
    out = search_stage(params, progress=False)
    assert out["trials"] == 3
    best = json.loads((project / "search" / "best.json").read_text())
    if best["schedule"] is not None:
        s = sample_stage(apply_sets(_params(project), ["sample.schedule=best"]), "eso_b_a05", progress=False,
                         out=project / "runs" / "eso_b_a05")
        assert s["schedule"]["order"] == best["schedule"]["order"]
        if best["schedule"]["order"] == "random":  # a block order records the steps it ran
            assert s["schedule"]["steps"] == best["schedule"]["steps"]
    for name in ("eso_b_a05", "ar"):
        c = curve_stage(params, name, progress=False)
        nfes = [p["nfe"] for p in c["points"]]
        assert len(nfes) == (1 if name == "ar" else 2) and nfes == sorted(nfes) and c["judge"] == "judge"
    assert c["points"][0]["nfe"] == 16  # AR: one point, NFE = L
    rid = run_id(params)
    counts = ingest(params, reports=project / "reports", db=project / "results.duckdb", rid=rid)
    again = ingest(params, reports=project / "reports", db=project / "results.duckdb", rid=rid)
    assert counts == again
    _, rows = query("SELECT count(*) FROM likelihood", project / "results.duckdb")
    _, distinct = query("SELECT count(DISTINCT (run_id, variant, split, metric)) FROM likelihood",
                        project / "results.duckdb")
    assert rows == distinct and rows[0][0] > 0  # re-ingesting added no duplicate rows
    report = write_report(project / "results.duckdb", rid, project / "reports")
    html = (project / "reports" / "index.html").read_text()
    assert "eso_b_a05" in html and len(report["rows"]) == 4  # three variants and the unigram baseline
    assert "<script" not in html
    assert any(f.endswith("pareto.png") for f in report["figures"])
    md_text = (project / "reports" / "report.md").read_text()
    for ref in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md_text):  # every figure it names lies in reports/figures
        assert ref.startswith("figures/") and (project / "reports" / ref).exists(), ref
    _, curves = query("SELECT variant, count(*) FROM curves GROUP BY variant ORDER BY variant",
                      project / "results.duckdb")
    assert curves == [("ar", 1), ("eso_b_a05", 2)]
    md = (project / "reports" / "report.md").read_text()
    assert "judged by judge (an AR model of its own stage, never a contestant; its test perplexity" in md
    assert "| unigram | unigram |" in md and "NELBO PPL, exact's tokens (± s.e.)" in md and "the paper's numbers" in md
    assert "e+0" not in md.split("## ")[0]  # readable numbers in the headline table
    assert f"| {rid} | pipeline |" in md  # the runs in the database, one row each
    assert "Which of the paper's orderings hold here" in md and "| ar < eso_b_a05 |" in md
    import csv

    table1 = list(csv.DictReader((project / "reports" / "table1.csv").open()))
    assert {r["metric"] for r in table1} >= {"exact_l2r_ppl", "exact_sampler_ppl", "nelbo_ppl", "iw1_ppl"}
    eso = [r for r in table1 if r["variant"] == "eso_b_a05" and r["split"] == "test"]
    assert all(r["stderr"] and float(r["stderr"]) > 0 for r in eso), eso


def test_best_json_is_exactly_the_chosen_trial_of_the_study(project):
    """Issue #22: best.json said steps 64 and shuffle shared for a block-order trial that set
    neither steps nor that name; it now holds the trial's own parameters and number, read back here
    from the study, and leaves out the settings its order never reads."""
    from esolm.config import ScheduleSettings
    from esolm.search.results import BestSchedule
    from esolm.stages import search_study

    best = json.loads((project / "search" / "best.json").read_text())
    assert best["schedule"] is not None and best["trial"] is not None
    trial = next(t for t in search_study(_params(project))[1].trials if t.number == best["trial"])
    assert best["searched"] == trial.params
    assert ScheduleSettings.from_dict(best["schedule"]) == ScheduleSettings.from_dict(trial.params)
    assert not set(BestSchedule.UNUSED[best["schedule"]["order"]]) & set(best["schedule"])
    assert best["gen_ppl"] == trial.values[0]
    block = BestSchedule(variant="v", schedule=ScheduleSettings(order="block", shuffle=True, subcontexts=3), trial=4,
                         searched={"order": "block", "shuffle": True, "subcontexts": 3})
    assert "steps" not in block.to_json()["schedule"] and block.to_json()["searched"]["shuffle"] is True
    assert BestSchedule.from_json(block.to_json()) == block


def test_the_study_belongs_to_the_model_file_and_workers_share_it(project):
    """Two worker processes fill one study with exactly n trials; retraining the model (a new
    file hash) starts a new study instead of reusing the old model's trials."""
    from esolm.params import apply_sets
    from esolm.search.study import counts
    from esolm.stages import search_study, search_trials, train_stage

    params = apply_sets(_params(project), ["search.n_trials=6", "search.sampler=tpe"])
    _, study = search_study(params)
    have = len(study.trials)  # the earlier test's search of the same model
    ran = search_trials(params, workers=2)
    # the trials that count towards n_trials (a rare surplus trial, pruned before it ran, does not)
    trials = [t for t in search_study(params)[1].trials if counts(t)]
    assert have == 3 and ran == 3 and len(trials) == 6
    assert len({t.number for t in trials}) == 6 and all(t.state.name == "COMPLETE" for t in trials)
    assert search_study(params)[1].metric_names == ["gen_ppl", "seconds_per_sample"]
    train_stage(apply_sets(_params(project), ["train.seed=1"]), "eso_b_a05", fresh=True, progress=False)
    _, retrained = search_study(params)
    assert retrained.study_name != study.study_name and retrained.study_name.startswith("schedule-eso_b_a05-")
    assert retrained.trials == []
    assert search_trials(params, n_trials=2) == 2 and sum(map(counts, search_study(params)[1].trials)) == 2


def test_each_stage_writes_its_own_headline_numbers_and_the_train_stage_its_curve(project):
    """The numbers DVC shows for an experiment come from the stage that computed them (issue
    #22: a metrics stage that `dvc exp run evaluate@V` never ran showed the parent's numbers)."""
    import csv

    from esolm.headline import HEADLINE, read_headline

    table = read_headline(["ar", "mdlm", "eso_b_a05", "nope"], project / "reports")
    for name in ("ar", "mdlm", "eso_b_a05"):
        like = json.loads((project / "runs" / name / "likelihood.json").read_text())
        gen = json.loads((project / "runs" / name / "generation.json").read_text())
        assert json.loads((project / "reports" / "metrics" / name / "likelihood.json").read_text()) == {
            "exact_ppl": like["test"]["exact_l2r_ppl"], "nelbo_ppl": like["test"]["nelbo_paired_ppl"]}
        assert json.loads((project / "reports" / "metrics" / name / "sampling.json").read_text()) == {
            "gen_ppl": gen["gen_ppl"], "s_per_sample": gen["seconds_per_sample"]}
        assert table[name] == {"exact_ppl": like["test"]["exact_l2r_ppl"],
                               "nelbo_ppl": like["test"]["nelbo_paired_ppl"],
                               "gen_ppl": gen["gen_ppl"], "s_per_sample": gen["seconds_per_sample"]}
        rows = list(csv.DictReader((project / "reports" / "curves" / f"{name}.csv").open()))
        logged = [json.loads(r) for r in (project / "runs" / name / "train.jsonl").read_text().splitlines()]
        assert [int(r["step"]) for r in rows] == [r["step"] for r in logged] and rows
        assert [float(r["loss"]) for r in rows] == pytest.approx([r["loss"] for r in logged])
    assert table["nope"] == dict.fromkeys(HEADLINE)


def test_sampling_without_an_out_folder_writes_nothing_dvc_tracks(project):
    from esolm.stages import sample_stage

    def files() -> dict[str, bytes]:
        return {str(f): f.read_bytes() for top in ("runs", "reports") for f in sorted((project / top).rglob("*"))
                if f.is_file()}

    before = files()
    s = sample_stage(_params(project), "mdlm", progress=False)
    assert len(s["texts"]) == 4 and files() == before


def test_report_escapes_generated_text(project, tmp_path):
    from esolm.report import _html

    page = _html("r1", ["variant"], [("<b>x</b>",)], [], [("v", 0, "<script>alert(1)</script>")])
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_evaluate_refuses_a_checkpoint_with_another_vocabulary(project):
    from esolm.params import apply_sets
    from esolm.stages import evaluate_stage

    params = apply_sets(_params(project), [])
    meta_path = project / "data" / "tiny" / "meta.json"
    meta = json.loads(meta_path.read_text())
    original = meta_path.read_text()
    meta["vocab_size"] += 1
    meta_path.write_text(json.dumps(meta))
    try:
        with pytest.raises(ValueError, match="vocabulary"):
            evaluate_stage(params, "ar", progress=False)
    finally:
        meta_path.write_text(original)


def test_zero_shot_sets_are_encoded_with_the_model_tokenizer_and_evaluated(project, tmp_path):
    from esolm.data import DataConfig, prepare
    from esolm.params import apply_sets
    from esolm.stages import evaluate_stage, train_stage

    params = _params(project)
    if not (project / "runs" / "ar" / "model.ckpt").exists():
        train_stage(params, "ar", fresh=False, progress=False)
    other = write_txt_corpus(tmp_path / "other", n_docs=30, seed=7)
    tok = project / "data" / "tiny" / "tokenizer.json"
    zdir = prepare(DataConfig(dataset="other", source=f"files:{other}/*.txt", tokenizer=f"file:{tok}",
                              length=16, out_dir=str(tmp_path / "z"), cache_dir=str(tmp_path / "raw")),
                   progress=False)
    result = evaluate_stage(apply_sets(params, [f"evaluate.zero_shot=['{zdir}']"]), "ar", progress=False)
    assert result["zero_shot:other"]["exact_l2r_ppl"] > 1
    bad = prepare(DataConfig(dataset="bad", source=f"files:{other}/*.txt", tokenizer="bpe:280", length=16,
                             out_dir=str(tmp_path / "z"), cache_dir=str(tmp_path / "raw")), progress=False)
    with pytest.raises(ValueError, match="file:"):
        evaluate_stage(apply_sets(params, [f"evaluate.zero_shot=['{bad}']"]), "ar", progress=False)


def test_bad_params_name_the_key_and_type(project):
    from esolm.params import apply_sets
    from esolm.stages import train_stage

    with pytest.raises(ValueError, match="steps"):
        train_stage(apply_sets(_params(project), ["train.steps=abc"]), "ar", fresh=False, progress=False)
    params = _params(project)
    params["train"]["stpes"] = 3
    with pytest.raises(ValueError, match="did you mean 'steps'"):
        train_stage(params, "ar", fresh=False, progress=False)
    with pytest.raises(ValueError, match="unknown variant"):
        train_stage(_params(project), "gpt5", fresh=False, progress=False)


def test_unknown_sample_and_evaluate_keys_name_the_closest(project):
    """``num_sample: 2`` used to be ignored (16 samples came out)."""
    from esolm.stages import evaluate_stage, sample_stage

    params = _params(project)
    params["sample"]["num_sample"] = 2
    with pytest.raises(ValueError, match="unknown parameter sample.num_sample; did you mean 'num_samples'"):
        sample_stage(params, "eso_b_a05", progress=False)
    params = _params(project)
    params["evaluate"]["nelbo_draw"] = 2
    with pytest.raises(ValueError, match="did you mean 'nelbo_draws'"):
        evaluate_stage(params, "eso_b_a05", progress=False)


def test_text_in_text_out(project, capsys):
    """Two lines of Python from a model file to strings; the CLI prints samples and takes a
    prompt or an infilling template."""
    import esolm
    from esolm.cli import main
    from esolm.text import encode_given

    model, tok = esolm.load(project / "runs" / "eso_b_a05" / "model.ckpt")
    texts = esolm.generate_text(model, tok, ScheduleSettings(steps=4, seed=1), prompt="the state of the", num_samples=3)
    assert len(texts) == 3 and all(isinstance(t, str) and t for t in texts)
    given = encode_given(tok, 16, prompt="the state of the")
    g = esolm.generate(model, ScheduleSettings(steps=4), num_samples=3, prompt=given)
    assert all(int(g.tokens[r, p]) == t for r in range(3) for p, t in given.items())
    fill = encode_given(tok, 16, infill="the [MASK][MASK] of the")
    first = tok.encode("the ", add_special_tokens=False).ids
    assert all(p not in fill for p in range(len(first), len(first) + 2))  # the two marks stay free
    with pytest.raises(ValueError, match="model's length is 16"):
        encode_given(tok, 16, prompt="the state " * 40)
    assert main(["sample", "--variant", "eso_b_a05", "--prompt", "the state of", "--set", "sample.num_samples=2"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2
    assert main(["sample", "--variant", "mdlm", "--infill", "the [MASK] of", "--set", "sample.num_samples=1"]) == 0
    assert main(["sample", "--variant", "ar", "--infill", "the [MASK] of"]) == 2
    assert "prefix prompt only" in capsys.readouterr().err


def test_a_contestant_never_judges_and_the_judge_never_competes(project):
    from esolm.params import apply_sets
    from esolm.stages import judge_params, sample_stage

    with pytest.raises(ValueError, match="sample.judge='ar' is a contestant"):
        sample_stage(apply_sets(_params(project), ["sample.judge=ar"]), "mdlm", progress=False)
    with pytest.raises(ValueError, match="judge.name='mdlm' is also a variant"):
        judge_params(apply_sets(_params(project), ["judge.name=mdlm"]))
    jp, name = judge_params(_params(project))
    assert list(jp["variants"]) == [name] and jp["train"]["steps"] == 12


def _swap(path: Path, data: bytes):
    """Replace a file's bytes for a block; the original comes back afterwards."""
    import contextlib

    @contextlib.contextmanager
    def swapped():
        original = path.read_bytes()
        path.write_bytes(data)
        try:
            yield
        finally:
            path.write_bytes(original)

    return swapped()


def test_a_model_file_of_another_family_is_never_evaluated_as_the_variant(project):
    """Issue #22: eso_b's model file copied into runs/mdlm/ was evaluated as MDLM and stored under mdlm."""
    from esolm.stages import evaluate_stage, sample_stage

    params = _params(project)
    with _swap(project / "runs" / "mdlm" / "model.ckpt", (project / "runs" / "eso_b_a05" / "model.ckpt").read_bytes()):
        before = (project / "runs" / "mdlm" / "likelihood.json").read_bytes()
        with pytest.raises(ValueError, match=r"is not the variant 'mdlm' of params.yaml: it has family 'eso_b' "
                                             r"\(variants.mdlm: 'mdlm'\).*dvc repro train@mdlm"):
            evaluate_stage(params, "mdlm", progress=False)
        with pytest.raises(ValueError, match="is not the variant 'mdlm'"):
            sample_stage(params, "mdlm", progress=False)
        assert (project / "runs" / "mdlm" / "likelihood.json").read_bytes() == before


def test_shards_of_another_tokenizer_of_the_same_size_are_refused(project, tmp_path):
    """Issue #22: shards of a different tokenizer with the same vocabulary size were evaluated
    without a word (a perplexity printed as valid)."""
    from esolm.data import DataConfig, prepare, read_meta
    from esolm.params import apply_sets
    from esolm.stages import evaluate_stage

    other = write_txt_corpus(tmp_path / "other", n_docs=60, seed=11)
    size = read_meta(project / "data" / "tiny")["vocab_size"]
    twin = prepare(DataConfig(dataset="tiny", source=f"files:{other}/*.txt", tokenizer=f"bpe:{size}", length=16,
                              out_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "raw")), progress=False)
    assert read_meta(twin)["vocab_size"] == size  # the same size, another tokenizer
    with pytest.raises(ValueError, match=r"model.ckpt was trained with tokenizer \w{12}, but .* was made with "
                                         r"tokenizer \w{12}"):
        evaluate_stage(apply_sets(_params(project), [f"data.out_dir={tmp_path / 'data'}"]), "ar", progress=False)


def test_a_corrupt_or_swapped_tokenizer_is_refused_before_training_and_never_embedded(project, tmp_path):
    import shutil

    from esolm.params import apply_sets
    from esolm.stages import train_stage

    data = tmp_path / "data"
    shutil.copytree(project / "data" / "tiny", data / "tiny")
    params = apply_sets(_params(project), [f"data.out_dir={data}"])
    params["variants"]["newcomer"] = {"family": "ar"}
    tok = data / "tiny" / "tokenizer.json"
    with _swap(tok, tok.read_bytes()[: len(tok.read_bytes()) // 2]), \
            pytest.raises(ValueError, match=r"tokenizer.json is not a valid tokenizer .*prepare the data again"):
        train_stage(params, "newcomer", fresh=False, progress=False)
    swapped = tok.read_text().replace('"<|endoftext|>"', '"<|end|>"', 1)
    with _swap(tok, swapped.encode()), \
            pytest.raises(ValueError, match=r"has sha256 \w{12}, but the shards .* were made with \w{12}"):
        train_stage(params, "newcomer", fresh=False, progress=False)
    assert not (project / "runs" / "newcomer").exists()


def test_the_report_takes_settings_from_the_model_files_and_says_when_params_changed(project, tmp_path):
    """Issue #22: after train.lr changed, the report recorded the new lr for models trained with the old one."""
    from esolm.params import apply_sets
    from esolm.report_results import settings_line
    from esolm.store import ingest, run_id

    trained_lr = json.loads((project / "runs" / "ar" / "train.json").read_text())["settings"]["train"]["lr"]
    params = apply_sets(_params(project), [f"train.lr={trained_lr * 3}"])
    rid = run_id(params)
    ingest(params, reports=project / "reports", db=tmp_path / "r.duckdb", rid=rid)
    line = settings_line(tmp_path / "r.duckdb", rid)
    assert f"ar was trained with train.lr={trained_lr!r} (params.yaml: {trained_lr * 3!r})" in line
    ingest(_params(project), reports=project / "reports", db=tmp_path / "r.duckdb", rid="same")
    assert "ar was trained" not in settings_line(tmp_path / "r.duckdb", "same")
