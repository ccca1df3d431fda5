"""The pipeline stages behind ``esolm train | evaluate | sample | search``: params in, files out.

Each function reads the stage's inputs from disk (token shards, checkpoints), calls the
library, and writes its outputs (one writer per file, atomic). No tensors cross stages.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from esolm.config import CurveConfig, EvalConfig, ModelConfig, SampleConfig, ScheduleSettings, renamed_family
from esolm.headline import write_curve, write_likelihood_metrics, write_sampling_metrics
from esolm.io import write_text_atomic
from esolm.params import build, section
from esolm.results import CurvePoint, CurveResult, GenerationResult, LikelihoodResult

IMPORT_KEYS = ("source", "raw")
"""Keys of a variant that is imported, not trained: ``source`` (``hf:<owner/name>``, an authors'
folder or Lightning ``.ckpt``: docs/released-models.md) and ``raw`` (the trained, not the EMA,
weights of a Lightning file)."""


def data_dir(params: dict) -> Path:
    data = section(params, "data")
    return Path(data["out_dir"]) / data["dataset"]


def run_dir(name: str) -> Path:
    return Path("runs") / name


def model_config(params: dict, name: str, meta: dict) -> ModelConfig:
    """ModelConfig of variant ``name``: the shared model section, the variant's own settings,
    and the vocabulary, length and pad id of the prepared data."""
    variants = section(params, "variants")
    if name not in variants:
        raise ValueError(f"unknown variant {name!r}; params.yaml defines {sorted(variants)}")
    own = {k: v for k, v in renamed_family(variants[name] or {}).items() if k not in IMPORT_KEYS}
    values = {**section(params, "model"), **own}
    values.update(vocab_size=meta["vocab_size"], length=meta["length"], pad_token_id=meta.get("pad_id"))
    return build(ModelConfig, values, f"variants.{name}")


# the fields that say what a model is: a model file that differs from its variant in one of them
# is another model (copied in, or trained before params.yaml changed), never evaluated as this one
IDENTITY_FIELDS = ("family", "alpha_0", "batch_split", "block_size", "d_model", "n_layers", "n_heads",
                   "cond_dim", "mlp_ratio", "rope_base", "vocab_size", "length")


def load_variant(params: dict, name: str, device: torch.device, data: Path | None = None):
    """(model, tokenizer) of ``runs/<name>/model.ckpt``, checked before use: the file is a model of
    the variant ``name`` as params.yaml defines it (family, alpha_0, sizes), and, with ``data``
    (a prepared folder), was trained with the tokenizer that made those shards."""
    from esolm.checkpoint import load_run
    from esolm.data.identity import data_tokenizer, same_tokenizer

    path = run_dir(name) / "model.ckpt"
    model, tok = load_run(path, device=device)
    have = model.config
    variant = (section(params, "variants").get(name) or {}) if name in section(params, "variants") else None
    if variant is not None and "source" not in variant:  # an imported model keeps its own sizes
        want = model_config(params, name, {"vocab_size": have.vocab_size, "length": have.length,
                                           "pad_id": have.pad_token_id})
        diff = [f"{k} {getattr(have, k)!r} (variants.{name}: {getattr(want, k)!r})" for k in IDENTITY_FIELDS
                if getattr(have, k) != getattr(want, k)]
        if diff:
            raise ValueError(f"{path} is not the variant {name!r} of params.yaml: it has {', '.join(diff)}; "
                             f"retrain it (dvc repro train@{name}) or fix variants.{name}")
    if data is not None:
        from esolm.data import read_meta

        meta = read_meta(data)
        _, data_sha = data_tokenizer(data, meta)
        same_tokenizer(str(path), getattr(model, "provenance", {}).get("tokenizer_sha256"), data, data_sha)
    return model, tok


JUDGE_KEYS = ("name", "model", "train")


def judge_params(params: dict) -> tuple[dict, str]:
    """(params in which the judge is the only variant, its name): an AR model on the shared
    model and train sections with the ``judge:`` section's overrides (larger, longer)."""
    from esolm.families import JUDGE_FAMILY

    jc = dict(section(params, "judge"))
    unknown = sorted(set(jc) - set(JUDGE_KEYS))
    if unknown:
        raise ValueError(f"unknown parameter judge.{unknown[0]}: use {list(JUDGE_KEYS)}")
    name = jc.get("name", "judge")
    if name in section(params, "variants"):
        raise ValueError(f"judge.name={name!r} is also a variant: the judge must never be a contestant")
    out = {**params, "variants": {name: {"family": JUDGE_FAMILY}},
           "model": {**section(params, "model"), **(jc.get("model") or {})},
           "train": {**section(params, "train"), **(jc.get("train") or {})}}
    return out, name


def judge_stage(params: dict, fresh: bool, progress: bool) -> dict:
    """Train the dedicated AR judge and measure its own test perplexity (runs/<name>/)."""
    jp, name = judge_params(params)
    summary = train_stage(jp, name, fresh, progress)
    likelihood = evaluate_stage(jp, name, progress)
    return {"name": name, "train": summary, "test_ppl": likelihood["test"]["exact_l2r_ppl"]
            if "test" in likelihood else None}


def train_stage(params: dict, name: str, fresh: bool, progress: bool) -> dict:
    from esolm.data import read_meta
    from esolm.train_config import TrainConfig
    from esolm.training import train

    variant = section(params, "variants").get(name) or {}
    if variant.get("source"):
        return import_stage(params, name, variant)
    tc = build(TrainConfig, dict(section(params, "train")), "train")  # every setting checked first
    ddir = data_dir(params)
    cfg = model_config(params, name, read_meta(ddir))
    summary = train(cfg, tc, ddir, run_dir(name), fresh=fresh, progress=progress)
    write_curve(name, run_dir(name) / "train.jsonl")  # the stage's DVC plot
    return summary


def import_stage(params: dict, name: str, variant: dict) -> dict:
    """The train stage of a variant with ``source:``: the published model is read (safely,
    ``esolm.published_io``) and written as ``runs/<name>/model.ckpt`` with the tokenizer of the
    prepared data (whose vocabulary must be the model's), plus a ``train.json`` that says where it
    came from and an empty curve; evaluate, sample, curve, search and report then treat it like a
    trained variant."""
    from esolm.checkpoint import save_model
    from esolm.data import read_meta
    from esolm.data.identity import check_prepared
    from esolm.model.backbone import Backbone
    from esolm.published_io import read_source

    unknown = sorted(set(variant) - {*IMPORT_KEYS, "family", "alpha_0", "batch_split"})
    if unknown:
        raise ValueError(f"variants.{name}: {unknown} cannot be set for an imported model (source: "
                         f"{variant['source']}): it brings its own sizes; use family, alpha_0, batch_split, raw")
    ddir = data_dir(params)
    check_prepared(ddir)
    meta = read_meta(ddir)
    imp = read_source(variant["source"], variant.get("family"), variant.get("alpha_0"), variant.get("batch_split"),
                      bool(variant.get("raw", False)))
    if imp.config.vocab_size != meta["vocab_size"]:
        raise ValueError(f"variants.{name}.source {variant['source']} has a vocabulary of {imp.config.vocab_size} "
                         f"ids but {ddir} has {meta['vocab_size']}: prepare the data with the model's tokenizer "
                         "(data.tokenizer: gpt2 for the published OpenWebText models)")
    Backbone(imp.config).load_state_dict(imp.weights)  # every name and shape checked before writing
    step = int(imp.source.get("step") or 0)
    out = run_dir(name)
    save_model(out / "model.ckpt", imp.config, imp.weights, imp.ema_weights, step, ddir,
               source={**imp.source, "skipped": imp.skipped})
    summary = {"steps": step, "tokens": None, "final_train_loss": None, "final_valid_loss": None, "wall_s": None,
               "tokens_per_s": None, "family": imp.config.family, "objective": None, "init": "imported",
               "source": str(variant["source"]), "settings": {"model": imp.config.to_dict(), "train": None}}
    write_text_atomic(out / "train.jsonl", "")
    write_text_atomic(out / "train.json", json.dumps(summary, indent=2) + "\n")
    write_curve(name, out / "train.jsonl")
    return summary


def _batches(ddir: Path, split: str, batch_size: int, n: int, device: torch.device) -> list[torch.Tensor]:
    from esolm.data import Batches

    b = Batches(ddir, split, batch_size, shuffle=False)
    return [b.batch_at(i).to(device) for i in range(min(n, len(b)))]


def evaluate_stage(params: dict, name: str, progress: bool) -> dict:
    from esolm.data import read_meta
    from esolm.device import pick_device
    from esolm.likelihood import evaluate_split

    ev = build(EvalConfig, dict(section(params, "evaluate")), "evaluate")
    device = pick_device(ev.device)
    ddir = data_dir(params)
    meta = read_meta(ddir)
    model, _ = load_variant(params, name, device, data=ddir)
    if model.config.vocab_size != meta["vocab_size"]:
        raise ValueError(f"runs/{name}/model.ckpt has vocabulary {model.config.vocab_size} but "
                         f"{ddir} has {meta['vocab_size']}: retrain on these shards")
    result = {"variant": name, "family": model.config.family, "alpha_0": model.config.alpha_0}
    targets = [(split, ddir, split) for split in ev.splits]
    targets += [(f"zero_shot:{Path(z).name}", Path(z), "test") for z in ev.zero_shot]
    for key, folder, split in targets:
        zmeta = read_meta(folder)
        if zmeta["vocab_size"] != meta["vocab_size"] or zmeta["length"] != meta["length"]:
            raise ValueError(f"{folder} was prepared with vocabulary {zmeta['vocab_size']} and length "
                             f"{zmeta['length']}, the model needs {meta['vocab_size']} and {meta['length']}: "
                             f"prepare it with --set data.tokenizer=file:{ddir / 'tokenizer.json'}")
        if folder != ddir:  # a zero-shot set: encoded with the model's own tokenizer, not one of its size
            from esolm.data.identity import data_tokenizer, same_tokenizer

            try:
                same_tokenizer(str(run_dir(name) / "model.ckpt"), model.provenance.get("tokenizer_sha256"),
                               folder, data_tokenizer(folder, zmeta)[1])
            except ValueError as err:
                raise ValueError(f"{err} (prepare it with --set data.tokenizer=file:{ddir / 'tokenizer.json'})") \
                    from None
        t0 = time.perf_counter()
        batches = _batches(folder, split, ev.batch_size, ev.nelbo_batches, device)
        if not batches:
            raise ValueError(f"split {split!r} of {folder} has no batch of {ev.batch_size} rows")
        result[key] = evaluate_split(model, batches, ev, zmeta["splits"][split]["bytes_per_token"], progress)
        result[key]["seconds"] = time.perf_counter() - t0
    splits = {k: v for k, v in result.items() if isinstance(v, dict)}
    like = LikelihoodResult(name, model.config.family, model.config.alpha_0, splits)
    like.write(run_dir(name))
    write_likelihood_metrics(name, like)  # the stage's DVC metrics: its own numbers, never a parent's
    return result


def best_schedule(out_dir: Path) -> ScheduleSettings:
    """The schedule chosen by the search (``sample.schedule=best``): ``out_dir/best.json``,
    read back by the search's one reader of it (an unknown key names the closest)."""
    from esolm.search.results import best_schedule as chosen

    return chosen(out_dir)


def sample_config(params: dict) -> SampleConfig:
    """The typed ``sample:`` section, with the searched schedule filled in for ``schedule: best``."""
    sc = build(SampleConfig, dict(section(params, "sample")), "sample")
    if sc.schedule == "best":
        sc = sc.with_schedule(best_schedule(Path(section(params, "search")["out_dir"])))
    return sc


def settings_for(sc: ScheduleSettings, model) -> ScheduleSettings:
    """The schedule settings of ``sc`` for ``model``: a sampling alpha_0 applies to the families
    whose alpha_0 is free (Eso-LMs); the others keep the value they imply."""
    s = sc.settings()
    return s if model.config.family_record.fixed_alpha_0 is None else replace(s, alpha_0=None)


def judge_of(params: dict, judge_name: str, device: torch.device, contestant=None):
    """The judge ``judge_name`` (``sample.judge``), never one of the contestants under ``variants``;
    an esolm judge must share the ``contestant``'s tokenizer (a hub judge brings its own)."""
    from esolm.data.identity import tokenizers_agree
    from esolm.judge import load_judge

    judge = load_judge(judge_name, Path("runs"), device, contestants=tuple(section(params, "variants")))
    if contestant is not None and hasattr(judge, "model"):
        tokenizers_agree(f"the judge runs/{judge.name}/model.ckpt", judge.model,
                         "the contestant", contestant)
    return judge


def judged_samples(model, tok, judge, settings: ScheduleSettings, num_samples: int, progress: bool) -> dict:
    """Sample, decode and judge: the Generation, texts, ids, per-sample entropies and the
    judge's scores (generative perplexity and per-sample NLL)."""
    from esolm.judge import unigram_entropy
    from esolm.sampling import generate

    g = generate(model, num_samples=num_samples, settings=settings, progress=progress)
    ids = g.tokens.tolist()
    texts = tok.decode_batch(ids, skip_special_tokens=False)
    entropies = [unigram_entropy(r) for r in ids]
    return {"generation": g, "texts": texts, "ids": ids, "entropies": entropies,
            "entropy": sum(entropies) / len(entropies), "scores": judge.score(texts)}


def load_average() -> float | None:
    """The 1-minute load average (None where the system has none): what else shared the CPUs."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def sample_stage(params: dict, name: str, progress: bool, out: Path | None = None) -> dict:
    """Sample ``name`` with the ``sample:`` settings and judge the samples. The files
    (``samples.jsonl``, ``generation.json``) are written only to ``out``; the variant's run folder
    (the DVC stage: ``esolm sample --variant V --out runs/V``) also gets its headline metrics."""
    from esolm.device import pick_device

    sc = sample_config(params)
    device = pick_device(sc.device)
    model, tok = load_variant(params, name, device)
    judge = judge_of(params, sc.judge, device, model)
    r = judged_samples(model, tok, judge, settings_for(sc, model), sc.num_samples, progress)
    g, scores = r["generation"], r["scores"]
    settings = g.settings  # what ran (the block order fixes its own steps)
    rows = [{"index": i, "text": t, "ids": ids, "entropy": e, "judge_nll": n, "settings": settings}
            for i, (t, ids, e, n) in enumerate(zip(r["texts"], r["ids"], r["entropies"],
                                                   scores["per_sample_nll"]))]
    result = GenerationResult(
        variant=name, family=model.config.family, nfe=g.nfe, seconds=g.seconds,
        seconds_per_sample=g.seconds / sc.num_samples, tokens_per_s=g.tokens.numel() / g.seconds,
        kv_cache=g.kv_cache, gen_ppl=scores["gen_ppl"], entropy=r["entropy"], judge=judge.name,
        schedule=settings, num_samples=sc.num_samples, load_avg=load_average(), cpus=os.cpu_count())
    if out is not None:
        write_text_atomic(out / "samples.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
        result.write(out)
        if out.resolve() == run_dir(name).resolve():
            write_sampling_metrics(name, result)
    return {**result.to_json(), "texts": r["texts"]}


def curve_stage(params: dict, name: str, progress: bool) -> dict:
    """runs/<name>/curve.json: generative perplexity, entropy, NFE and seconds per sample of
    ``name`` at each T of ``curve.steps`` (the sample section's other settings, a random order
    and the log-linear schedule; the same judge)."""
    from esolm.device import pick_device

    cc = build(CurveConfig, dict(section(params, "curve")), "curve")
    sc = build(SampleConfig, dict(section(params, "sample")), "sample")
    sc = replace(sc, order="random", schedule="loglinear")  # a sample.schedule of best plays no part
    device = pick_device(sc.device)
    model, tok = load_variant(params, name, device)
    judge = judge_of(params, sc.judge, device, model)
    ar = model.config.family_record.autoregressive  # one point: NFE = L
    points = []
    for steps in (model.config.length,) if ar else cc.steps:
        r = judged_samples(model, tok, judge, replace(settings_for(sc, model), steps=steps), cc.num_samples,
                           progress)
        g = r["generation"]
        points.append(CurvePoint(steps=None if ar else steps, nfe=g.nfe,
                                 seconds_per_sample=g.seconds / cc.num_samples,
                                 gen_ppl=r["scores"]["gen_ppl"], entropy=r["entropy"]))
    out = CurveResult(variant=name, family=model.config.family, alpha_0=model.config.alpha_0,
                      judge=judge.name, num_samples=cc.num_samples, top_p=sc.top_p, points=points)
    out.write(run_dir(name))
    return out.to_json()


def prompted_samples(params: dict, name: str, prompt: str | None, infill: str | None) -> tuple[list[str], dict]:
    """``esolm sample --prompt/--infill``: the sample section's schedule, printed not stored;
    generated infill spans marked. Returns the texts and the settings that ran."""
    from esolm.device import pick_device
    from esolm.text import INFILL_MARKS, load, sample_text

    sc = sample_config(params)
    model, tok = load(run_dir(name) / "model.ckpt", device=pick_device(sc.device))
    return sample_text(model, tok, settings_for(sc, model), prompt=prompt, infill=infill,
                       num_samples=sc.num_samples, marks=INFILL_MARKS if infill is not None else None)


def search_config(params: dict):
    """The SearchConfig of params.yaml's ``search`` section."""
    from esolm.search import SearchConfig

    values = {k: v for k, v in section(params, "search").items() if k != "device"}
    return build(SearchConfig, values, "search")


def search_study(params: dict):
    """(config, study) of the search: the study named by everything that scores a trial (the
    contestant's and the judge's model files by content hash, the samples, the entropy floor,
    the space, the timing: ``search.scoring``) in ``search.storage``, created with named
    objectives if it does not exist yet."""
    from esolm.search import model_key, open_study, scoring, study_key, study_name

    sc = search_config(params)
    path = run_dir(sc.variant) / "model.ckpt"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: train the variant first (esolm train --variant {sc.variant})")
    judge = build(SampleConfig, dict(section(params, "sample")), "sample").judge
    judge_file = run_dir(judge) / "model.ckpt"
    if not judge.startswith("hf:") and not judge_file.exists():
        raise FileNotFoundError(f"judge model {judge_file} not found: train it first (esolm judge, or dvc repro judge)")
    scored = scoring(sc, model_key(path), judge if judge.startswith("hf:") else model_key(judge_file))
    return sc, open_study(sc, study_name(sc.variant, study_key(scored)), scored=scored)


def _search_setup(params: dict, device: torch.device):
    """(model, judge, tokenizer, entropy floor) for the schedule search."""
    from esolm.data import load_split
    from esolm.judge import unigram_entropy

    sc = search_config(params)
    model, tok = load_variant(params, sc.variant, device)
    judge = judge_of(params, build(SampleConfig, dict(section(params, "sample")), "sample").judge, device, model)
    floor = sc.entropy_floor
    if floor <= 0:
        rows = load_split(data_dir(params), "valid")[:64].tolist()
        floor = sc.entropy_floor_frac * sum(unigram_entropy(r) for r in rows) / len(rows)
    return model, judge, tok, floor


def queue_search(params: dict, n_trials: int | None = None) -> int:
    """Queue the trials missing from this model's study up to ``n_trials`` (default
    search.n_trials); returns how many were queued."""
    from esolm.search import queue_trials

    sc, study = search_study(params)
    return queue_trials(study, n_trials or sc.n_trials)


def join_search(params: dict, progress: bool = False, threads: int = 0, shared: bool = True,
                n_trials: int | None = None) -> int:
    """One worker: run trials of this study until it holds ``n_trials`` (default search.n_trials)
    and none is queued (any process, any machine with the same model files and storage); a dead
    worker's trial is failed and run again, a live one's never touched. Returns the trials it ran.
    ``shared``: other workers run at the same time, so the sampler is reseeded (workers seeded
    alike would propose the same schedules); a lone worker keeps search.seed (reproducible)."""
    from esolm.device import pick_device
    from esolm.search import make_evaluator, objective_for, work

    if threads:
        torch.set_num_threads(threads)
    device = pick_device(section(params, "search").get("device", "auto"))
    sc, study = search_study(params)
    if shared:
        study.sampler.reseed_rng()
    model, judge, tok, floor = _search_setup(params, device)
    evaluate = make_evaluator(model, judge, tok, sc.num_samples, sc.seed, sc.repeats, sc.warmup)
    return work(study, objective_for(evaluate, sc.space, model.config.family, floor), n_trials or sc.n_trials,
                progress)


def search_trials(params: dict, n_trials: int | None = None, progress: bool = False, workers: int = 1,
                  join: bool = False) -> int:
    """Queue the missing trials (unless ``join``) and run trials up to ``n_trials`` (default
    search.n_trials) with ``workers`` processes; returns the trials run."""
    import os
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    if not join:
        queue_search(params, n_trials)
    if workers <= 1:
        return join_search(params, progress, shared=join, n_trials=n_trials)
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(join_search, params, False, threads, True, n_trials) for _ in range(workers)]
        return sum(f.result() for f in futures)


def search_outputs(params: dict, compare: bool = True) -> dict:
    """Write trials.parquet, pareto.json, best.json and the figure from the study, and a SQLite
    snapshot of it as study.db (the study itself lives in ``search.storage``, outside the outputs)."""
    from esolm.device import pick_device
    from esolm.search import (
        compare_with_default,
        copy_to_sqlite,
        make_evaluator,
        open_storage,
        pareto,
        storage_url,
        trial_rows,
        write_outputs,
    )

    device = pick_device(section(params, "search").get("device", "auto"))
    sc, study = search_study(params)
    rows = trial_rows(study, sc.variant)
    comparison: dict = {}
    model, judge, tok, floor = _search_setup(params, device)
    if compare:
        evaluate = make_evaluator(model, judge, tok, sc.num_samples, sc.seed, sc.repeats, sc.warmup)
        comparison = compare_with_default(evaluate, pareto([r for r in rows if r["feasible"]]),
                                          sc.default_steps, floor)
    snapshot = Path(sc.out_dir) / "study.db"
    if storage_url(sc) != f"sqlite:///{snapshot}":
        copy_to_sqlite(study.study_name, open_storage(storage_url(sc)), snapshot)
    out = write_outputs(sc, rows, comparison, floor)
    out["study"] = study.study_name
    return out


def search_stage(params: dict, progress: bool, workers: int = 1) -> dict:
    ran = search_trials(params, progress=progress, workers=workers)
    out = search_outputs(params)
    out["ran"] = ran
    return out
