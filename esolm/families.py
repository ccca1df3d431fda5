"""The family table: one plain record per model family, of data and functions.

Everything that differs between AR, MDLM, BD3-LM and Eso-LM (A)/(B) is written here once
(in the spirit of torchtitan's per-model spec): the fixed alpha_0, the NELBO terms, the
attention masks of the one-stream (clean) pass and of the two-stream ``[z ; x]`` pass, the
sampling plan and loop, how the exact likelihood is computed, the order law of the
importance-weighted bound and of the sampler-order metric, and which schedule settings the
search tunes. Every other module reads ``model.config.spec`` (or ``family(name)``) instead of
comparing family names, so adding a family means adding one record below (and its functions).

The record's functions live in the modules of their concern (``objectives``, ``likelihood``,
``sampling.loops``); they receive the record through ``model.config.spec``, so none of
those modules imports this one (``ModelConfig.spec`` imports it on first use).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor

from esolm import objectives
from esolm.config import ModelConfig, ScheduleSettings
from esolm.model.attention import MaskSpec
from esolm.ordering import Schedule, make_schedule

Plan = Schedule | list[Schedule] | None
MaskFn = Callable[..., MaskSpec]  # (cfg, n_clean=None, keep=None) or (cfg, half, n_clean=None, keep=None)
PlanFn = Callable[[ModelConfig, int, ScheduleSettings, Tensor, torch.Generator], Plan]
SampleLoop = Callable[..., int]  # (model, x, plan, dec, kv_cache, step_mode, n_given) -> forward passes
ExactFn = Callable[..., Tensor]  # (model, x, order, valid, chunk, progress) -> log p(x | order) [B]
OrderLaw = Callable[[ModelConfig, int, int, str, torch.Generator | None], Tensor]

ALL_DIMS = frozenset(("steps", "alpha_0", "order", "subcontexts", "shuffle", "schedule", "gamma", "top_p"))
JUDGE_FAMILY = "ar"  # the judge of generative perplexity scores left to right


@dataclass(frozen=True)
class Ref:
    """A function named ``"module:name"``, imported on its first call. The sampling loops and the
    likelihood functions are named this way so that importing the table does not import them:
    ``esolm.codedeps`` follows imports, and a stage that only trains must not depend on (and be
    rerun by edits to) the sampler. Every stage that calls one of them imports its module itself
    (``esolm.sampling``, ``esolm.likelihood``); ``tests/test_families.py`` checks every name resolves."""

    target: str

    def resolve(self) -> Callable:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self.resolve()(*args, **kwargs)


@dataclass(frozen=True)
class Family:
    """What defines a model family (method.md sections 3-5). Masks are built per call:
    ``clean_mask(cfg, n_clean=None, keep=None)`` for one pass over the (permuted) sequence,
    ``two_stream_mask(cfg, half, n_clean=None, keep=None)`` for ``[z ; x]`` (None: no such pass)."""

    name: str
    label: str
    """How figures and tables name the family."""
    color: str
    """Its matplotlib colour in the report's figures."""
    fixed_alpha_0: float | None
    """alpha_0 implied by the family (AR 0, MDLM and BD3-LM 1); None: chosen per variant."""
    default_alpha_0: float
    """alpha_0 of a config that gives none."""
    blocks: bool
    """Generates in blocks of ``block_size`` (which must divide the length)."""
    autoregressive: bool
    """Strictly left to right: one order, no schedule (steps, order, ... play no part), prefix
    prompts only, and a valid judge of generative perplexity."""
    kv_cache: bool
    """Whether its sampler can cache keys and values (bidirectional attention cannot)."""
    shuffle_clean: bool
    """Sequential term: the clean tokens of z_0 in a random order (else left to right)."""
    terms: Mapping[str, objectives.Term]
    """The NELBO terms (``diffusion`` and/or ``sequential``) as plain functions."""
    clean_mask: MaskFn
    two_stream_mask: MaskFn | None
    plan: PlanFn
    """The sampling schedule of a batch: (cfg, batch, settings, given positions, generator)."""
    sample: SampleLoop
    """The sampling loop; one signature for all: (model, x, plan, dec, kv_cache, step_mode, n_given)."""
    exact: ExactFn
    """Exact log p(x | order): (model, x, order, valid, chunk, progress) -> [B] nats."""
    order_law: OrderLaw
    """Orders [B, L] of the IW bound and the sampler-order metric: (cfg, batch, length, law, generator)."""
    iw_laws: tuple[str, ...]
    """The laws ``order_law`` distinguishes (the first is the paper's, the sampler's)."""
    sampler_metric: bool
    """Whether the exact likelihood under the sampler's order differs from left to right."""
    search_dims: frozenset[str]
    """Schedule settings the search tunes for this family."""


# ----------------------------------------------------------------------------- masks


def _causal(cfg: ModelConfig, n_clean: Tensor | None = None, keep: Tensor | None = None) -> MaskSpec:
    return MaskSpec("causal")


def _full(cfg: ModelConfig, n_clean: Tensor | None = None, keep: Tensor | None = None) -> MaskSpec:
    return MaskSpec("full", keep=keep)


def _prefix(cfg: ModelConfig, n_clean: Tensor | None = None, keep: Tensor | None = None) -> MaskSpec:
    return MaskSpec("prefix", n_clean=n_clean)


def _block_causal(cfg: ModelConfig, n_clean: Tensor | None = None, keep: Tensor | None = None) -> MaskSpec:
    return MaskSpec("block_causal", block=cfg.block_size)


def _two_stream_causal(cfg: ModelConfig, half: int, n_clean: Tensor | None = None,
                       keep: Tensor | None = None) -> MaskSpec:
    return MaskSpec("two_stream", half=half, inner="causal")


def _two_stream_prefix(cfg: ModelConfig, half: int, n_clean: Tensor | None = None,
                       keep: Tensor | None = None) -> MaskSpec:
    return MaskSpec("two_stream", half=half, inner="prefix", n_clean=n_clean)


def _two_stream_blocks(cfg: ModelConfig, half: int, n_clean: Tensor | None = None,
                       keep: Tensor | None = None) -> MaskSpec:
    return MaskSpec("two_stream", block=cfg.block_size, half=half, inner="block_causal", keep=keep)


# ----------------------------------------------------------------------------- sampling plans


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


# ----------------------------------------------------------------------------- the table

_NOT_ALPHA = ALL_DIMS - {"alpha_0"}

AR = Family(
    name="ar", label="AR", color="k", fixed_alpha_0=0.0, default_alpha_0=0.0, blocks=False,
    autoregressive=True, kv_cache=True, shuffle_clean=False,
    terms=MappingProxyType({"sequential": objectives.ar_nll}),
    clean_mask=_causal, two_stream_mask=None, plan=_prefix_only,
    sample=Ref("esolm.sampling.loops:ar"),
    exact=Ref("esolm.likelihood:exact_left_to_right"),
    order_law=Ref("esolm.likelihood:left_to_right_law"), iw_laws=("sampler",),
    sampler_metric=False, search_dims=frozenset({"top_p"}))

MDLM = Family(
    name="mdlm", label="MDLM", color="tab:red", fixed_alpha_0=1.0, default_alpha_0=1.0, blocks=False,
    autoregressive=False, kv_cache=False, shuffle_clean=False,
    terms=MappingProxyType({"diffusion": objectives.mdlm_nll}),
    clean_mask=_full, two_stream_mask=None, plan=_one_schedule,
    sample=Ref("esolm.sampling.loops:mdlm"),
    exact=Ref("esolm.likelihood:exact_per_position"),
    order_law=Ref("esolm.likelihood:any_order_law"), iw_laws=("sampler", "uniform"),
    sampler_metric=True, search_dims=_NOT_ALPHA)

BD3LM = Family(
    name="bd3lm", label="BD3-LM", color="tab:green", fixed_alpha_0=1.0, default_alpha_0=1.0, blocks=True,
    autoregressive=False, kv_cache=True, shuffle_clean=False,
    terms=MappingProxyType({"diffusion": objectives.bd3lm_nll}),
    clean_mask=_block_causal, two_stream_mask=_two_stream_blocks, plan=_block_schedules,
    sample=Ref("esolm.sampling.loops:bd3lm"),
    exact=Ref("esolm.likelihood:exact_per_position"),
    order_law=Ref("esolm.likelihood:block_law"), iw_laws=("sampler",),
    sampler_metric=True, search_dims=_NOT_ALPHA)

_ESO_TERMS = MappingProxyType({"diffusion": objectives.eso_diffusion_nll, "sequential": objectives.sequential_nll})

ESO_A = Family(
    name="eso_a", label="Eso-LM (A)", color="tab:purple", fixed_alpha_0=None, default_alpha_0=0.25,
    blocks=False, autoregressive=False, kv_cache=True, shuffle_clean=False, terms=_ESO_TERMS,
    clean_mask=_prefix, two_stream_mask=_two_stream_prefix, plan=_one_schedule,
    sample=Ref("esolm.sampling.loops:eso_a"),
    exact=Ref("esolm.likelihood:exact_any_order"),
    order_law=Ref("esolm.likelihood:any_order_law"), iw_laws=("sampler", "uniform"),
    sampler_metric=True, search_dims=ALL_DIMS)

ESO_B = Family(
    name="eso_b", label="Eso-LM (B)", color="tab:blue", fixed_alpha_0=None, default_alpha_0=0.25,
    blocks=False, autoregressive=False, kv_cache=True, shuffle_clean=True, terms=_ESO_TERMS,
    clean_mask=_causal, two_stream_mask=_two_stream_causal, plan=_one_schedule,
    sample=Ref("esolm.sampling.loops:eso_b"),
    exact=Ref("esolm.likelihood:exact_any_order"),
    order_law=Ref("esolm.likelihood:any_order_law"), iw_laws=("sampler", "uniform"),
    sampler_metric=True, search_dims=ALL_DIMS)

FAMILIES: Mapping[str, Family] = MappingProxyType({f.name: f for f in (AR, MDLM, BD3LM, ESO_A, ESO_B)})


def family(name: str) -> Family:
    """The record of family ``name``; an unknown name is an error naming the closest one."""
    if name in FAMILIES:
        return FAMILIES[name]
    match = difflib.get_close_matches(str(name), list(FAMILIES), n=1)
    hint = f"; did you mean {match[0]!r}?" if match else ""
    raise ValueError(f"family {name!r} is unknown: use one of {tuple(FAMILIES)}{hint}")
