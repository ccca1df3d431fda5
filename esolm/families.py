"""The family table: one plain record per model family, of data and names.

Everything that differs between AR, MDLM, BD3-LM and Eso-LM (A)/(B) is written here once
(in the spirit of torchtitan's per-model spec): the fixed alpha_0, the NELBO terms, the
attention masks of the one-stream (clean) pass and of the two-stream ``[z ; x]`` pass, the
sampling plan and loop, how the exact likelihood is computed, the order law of the
importance-weighted bound and of the sampler-order metric, and which schedule settings the
search tunes. Every other module reads ``model.config.family_record`` (or ``family(name)``) instead of
comparing family names, so adding a family means adding one record below and its functions.

The record holds *names*, never functions: each name is resolved by the module that owns
that concern, from its own table (``objectives.TERMS``, ``model.masks.CLEAN`` and
``TWO_STREAM``, ``ordering.PLANS``, ``sampling.loops.LOOPS``, ``likelihood.EXACT`` and
``ORDER_LAWS``). So this module imports nothing of the library, no module climbs back up
through it to reach its own functions, and a stage depends only on the code it runs
(``esolm.codedeps``). ``tests/test_families.py`` checks that every name resolves.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

ALL_DIMS = frozenset(("steps", "alpha_0", "order", "subcontexts", "shuffle", "schedule", "gamma", "top_p"))
JUDGE_FAMILY = "ar"  # the judge of generative perplexity scores left to right


@dataclass(frozen=True)
class Family:
    """What defines a model family (method.md sections 3-5), as plain values and names."""

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
    terms: Mapping[str, str]
    """The NELBO terms: ``diffusion`` and/or ``sequential`` -> a name of ``objectives.TERMS``."""
    clean_mask: str
    """The mask of one pass over the (permuted) sequence: a name of ``model.masks.CLEAN``."""
    two_stream_mask: str | None
    """The mask of the two-stream pass: a name of ``model.masks.TWO_STREAM`` (None: no such pass)."""
    plan: str
    """The sampling schedule of a batch: a name of ``ordering.PLANS``."""
    sample: str
    """The sampling loop: a name of ``sampling.loops.LOOPS``."""
    exact: str
    """Exact log p(x | order): a name of ``likelihood.EXACT``."""
    order_law: str
    """Orders of the IW bound and the sampler-order metric: a name of ``likelihood.ORDER_LAWS``."""
    iw_laws: tuple[str, ...]
    """The laws ``order_law`` distinguishes (the first is the paper's, the sampler's)."""
    sampler_metric: bool
    """Whether the exact likelihood under the sampler's order differs from left to right."""
    search_dims: frozenset[str]
    """Schedule settings the search tunes for this family."""


# ----------------------------------------------------------------------------- the table

_NOT_ALPHA = ALL_DIMS - {"alpha_0"}

AR = Family(
    name="ar", label="AR", color="k", fixed_alpha_0=0.0, default_alpha_0=0.0, blocks=False,
    autoregressive=True, kv_cache=True, shuffle_clean=False,
    terms=MappingProxyType({"sequential": "ar_nll"}),
    clean_mask="causal", two_stream_mask=None, plan="prefix_only", sample="ar", exact="left_to_right",
    order_law="left_to_right", iw_laws=("sampler",),
    sampler_metric=False, search_dims=frozenset({"top_p"}))

MDLM = Family(
    name="mdlm", label="MDLM", color="tab:red", fixed_alpha_0=1.0, default_alpha_0=1.0, blocks=False,
    autoregressive=False, kv_cache=False, shuffle_clean=False,
    terms=MappingProxyType({"diffusion": "mdlm_nll"}),
    clean_mask="full", two_stream_mask=None, plan="one", sample="mdlm", exact="per_position",
    order_law="any_order", iw_laws=("sampler", "uniform"),
    sampler_metric=True, search_dims=_NOT_ALPHA)

BD3LM = Family(
    name="bd3lm", label="BD3-LM", color="tab:green", fixed_alpha_0=1.0, default_alpha_0=1.0, blocks=True,
    autoregressive=False, kv_cache=True, shuffle_clean=False,
    terms=MappingProxyType({"diffusion": "bd3lm_nll"}),
    clean_mask="block_causal", two_stream_mask="block_causal", plan="blocks", sample="bd3lm",
    exact="per_position", order_law="blocks", iw_laws=("sampler",),
    sampler_metric=True, search_dims=_NOT_ALPHA)

_ESO_TERMS = MappingProxyType({"diffusion": "eso_diffusion_nll", "sequential": "sequential_nll"})

ESO_A = Family(
    name="eso_a", label="Eso-LM (A)", color="tab:purple", fixed_alpha_0=None, default_alpha_0=0.25,
    blocks=False, autoregressive=False, kv_cache=True, shuffle_clean=False, terms=_ESO_TERMS,
    clean_mask="prefix", two_stream_mask="prefix", plan="one", sample="eso_a", exact="any_order",
    order_law="any_order", iw_laws=("sampler", "uniform"),
    sampler_metric=True, search_dims=ALL_DIMS)

ESO_B = Family(
    name="eso_b", label="Eso-LM (B)", color="tab:blue", fixed_alpha_0=None, default_alpha_0=0.25,
    blocks=False, autoregressive=False, kv_cache=True, shuffle_clean=True, terms=_ESO_TERMS,
    clean_mask="causal", two_stream_mask="causal", plan="one", sample="eso_b", exact="any_order",
    order_law="any_order", iw_laws=("sampler", "uniform"),
    sampler_metric=True, search_dims=ALL_DIMS)

FAMILIES: Mapping[str, Family] = MappingProxyType({f.name: f for f in (AR, MDLM, BD3LM, ESO_A, ESO_B)})


def family(name: str) -> Family:
    """The record of family ``name``; an unknown name is an error naming the closest one."""
    if name in FAMILIES:
        return FAMILIES[name]
    match = difflib.get_close_matches(str(name), list(FAMILIES), n=1)
    hint = f"; did you mean {match[0]!r}?" if match else ""
    raise ValueError(f"family {name!r} is unknown: use one of {tuple(FAMILIES)}{hint}")
