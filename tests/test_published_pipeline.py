"""A variant with ``source:`` (issue #26, item 5): its train stage imports the published model
instead of training, and evaluate, sample and the report treat it like a trained variant."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from tests.data.conftest import write_txt_corpus

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "authors"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Shards made with a 23-token character tokenizer: the vocabulary of the fixtures."""
    from esolm.data import DataConfig, prepare
    from esolm.published_io import chars_tokenizer

    tmp = tmp_path_factory.mktemp("released")
    chars_tokenizer(23).save(str(tmp / "chars.json"))
    corpus = write_txt_corpus(tmp / "docs", n_docs=30)
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["data"].update(dataset="tiny", source=f"files:{corpus}/*.txt", tokenizer=f"file:{tmp / 'chars.json'}",
                     length=16, out_dir=str(tmp / "data"), cache_dir=str(tmp / "raw"))
    p["model"].update(d_model=32, n_heads=4, cond_dim=32)
    p["variants"] = {"eso_fix": {"source": str(FIXTURES / "eso_b_hf"), "alpha_0": 0.25},
                     "mdlm_fix": {"source": str(FIXTURES / "mdlm_hf")}}
    p["train"].update(steps=4, batch_size=8, val_every=2, ckpt_every=2, log_every=2, warmup_steps=1)
    p["judge"]["train"] = {"steps": 4}
    p["evaluate"].update(splits=["test"], batch_size=4, nelbo_batches=2, exact_batches=1, nelbo_draws=2,
                         iw_orders=[1])
    p["sample"].update(num_samples=2, steps=4)
    p["search"].update(variant="eso_fix")
    (tmp / "params.yaml").write_text(yaml.safe_dump(p))
    prepare(DataConfig.from_dict(p["data"]), progress=False)
    cwd = os.getcwd()
    os.chdir(tmp)
    yield tmp
    os.chdir(cwd)


def test_a_source_variant_is_imported_evaluated_and_sampled_like_a_trained_one(project):
    from esolm.checkpoint import load_model
    from esolm.params import load_params
    from esolm.published_io import load_published
    from esolm.stages import evaluate_stage, judge_stage, sample_stage, train_stage

    params = load_params(project / "params.yaml")
    summary = train_stage(params, "eso_fix", fresh=False, progress=False)
    assert summary["source"] == str(FIXTURES / "eso_b_hf") and summary["init"] == "imported"
    ours = load_model(project / "runs" / "eso_fix" / "model.ckpt")
    theirs, _ = load_published(FIXTURES / "eso_b_hf")
    assert ours.config.family == "eso_b" and ours.config.alpha_0 == 0.25
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    result = evaluate_stage(params, "eso_fix", progress=False)
    assert 1 < result["test"]["exact_l2r_ppl"] < 1e4
    assert json.loads((project / "reports" / "metrics" / "eso_fix" / "likelihood.json").read_text())["exact_ppl"] \
        == result["test"]["exact_l2r_ppl"]
    judge_stage(params, fresh=False, progress=False)
    s = sample_stage(params, "eso_fix", progress=False, out=project / "runs" / "eso_fix")
    assert s["nfe"] > 0 and len(s["texts"]) == 2
    train_stage(params, "mdlm_fix", fresh=False, progress=False)
    assert load_model(project / "runs" / "mdlm_fix" / "model.ckpt").config.family == "mdlm"


def test_a_source_variant_refuses_sizes_and_another_vocabulary(project, tmp_path):
    from esolm.params import load_params
    from esolm.stages import train_stage

    params = load_params(project / "params.yaml")
    params["variants"]["eso_fix"] = {"source": str(FIXTURES / "eso_b_hf"), "d_model": 64}
    with pytest.raises(ValueError, match=r"variants.eso_fix: \['d_model'\] cannot be set for an imported model"):
        train_stage(params, "eso_fix", fresh=False, progress=False)
    params = load_params(project / "params.yaml")
    params["data"]["out_dir"] = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError):
        train_stage(params, "eso_fix", fresh=False, progress=False)
