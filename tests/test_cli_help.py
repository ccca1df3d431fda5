"""A CLI that teaches itself (issue 27): an example in every verb's --help, the valid --variant
names, ``esolm params``, ``--version``, ``sample --num-samples/--steps/--seed``, ``--infill``
without ``[MASK]`` refused, filled tokens marked, the schedule that ran printed, and a searched
schedule applied to another variant warned about."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

import esolm.stages
from esolm.cli import NO_QUIET, NO_SET, VERBS, main, parser
from esolm.params import build, load_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A folder with the repository's params.yaml and no run folders."""
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _help(verb: str, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verbs_help_has_an_example(verb, capsys, here):
    out = _help(verb, capsys)
    assert "examples:" in out
    examples = out.split("examples:")[1].strip().splitlines()
    # each line runs the verb, alone or under a launcher (torchrun ... $(which esolm) train, srun esolm train)
    assert examples and all(re.search(rf"esolm\)? {verb}\b", line) for line in examples)
    assert ("--set" in out) is (verb not in NO_SET) and ("--quiet" in out) is (verb not in NO_QUIET)


def test_options_that_do_nothing_are_not_offered(capsys, here):
    for verb in ("query", "preset", "doctor"):
        out = _help(verb, capsys)
        assert "--set" not in out and "--quiet" not in out, verb
    assert "--params" not in _help("query", capsys)
    out = _help("train", capsys)
    assert "--set" in out and "--quiet" in out


def test_version(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"esolm {metadata.version('esolm')}"


def test_variant_help_lists_the_names_and_a_wrong_one_says_which_are_valid(here, capsys):
    names = list(load_params("params.yaml")["variants"])
    variant = next(a for a in parser()._subparsers._group_actions[0].choices["sample"]._actions
                   if a.dest == "variant")
    assert all(n in variant.help for n in names)
    assert main(["sample", "--variant", "eso_b_a25", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" not in err
    assert "unknown variant 'eso_b_a25' (did you mean 'eso_b_a025'?)" in err and ", ".join(names) in err
    (here / "runs" / "imported").mkdir(parents=True)
    (here / "runs" / "imported" / "model.ckpt").write_bytes(b"")  # a run folder with a model file counts
    assert main(["evaluate", "--variant", "imported"]) == 2
    assert "unknown variant" not in capsys.readouterr().err
    assert main(["train", "--variant", "imported", "--set", "train.lr=x"]) == 2  # training needs a variant
    assert "unknown variant 'imported'" in capsys.readouterr().err


def test_params_lists_every_settable_key_with_its_value_and_doc(here, capsys):
    lr = load_params("params.yaml")["train"]["lr"]
    assert main(["params", "train"]) == 0
    out = capsys.readouterr().out
    assert f"train.lr = {lr}\n    Peak learning rate" in out
    assert all(line.startswith(("train.", "    ")) for line in out.splitlines() if line)
    assert main(["params"]) == 0
    out = capsys.readouterr().out
    for key in ("data.tokenizer = bpe:", "model.d_model = ", "variants.mdlm.family = mdlm", "search.space.steps = [",
                "judge.train.steps = ", "bench.out = reports/bench.json", "preset = tiny-cpu"):
        assert key in out, key
    # a field the file leaves out: the code's default, and how to set it
    assert "sample.step_mode = dynamic   (code default; not in the params file" in out
    assert main(["params", "--set", "train.lr=0.5", "train.lr"]) == 0
    assert "train.lr = 0.5" in capsys.readouterr().out
    assert main(["params", "trian"]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err


def test_the_sections_named_by_params_are_the_classes_the_verbs_build():
    """``esolm params`` reads the docs from the source of SECTIONS' classes: each section of
    params.yaml must build into its class (the keys the verbs pop aside)."""
    import importlib

    from esolm.paramdoc import SECTIONS

    params = load_params(ROOT / "params.yaml")
    popped = {"bench": ("out", "device"), "search": ("device",)}
    for name, (module, cls, _) in SECTIONS.items():
        if name == "variants":
            continue
        values = {k: v for k, v in params[name].items() if k not in popped.get(name, ())}
        build(getattr(importlib.import_module(module), cls), values, name)


def test_infill_without_a_mask_is_a_one_line_error(here, capsys):
    assert main(["sample", "--variant", "mdlm", "--infill", "The state of the Union"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no [MASK]" in err and "--infill 'The [MASK]" in err


def test_filled_tokens_are_marked():
    from tokenizers import Tokenizer, models, pre_tokenizers

    from esolm.config import ScheduleSettings
    from esolm.text import INFILL_MARKS, marked_text, sample_text
    from tests.conftest import sharp_model

    vocab = {f"w{i}": i for i in range(7)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w6"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    assert marked_text(tok, [0, 1, 2, 3, 4], {0, 2, 3}, INFILL_MARKS) == "w0 ⟦w1⟧ w2 w3 ⟦w4⟧"
    model = sharp_model("mdlm", vocab_size=7, length=6)
    texts, ran = sample_text(model, tok, ScheduleSettings(steps=3), infill="w0 [MASK] w2", num_samples=2,
                             marks=INFILL_MARKS)
    assert all(t.startswith("w0 ⟦") and "⟧ w2 ⟦" in t and t.endswith("⟧") for t in texts), texts
    assert ran["steps"] == 3
    plain, _ = sample_text(model, tok, ScheduleSettings(steps=3), infill="w0 [MASK] w2", num_samples=1)
    assert "⟦" not in plain[0]


def _fake_sample_stage(seen: dict):
    def stage(params, name, progress, out=None):
        seen.update(params["sample"], out=out)
        return {"texts": ["a b"], "num_samples": params["sample"]["num_samples"], "nfe": 4, "seconds": 0.1,
                "gen_ppl": 9.0, "entropy": 1.0,
                "schedule": {"steps": params["sample"]["steps"], "alpha_0": 0.25, "order": "random",
                             "gamma": None, "seed": params["sample"]["seed"]}}
    return stage


def test_sample_options_set_the_sample_section_and_the_schedule_is_printed(here, capsys, monkeypatch):
    seen: dict = {}
    monkeypatch.setattr(esolm.stages, "sample_stage", _fake_sample_stage(seen))
    assert main(["sample", "--variant", "mdlm", "--num-samples", "3", "--steps", "7", "--seed", "5",
                 "--set", "sample.steps=9", "--quiet"]) == 0  # the option wins over --set
    assert (seen["num_samples"], seen["steps"], seen["seed"]) == (3, 7, 5)
    assert seen["out"] is None  # without --out, esolm sample writes nothing DVC tracks
    out = capsys.readouterr().out
    assert "schedule: steps 7, alpha_0 0.25, order random, seed 5" in out and "gamma" not in out


def test_a_searched_schedule_on_another_variant_warns(here, capsys, monkeypatch):
    best = {"variant": "eso_b_a025", "schedule": {"steps": 8, "order": "random"}, "gen_ppl": 50.0,
            "seconds": 0.01, "time_budget": 0.0}
    (here / "search").mkdir()
    (here / "search" / "best.json").write_text(json.dumps(best))
    monkeypatch.setattr(esolm.stages, "sample_stage", _fake_sample_stage({}))
    sets = ["--set", "sample.schedule=best", "--set", "search.out_dir=search", "--quiet"]
    assert main(["sample", "--variant", "mdlm", *sets]) == 0
    out = capsys.readouterr()
    assert out.err.strip() == ("esolm sample: warning: sample.schedule=best is the schedule searched on eso_b_a025 "
                               "(the search's choice in search/), applied here to mdlm")
    assert "(sample.schedule=best: searched on eso_b_a025)" in out.out
    assert main(["sample", "--variant", "eso_b_a025", *sets]) == 0
    assert capsys.readouterr().err == ""


def test_the_repo_params_file_has_the_examples_variants():
    """The examples name variants of the embedded study."""
    from esolm.cli import EXAMPLES

    names = set(yaml.safe_load((ROOT / "params.yaml").read_text())["variants"])
    for verb, lines in EXAMPLES.items():
        for line in lines:
            words = line.split()
            if "--variant" in words and verb != "import":
                assert words[words.index("--variant") + 1] in names, line
