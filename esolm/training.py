"""Training with Lightning: one module for every family, EMA, exact resume, DDP/FSDP.

Determinism that makes resume exact: the loss's random draws come from a generator seeded
by (seed, micro-step), dropout from the global RNG reseeded by (seed, micro-step, rank),
and the data position is a pure function of the micro-step (``Batches.batch_at``). A
checkpoint therefore needs no RNG state: weights, EMA, optimizer, scheduler and the step.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from esolm.checkpoint import MODEL_FORMAT, tokenizer_record
from esolm.config import INITS, ModelConfig
from esolm.data.batches import Batches
from esolm.io import atomic_save, read_jsonl, run_lock, safe_load, write_text_atomic
from esolm.model.backbone import Backbone
from esolm.objectives import OBJECTIVES, LossOutput, loss, training_objective
from esolm.seeds import derive_seed, stream_generator

LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """batch_size is the global batch (rows per optimizer step); micro_batch_size the rows one
    process handles per forward (0: batch_size / devices, no accumulation)."""

    steps: int = 300
    batch_size: int = 32
    micro_batch_size: int = 0
    lr: float = 1e-3
    warmup_steps: int = 30
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.0
    objective: str = "nelbo"
    mask_warmup_steps: int = 0
    """Optimizer steps over which the largest diffusion time t of training rises linearly from
    ``mask_warmup_start`` to 1 (``mask_ceiling``): fewer masks early, so a diffusion model learns
    to read its context before it faces mostly masked rows. 0: no warm-up (the reference).
    Validation, evaluation and sampling always use t in [eps, 1]."""
    mask_warmup_start: float = 0.3
    """The largest diffusion time at step 0 of the warm-up, in [0.01, 1]."""
    precision: str = "auto"
    compile: bool = False
    val_every: int = 100
    val_batches: int = 4
    ckpt_every: int = 100
    log_every: int = 10
    seed: int = 0
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    accelerator: str = "auto"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "val_every", "val_batches", "ckpt_every", "log_every",
                     "devices", "num_nodes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)!r} is invalid: use an integer >= 1")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"train.lr_schedule={self.lr_schedule!r} is unknown: use one of {LR_SCHEDULES}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"train.objective={self.objective!r} is unknown: use one of {OBJECTIVES}")
        if not isinstance(self.mask_warmup_steps, int) or self.mask_warmup_steps < 0:
            raise ValueError(f"train.mask_warmup_steps={self.mask_warmup_steps!r} is invalid: use an "
                             "integer >= 0 (0 disables the masking warm-up)")
        if not 0.01 <= self.mask_warmup_start <= 1.0:
            raise ValueError(f"train.mask_warmup_start={self.mask_warmup_start!r} is invalid: use the "
                             "largest diffusion time at the start of the warm-up, in [0.01, 1]")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"train.ema={self.ema!r} is invalid: use a decay in [0, 1) (0 disables EMA)")
        if self.strategy not in ("auto", "ddp", "fsdp", "ddp_spawn"):
            raise ValueError(f"train.strategy={self.strategy!r} is unknown: use auto, ddp or fsdp")
        world = self.devices * self.num_nodes
        micro = self.micro_batch_size or self.batch_size // world
        if micro < 1 or self.batch_size % (micro * world):
            raise ValueError(f"train.batch_size={self.batch_size} must be a multiple of "
                             f"micro_batch_size x devices x num_nodes = {micro} x {world}")

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    @property
    def micro(self) -> int:
        return self.micro_batch_size or self.batch_size // self.world_size

    @property
    def accumulate(self) -> int:
        return self.batch_size // (self.micro * self.world_size)


def lr_factor(step: int, tc: TrainConfig) -> float:
    """Linear warmup to 1, then constant or cosine down to ``min_lr_ratio``."""
    if step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    if tc.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps))
    return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def mask_ceiling(step: int, tc: TrainConfig) -> float:
    """The largest diffusion time t drawn at optimizer step ``step``: ``mask_warmup_start``
    rising linearly to 1 over ``mask_warmup_steps`` steps, then 1 (always 1 without a warm-up)."""
    if step >= tc.mask_warmup_steps:
        return 1.0
    return tc.mask_warmup_start + (1.0 - tc.mask_warmup_start) * step / tc.mask_warmup_steps


def _step_of(path: Path) -> str:
    """'step N' of a checkpoint file, or 'none yet'."""
    try:
        return f"step {safe_load(path).get('global_step')}"
    except (FileNotFoundError, ValueError):
        return "none yet"


def ema_decay(decay: float, updates: int) -> float:
    """The reference's EMA warm-up: min(decay, (1 + n) / (10 + n)) at the n-th update (n >= 1),
    so early averages forget the initialisation instead of holding it for ~1 / (1 - decay) steps."""
    return min(decay, (1 + updates) / (10 + updates))


class MicroBatches(IterableDataset):
    """Endless micro-batches of this rank, starting at micro-step ``start`` (set on resume)."""

    def __init__(self, batches: Batches) -> None:
        self.batches = batches
        self.start = 0

    def __iter__(self) -> Iterator[Tensor]:
        step = self.start
        while True:
            yield self.batches.batch_at(step)
            step += 1


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary name and renamed; loaded with weights_only=True."""

    def save_checkpoint(self, checkpoint: dict, path: str | os.PathLike, storage_options: Any = None) -> None:
        bad = [k for k, v in checkpoint.get("state_dict", {}).items()
               if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:  # never replace the last finite state with a diverged one
            raise RuntimeError(f"non-finite weights ({bad[0]}{' and others' if len(bad) > 1 else ''}) "
                               f"at step {checkpoint.get('global_step')}; {path} keeps the last finite "
                               f"state ({_step_of(Path(path))}): lower train.lr or check the data")
        atomic_save(checkpoint, Path(path))

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None,
                        weights_only: bool | None = None) -> dict:
        return safe_load(Path(path), map_location)


def global_per_token(out: LossOutput, world_size: int) -> tuple[Tensor, Tensor]:
    """(loss to backpropagate, per-token NELBO of the global batch).

    Each term's local NLL sum is divided by the term's *global* token count, so the sum over
    processes is the global per-token NELBO; DDP averages gradients, hence the factor world.
    """
    counts = torch.stack([out.diffusion_tokens, out.sequential_tokens]).float()
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    d = out.diffusion_nll / counts[0] if counts[0] > 0 else out.diffusion_nll * 0
    s = out.sequential_nll / counts[1] if counts[1] > 0 else out.sequential_nll * 0
    piece = d + s
    value = piece.detach().clone()
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(value)
    return piece * world_size, value


class LitModel(pl.LightningModule):
    """The Backbone, its EMA copy and the training objective of its family."""

    def __init__(self, cfg: ModelConfig, tc: TrainConfig) -> None:
        super().__init__()
        self.objective = training_objective(cfg, tc.objective)
        self.masks = "diffusion" in cfg.spec.terms and cfg.alpha_0 > 0  # a diffusion term draws t
        self.cfg, self.tc = cfg, tc
        torch.manual_seed(tc.seed)
        self.model = Backbone(cfg)
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if tc.ema > 0 else None
        self.ema_updates = 0
        # the compiled wrapper is kept out of the module tree (no duplicate state_dict keys)
        object.__setattr__(self, "net", torch.compile(self.model) if tc.compile else self.model)
        self.train_data: MicroBatches | None = None
        self.fingerprint = ""
        self.last: dict[str, float] = {}
        self.losses: list[float] = []

    def t_max(self, step: int) -> float:
        """The largest diffusion time of optimizer step ``step`` (1 for a model that masks nothing)."""
        return mask_ceiling(step, self.tc) if self.masks else 1.0

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # train() resumes only a checkpoint whose fingerprint (config, data, code) matches
        if self.train_data is not None:
            self.train_data.start = checkpoint["global_step"] * self.tc.accumulate
        self.ema_updates = checkpoint.get("esolm_ema_updates", checkpoint["global_step"])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["esolm_fingerprint"] = self.fingerprint
        checkpoint["esolm_ema_updates"] = self.ema_updates

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        micro_step = self.global_step * self.tc.accumulate + batch_idx % self.tc.accumulate
        torch.manual_seed(derive_seed(self.tc.seed, "train", "dropout", micro_step, self.global_rank))
        gen = stream_generator(self.tc.seed, "train", "draws", micro_step)
        out = loss(self.net, batch, generator=gen, rank=self.global_rank, world_size=self.trainer.world_size,
                   objective=self.objective, t_max=self.t_max(self.global_step))
        objective, value = global_per_token(out, self.trainer.world_size)
        if not torch.isfinite(value):
            last = Path(self.trainer.default_root_dir) / "checkpoints" / "last.ckpt"
            raise RuntimeError(f"non-finite training loss {value.item()} at step {self.global_step}; "
                               f"stopped; {last} keeps the last finite state ({_step_of(last)}): "
                               "lower train.lr or check the data")
        self.losses.append(float(value))
        self.log("train_loss", value, prog_bar=True, batch_size=batch.shape[0])
        return objective / self.tc.accumulate

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        self.last["grad_norm"] = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema_updates += 1
            decay = ema_decay(self.tc.ema, self.ema_updates)
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.model.parameters()):
                    e.lerp_(p, 1.0 - decay)

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        gen = stream_generator(self.tc.seed, "valid", batch_idx)
        out = loss(self.net, batch, generator=gen)  # always the NELBO, whatever the objective
        self.log("val_loss", out.per_token, prog_bar=True, batch_size=batch.shape[0], sync_dist=True)

    def configure_optimizers(self) -> dict:
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.tc.lr, weight_decay=self.tc.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, self.tc))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class JsonlLog(pl.Callback):
    """The working curve ``runs/NAME/checkpoints/train.jsonl``, kept beside the resumable
    checkpoint: one row per ``log_every`` optimizer steps (rank 0 only). On resume the rows after
    the restored step are dropped, so the file is the curve of one run. ``train`` copies it to
    ``runs/NAME/train.jsonl`` (the stage output) when training ends."""

    def __init__(self, path: Path, tc: TrainConfig, length: int) -> None:
        self.path, self.tc, self.length = path, tc, length
        self.t_last, self.step_last = 0.0, 0

    def on_train_start(self, trainer: pl.Trainer, module: LitModel) -> None:
        import time

        if trainer.is_global_zero:
            keep = [r for r in read_jsonl(self.path) if r["step"] <= trainer.global_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        self.t_last, self.step_last = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, module: LitModel, *args: Any) -> None:
        import time

        step = trainer.global_step
        if step == self.step_last or step % self.tc.log_every or not module.losses:
            return
        now = time.perf_counter()
        tokens = (step - self.step_last) * self.tc.batch_size * self.length
        row = {"step": step, "loss": sum(module.losses) / len(module.losses),
               "lr": trainer.optimizers[0].param_groups[0]["lr"],
               "grad_norm": module.last.get("grad_norm", float("nan")),
               "t_max": module.t_max(step - 1),
               "tokens_per_s": tokens / max(now - self.t_last, 1e-9)}
        module.losses.clear()
        self.t_last, self.step_last = now, step
        if trainer.is_global_zero:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


CODE_ENTRY = "esolm.training:train"  # the fingerprint covers every file this can run (esolm.codedeps)
# settings that do not change the training trajectory (raising ``steps`` continues a run)
NOT_FINGERPRINTED = ("steps", "log_every", "val_every", "val_batches", "ckpt_every")


def fingerprint(cfg: ModelConfig, tc: TrainConfig, data_dir: Path) -> str:
    """What a resumable checkpoint must match: model and train config, the data's config
    hash, and the source of the code that defines the model and its loss."""
    import hashlib
    from dataclasses import asdict

    from esolm.codedeps import code_files

    files = code_files(CODE_ENTRY)
    meta = json.loads((data_dir / "meta.json").read_text()) if (data_dir / "meta.json").exists() else {}
    train = {k: v for k, v in asdict(tc).items() if k not in NOT_FINGERPRINTED}
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


def trainer_for(tc: TrainConfig, run_dir: Path, progress: bool, callbacks: list) -> pl.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", every_n_train_steps=tc.ckpt_every,
                           save_top_k=1, enable_version_counter=False)
    return pl.Trainer(
        max_steps=tc.steps, accelerator=tc.accelerator, devices=tc.devices, num_nodes=tc.num_nodes,
        strategy=tc.strategy, precision=_precision(tc), gradient_clip_val=tc.grad_clip or None,
        accumulate_grad_batches=tc.accumulate, val_check_interval=tc.val_every * tc.accumulate,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False,
        enable_progress_bar=progress, enable_model_summary=False, use_distributed_sampler=False,
        plugins=[AtomicCheckpointIO()], callbacks=[ckpt, *callbacks], default_root_dir=run_dir)


def train(cfg: ModelConfig, tc: TrainConfig, data_dir: Path, run_dir: Path, fresh: bool = False,
          progress: bool = True, callbacks: list[pl.Callback] | None = None) -> dict:
    """Train (or resume) one variant; writes checkpoints/ (last.ckpt and the working curve, the
    resumable state), then model.ckpt, train.jsonl and train.json (the stage's outputs)."""
    training_objective(cfg, tc.objective)  # before any file is touched

    run_dir.mkdir(parents=True, exist_ok=True)
    primary = os.environ.get("LOCAL_RANK", "0") == "0"  # DDP children share rank 0's lock
    with run_lock(run_dir / "checkpoints", "esolm train") if primary else contextlib.nullcontext():
        fresh = _prepare_run_dir(cfg, tc, data_dir, run_dir, fresh)
        return _fit(cfg, tc, data_dir, run_dir, fresh, progress, callbacks)


def _prepare_run_dir(cfg: ModelConfig, tc: TrainConfig, data_dir: Path, run_dir: Path, fresh: bool) -> bool:
    """Keep a resumable checkpoint, or set aside one from other settings, data or code (rank 0
    moves it; every rank trains fresh); a checkpoint beyond ``train.steps`` is an error (never
    silently a longer model). Returns whether training starts fresh."""
    import time

    last = run_dir / "checkpoints" / "last.ckpt"
    zero = rank_zero_only.rank == 0  # from the launcher's environment (torchrun, SLURM, Lightning)
    if last.exists() and not fresh:
        ckpt = safe_load(last)
        if ckpt.get("esolm_fingerprint") != fingerprint(cfg, tc, data_dir):
            if zero:
                aside = last.with_name(f"stale-{int(time.time())}.ckpt")
                os.replace(last, aside)
                print(f"{last} came from other settings, data or code; kept as {aside.name}, "
                      "training from scratch")
            fresh = True
        elif ckpt.get("global_step", 0) > tc.steps:
            raise ValueError(f"{last} is at step {ckpt['global_step']}, beyond train.steps={tc.steps}: "
                             "raise train.steps to continue it, or pass --fresh to train "
                             f"{tc.steps} steps from scratch")
    if fresh and zero:
        for stale in (last, _working_log(run_dir)):
            stale.unlink(missing_ok=True)
    return fresh


def _fit(cfg: ModelConfig, tc: TrainConfig, data_dir: Path, run_dir: Path, fresh: bool, progress: bool,
         callbacks: list[pl.Callback] | None) -> dict:
    import time

    last = run_dir / "checkpoints" / "last.ckpt"
    fp = fingerprint(cfg, tc, data_dir)
    module = LitModel(cfg, tc)
    module.fingerprint = fp
    logs = [JsonlLog(_working_log(run_dir), tc, cfg.length), *(callbacks or [])]
    with lightning_notices(progress):
        trainer = trainer_for(tc, run_dir, progress, logs)
        rank = trainer.global_rank
        module.train_data = MicroBatches(Batches(data_dir, "train", tc.micro, seed=tc.seed, rank=rank,
                                                 world_size=tc.world_size))
        loader = DataLoader(module.train_data, batch_size=None)
        t0 = time.perf_counter()
        resume = last if last.exists() and not fresh else None
        trainer.fit(module, loader, _val_loader(data_dir, tc, rank), ckpt_path=resume)
        seconds = time.perf_counter() - t0
    trainer.save_checkpoint(last, weights_only=False)
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
               if tc.mask_warmup_steps and module.masks else None}
    if trainer.is_global_zero:
        atomic_save({"format": MODEL_FORMAT, "config": module.cfg.to_dict(), "step": trainer.global_step,
                     "weights": module.model.state_dict(),
                     "ema_weights": None if module.ema is None else module.ema.state_dict(),
                     **tokenizer_record(data_dir), "data_dir": str(data_dir)},
                    run_dir / "model.ckpt")
        write_text_atomic(run_dir / "train.jsonl", text)
        write_text_atomic(run_dir / "train.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _mean_rate(rows: list[dict]) -> float | None:
    rates = [r["tokens_per_s"] for r in rows[1:]] or [r["tokens_per_s"] for r in rows]
    return sum(rates) / len(rates) if rates else None
