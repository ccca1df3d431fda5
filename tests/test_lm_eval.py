"""The lm-evaluation-harness model ``esolm`` (esolm/lm_eval_adapter.py) on a local task, offline:
the fixtures of tests/fixtures/authors imported with the placeholder ``chars`` tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from esolm.likelihood import left_to_right, order_log_prob
from esolm.published_io import import_model

lm_eval = pytest.importorskip("lm_eval")  # the dev extra installs it; a lean install skips

from lm_eval.api.instance import Instance  # noqa: E402

from esolm.lm_eval_adapter import EsoLMHarness  # noqa: E402

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    out = {}
    for name, src in (("eso_b", "eso_b_hf"), ("mdlm", "mdlm_hf"), ("ar", "ar_lightning.ckpt")):
        out[name] = import_model(FIX / "authors" / src, root / name / "model.ckpt", tokenizer="chars")
    return out


def _req(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@pytest.mark.parametrize("name", ["eso_b", "ar"])
def test_loglikelihood_is_the_exact_left_to_right_likelihood(models, name):
    lm = EsoLMHarness(path=str(models[name]))
    assert lm.exact and "exact" in lm.what
    ids = lm.tok.encode("the cat sat on").ids
    x = torch.tensor([ids])
    full = float(order_log_prob(lm.model, x, left_to_right(*x.shape)))
    ctx = float(order_log_prob(lm.model, x[:, :8], left_to_right(1, 8)))
    (whole, _), (cond, _) = lm.loglikelihood([_req("loglikelihood", "", "the cat sat on"),
                                              _req("loglikelihood", "the cat ", "sat on")])
    assert whole == pytest.approx(full, abs=1e-4) and cond == pytest.approx(full - ctx, abs=1e-4)
    [rolling] = lm.loglikelihood_rolling([_req("loglikelihood_rolling", "the cat sat on")])
    assert rolling == pytest.approx(full, abs=1e-4)


def test_mdlm_scores_are_labelled_bounds_and_lie_below_zero(models):
    lm = EsoLMHarness(path=str(models["mdlm"]), iw_orders=2)
    assert not lm.exact and "bound" in lm.what
    [(cond, greedy)] = lm.loglikelihood([_req("loglikelihood", "the cat ", "sat")])
    [rolling] = lm.loglikelihood_rolling([_req("loglikelihood_rolling", "the cat sat")])
    assert cond < 0 and rolling < 0 and isinstance(greedy, bool)


def test_generate_until_samples_and_stops(models):
    lm = EsoLMHarness(path=str(models["eso_b"]))
    [text] = lm.generate_until([_req("generate_until", "the cat", {"until": ["\n"], "max_gen_toks": 6})])
    assert isinstance(text, str) and len(text) <= 6 and "\n" not in text


@pytest.mark.parametrize("name", ["eso_b", "mdlm"])
def test_the_local_tasks_run_through_the_harness(models, tmp_path, name):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    data = FIX / "lm_eval" / "local.jsonl"
    for task in ("esolm_local", "esolm_local_rolling"):
        text = (FIX / "lm_eval" / f"{task}.yaml").read_text().replace("DATA", str(data))
        (tmp_path / f"{task}.yaml").write_text(text)
    res = simple_evaluate(model="esolm", model_args=f"path={models[name]}",
                          tasks=["esolm_local", "esolm_local_rolling"],
                          task_manager=TaskManager(include_path=str(tmp_path)))
    acc = res["results"]["esolm_local"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert res["results"]["esolm_local_rolling"]["bits_per_byte,none"] > 0
