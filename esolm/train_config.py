"""The ``train:`` section (``TrainConfig``) and the schedules derived from it: the learning rate
(``lr_factor``), the masking warm-up (``mask_ceiling``) and the EMA warm-up (``ema_decay``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from esolm.objectives import OBJECTIVES

LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
ACCELERATORS = ("auto", "cpu", "gpu", "mps")
STRATEGIES = ("auto", "ddp", "fsdp", "ddp_spawn")


@dataclass(frozen=True)
class TrainConfig:
    """batch_size is the global batch (rows per optimizer step); micro_batch_size the rows one
    process handles per forward (0: batch_size / devices, no accumulation)."""

    steps: int = 300
    """Optimizer steps (weight updates) of the whole run; a resumed run continues to this count."""
    batch_size: int = 32
    """Rows per optimizer step, over every process and accumulated micro-batch (the global batch)."""
    micro_batch_size: int = 0
    """Rows one process handles per forward; 0: batch_size / devices (no gradient accumulation)."""
    lr: float = 1e-3
    """Peak learning rate of AdamW, reached after ``warmup_steps`` (``lr_factor``)."""
    warmup_steps: int = 30
    """Optimizer steps of the linear learning-rate warm-up."""
    lr_schedule: str = "constant"
    """After the warm-up: constant, or cosine down to ``min_lr_ratio`` x ``lr`` at ``steps``."""
    min_lr_ratio: float = 0.1
    """The cosine schedule's final learning rate as a fraction of ``lr``."""
    weight_decay: float = 0.0
    """AdamW's weight decay."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this value; 0: no clipping."""
    ema: float = 0.0
    """Decay of the exponential moving average of the weights (0 disables EMA), warmed up as
    ``ema_decay``; the model file keeps both weights."""
    objective: str = "nelbo"
    """The training objective: nelbo or low_var (``esolm.objectives.OBJECTIVES``)."""
    mask_warmup_steps: int = 0
    """Optimizer steps over which the largest diffusion time t of training rises linearly from
    ``mask_warmup_start`` to 1 (``mask_ceiling``): fewer masks early, so a diffusion model learns
    to read its context before it faces mostly masked rows. 0: no warm-up (the reference).
    Validation, evaluation and sampling always use t in [eps, 1]."""
    mask_warmup_start: float = 0.3
    """The largest diffusion time at step 0 of the warm-up, in [0.01, 1]."""
    precision: str = "auto"
    """Lightning precision (32-true, bf16-mixed, ...); auto: bf16-mixed on a GPU, 32-true on a CPU."""
    compile: bool = False
    """Run the model through torch.compile."""
    val_every: int = 100
    """Optimizer steps between validations."""
    val_batches: int = 4
    """Validation batches per validation."""
    ckpt_every: int = 100
    """Optimizer steps between resumable checkpoints."""
    log_every: int = 10
    """Optimizer steps between rows of the training curve (train.jsonl)."""
    seed: int = 0
    """Seed of initialisation, data order, dropout and diffusion draws (independent streams)."""
    devices: int = 1
    """Devices (processes) per node."""
    num_nodes: int = 1
    """Machines taking part."""
    strategy: str = "auto"
    """Lightning strategy: auto, ddp or fsdp."""
    accelerator: str = "auto"
    """Lightning accelerator: auto (a GPU when present), cpu or gpu."""

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
        if self.strategy not in STRATEGIES:
            raise ValueError(f"train.strategy={self.strategy!r} is unknown: use one of {STRATEGIES}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision={self.precision!r} is unknown: use one of {PRECISIONS}")
        if self.accelerator not in ACCELERATORS:
            raise ValueError(f"train.accelerator={self.accelerator!r} is unknown: use one of {ACCELERATORS}")
        self._check_ranges()
        world = self.devices * self.num_nodes
        micro = self.micro_batch_size or self.batch_size // world
        if micro < 1 or self.batch_size % (micro * world):
            raise ValueError(f"train.batch_size={self.batch_size} must be a multiple of "
                             f"micro_batch_size x devices x num_nodes = {micro} x {world}")

    def _check_ranges(self) -> None:
        """Values of the right type but outside their range, each refused before a run starts."""
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"train.lr={self.lr!r} is invalid: use a learning rate > 0 (e.g. 1e-3)")
        if not (isinstance(self.grad_clip, (int, float)) and math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"train.grad_clip={self.grad_clip!r} is invalid: use a norm > 0, or 0 for no "
                             "clipping")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"train.seed={self.seed!r} is invalid: use an integer >= 0")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps={self.warmup_steps!r} is invalid: use an integer >= 0")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"train.weight_decay={self.weight_decay!r} is invalid: use a value >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train.min_lr_ratio={self.min_lr_ratio!r} is invalid: use a ratio in [0, 1]")

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


def ema_decay(decay: float, updates: int) -> float:
    """The reference's EMA warm-up: min(decay, (1 + n) / (10 + n)) at the n-th update (n >= 1),
    so early averages forget the initialisation instead of holding it for ~1 / (1 - decay) steps."""
    return min(decay, (1 + updates) / (10 + updates))


