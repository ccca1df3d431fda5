"""Permutations: the order in which the model sees (training) or generates (sampling) positions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from esolm.config import ScheduleSettings, shuffle_mode
from esolm.noise import alpha

if TYPE_CHECKING:
    from esolm.config import ModelConfig


def clean_first_order(masked: Tensor, clean_key: Tensor, mask_key: Tensor,
                      padding: Tensor | None = None) -> Tensor:
    """sort_idx [B, L]: clean positions first ordered by ``clean_key``, then masked ones by
    ``mask_key``, then padding (so that, under causal attention, no real token sees it).

    masked, padding: bool [B, L]; keys: float [B, L] in [0, 1) (random draws for a uniformly
    random order, ``position / L`` for left to right).
    """
    key = torch.where(masked, 2.0 + mask_key, clean_key)
    if padding is not None:
        key = torch.where(padding, 4.0 + mask_key, key)
    return torch.argsort(key, dim=-1, stable=True)


def left_to_right_key(batch: int, length: int, device: torch.device) -> Tensor:
    """Keys that sort positions left to right: position / L, [B, L]."""
    return (torch.arange(length, device=device) / length).expand(batch, length)


# ----------------------------------------------------------------------------- sampling schedule

@dataclass(frozen=True)
class Schedule:
    """A sampling schedule shared by a batch (method.md section 4).

    order: LongTensor[B, L], positions in generation order; the first ``n_given`` are given
    (prompt) tokens, then ``n_diffusion`` diffusion tokens, then the sequential ones left to
    right. counts: tokens decoded per non-empty step, in order (sequential steps are 1s).
    """

    order: Tensor
    counts: tuple[int, ...]
    n_given: int
    n_diffusion: int

    @property
    def steps(self) -> int:
        return len(self.counts)


def loglinear_counts(n: int, steps: int, alpha_0: float, eps: float,
                     generator: torch.Generator | None) -> list[int]:
    """Binomial(remaining, (alpha_s - alpha_t) / (1 - alpha_t)) unmasked per diffusion step,
    t going from 1 to 0 in ``steps`` equal steps; the total is about alpha_0 * n."""
    counts, remaining = [], n
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    for t, s in zip(times[:-1], times[1:]):
        a_t, a_s = alpha(t, alpha_0, eps), alpha(s, alpha_0, eps)
        p = float(((a_s - a_t) / (1.0 - a_t)).clamp(0.0, 1.0)) if a_t < 1 else 0.0
        k = int(torch.binomial(torch.tensor(float(remaining)), torch.tensor(p), generator=generator))
        counts.append(k)
        remaining -= k
    return counts


def power_counts(n_diffusion: int, steps: int, gamma: float) -> list[int]:
    """Deterministic counts: after step s, round(D * (s / T) ** gamma) tokens are decoded.
    gamma = 1 spreads them evenly; gamma > 1 decodes few early and many late."""
    done = [round(n_diffusion * (s / steps) ** gamma) for s in range(steps + 1)]
    return [b - a for a, b in zip(done[:-1], done[1:])]


def block_steps(free: Tensor, n_diffusion: int, subcontexts: int, shuffle: bool | str,
                generator: torch.Generator | None) -> tuple[Tensor, list[int]]:
    """Block-AR (subcontext) order over the free positions [B, F]: split them into
    ``subcontexts`` contiguous chunks; each step decodes one within-chunk offset in every
    chunk. shuffle: ``none`` (offsets 0, 1, ... and chunks left to right), ``shared`` (the
    reference: a random offset order, and per step a random chunk order, one order for the
    whole batch), ``per_chunk`` (every row and chunk its own random offset order).
    Returns the diffusion part of the order [B, D] and its per-step counts."""
    mode = shuffle_mode(shuffle)
    B, F = free.shape
    size = -(-F // subcontexts)
    rank = torch.arange(F).expand(B, F)  # rank of each free position inside its chunk
    chunk = rank // size
    step = rank % size  # the step that decodes each position
    across = chunk.float() / subcontexts  # order of the chunks inside one step
    if mode == "shared":
        step = torch.argsort(torch.randperm(size, generator=generator))[step]
        place = torch.argsort(torch.rand(size, subcontexts, generator=generator), dim=1)
        across = place[step, chunk].float() / subcontexts  # a random chunk order per step
    elif mode == "per_chunk":
        u = torch.rand(B, F, generator=generator)
        step = torch.argsort(torch.argsort(chunk * 2.0 + u, dim=1), dim=1) - chunk * size
        across = torch.rand(B, F, generator=generator)
    idx = torch.argsort(step.float() + across, dim=1, stable=True)[:, :n_diffusion]
    counts = torch.bincount(step.gather(1, idx)[0], minlength=size).tolist()
    return free.gather(1, idx), [c for c in counts if c]


def _random_free_order(B: int, L: int, given: Tensor, generator: torch.Generator | None) -> Tensor:
    """[B, L - P]: the non-given positions of each row, in a uniformly random order."""
    key = torch.rand(B, L, generator=generator)
    key[:, given] = -1.0
    return torch.argsort(key, dim=1)[:, given.numel():]


def make_schedule(batch: int, length: int, steps: int | None = None, alpha_0: float | None = None, *,
                  settings: ScheduleSettings | None = None, order: str | None = None,
                  schedule: str | None = None, gamma: float | None = None,
                  subcontexts: int | None = None, shuffle: bool | str | None = None,
                  given: Tensor | None = None, eps: float = 1e-3,
                  generator: torch.Generator | None = None) -> Schedule:
    """Draw the generation order and tokens per step (on the CPU generator ``generator``) for
    ``settings`` (defaults: ``ScheduleSettings()``), with any keyword given here replacing its
    value. ``alpha_0`` must be a number here (the model's value is resolved by ``generate``)."""
    s = (settings or ScheduleSettings()).replace(steps=steps, alpha_0=alpha_0, order=order, schedule=schedule,
                                                 gamma=gamma, subcontexts=subcontexts, shuffle=shuffle)
    if s.alpha_0 is None:
        raise ValueError("make_schedule needs alpha_0: the fraction of positions decoded by diffusion")
    given = torch.zeros(0, dtype=torch.long) if given is None else given.cpu()
    n_free = length - given.numel()
    free = _random_free_order(batch, length, given, generator)
    if s.order == "random" and s.schedule == "loglinear":
        counts = loglinear_counts(n_free, s.steps, s.alpha_0, eps, generator)
    else:
        counts = power_counts(round(s.alpha_0 * n_free), s.steps, s.gamma)
    n_diff = sum(counts)
    if s.order == "block":
        free = torch.sort(free, dim=1).values
        diff, counts = block_steps(free, n_diff, s.subcontexts, s.shuffle, generator)
    else:
        diff = free[:, :n_diff]
    taken = torch.zeros(batch, length, dtype=torch.bool)
    taken[:, given] = True
    taken.scatter_(1, diff, True)
    sequential = torch.argsort((taken.float() * 2 * length + torch.arange(length)), dim=1)
    sequential = sequential[:, : length - given.numel() - n_diff]
    full = torch.cat((given.expand(batch, -1), diff, sequential), dim=1)
    counts = [c for c in counts if c] + [1] * sequential.shape[1]
    return Schedule(full, tuple(counts), given.numel(), n_diff)


# ----------------------------------------------------------------------------- sampling plans
# (named by the family records: ``Family.plan``)

def _prefix_only(cfg: ModelConfig, batch: int, s: ScheduleSettings, given: Tensor,
                 generator: torch.Generator) -> None:
    """AR: no schedule (one token per step, left to right); a prompt must be a prefix."""
    if given.numel() and not torch.equal(given, torch.arange(given.numel())):
        raise ValueError("an AR model takes a prefix prompt only (positions 0..P-1); "
                         f"got positions {given.tolist()}")
    return None


def _one_schedule(cfg: ModelConfig, batch: int, s: ScheduleSettings, given: Tensor,
                  generator: torch.Generator) -> Schedule:
    return make_schedule(batch, cfg.length, settings=s, given=given, eps=cfg.eps, generator=generator)


def _block_schedules(cfg: ModelConfig, batch: int, s: ScheduleSettings, given: Tensor,
                     generator: torch.Generator) -> list[Schedule]:
    """BD3-LM: one MDLM schedule (alpha_0 = 1) per block of ``block_size``, left to right."""
    size = cfg.block_size
    return [make_schedule(batch, size, settings=s, alpha_0=1.0, given=given[(given >= b) & (given < b + size)] - b,
                          eps=cfg.eps, generator=generator)
            for b in range(0, cfg.length, size)]


Plan = Schedule | list[Schedule] | None
PLANS: dict[str, Callable[..., Plan]] = {"prefix_only": _prefix_only, "one": _one_schedule,
                                         "blocks": _block_schedules}


def plan(cfg: ModelConfig, batch: int, s: ScheduleSettings, given: Tensor, generator: torch.Generator) -> Plan:
    """The family's sampling plan for a batch: its schedule (a list per block for BD3-LM; None
    for AR, which has none) for settings ``s`` and the given (prompt) positions."""
    return PLANS[cfg.family_record.plan](cfg, batch, s, given, generator)
