"""Training: every variant learns, exact resume after a kill, DDP invariance, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from tokenizers import Tokenizer

from esolm.checkpoint import load_model
from esolm.config import ModelConfig
from esolm.data import DataConfig, prepare, read_meta
from esolm.io import safe_load
from esolm.train_config import TrainConfig
from esolm.training import train
from tests.data.conftest import write_txt_corpus


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("train")
    corpus = write_txt_corpus(tmp / "docs", n_docs=60)
    return prepare(DataConfig(dataset="tiny", source=f"files:{corpus}/*.txt", tokenizer="bpe:300",
                              length=16, out_dir=str(tmp / "out"), cache_dir=str(tmp / "raw")),
                   progress=False)


def _cfg(shards: Path, variant: str) -> ModelConfig:
    return ModelConfig(family=variant, vocab_size=read_meta(shards)["vocab_size"], length=16, d_model=32,
                       n_layers=2, n_heads=4, cond_dim=32, dropout=0.1,
                       alpha_0=0.5 if variant.startswith("eso") else None)


TC = TrainConfig(steps=40, batch_size=8, val_every=20, val_batches=2, ckpt_every=20, log_every=10,
                 lr=3e-3, warmup_steps=5, ema=0.9)


@pytest.mark.parametrize("variant", ["ar", "mdlm", "bd3lm", "eso_a", "eso_b"])
def test_every_variant_trains_and_its_validation_loss_falls(shards, tmp_path, variant):
    cfg = _cfg(shards, variant)
    model = load_model_like(cfg)
    before = _val_loss(model, shards)
    summary = train(cfg, TC, shards, tmp_path / variant, progress=False)
    after = _val_loss(load_model(tmp_path / variant / "model.ckpt", ema=False), shards)
    print(f"{variant}: valid loss {before:.3f} -> {after:.3f}; train.json {summary}")
    assert after < before - 0.5
    rows = [json.loads(r) for r in (tmp_path / variant / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(rows[0])
    assert summary["steps"] == 40 and summary["tokens"] == 40 * 8 * 16
    assert summary["objective"] == "nelbo" and summary["init"].startswith("adaLN-Zero")
    assert summary["ema"] == {"decay": 0.9, "warmup": "min(decay, (1 + n) / (10 + n))"}


def load_model_like(cfg: ModelConfig):
    from esolm.model.backbone import Backbone

    torch.manual_seed(TC.seed)
    return Backbone(cfg).eval()


def _val_loss(model, shards: Path) -> float:
    from esolm import loss
    from esolm.data import Batches

    val = Batches(shards, "valid", 8, shuffle=False)
    with torch.no_grad():
        vals = [loss(model, val.batch_at(i), generator=torch.Generator().manual_seed(i)).per_token
                for i in range(2)]
    return float(sum(vals) / len(vals))


class Kill(pl.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 27:
            raise KeyError("simulated kill")


def test_resume_after_a_kill_is_exact(shards, tmp_path):
    cfg = _cfg(shards, "eso_b")
    train(cfg, TC, shards, tmp_path / "straight", progress=False)
    with pytest.raises(KeyError, match="simulated kill"):
        train(cfg, TC, shards, tmp_path / "killed", progress=False, callbacks=[Kill()])
    assert not (tmp_path / "killed" / "model.ckpt").exists()
    assert safe_load(tmp_path / "killed" / "checkpoints" / "last.ckpt")["global_step"] == 20
    train(cfg, TC, shards, tmp_path / "killed", progress=False)  # resumes from step 20
    a = safe_load(tmp_path / "straight" / "model.ckpt")
    b = safe_load(tmp_path / "killed" / "model.ckpt")
    for key in ("weights", "ema_weights"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    assert (tmp_path / "straight" / "train.jsonl").read_text() != ""
    losses = [[json.loads(r)["loss"] for r in (tmp_path / run / "train.jsonl").read_text().splitlines()]
              for run in ("straight", "killed")]
    assert losses[0] == losses[1]


def test_a_checkpoint_from_other_settings_is_replaced_only_once_the_new_run_has_checkpointed(shards, tmp_path):
    short = TC.__class__(**{**TC.__dict__, "steps": 20})
    train(_cfg(shards, "eso_b"), short, shards, tmp_path / "r", progress=False)
    old = (tmp_path / "r" / "checkpoints" / "last.ckpt").read_bytes()
    seen: list[tuple[int, bool]] = []

    class Watch(pl.Callback):  # before the first checkpoint of the new run, the old state is in place
        def on_train_batch_end(self, trainer, *args):
            state = tmp_path / "r" / "checkpoints" / "last.ckpt"
            seen.append((trainer.global_step, state.read_bytes() == old))

    other = _cfg(shards, "eso_b").replace(d_model=64)
    summary = train(other, short, shards, tmp_path / "r", progress=False, callbacks=[Watch()])
    assert summary["steps"] == 20
    assert all(same for step, same in seen if step < 20) and len(seen) >= 19
    assert not list((tmp_path / "r" / "checkpoints").glob("stale-*"))  # cleaned once the run finished
    rows = [json.loads(r) for r in (tmp_path / "r" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20]
    assert load_model(tmp_path / "r" / "model.ckpt").config.d_model == 64


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def resumable(shards, tmp_path_factory) -> Path:
    """A finished, resumable run of 20 steps (checkpoints/last.ckpt and its working curve)."""
    run = tmp_path_factory.mktemp("resumable") / "ar"
    train(_cfg(shards, "ar"), TC.__class__(**{**TC.__dict__, "steps": 20}), shards, run, progress=False)
    return run


# the six settings of issue #22 that used to move last.ckpt aside and empty the working curve
# before failing; each is now refused before a file of the run folder is touched
REJECTED = [(dict(lr=-1.0), r"train.lr=-1.0 is invalid"), (dict(precision="fp7"), r"train.precision='fp7'"),
            (dict(accelerator="gpu"), r"train.accelerator='gpu'.*cannot run on this machine"),
            (dict(strategy="fsdp"), r"strategy='fsdp', .*cannot run on this machine"),
            (dict(seed=-1), r"train.seed=-1 is invalid"),
            (dict(batch_size=10_000_000), r"train.batch_size=10000000 needs .* training rows"),
            (dict(grad_clip=-1.0), r"train.grad_clip=-1.0 is invalid.*0 for no clipping")]


@pytest.mark.parametrize("change,match", REJECTED, ids=[next(iter(c)) for c, _ in REJECTED])
def test_a_rejected_run_leaves_the_resumable_run_byte_identical(shards, resumable, change, match):
    before = _snapshot(resumable)
    with pytest.raises(ValueError, match=match):
        train(_cfg(shards, "ar"), TC.__class__(**{**TC.__dict__, "steps": 40, **change}), shards, resumable,
              progress=False)
    assert _snapshot(resumable) == before


def test_a_fresh_run_that_fails_before_its_first_checkpoint_keeps_the_old_state(shards, resumable, monkeypatch):
    before = _snapshot(resumable)
    from esolm import lit

    real = lit.loss

    def failing(*a, **k):  # a crash in the new run's third step
        failing.calls += 1
        if failing.calls == 3:
            raise RuntimeError("crash in step 3")
        return real(*a, **k)

    failing.calls = 0
    monkeypatch.setattr(lit, "loss", failing)
    with pytest.raises(RuntimeError, match="crash in step 3"):
        train(_cfg(shards, "ar").replace(d_model=64), TC.__class__(**{**TC.__dict__, "steps": 20}), shards,
              resumable, progress=False)
    after = _snapshot(resumable)
    assert {k: v for k, v in after.items() if k != "checkpoints/.lock"} == \
        {k: v for k, v in before.items() if k != "checkpoints/.lock"}


def test_a_finished_run_resumes_to_the_same_model(shards, tmp_path):
    short = TC.__class__(**{**TC.__dict__, "steps": 20})
    cfg = _cfg(shards, "ar")
    train(cfg, short, shards, tmp_path / "r", progress=False)
    first = safe_load(tmp_path / "r" / "model.ckpt")["weights"]
    curve = (tmp_path / "r" / "train.jsonl").read_text()
    for output in ("model.ckpt", "train.jsonl", "train.json"):
        (tmp_path / "r" / output).unlink()  # what DVC does to a stage's outputs before a rerun
    train(cfg, short, shards, tmp_path / "r", progress=False)
    again = safe_load(tmp_path / "r" / "model.ckpt")["weights"]
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert (tmp_path / "r" / "train.jsonl").read_text() == curve  # kept with the checkpoint


def test_bad_checkpoint_files_are_clear_errors(tmp_path):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="cannot be read"):
        load_model(bad)
    torch.save({"format": "something-else"}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match="not an esolm model file"):
        load_model(tmp_path / "foreign.ckpt")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.ckpt")


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(shards, tmp_path, monkeypatch):
    cfg = _cfg(shards, "ar")
    train(cfg, TC.__class__(**{**TC.__dict__, "steps": 20}), shards, tmp_path / "nan", progress=False)
    good = (tmp_path / "nan" / "checkpoints" / "last.ckpt").read_bytes()
    from esolm import lit as training  # the Lightning module calls loss

    real = training.loss

    def poisoned(*a, **k):
        out = real(*a, **k)
        out.sequential_nll = out.sequential_nll * float("nan")
        return out

    monkeypatch.setattr(training, "loss", poisoned)
    with pytest.raises(RuntimeError, match="non-finite training loss .* at step 20"):
        train(cfg, TC, shards, tmp_path / "nan", progress=False)
    assert (tmp_path / "nan" / "checkpoints" / "last.ckpt").read_bytes() == good


@pytest.mark.parametrize("kw,match", [(dict(steps=0), "steps"), (dict(lr_schedule="linear"), "lr_schedule"),
                                      (dict(batch_size=10, micro_batch_size=4), "multiple"),
                                      (dict(ema=1.0), "ema"), (dict(strategy="deepspeed"), "strategy"),
                                      (dict(mask_warmup_steps=-1), "mask_warmup_steps=-1 is invalid"),
                                      (dict(mask_warmup_start=0.0), r"mask_warmup_start=0.0 is invalid.*\[0.01, 1\]")])
def test_bad_train_config_is_a_clear_error(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def _ddp_worker(rank: int, world: int, init: str, out_dir: str) -> None:
    import torch.distributed as dist

    from esolm import loss
    from esolm.lit import global_per_token
    from tests.conftest import sharp_model

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = sharp_model("eso_b", alpha_0=0.5)
        x = torch.randint(0, 7, (8, 16), generator=torch.Generator().manual_seed(0))
        B = 8 // world
        out = loss(model, x[rank * B:(rank + 1) * B], generator=torch.Generator().manual_seed(5),
                   rank=rank, world_size=world)
        objective, value = global_per_token(out, world)
        objective.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        dist.all_reduce(grads)
        grads /= world  # what DDP does
        if rank == 0:
            torch.save({"value": value, "grads": grads}, f"{out_dir}/ddp.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_give_the_single_process_loss_and_gradient(tmp_path):
    """Same global batch and seed: 2 CPU processes (gloo) reproduce the 1-process step-0
    per-token loss and its gradient (t stratification and batch split are global)."""
    import torch.multiprocessing as mp

    from esolm import loss
    from esolm.lit import global_per_token
    from tests.conftest import sharp_model

    mp.spawn(_ddp_worker, args=(2, f"file://{tmp_path}/store", str(tmp_path)), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    model = sharp_model("eso_b", alpha_0=0.5)
    x = torch.randint(0, 7, (8, 16), generator=torch.Generator().manual_seed(0))
    objective, value = global_per_token(loss(model, x, generator=torch.Generator().manual_seed(5)), 1)
    objective.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(ddp["value"], value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ddp["grads"], grads, rtol=1e-4, atol=1e-6)


def test_ema_warms_up_like_the_reference():
    from esolm.train_config import ema_decay

    assert ema_decay(0.9999, 1) == pytest.approx(2 / 11) and ema_decay(0.5, 100) == 0.5
    kept, plain = 1.0, 0.9999 ** 10_000
    for n in range(1, 10_001):
        kept *= ema_decay(0.9999, n)
    # without warm-up the average still holds 37% of the initial weights after 10k steps
    assert plain > 0.36 and kept < 1e-3


def test_fewer_steps_than_the_checkpoint_is_an_error_not_a_longer_model(shards, tmp_path, capsys):
    cfg = _cfg(shards, "ar")
    train(cfg, TC.__class__(**{**TC.__dict__, "steps": 20}), shards, tmp_path / "r", progress=False)
    # a killed append leaves a partial last line: it is dropped, the run resumes
    with (tmp_path / "r" / "checkpoints" / "train.jsonl").open("a") as f:  # the working curve
        f.write('{"step": 3')
    shorter = TC.__class__(**{**TC.__dict__, "steps": 10})
    with pytest.raises(ValueError, match="at step 20, beyond train.steps=10: .* --fresh"):
        train(cfg, shorter, shards, tmp_path / "r", progress=False)
    summary = train(cfg, shorter, shards, tmp_path / "r", fresh=True, progress=False)
    assert summary["steps"] == 10 and safe_load(tmp_path / "r" / "model.ckpt")["step"] == 10
    longer = train(cfg, TC.__class__(**{**TC.__dict__, "steps": 20}), shards, tmp_path / "r", progress=False)
    assert longer["steps"] == 20
    rows = [json.loads(r) for r in (tmp_path / "r" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20]


def test_a_second_trainer_of_one_run_stops_with_a_message(shards, tmp_path):
    from esolm.io import run_lock

    with run_lock(tmp_path / "r" / "checkpoints"), pytest.raises(RuntimeError, match="in use by another esolm train"):
        train(_cfg(shards, "ar"), TC, shards, tmp_path / "r", progress=False)
    assert not (tmp_path / "r" / "train.jsonl").exists()


def test_partial_jsonl_lines_and_full_disks_lose_nothing(tmp_path, monkeypatch):
    from esolm import io

    log = tmp_path / "train.jsonl"
    log.write_text('{"step": 10}\n{"step": 20}\n{"step": 3')
    assert io.read_jsonl(log) == [{"step": 10}, {"step": 20}]
    log.write_text('{"step": 10}\n{"ste\n{"step": 30}\n')
    with pytest.raises(ValueError, match="train.jsonl line 2 is not JSON"):
        io.read_jsonl(log)
    target = tmp_path / "model.ckpt"
    io.atomic_save({"step": 1}, target)

    def full(obj, f, *a, **k):
        import errno

        Path(f).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.torch, "save", full)
    with pytest.raises(OSError, match="disk full while writing .*model.ckpt; the previous version"):
        io.atomic_save({"step": 2}, target)
    assert safe_load(target) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt", "train.jsonl"]


def test_the_model_file_carries_its_tokenizer(shards, tmp_path, monkeypatch):
    """Tokenizers used to be stored as a relative path: re-preparing the data (same vocabulary
    size) silently swapped it, and loading from another directory failed naming no file."""
    import shutil

    from esolm.checkpoint import load_run

    data = tmp_path / "data"
    shutil.copytree(shards, data)
    train(_cfg(data, "ar"), TC.__class__(**{**TC.__dict__, "steps": 10}), data, tmp_path / "r", progress=False)
    original = (data / "tokenizer.json").read_text()
    (data / "tokenizer.json").write_text('{"not": "the tokenizer"}')
    monkeypatch.chdir(tmp_path.parent)
    _model, tok = load_run(tmp_path / "r" / "model.ckpt")
    assert tok.to_str(pretty=True) == Tokenizer.from_str(original).to_str(pretty=True)
    ckpt = safe_load(tmp_path / "r" / "model.ckpt")
    ckpt["tokenizer_json"] = ckpt["tokenizer_json"].replace('"', "'", 1)
    torch.save(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="bad.ckpt: the embedded tokenizer does not match"):
        load_run(tmp_path / "bad.ckpt")


def test_a_diverged_state_never_replaces_the_last_finite_checkpoint(tmp_path):
    from esolm.lit import AtomicCheckpointIO

    io_ = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io_.save_checkpoint({"global_step": 10, "state_dict": {"w": torch.ones(3)}}, path)
    with pytest.raises(RuntimeError, match=r"non-finite weights \(w\) at step 20; .* last finite state \(step 10\)"):
        io_.save_checkpoint({"global_step": 20, "state_dict": {"w": torch.tensor([1.0, float("nan"), 0.0])}}, path)
    assert safe_load(path)["global_step"] == 10


def test_export_round_trip_gives_the_same_logits(shards, tmp_path, monkeypatch):
    """esolm export: a Hugging Face style folder that loads back to the same model and tokenizer."""
    import esolm
    from esolm.checkpoint import export
    from esolm.model.attention import AttentionMask

    cfg = _cfg(shards, "eso_b")
    train(cfg, TC.__class__(**{**TC.__dict__, "steps": 10}), shards, tmp_path / "r", progress=False)
    out = export(tmp_path / "r" / "model.ckpt", tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                     "tokenizer.json"]
    assert "esolm.load" in (out / "README.md").read_text()
    monkeypatch.chdir(tmp_path.parent)  # loads from anywhere
    a, tok_a = esolm.load(tmp_path / "r" / "model.ckpt")
    b, tok_b = esolm.load(out)
    x = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        mask = AttentionMask("causal")
        torch.testing.assert_close(a(x, pos, mask), b(x, pos, mask), rtol=0, atol=0)
    assert tok_a.to_str() == tok_b.to_str()
    (out / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="is not an esolm export"):
        esolm.load(out)


def test_a_quiet_training_prints_none_of_lightnings_notices(shards, tmp_path, caplog, monkeypatch):
    """--quiet (progress off) or no terminal (a log: progress lines instead): no 'GPU available',
    no logger tip; and never the warnings about our own checkpoints/ folder or Lightning's
    internal deprecations. On a terminal, not quiet: the notices show beside the bar."""
    import logging
    import sys
    import warnings

    cfg, short = _cfg(shards, "ar"), TC.__class__(**{**TC.__dict__, "steps": 4, "val_every": 2, "ckpt_every": 2})
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train(cfg, short, shards, tmp_path / "q", progress=False)
        train(cfg, short, shards, tmp_path / "q", fresh=True, progress=False)  # checkpoints/ exists
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("lightning")]
    noise = [str(w.message) for w in seen if "exists and is not empty" in str(w.message)
             or "LeafSpec" in str(w.message)]
    assert not noise
    train(cfg, short, shards, tmp_path / "logged", progress=True)  # pytest's stderr is no terminal
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("lightning")]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    train(cfg, short, shards, tmp_path / "loud", progress=True)
    assert any("GPU available" in r.getMessage() for r in caplog.records)


def test_the_masking_warm_up_reaches_every_training_step_and_the_records(shards, tmp_path, monkeypatch):
    """train.mask_warmup_steps: each training step's loss draws t below ``mask_ceiling`` (0.3
    rising to 1), validation always over [eps, 1]; train.jsonl and train.json say so."""
    from esolm import lit as training  # the Lightning module calls loss
    from esolm.train_config import mask_ceiling

    tc = TrainConfig(**{**TC.__dict__, "steps": 20, "mask_warmup_steps": 10, "mask_warmup_start": 0.3})
    assert [mask_ceiling(s, tc) for s in (0, 5, 10, 50)] == pytest.approx([0.3, 0.65, 1.0, 1.0], abs=1e-12)
    assert mask_ceiling(0, TC) == 1.0  # no warm-up: the reference's draw
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("t_max", "validation"))
        return real(*args, **kwargs)

    real = training.loss
    monkeypatch.setattr(training, "loss", spy)
    summary = train(_cfg(shards, "mdlm"), tc, shards, tmp_path / "mdlm", progress=False)
    assert [c for c in seen if c != "validation"] == [mask_ceiling(s, tc) for s in range(20)]
    assert "validation" in seen
    assert summary["mask_warmup"] == {"steps": 10, "start": 0.3}
    rows = [json.loads(r) for r in (tmp_path / "mdlm" / "train.jsonl").read_text().splitlines()]
    assert [r["t_max"] for r in rows] == [mask_ceiling(9, tc), 1.0]
    seen.clear()
    ar = train(_cfg(shards, "ar"), tc, shards, tmp_path / "ar", progress=False)
    assert ar["mask_warmup"] is None  # no diffusion term, nothing masked: no warm-up anywhere
    assert {c for c in seen if c != "validation"} == {1.0}
    assert [json.loads(r)["t_max"] for r in (tmp_path / "ar" / "train.jsonl").read_text().splitlines()] == [1.0, 1.0]


def test_training_in_a_log_prints_a_line_per_interval_and_a_bar_only_on_a_terminal(shards, tmp_path, capsys,
                                                                                       monkeypatch):
    """Issue #27: under dvc repro (no terminal) a 14-minute training printed nothing. Now: a line
    per interval (here every step) with step, loss, tokens/s and ETA, and the last step always."""
    from esolm import training

    monkeypatch.setattr(training, "PROGRESS_EVERY_S", 0.0)
    train(_cfg(shards, "ar"), TC.__class__(**{**TC.__dict__, "steps": 6, "ckpt_every": 6, "val_every": 6}),
          shards, tmp_path / "logged", progress=True)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("train logged: step ")]
    assert len(lines) == 6 and lines[-1].startswith("train logged: step 6/6 loss ")
    assert "tok/s" in lines[0] and "ETA" in lines[0] and "\r" not in err
    assert "train logged: 6 steps of 8 x 16 tokens, from step 0" in err


def test_progress_lines_read_well():
    from esolm.lit import ProgressLines, _clock

    p = ProgressLines("v", TC, 16)
    p.step0 = 10
    assert p.line(20, 3.14159, 5.0) == "train v: step 20/40 loss 3.1416 256 tok/s, 5s elapsed, ETA 10s"
    assert [_clock(s) for s in (4.2, 185, 3720, float("nan"))] == ["4s", "3m05s", "1h02m", "?"]
