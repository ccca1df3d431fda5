"""``generate``: sampling for every family from one code base (method.md section 4)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from esolm.device import synchronize
from esolm.model.backbone import Backbone
from esolm.ordering import Schedule, make_schedule, shuffle_mode, validate_schedule
from esolm.sampling import loops
from esolm.sampling.decode import nucleus_filter, sample_tokens
from esolm.seeds import stream_generator

__all__ = ["Generation", "generate", "nucleus_filter", "sample_tokens"]


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


def _schedule(model: Backbone, batch: int, steps: int, alpha_0: float, given: Tensor,
              opts: dict, generator: torch.Generator) -> Schedule | list[Schedule] | None:
    cfg = model.config
    if cfg.variant == "ar":
        if given.numel() and not torch.equal(given, torch.arange(given.numel())):
            raise ValueError("an AR model takes a prefix prompt only (positions 0..P-1); "
                             f"got positions {given.tolist()}")
        return None
    if cfg.variant == "bd3lm":
        size = cfg.block_size
        return [make_schedule(batch, size, steps, 1.0, given=given[(given >= b) & (given < b + size)] - b,
                              eps=cfg.eps, generator=generator, **opts)
                for b in range(0, cfg.length, size)]
    return make_schedule(batch, cfg.length, steps, alpha_0, given=given, eps=cfg.eps,
                         generator=generator, **opts)


def generate(model: Backbone, num_samples: int = 8, steps: int = 64, alpha_0: float | None = None,
             order: str = "random", kv_cache: bool = True, top_p: float = 1.0,
             prompt: dict[int, int] | None = None, seed: int = 0, *, schedule: str = "loglinear",
             gamma: float = 1.0, subcontexts: int = 4, shuffle: bool | str = False,
             batch_size: int | None = None, record_logits: bool = False,
             progress: bool = False, cuda_graphs: bool = False) -> Generation:
    """Sample ``num_samples`` sequences of the model's length.

    steps: diffusion steps T (per block for BD3-LM; AR ignores it). alpha_0: fraction
    decoded by diffusion (None: the model's training value; Eso-LMs only). order: random or
    block (``subcontexts`` chunks; step s decodes the same offset of every chunk, so the
    block order fixes its own steps and ignores ``steps``/``schedule``/``gamma``:
    ``Generation.settings`` records what was used). shuffle (block order): none | shared
    (the reference: one random offset order and one random chunk order per step, shared
    by the batch; ``True``) | per_chunk. schedule: loglinear (binomial counts) or power
    (deterministic, shape ``gamma``). kv_cache: cache where the family can. prompt:
    position -> id, kept and prefilled in the first forward. Empty steps cost none. The
    schedule and the token noise come from independent streams derived from ``seed``.
    cuda_graphs: Eso-LM (B) and AR decode over a static KV cache, each step shape captured
    once as a CUDA graph on a GPU (elsewhere the same static steps run eagerly).
    """
    cfg = model.config
    alpha_0 = cfg.alpha_0 if alpha_0 is None else alpha_0
    shuffle = shuffle_mode(shuffle)
    validate_schedule(steps, alpha_0, order, schedule, gamma, subcontexts)
    if cfg.variant in ("ar", "mdlm", "bd3lm") and alpha_0 != cfg.alpha_0:
        raise ValueError(f"alpha_0={alpha_0} applies to Eso-LMs only; {cfg.variant} implies {cfg.alpha_0}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r} is invalid: use a value in (0, 1]")
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} is invalid: use an integer >= 1")
    given, ids = _prompt(prompt, cfg.length, cfg.vocab_size)
    device = next(model.parameters()).device
    # independent streams: the order/counts and the token noise must never share a seed
    cpu_gen = stream_generator(seed, "sample", "schedule")
    dec = loops.Decoder(stream_generator(seed, "sample", "tokens", device=device), top_p, record_logits)
    opts = dict(order=order, schedule=schedule, gamma=gamma, subcontexts=subcontexts, shuffle=shuffle)
    batch_size = batch_size or num_samples
    out, schedules, nfe, seconds = [], [], 0, 0.0
    with model.inference():
        for first in range(0, num_samples, batch_size):
            B = min(batch_size, num_samples - first)
            sched = _schedule(model, B, steps, alpha_0, given, opts, cpu_gen)
            x = torch.full((B, cfg.length), cfg.mask_token_id, dtype=torch.long, device=device)
            x[:, given.to(device)] = ids.to(device)
            bar = tqdm(total=_n_steps(sched, cfg.length - given.numel()), disable=not progress,
                       desc=f"sampling {cfg.variant}", leave=False)
            dec.on_step = bar.update
            synchronize(device)
            t0 = time.perf_counter()
            nfe += _run(model, x, sched, dec, kv_cache, given.numel(), cuda_graphs)
            synchronize(device)
            seconds += time.perf_counter() - t0
            bar.close()
            out.append(x)
            schedules.append(sched)
    used_cache = kv_cache and cfg.variant != "mdlm"
    settings = _settings(cfg.variant, schedules[0], steps, alpha_0, top_p, used_cache, seed, opts)
    return Generation(torch.cat(out), nfe, seconds, used_cache, cfg.variant, schedules,
                      dec.logits if record_logits else None, settings)


def _settings(family: str, sched, steps: int, alpha_0: float, top_p: float, kv_cache: bool,
              seed: int, opts: dict) -> dict:
    """The schedule settings that were actually used (recorded beside the samples)."""
    out = {"alpha_0": alpha_0, "top_p": top_p, "kv_cache": kv_cache, "seed": seed, **opts}
    if family == "ar":
        return {**out, "order": "left_to_right", "steps": None, "schedule": None, "gamma": None,
                "subcontexts": None, "shuffle": None}
    if opts["order"] == "block":  # the chunks fix the steps: steps/schedule/gamma play no part
        first = sched[0] if isinstance(sched, list) else sched
        out.update(steps=_diffusion_steps(first), schedule=None, gamma=None)
    else:
        out.update(steps=steps, subcontexts=None, shuffle=None)
        if opts["schedule"] != "power":
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
def _run(model: Backbone, x: Tensor, sched, dec: loops.Decoder, kv_cache: bool, n_given: int,
         graphs: bool = False) -> int:
    variant = model.config.variant
    if variant == "ar":
        return loops.ar(model, x, n_given, dec, kv_cache, graphs=graphs)
    if variant == "eso_b":
        return loops.eso_b(model, x, sched, dec, kv_cache, graphs=graphs)
    return LOOPS[variant](model, x, sched, dec, kv_cache)


LOOPS = {"eso_a": loops.eso_a, "eso_b": loops.eso_b, "mdlm": loops.mdlm, "bd3lm": loops.bd3lm}
