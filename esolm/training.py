"""Training runs: a run folder, its fingerprint and resume, the Lightning trainer, the outputs.

Determinism that makes resume exact: the loss's random draws come from a generator seeded
by (seed, micro-step), dropout from the global RNG reseeded by (seed, micro-step, rank),
and the data position is a pure function of the micro-step (``Batches.batch_at``). A
checkpoint therefore needs no RNG state: weights, EMA, optimizer, scheduler and the step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader

from esolm.checkpoint import save_model
from esolm.config import INITS, ModelConfig
from esolm.data.batches import Batches
from esolm.io import job_key, job_lock, read_jsonl, safe_load, write_text_atomic
from esolm.lit import AtomicCheckpointIO, JsonlLog, LitModel, MicroBatches, ProgressLines
from esolm.objectives import training_objective
from esolm.params import NOT_A_MODEL_SETTING
from esolm.train_config import TrainConfig

PROGRESS_EVERY_S = float(os.environ.get("ESOLM_PROGRESS_EVERY", "30"))
"""Seconds between progress lines when training runs without a terminal (``dvc repro`` into a log)."""
CODE_ENTRY = "esolm.training:train"  # the fingerprint covers every file this can run (esolm.codedeps)


def fingerprint(cfg: ModelConfig, tc: TrainConfig, data_dir: Path) -> str:
    """What a resumable checkpoint must match: model and train config, the data's config
    hash, and the source of the code that defines the model and its loss."""
    import hashlib

    from esolm.codedeps import code_files

    files = code_files(CODE_ENTRY)
    meta = json.loads((data_dir / "meta.json").read_text()) if (data_dir / "meta.json").exists() else {}
    train = {k: v for k, v in asdict(tc).items() if k not in NOT_A_MODEL_SETTING}
    h = hashlib.sha256(json.dumps({"model": cfg.to_dict(), "train": train,
                                   "data": meta.get("config_hash")}, sort_keys=True, default=str).encode())
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def _precision(tc: TrainConfig) -> str:
    if tc.precision != "auto":
        return tc.precision
    return "bf16-mixed" if torch.cuda.is_available() and tc.accelerator != "cpu" else "32-true"


def _val_loader(data_dir: Path, tc: TrainConfig, rank: int) -> DataLoader:
    val = Batches(data_dir, "valid", tc.micro, seed=tc.seed, rank=rank, world_size=tc.world_size,
                  shuffle=False)
    rows = [val.batch_at(i) for i in range(min(tc.val_batches, len(val)))]
    return DataLoader(rows, batch_size=None)


def trainer_for(tc: TrainConfig, run_dir: Path, progress: bool, callbacks: list,
                before_first_save: Callable[[], None] | None = None) -> pl.Trainer:
    """The Lightning trainer of ``tc``. Building it writes nothing, so a setting this machine
    cannot run (``train.accelerator=gpu`` without one, ``fsdp`` on a CPU) is refused here, as one
    line naming the setting, before a run folder is touched."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", every_n_train_steps=tc.ckpt_every,
                           save_top_k=1, enable_version_counter=False)
    try:
        return pl.Trainer(
            max_steps=tc.steps, accelerator=tc.accelerator, devices=tc.devices, num_nodes=tc.num_nodes,
            strategy=tc.strategy, precision=_precision(tc), gradient_clip_val=tc.grad_clip or None,
            accumulate_grad_batches=tc.accumulate, val_check_interval=tc.val_every * tc.accumulate,
            check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False,
            enable_progress_bar=progress, enable_model_summary=False, use_distributed_sampler=False,
            plugins=[AtomicCheckpointIO(before_first_save)], callbacks=[ckpt, *callbacks],
            default_root_dir=run_dir)
    except (MisconfigurationException, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"train.accelerator={tc.accelerator!r}, strategy={tc.strategy!r}, "
                         f"precision={tc.precision!r}, devices={tc.devices} cannot run on this machine "
                         f"({first}); use train.accelerator=cpu or auto, strategy=auto") from None


def check_data(tc: TrainConfig, data_dir: Path) -> None:
    """The shards can feed ``tc``: a micro-step of every process takes ``micro x world`` rows of
    the train split (``Batches`` drops a partial one), so a larger batch than the split holds is
    refused before anything moves; so are a changed or corrupt tokenizer.json and ids outside
    the vocabulary (``esolm.data.identity``)."""
    from esolm.data import read_meta
    from esolm.data.identity import check_prepared

    check_prepared(data_dir)
    meta = read_meta(data_dir)
    rows = meta["splits"].get("train", {}).get("rows", 0)
    need = tc.micro * tc.world_size
    if rows < need:
        raise ValueError(f"train.batch_size={tc.batch_size} needs {need} rows per micro-step "
                         f"({tc.micro} x {tc.world_size} processes) but {data_dir} has {rows} training rows: "
                         f"use train.batch_size <= {rows} (or a train.micro_batch_size with accumulation)")


class Superseded:
    """The state of an earlier run that a fresh run replaces: its resumable checkpoint and its
    working curve. Nothing is moved when the fresh run starts; ``settle`` sets both aside (as
    ``stale-<time>.ckpt`` / ``.jsonl``) just before the fresh run writes its first checkpoint, so
    a run that fails earlier (a bad setting, a crash in the first steps) leaves the old state
    resumable. ``clean`` removes the set-aside files once the fresh run has finished."""

    def __init__(self, run_dir: Path) -> None:
        self.folder = run_dir / "checkpoints"
        self.files: list[Path] = []

    def replace(self, files: list[Path]) -> None:
        self.files = [f for f in files if f.exists()]

    @property
    def settled(self) -> bool:
        return not self.files

    def settle(self) -> None:
        import time

        stamp = int(time.time())
        for f in self.files:
            if f.exists():
                aside = f.with_name(f"stale-{stamp}{f.suffix}")
                os.replace(f, aside)
                print(f"{f} set aside as {aside.name}: this run has written its first checkpoint")
        self.files = []

    def clean(self) -> None:
        for f in self.folder.glob("stale-*"):
            f.unlink(missing_ok=True)


def train(cfg: ModelConfig, tc: TrainConfig, data_dir: Path, run_dir: Path, fresh: bool = False,
          progress: bool = True, callbacks: list[pl.Callback] | None = None) -> dict:
    """Train (or resume) one variant; writes checkpoints/ (last.ckpt and the working curve, the
    resumable state), then model.ckpt, train.jsonl and train.json (the stage's outputs).

    Every setting, the data and the machine are checked before a file is touched, and a
    resumable state is set aside only when the new run has written its first checkpoint: a
    rejected or failed run leaves ``run_dir`` as it was."""
    training_objective(cfg, tc.objective)
    check_data(tc, data_dir)
    superseded = Superseded(run_dir)
    log = JsonlLog(_working_log(run_dir), tc, cfg.length, ready=lambda: superseded.settled)

    def first_save() -> None:  # the earlier state goes aside, then the rows that waited for it
        superseded.settle()
        log.flush()

    bar = progress and sys.stderr.isatty()  # a bar on a terminal; in a log, a line per interval
    lines = [ProgressLines(run_dir.name, tc, cfg.length, PROGRESS_EVERY_S)] if progress and not bar else []
    with lightning_notices(bar):  # Lightning's informational lines only beside its bar
        trainer = trainer_for(tc, run_dir, bar, [log, *lines, *(callbacks or [])], first_save)
    run_dir.mkdir(parents=True, exist_ok=True)
    zero = trainer.global_rank == 0  # Lightning's ranks: torchrun, its own launcher, SLURM
    # one job at a time per run; every rank of this job shares the lock (esolm.io.job_lock)
    with job_lock(run_dir / "checkpoints", job_key(claim=True), trainer.global_rank):
        fp = fingerprint(cfg, tc, data_dir)
        resume = None if fresh else _resume_point(run_dir, tc, fp)
        if resume is None and zero:
            superseded.replace([run_dir / "checkpoints" / "last.ckpt", _working_log(run_dir)])
        summary = _fit(cfg, tc, data_dir, run_dir, resume, fp, bar, trainer, log)
        if zero:
            superseded.clean()
        return summary


def _resume_point(run_dir: Path, tc: TrainConfig, fp: str) -> tuple[int, str] | None:
    """Where training resumes (reads only): (step, sha256 prefix of the file) of a checkpoint of
    these settings, data and code (``fp``), the point every rank must agree on; None to start
    fresh (none, or one from other settings: ``Superseded`` replaces it). A checkpoint beyond
    ``train.steps`` is an error (never silently a longer model)."""
    import hashlib

    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.exists():
        return None
    ckpt = safe_load(last)
    if ckpt.get("esolm_fingerprint") != fp:
        if rank_zero_only.rank == 0:
            print(f"{last} came from other settings, data or code: training from scratch; it is "
                  "set aside (stale-*.ckpt) when this run writes its first checkpoint")
        return None
    step = int(ckpt.get("global_step", 0))
    if step > tc.steps:
        raise ValueError(f"{last} is at step {step}, beyond train.steps={tc.steps}: raise train.steps to "
                         f"continue it, or pass --fresh to train {tc.steps} steps from scratch")
    h = hashlib.sha256()
    with last.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return step, h.hexdigest()[:12]


def _fit(cfg: ModelConfig, tc: TrainConfig, data_dir: Path, run_dir: Path, resume: tuple[int, str] | None,
         fp: str, progress: bool, trainer: pl.Trainer, log: JsonlLog) -> dict:
    import time

    last = run_dir / "checkpoints" / "last.ckpt"
    module = LitModel(cfg, tc)
    module.fingerprint, module.resume_point = fp, resume
    with lightning_notices(progress):
        rank = trainer.global_rank
        module.train_data = MicroBatches(Batches(data_dir, "train", tc.micro, seed=tc.seed, rank=rank,
                                                 world_size=tc.world_size))
        loader = DataLoader(module.train_data, batch_size=None)
        t0 = time.perf_counter()
        trainer.fit(module, loader, _val_loader(data_dir, tc, rank), ckpt_path=last if resume else None)
        seconds = time.perf_counter() - t0
    trainer.save_checkpoint(last, weights_only=False)
    log.flush()
    return _finish(module, trainer, tc, data_dir, run_dir, seconds)


# Lightning's warnings that ask nothing of our users: checkpoints/ is ours (the resumable state
# and the working curve live there), and the pytree deprecation is inside Lightning itself.
LIGHTNING_NOISE = (r"Checkpoint directory .* exists and is not empty",
                   r".*isinstance\(treespec, LeafSpec\)")


@contextlib.contextmanager
def lightning_notices(progress: bool) -> Iterator[None]:
    """Lightning without its noise: the warnings above never; and with ``progress`` off (the
    stages' ``--quiet``) none of its informational lines (accelerator found, logger tip, why
    ``fit`` stopped). Its warnings and errors still show."""
    log = logging.getLogger("lightning.pytorch")
    level = log.level
    with warnings.catch_warnings():
        for pattern in LIGHTNING_NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        if not progress:
            log.setLevel(logging.WARNING)
        try:
            yield
        finally:
            log.setLevel(level)


def _working_log(run_dir: Path) -> Path:
    """The curve being written during training; it lives with the resumable checkpoint."""
    return run_dir / "checkpoints" / "train.jsonl"


def _finish(module: LitModel, trainer: pl.Trainer, tc: TrainConfig, data_dir: Path, run_dir: Path,
            seconds: float) -> dict:
    rows = read_jsonl(_working_log(run_dir))  # a partial last line (a kill mid-write) is dropped
    text = "".join(json.dumps(r) + "\n" for r in rows)
    val = trainer.callback_metrics.get("val_loss")
    summary = {"steps": trainer.global_step, "tokens": trainer.global_step * tc.batch_size * module.cfg.length,
               "final_train_loss": rows[-1]["loss"] if rows else None,
               "final_valid_loss": float(val) if val is not None else None,
               "wall_s": seconds, "tokens_per_s": _mean_rate(rows), "family": module.cfg.family,
               "objective": module.objective, "init": INITS[module.cfg.init],
               "ema": {"decay": tc.ema, "warmup": "min(decay, (1 + n) / (10 + n))"} if tc.ema else None,
               "mask_warmup": {"steps": tc.mask_warmup_steps, "start": tc.mask_warmup_start}
               if tc.mask_warmup_steps and module.masks else None,
               # what this model was trained with: the report reads it, not today's params.yaml
               "settings": {"model": module.cfg.to_dict(), "train": asdict(tc)}}
    # every rank gathers the weights (a collective under FSDP, where rank 0 alone would hang); one writes
    weights = module.model.state_dict()
    ema = None if module.ema is None else module.ema.state_dict()
    if trainer.is_global_zero:
        save_model(run_dir / "model.ckpt", module.cfg, weights, ema, trainer.global_step, data_dir)
        write_text_atomic(run_dir / "train.jsonl", text)
        write_text_atomic(run_dir / "train.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _mean_rate(rows: list[dict]) -> float | None:
    rates = [r["tokens_per_s"] for r in rows[1:]] or [r["tokens_per_s"] for r in rows]
    return sum(rates) / len(rates) if rates else None
