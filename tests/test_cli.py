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
                           families=["eso_b", "mdlm", "ar", "bd3lm_l4"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["bench", "--params", str(tmp_path / "params.yaml"), "--quiet", "--device", "cpu"]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert {r["family"] for r in rows} == {"eso_b", "mdlm", "ar", "bd3lm_l4"}
    for r in rows:
        assert {"family", "length", "nfe", "batch_size", "median_s", "tokens_per_s", "device"} <= set(r)
        assert r["nfe"] == 16 and r["median_s"] > 0
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert "speedup over" in capsys.readouterr().out


def test_bad_param_in_a_verb_exits_2_with_a_message(capsys):
    assert main(["bench", "--set", "bench.lengthz=[3]"]) == 2
    assert "did you mean 'lengths'" in capsys.readouterr().err


@pytest.mark.parametrize("rank,prints", [(0, True), (1, False)])
def test_train_prints_its_summary_on_rank_zero_only(monkeypatch, capsys, rank, prints):
    from lightning.pytorch.utilities import rank_zero_only

    import esolm.stages

    monkeypatch.setattr(esolm.stages, "train_stage", lambda *a, **k: {"steps": 3, "variant": "ar"})
    monkeypatch.setattr(rank_zero_only, "rank", rank)
    assert main(["train", "--variant", "ar", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert ('"steps": 3' in out) is prints
