"""The family table: every family is one record, every lookup goes through it, and the old
``variant`` key of params and model files still loads."""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import pytest
import torch

from esolm import generate, order_log_prob
from esolm.config import ModelConfig, ScheduleSettings
from esolm.families import ALL_DIMS, FAMILIES, Family, family
from esolm.likelihood import ORDER_LAWS
from esolm.model.masks import AttentionMask, clean_mask, two_stream_mask
from tests.conftest import FAMILY_NAMES, sharp_model

ROOT = Path(__file__).resolve().parents[1]


def test_the_table_holds_every_family_and_configs_look_it_up():
    assert tuple(FAMILIES) == FAMILY_NAMES
    for name, record in FAMILIES.items():
        assert isinstance(record, Family) and record.name == name
        cfg = ModelConfig(family=name, length=16, block_size=4)
        assert cfg.family_record is record
        assert cfg.alpha_0 == (record.default_alpha_0 if record.fixed_alpha_0 is None else record.fixed_alpha_0)
        assert set(record.terms) and set(record.terms) <= {"diffusion", "sequential"}
        assert isinstance(clean_mask(cfg, n_clean=torch.zeros(2, dtype=torch.long)), AttentionMask)
        if record.two_stream_mask is not None:
            assert two_stream_mask(cfg, 16, n_clean=torch.zeros(2, dtype=torch.long)).kind == "two_stream"
        assert record.search_dims <= ALL_DIMS and "top_p" in record.search_dims
        assert ("alpha_0" in record.search_dims) == (record.fixed_alpha_0 is None)
        assert record.iw_laws[0] == "sampler"
        for law in record.iw_laws:
            order = ORDER_LAWS[record.order_law](cfg, 3, 16, law, torch.Generator().manual_seed(0))
            assert torch.equal(order.sort(1).values, torch.arange(16).expand(3, 16))


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_family_samples_and_scores_through_its_record(name):
    model = sharp_model(name, block_size=4)
    g = generate(model, ScheduleSettings(steps=4, seed=3), num_samples=2)
    assert g.family == name and g.tokens.shape == (2, 16)
    assert g.kv_cache == model.config.family_record.kv_cache
    law = ORDER_LAWS[model.config.family_record.order_law]
    order = law(model.config, 2, 16, "sampler", torch.Generator().manual_seed(1))
    assert torch.isfinite(order_log_prob(model, g.tokens, order)).all()


def test_an_unknown_family_names_the_closest():
    with pytest.raises(ValueError, match="did you mean 'eso_b'"):
        family("eso_bb")
    with pytest.raises(ValueError, match="ModelConfig.family='mdml' is invalid.*'mdlm'"):
        ModelConfig(family="mdml")


LIBRARY = ("objectives.py", "likelihood.py", "config.py", "stages.py", "judge.py", "report.py", "report_results.py",
           "report_figures.py", "lit.py", "train_config.py",
           "training.py", "checkpoint.py", "text.py", "store.py", "sampling/__init__.py", "sampling/loops.py",
           "search/__init__.py", "search/study.py", "search/front.py", "search/results.py", "search/storage.py",
           "published.py", "published_io.py", "safe_pickle.py", "lm_eval_adapter.py")


@pytest.mark.parametrize("module", LIBRARY)
def test_no_module_compares_family_names(module):
    """Behaviour that depends on the family is looked up in its record, never chosen by
    comparing a family name (adding a family touches esolm/families.py only)."""
    tree = ast.parse((ROOT / "esolm" / module).read_text())
    names = set(FAMILIES)
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            consts = [c for c in ast.walk(node) if isinstance(c, ast.Constant) and c.value in names]
            assert not consts, f"{module}:{node.lineno} compares with a family name"
        if isinstance(node, ast.Attribute):
            assert node.attr != "variant" or not isinstance(node.value, ast.Attribute) \
                or node.value.attr != "config", f"{module}:{node.lineno} reads config.variant"


def test_the_old_variant_key_loads_from_params_model_files_and_exports(tmp_path):
    from tokenizers import Tokenizer, models

    from esolm.checkpoint import MODEL_FORMAT, export, load_run
    from esolm.stages import model_config

    meta = {"vocab_size": 7, "length": 16}
    params = {"model": {"d_model": 32, "n_heads": 4, "cond_dim": 32},
              "variants": {"old": {"variant": "eso_a", "alpha_0": 0.5}, "new": {"family": "eso_a", "alpha_0": 0.5}}}
    assert model_config(params, "old", meta) == model_config(params, "new", meta)
    with pytest.raises(ValueError, match="not both"):
        ModelConfig.from_dict({"variant": "ar", "family": "ar"})
    model = sharp_model("eso_b", alpha_0=0.5)
    old = {k: v for k, v in model.config.to_dict().items() if k != "family"} | {"variant": "eso_b"}
    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).to_str()

    torch.save({"format": MODEL_FORMAT, "config": old, "weights": model.state_dict(), "ema_weights": None,
                "step": 3, "tokenizer": "tok.json", "tokenizer_json": tok,
                "tokenizer_sha256": hashlib.sha256(tok.encode()).hexdigest()}, tmp_path / "model.ckpt")
    loaded, _ = load_run(tmp_path / "model.ckpt")
    assert loaded.config == model.config
    x = torch.randint(0, 7, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).expand(2, 16)
    torch.testing.assert_close(loaded(x, pos, AttentionMask("causal")), model(x, pos, AttentionMask("causal")))
    out = export(tmp_path / "model.ckpt", tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["family"] == "eso_b"
    assert load_run(out)[0].config == model.config


def test_schedule_settings_hold_the_defaults_of_generate_and_make_schedule():
    from esolm.ordering import make_schedule

    model = sharp_model("eso_b", alpha_0=0.5)
    s = ScheduleSettings(steps=5, order="block", subcontexts=2, shuffle=True, top_p=0.9, seed=4)
    a = generate(model, s, num_samples=2)
    b = generate(model, ScheduleSettings(steps=5, order="block", subcontexts=2, shuffle=True, top_p=0.9, seed=4),
                 num_samples=2)
    assert torch.equal(a.tokens, b.tokens) and a.settings == b.settings
    assert s.shuffle == "shared" and ScheduleSettings().shuffle == "none"
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    x = make_schedule(2, 16, 6, 0.5, generator=g1)
    y = make_schedule(2, 16, settings=ScheduleSettings(steps=6, alpha_0=0.5), generator=g2)
    assert torch.equal(x.order, y.order) and x.counts == y.counts
    with pytest.raises(ValueError, match="top_p"):
        ScheduleSettings(top_p=0.0)


def test_schedule_settings_round_trip_through_best_json_and_a_bad_key_names_the_closest(tmp_path):
    from esolm.search import SearchConfig, write_outputs
    from esolm.stages import best_schedule

    trial = {"alpha_0": 0.3, "order": "block", "subcontexts": 4, "shuffle": True, "top_p": 0.95}
    rows = [{"variant": "v", "trial": 0, "state": "COMPLETE", "feasible": True, "gen_ppl": 10.0, "seconds": 0.1,
             "nfe": 4, "entropy": 2.0, "params": trial}]
    sc = SearchConfig(out_dir=str(tmp_path))
    write_outputs(sc, rows, {}, 0.0)
    stored = json.loads((tmp_path / "best.json").read_text())["schedule"]
    expected = ScheduleSettings(**trial)
    # every schedule field the block order reads (not steps, schedule, gamma), no seed or cache flag
    assert stored == {k: v for k, v in expected.to_dict(run=False).items() if k not in ("steps", "schedule", "gamma")}
    assert best_schedule(tmp_path) == expected
    (tmp_path / "best.json").write_text(json.dumps({"schedule": {**stored, "stepz": 8}}))
    with pytest.raises(ValueError, match="stepz; did you mean 'steps'"):
        best_schedule(tmp_path)


def test_the_sample_section_is_schedule_settings_with_best_filled_in(tmp_path, monkeypatch):
    from esolm.config import SampleConfig
    from esolm.params import build
    from esolm.stages import sample_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "best.json").write_text(json.dumps({"schedule": {"steps": 9, "top_p": 0.8}}))
    params = {"sample": {"schedule": "best", "seed": 5, "num_samples": 2}, "search": {"out_dir": "s"}}
    sc = sample_config(params)
    assert (sc.steps, sc.top_p, sc.schedule, sc.seed, sc.num_samples) == (9, 0.8, "loglinear", 5, 2)
    assert sc.settings() == ScheduleSettings(steps=9, top_p=0.8, seed=5)
    with pytest.raises(ValueError, match="sample.num_sample; did you mean 'num_samples'"):
        build(SampleConfig, {"num_sample": 2}, "sample")


def test_every_name_of_the_table_resolves_in_the_module_that_owns_it():
    """The records hold names only; each user resolves them from its own table."""
    from esolm import likelihood, objectives, ordering
    from esolm.model import masks
    from esolm.sampling import loops

    for fam in FAMILIES.values():
        assert set(fam.terms.values()) <= set(objectives.TERMS), fam.name
        assert fam.clean_mask in masks.CLEAN and fam.plan in ordering.PLANS, fam.name
        assert fam.two_stream_mask is None or fam.two_stream_mask in masks.TWO_STREAM, fam.name
        assert fam.sample in loops.LOOPS and fam.exact in likelihood.EXACT, fam.name
        assert fam.order_law in likelihood.ORDER_LAWS, fam.name
        for field in fam.__dataclass_fields__:
            assert not callable(getattr(fam, field)), (fam.name, field)  # data and names only


def test_the_library_imports_form_no_circle_and_the_family_table_is_a_leaf():
    """Every import of the package (module level and inside functions, not those for type
    checkers only) as a graph: it has no circle (so every module sits above all it imports:
    none climbs back up), and esolm.families imports nothing of the library. It had one
    circle: config -> families -> objectives / ordering -> model.backbone -> config."""
    import graphlib

    from esolm.codedeps import import_graph

    graph = import_graph()
    assert graph["esolm.families"] == set()
    assert "esolm.model.backbone" in graph["esolm.objectives"]  # the graph is real
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        raise AssertionError(f"import circle: {' -> '.join(err.args[1])}") from None
    assert set(order) == set(graph)


def test_training_does_not_depend_on_the_sampler_or_the_likelihood_code():
    """The table names its loops and likelihood functions, so an edit to the sampler does not
    rerun (and invalidate) training; sampling and evaluation still depend on them."""
    from esolm.codedeps import compact, stage_code

    train = compact(stage_code("train"))
    assert "esolm/families.py" in train
    assert not [d for d in train if d.startswith(("esolm/sampling", "esolm/likelihood"))], train
    assert "esolm/sampling" in compact(stage_code("sample"))
    assert "esolm/likelihood.py" in compact(stage_code("evaluate"))
