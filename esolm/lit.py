"""The Lightning pieces of training: the module (one for every family, with EMA), its endless
micro-batches, the atomic checkpoint writer and the per-step JSONL log (``esolm.training``
runs them).

Determinism that makes resume exact: the loss's random draws come from a generator seeded
by (seed, micro-step), dropout from the global RNG reseeded by (seed, micro-step, rank),
and the data position is a pure function of the micro-step (``Batches.batch_at``). A
checkpoint therefore needs no RNG state: weights, EMA, optimizer, scheduler and the step.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor
from torch.utils.data import IterableDataset

from esolm.config import ModelConfig
from esolm.data.batches import Batches
from esolm.io import atomic_save, read_jsonl, safe_load, write_text_atomic
from esolm.model.backbone import Backbone
from esolm.objectives import LossOutput, loss, training_objective
from esolm.seeds import derive_seed, stream_generator
from esolm.train_config import TrainConfig, ema_decay, lr_factor, mask_ceiling


def _step_of(path: Path) -> str:
    """'step N' of a checkpoint file, or 'none yet'."""
    try:
        return f"step {safe_load(path).get('global_step')}"
    except (FileNotFoundError, ValueError):
        return "none yet"


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
    """Checkpoints written to a temporary name and renamed; loaded with weights_only=True.
    ``before_first_save`` runs once, just before the first checkpoint of this run is written
    (``training.Superseded.settle``: an earlier run's state is set aside only then)."""

    def __init__(self, before_first_save: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.before_first_save = before_first_save

    def save_checkpoint(self, checkpoint: dict, path: str | os.PathLike, storage_options: Any = None) -> None:
        bad = [k for k, v in checkpoint.get("state_dict", {}).items()
               if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:  # never replace the last finite state with a diverged one
            raise RuntimeError(f"non-finite weights ({bad[0]}{' and others' if len(bad) > 1 else ''}) "
                               f"at step {checkpoint.get('global_step')}; {path} keeps the last finite "
                               f"state ({_step_of(Path(path))}): lower train.lr or check the data")
        if self.before_first_save is not None:
            self.before_first_save()
            self.before_first_save = None
        atomic_save(checkpoint, Path(path))

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None,
                        weights_only: bool | None = None) -> dict:
        return safe_load(Path(path), map_location)


def disagreement(seen: list[tuple], job: str, folder: Path) -> str | None:
    """Why the ranks of one job cannot train together, from what each saw: (resume point,
    the job named in its run folder's lock); None when every rank sees this job's lock and the
    same resume point (the same step of the same checkpoint, or none)."""
    apart = [rank for rank, (_, owner) in enumerate(seen) if owner != job]
    if apart:
        return (f"rank{'s' if len(apart) > 1 else ''} {','.join(map(str, apart))} of job {job} do not see its "
                f"lock in {folder}: every node must use the same run folder (a shared filesystem); training "
                "from separate checkouts is not supported: nothing was trained")
    points = [p for p, _ in seen]
    if all(p == points[0] for p in points):
        return None
    groups: dict = {}
    for rank, p in enumerate(points):
        groups.setdefault(p, []).append(rank)
    said = ", ".join(f"rank{'s' if len(r) > 1 else ''} {','.join(map(str, r))} "
                     + ("from scratch" if p is None else f"step {p[0]} ({p[1]})") for p, r in groups.items())
    return (f"the ranks disagree on where to resume: {said}; every rank must read the same {folder} "
            "(a folder shared by every node), or none (--fresh): nothing was trained")


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
        self.masks = "diffusion" in cfg.family_record.terms and cfg.alpha_0 > 0  # a diffusion term draws t
        self.cfg, self.tc = cfg, tc
        torch.manual_seed(tc.seed)
        self.model = Backbone(cfg)
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if tc.ema > 0 else None
        self.ema_updates = 0
        # the compiled wrapper is kept out of the module tree (no duplicate state_dict keys)
        object.__setattr__(self, "net", torch.compile(self.model) if tc.compile else self.model)
        self.train_data: MicroBatches | None = None
        self.fingerprint = ""
        self.resume_point: tuple[int, str] | None = None  # (step, checkpoint sha) this rank resumes from
        self.last: dict[str, float] = {}
        self.losses: list[float] = []

    def t_max(self, step: int) -> float:
        """The largest diffusion time of optimizer step ``step`` (1 for a model that masks nothing)."""
        return mask_ceiling(step, self.tc) if self.masks else 1.0

    def setup(self, stage: str) -> None:
        """Before any checkpoint is restored, every rank states where it resumes from; unless all
        agree (the same step of the same file, or all from scratch) every rank stops with one
        line: ranks that read different run folders (separate checkouts) never train apart."""
        world = self.trainer.world_size
        if world < 2 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return
        from esolm.io import job_key, owner_of

        folder = Path(self.trainer.default_root_dir) / "checkpoints"
        seen: list = [None] * world
        torch.distributed.all_gather_object(seen, (self.resume_point, owner_of(folder)))
        problem = disagreement(seen, job_key(), folder)
        if problem:
            raise RuntimeError(problem)

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
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if type(self.trainer.strategy).__name__.startswith("FSDP") and torch.distributed.is_initialized():
            square = norm.double() ** 2  # each rank holds a shard: the global norm sums the squares
            torch.distributed.all_reduce(square)
            norm = square.sqrt()
        self.last["grad_norm"] = float(norm)

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
    ``runs/NAME/train.jsonl`` (the stage output) when training ends. While ``ready()`` is false
    (a fresh run has not yet written its first checkpoint, so an earlier run's curve is still in
    place) rows wait in memory; ``flush`` writes them."""

    def __init__(self, path: Path, tc: TrainConfig, length: int, ready: Callable[[], bool] = lambda: True) -> None:
        self.path, self.tc, self.length, self.ready = path, tc, length, ready
        self.t_last, self.step_last = 0.0, 0
        self.waiting: list[dict] = []

    def on_train_start(self, trainer: pl.Trainer, module: LitModel) -> None:
        import time

        if trainer.is_global_zero and self.ready():
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
            self.waiting.append(row)
            self.flush()

    def flush(self) -> None:
        """Append the waiting rows, once the earlier run's curve is out of the way."""
        if self.waiting and self.ready():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in self.waiting))
            self.waiting.clear()




class ProgressLines(pl.Callback):
    """Training progress for a log (``dvc repro``, a CI job, a batch system): one line every
    ``every_s`` seconds and at the end, never a bar's carriage returns: the step, the training
    loss, tokens per second, the elapsed time and the time left at that rate."""

    def __init__(self, name: str, tc: TrainConfig, length: int, every_s: float = 30.0,
                 clock: Any = None, out: Any = None) -> None:
        import sys
        import time

        self.name, self.tc, self.length, self.every_s = name, tc, length, every_s
        self.clock = clock or time.monotonic
        self.out = out or sys.stderr
        self.t0 = self.last = 0.0
        self.step0 = 0

    def on_train_start(self, trainer: pl.Trainer, module: LitModel) -> None:
        self.t0 = self.last = self.clock()
        self.step0 = trainer.global_step
        if trainer.is_global_zero:
            start = f"resuming at step {self.step0}" if self.step0 else "from step 0"
            print(f"train {self.name}: {self.tc.steps} steps of {self.tc.batch_size} x {self.length} tokens, "
                  f"{start}; a line every {self.every_s:g} s", file=self.out, flush=True)

    def on_train_batch_end(self, trainer: pl.Trainer, module: LitModel, *args: Any) -> None:
        now = self.clock()
        step = trainer.global_step
        if not trainer.is_global_zero or (now - self.last < self.every_s and step < self.tc.steps):
            return
        self.last = now
        print(self.line(step, trainer.callback_metrics.get("train_loss"), now - self.t0), file=self.out, flush=True)

    def line(self, step: int, loss: Any, elapsed: float) -> str:
        done = step - self.step0
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (self.tc.steps - step) / rate if rate > 0 else float("nan")
        loss_text = "-" if loss is None else f"{float(loss):.4f}"
        return (f"train {self.name}: step {step}/{self.tc.steps} loss {loss_text} "
                f"{rate * self.tc.batch_size * self.length:,.0f} tok/s, {_clock(elapsed)} elapsed, "
                f"ETA {_clock(left)}")


def _clock(seconds: float) -> str:
    """12s, 3m05s, 1h02m; '?' when unknown."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
