"""``generate``: sampling for every family from one code base (method.md section 4)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from esolm.config import ScheduleSettings
from esolm.device import synchronize
from esolm.model.attention import varying_shape_kernels
from esolm.model.backbone import Backbone
from esolm.ordering import Schedule
from esolm.ordering import plan as family_plan
from esolm.sampling import loops
from esolm.sampling.decode import nucleus_filter, sample_tokens
from esolm.seeds import stream_generator

__all__ = ["Generation", "ScheduleSettings", "generate", "nucleus_filter", "sample_tokens"]


@dataclass
class Generation:
    """tokens: LongTensor[N, L] in natural order; nfe: forward passes run (all batches);
    seconds: wall time of the sampling loops (synchronised on GPUs); kv_cache: whether a
    cached path ran (MDLM never caches); schedules: the schedule of each batch; settings: the
    schedule settings actually used (``steps`` is what ran: the block order fixes its own)."""

    tokens: Tensor
    nfe: int
    seconds: float
    kv_cache: bool
    family: str
    schedules: list[Schedule | list[Schedule] | None]
    step_logits: list[Tensor] | None = None
    settings: dict | None = None


def _prompt(prompt: dict[int, int] | None, length: int, vocab: int) -> tuple[Tensor, Tensor]:
    """dict position -> id as (sorted positions, ids), validated."""
    if not prompt:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    pos = sorted(prompt)
    for p in pos:
        if not isinstance(p, int) or not 0 <= p < length:
            raise ValueError(f"prompt position {p!r} lies outside the sequence [0, {length - 1}]")
        if not isinstance(prompt[p], int) or not 0 <= prompt[p] < vocab:
            raise ValueError(f"prompt id {prompt[p]!r} at position {p} lies outside [0, {vocab - 1}]")
    return torch.tensor(pos), torch.tensor([prompt[p] for p in pos])


def generate(model: Backbone, settings: ScheduleSettings | None = None, *, prompt: dict[int, int] | None = None,
             num_samples: int = 8, batch_size: int | None = None, progress: bool = False,
             record_logits: bool = False, stop_after: int | None = None) -> Generation:
    """Sample ``num_samples`` sequences of the model's length.

    settings: how to sample (``ScheduleSettings``, whose fields document each one and hold the
    defaults: steps, alpha_0, order, schedule, gamma, subcontexts, shuffle, top_p, and how the
    schedule runs: kv_cache, step_mode, seed); ``Generation.settings`` records what was used
    (the block order fixes its own steps). prompt: position -> id, kept and prefilled in the
    first forward. batch_size: rows per batch (default: all). Empty steps cost none. The
    schedule and the token noise come from independent streams derived from the seed. The
    family's record (``model.config.family_record``) names the plan and the loop. record_logits: keep
    every step's logits (tests). stop_after: stop each batch after this many forward passes (a
    benchmark's warm-up on the timed shapes); the tokens not reached stay masked and ``nfe``
    counts the passes run.
    """
    cfg, record = model.config, model.config.family_record
    s = _checked(model, settings, num_samples, stop_after)
    given, ids = _prompt(prompt, cfg.length, cfg.vocab_size)
    device = next(model.parameters()).device
    # independent streams: the order/counts and the token noise must never share a seed
    cpu_gen = stream_generator(s.seed, "sample", "schedule")
    dec = loops.Decoder(stream_generator(s.seed, "sample", "tokens", device=device), s.top_p, record_logits)
    batch_size = batch_size or num_samples
    out, schedules, nfe, seconds = [], [], 0, 0.0
    with model.inference(), varying_shape_kernels():
        for first in range(0, num_samples, batch_size):
            B = min(batch_size, num_samples - first)
            plan = family_plan(cfg, B, s, given, cpu_gen)
            x = torch.full((B, cfg.length), cfg.mask_token_id, dtype=torch.long, device=device)
            x[:, given.to(device)] = ids.to(device)
            bar = tqdm(total=_n_steps(plan, cfg.length - given.numel()), disable=None if progress else True,
                       desc=f"sampling {cfg.family}", leave=False)
            dec.on_step = bar.update if stop_after is None else _stopper(bar.update, stop_after)
            synchronize(device)
            t0 = time.perf_counter()
            try:
                nfe += _run(model, x, plan, dec, s.kv_cache, given.numel(), s.step_mode)
            except _Stopped:
                nfe += stop_after
            synchronize(device)
            seconds += time.perf_counter() - t0
            bar.close()
            out.append(x)
            schedules.append(plan)
    used = s.replace(kv_cache=s.kv_cache and record.kv_cache)
    return Generation(torch.cat(out), nfe, seconds, used.kv_cache, cfg.family, schedules,
                      dec.logits if record_logits else None, _settings(record.autoregressive, schedules[0], used))


def _checked(model: Backbone, settings: ScheduleSettings | None, num_samples: int,
             stop_after: int | None) -> ScheduleSettings:
    """The settings ``generate`` runs (alpha_0 resolved to the model's when unset), every
    argument checked first."""
    if stop_after is not None and (not isinstance(stop_after, int) or stop_after < 1):
        raise ValueError(f"stop_after={stop_after!r} is invalid: use an integer >= 1 or None")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} is invalid: use an integer >= 1")
    cfg = model.config
    s = (settings or ScheduleSettings()).settings()
    if cfg.family_record.fixed_alpha_0 is not None and s.alpha_0 is not None and s.alpha_0 != cfg.alpha_0:
        raise ValueError(f"alpha_0={s.alpha_0} applies to Eso-LMs only; {cfg.family} implies {cfg.alpha_0}")
    return s.replace(alpha_0=cfg.alpha_0 if s.alpha_0 is None else s.alpha_0)


class _Stopped(Exception):
    """Raised by the step hook after ``stop_after`` forward passes; caught by ``generate``."""


def _stopper(update, limit: int):
    done = 0

    def on_step() -> None:
        nonlocal done
        update()
        done += 1
        if done >= limit:
            raise _Stopped

    return on_step


def _settings(autoregressive: bool, sched, s: ScheduleSettings) -> dict:
    """The schedule settings that were actually used (recorded beside the samples): those that
    played no part are None."""
    out = s.to_dict()
    if autoregressive:
        return {**out, "order": "left_to_right", "steps": None, "schedule": None, "gamma": None,
                "subcontexts": None, "shuffle": None}
    if s.order == "block":  # the chunks fix the steps: steps/schedule/gamma play no part
        first = sched[0] if isinstance(sched, list) else sched
        out.update(steps=_diffusion_steps(first), schedule=None, gamma=None)
    else:
        out.update(subcontexts=None, shuffle=None)
        if s.schedule != "power":
            out["gamma"] = None
    return out


def _diffusion_steps(sched: Schedule) -> int:
    """Non-empty steps of the diffusion phase (the sequential phase decodes one per step)."""
    total, steps = 0, 0
    for c in sched.counts:
        if total >= sched.n_diffusion:
            break
        total, steps = total + c, steps + 1
    return steps


def _n_steps(sched: Schedule | list[Schedule] | None, free: int) -> int:
    if sched is None:
        return free
    if isinstance(sched, list):
        return sum(s.steps for s in sched)
    return sched.steps


@torch.inference_mode()  # lighter than no_grad per operator; x is filled in place
def _run(model: Backbone, x: Tensor, plan, dec: loops.Decoder, kv_cache: bool, n_given: int,
         step_mode: str = "dynamic") -> int:
    return loops.LOOPS[model.config.family_record.sample](model, x, plan, dec, kv_cache, step_mode, n_given)
