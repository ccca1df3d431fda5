"""The typed results of the stages: each file's one writer and reader round-trip, and a bad file
is one line naming it and what is wrong."""

from __future__ import annotations

import json

import pytest

from esolm.results import CurvePoint, CurveResult, GenerationResult, LikelihoodResult


def test_each_result_reads_back_what_it_wrote(tmp_path):
    like = LikelihoodResult("v", "eso_b", 0.25, {"test": {"exact_l2r_ppl": 20.5, "tokens": 64},
                                                 "zero_shot:x": {"nelbo_ppl": 30.0}})
    gen = GenerationResult("v", "eso_b", 12, 0.5, 0.25, 64.0, True, 40.0, 2.7, "judge", {"steps": 8}, 2)
    curve = CurveResult("v", "eso_b", 0.25, "judge", 2, 1.0, [CurvePoint(4, 4, 0.01, 80.0, 2.6),
                                                               CurvePoint(None, 16, 0.02, 40.0, 2.7)])
    for result in (like, gen, curve):
        result.write(tmp_path)
        assert type(result).read(tmp_path) == result
    # the files keep the layout they had before these classes: per-split sections at the top level
    assert json.loads((tmp_path / "likelihood.json").read_text()) == {
        "variant": "v", "family": "eso_b", "alpha_0": 0.25, "test": {"exact_l2r_ppl": 20.5, "tokens": 64},
        "zero_shot:x": {"nelbo_ppl": 30.0}}
    assert like.long_rows()[0] == {"split": "test", "metric": "exact_l2r_ppl", "value": 20.5}


def test_a_missing_or_broken_file_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="generation.json not found: run its stage"):
        GenerationResult.read(tmp_path)
    (tmp_path / "curve.json").write_text("{not json")
    with pytest.raises(ValueError, match="curve.json is not valid JSON"):
        CurveResult.read(tmp_path)
    (tmp_path / "generation.json").write_text(json.dumps({"variant": "v", "family": "ar"}))
    with pytest.raises(ValueError, match=r"generation.json lacks \['nfe'"):
        GenerationResult.read(tmp_path)
