"""Training objectives (negative ELBO in nats) for every family, as plain functions.

``loss(model, x)`` sums the NELBO terms of the model's family (``model.config.family_record.terms``,
the family table in ``esolm.families``); each term takes its attention masks from the same record.
All random draws (t, masks, permutations) are made for the *global* batch and sliced to
this process's rows, so the per-token loss of a global batch does not depend on how it
is split across processes (method.md section 5, property 7).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from esolm.config import ModelConfig
from esolm.model.backbone import Backbone
from esolm.model.masks import AttentionMask, clean_mask, two_stream_mask
from esolm.noise import alpha, antithetic_times, diffusion_weight, uniform
from esolm.ordering import clean_first_order, left_to_right_key


@dataclass
class LossOutput:
    """Summed NLL and token counts of each term of the NELBO for one (local) batch.

    per_token: differentiable scalar, diffusion_nll / diffusion_tokens +
    sequential_nll / sequential_tokens (a missing term counts 0). Sums and counts are
    returned so that averages stay exact across batches and processes.
    """

    per_token: Tensor
    num_tokens: Tensor
    diffusion_nll: Tensor
    diffusion_tokens: Tensor
    sequential_nll: Tensor
    sequential_tokens: Tensor

    @property
    def nll(self) -> Tensor:
        """Summed NLL consistent with per_token: per_token * num_tokens (detached)."""
        return self.per_token.detach() * self.num_tokens


def combine(diffusion_nll: Tensor, diffusion_tokens: Tensor, sequential_nll: Tensor,
            sequential_tokens: Tensor) -> Tensor:
    """Per-token NELBO from the (possibly all-reduced) sums of the two terms."""
    d = diffusion_nll / diffusion_tokens.clamp_min(1) if diffusion_tokens > 0 else diffusion_nll * 0
    s = sequential_nll / sequential_tokens.clamp_min(1) if sequential_tokens > 0 else sequential_nll * 0
    return d + s


OBJECTIVES = ("nelbo", "low_var")


@dataclass(frozen=True)
class Draws:
    """Random draws of this process's rows. t: [B]; u_mask, u_perm: [B, L]; diffusion: bool [B];
    objective: ``nelbo`` (weight -alpha'_t / (1 - alpha_t) per masked token) or ``low_var``
    (weight 1: the reference's lower-variance training loss for alpha_0 = 1; not a bound)."""

    t: Tensor
    u_mask: Tensor
    u_perm: Tensor
    diffusion: Tensor
    objective: str = "nelbo"


def token_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """-log p(target) per token, float32. logits [B, N, V], targets [B, N] -> [B, N]."""
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


def valid_tokens(cfg: ModelConfig, x: Tensor) -> Tensor:
    """bool [B, L]: positions that count (not padding)."""
    if cfg.pad_token_id is None:
        return torch.ones_like(x, dtype=torch.bool)
    return x != cfg.pad_token_id


def diffusion_rows(cfg: ModelConfig, global_batch: int) -> int:
    """How many rows of the global batch go to the diffusion term (method.md: batch split)."""
    terms = cfg.family_record.terms
    if "diffusion" not in terms or cfg.alpha_0 == 0.0:
        return 0
    if "sequential" not in terms or cfg.alpha_0 == 1.0:
        return global_batch
    if global_batch < 2:
        raise ValueError(f"a hybrid Eso-LM loss (alpha_0={cfg.alpha_0}) needs a global batch of at "
                         f"least 2 rows, got {global_batch}")
    return min(max(round(global_batch * cfg.batch_split), 1), global_batch - 1)


def draw(cfg: ModelConfig, batch: int, length: int, device: torch.device,
         generator: torch.Generator | None, rank: int = 0, world_size: int = 1,
         t_max: float = 1.0) -> Draws:
    """Draws for the global batch of ``batch * world_size`` rows, sliced to this rank's rows;
    t is stratified over [eps, t_max] (``t_max`` < 1 only in the masking warm-up of training)."""
    g_batch = batch * world_size
    n_diff = diffusion_rows(cfg, g_batch)
    t = torch.zeros(g_batch)
    t[:n_diff] = antithetic_times(n_diff, generator, cfg.eps, t_max).cpu()
    u_mask = uniform((g_batch, length), generator, device)
    u_perm = uniform((g_batch, length), generator, device)
    rows = slice(rank * batch, (rank + 1) * batch)
    diffusion = torch.arange(g_batch) < n_diff
    return Draws(t[rows].to(device), u_mask[rows], u_perm[rows], diffusion[rows].to(device))


def _noised(model: Backbone, x: Tensor, valid: Tensor, d: Draws) -> tuple[Tensor, Tensor, Tensor]:
    """z_t ~ q(. | x, alpha_t) per row: (z_t, masked bool [B, L], NELBO weight [B, 1]); the
    families with a diffusion term but no sequential one have alpha_0 = 1."""
    cfg = model.config
    a0 = cfg.alpha_0
    masked = (d.u_mask >= alpha(d.t, a0, cfg.eps)[:, None]) & valid
    z = torch.where(masked, cfg.mask_token_id, x)
    if d.objective == "low_var":
        return z, masked, torch.ones_like(d.t)[:, None]
    return z, masked, diffusion_weight(d.t, a0, cfg.eps)[:, None]


def key_padding(valid: Tensor) -> Tensor | None:
    """Key-padding mask for bidirectional attention (None when nothing is padding)."""
    return None if bool(valid.all()) else valid


def _natural(x: Tensor) -> Tensor:
    return torch.arange(x.shape[1], device=x.device).expand_as(x)


def mdlm_nll(model: Backbone, x: Tensor, valid: Tensor, d: Draws) -> Tensor:
    """MDLM: bidirectional attention (the family's clean mask) over the natural order."""
    z, masked, weight = _noised(model, x, valid, d)
    mask = clean_mask(model.config, keep=key_padding(valid))
    nll = token_nll(model(z, _natural(x), mask), x)
    return (weight * nll * masked).sum()


def bd3lm_nll(model: Backbone, x: Tensor, valid: Tensor, d: Draws) -> Tensor:
    """BD3-LM: the 2L ``[x_t ; x]`` sequence with the block-diffusion mask of block L'."""
    z, masked, weight = _noised(model, x, valid, d)
    L, pos = x.shape[1], _natural(x)
    keep = key_padding(torch.cat((valid, valid), 1))
    mask = two_stream_mask(model.config, L, keep=keep)
    logits = model(torch.cat((z, x), 1), torch.cat((pos, pos), 1), mask, logits_for=slice(0, L))
    return (weight * token_nll(logits, x) * masked).sum()


def eso_diffusion_nll(model: Backbone, x: Tensor, valid: Tensor, d: Draws) -> Tensor:
    """Eso-LM diffusion term: clean first, then masks, each group in a random order; causal
    attention for (B), prefix attention (bidirectional among clean tokens) for (A)."""
    z, masked, weight = _noised(model, x, valid, d)
    order = clean_first_order(masked, d.u_perm, d.u_perm, padding=~valid)
    mask = clean_mask(model.config, n_clean=(~masked & valid).sum(1))
    nll = token_nll(model(z.gather(1, order), order, mask), x.gather(1, order))
    return (weight * nll * masked.gather(1, order)).sum()


def sequential_nll(model: Backbone, x: Tensor, valid: Tensor, d: Draws) -> Tensor:
    """Summed NLL of the positions masked in z_0, decoded left to right (method.md L_sequential)."""
    cfg = model.config
    B, L = x.shape
    masked = (d.u_mask >= cfg.alpha_0) & valid
    l2r = left_to_right_key(B, L, x.device)
    order = clean_first_order(masked, d.u_perm if cfg.family_record.shuffle_clean else l2r, l2r, padding=~valid)
    return sequential_nll_for_order(model, x, masked, order, (~masked & valid).sum(1)).sum()


def sequential_nll_for_order(model: Backbone, x: Tensor, masked: Tensor, order: Tensor,
                             n_clean: Tensor) -> Tensor:
    """NLL [B, L] (in permuted order, zero where not masked) of the masked positions of ``x``.

    ``order`` lists the ``n_clean`` [B] clean positions of z_0 first, then the masked ones in
    their generation order, then padding. One forward pass over ``[z_0 permuted ; x permuted]`` with the 2L
    block-size-1 mask: each masked query sees the clean tokens and the masked tokens
    revealed before it, and nothing else.
    """
    cfg = model.config
    L = x.shape[1]
    z0 = torch.where(masked, cfg.mask_token_id, x)
    mask = two_stream_mask(cfg, L, n_clean=n_clean)
    tokens = torch.cat((z0.gather(1, order), x.gather(1, order)), 1)
    logits = model(tokens, torch.cat((order, order), 1), mask, logits_for=slice(0, L))
    return token_nll(logits, x.gather(1, order)) * masked.gather(1, order)


def ar_token_nll(model: Backbone, x: Tensor) -> Tensor:
    """Next-token NLL [B, L]; the mask id serves as the beginning-of-sequence token."""
    B, L = x.shape
    bos = torch.full((B, 1), model.config.mask_token_id, dtype=x.dtype, device=x.device)
    pos = torch.arange(L, device=x.device).expand(B, L)
    return token_nll(model(torch.cat((bos, x[:, :-1]), 1), pos, AttentionMask("causal")), x)


def ar_nll(model: Backbone, x: Tensor, valid: Tensor, d: Draws) -> Tensor:
    return (ar_token_nll(model, x) * valid).sum()


def loss(model: Backbone, x: Tensor, generator: torch.Generator | None = None, rank: int = 0,
         world_size: int = 1, objective: str = "nelbo", t_max: float = 1.0) -> LossOutput:
    """NELBO estimate (nats/token) of the batch ``x`` [B, L] under ``model``'s family; with
    ``objective="low_var"`` (alpha_0 = 1 only) the diffusion term drops its time weight.
    ``t_max`` < 1 draws the diffusion times from [eps, t_max] only: the masking warm-up of
    training (``esolm.train_config.mask_ceiling``); the estimate is then not the NELBO."""
    cfg = model.config
    check_tokens(cfg, x)
    check_objective(cfg, objective)
    B, L = x.shape
    d = replace(draw(cfg, B, L, x.device, generator, rank, world_size, t_max), objective=objective)
    valid = valid_tokens(cfg, x)
    zero = torch.zeros((), device=x.device)
    parts = {"diffusion": (zero, zero), "sequential": (zero, zero)}
    for name, term in cfg.family_record.terms.items():
        fn = TERMS[term]
        rows = d.diffusion if name == "diffusion" else ~d.diffusion
        if rows.any():
            sub = Draws(d.t[rows], d.u_mask[rows], d.u_perm[rows], d.diffusion[rows], objective)
            parts[name] = (fn(model, x[rows], valid[rows], sub), valid[rows].sum())
    (dn, dt), (sn, st) = parts["diffusion"], parts["sequential"]
    return LossOutput(combine(dn, dt, sn, st), valid.sum(), dn, dt, sn, st)


def check_objective(cfg: ModelConfig, objective: str) -> None:
    """``low_var`` exists for alpha_0 = 1 training (the authors' OpenWebText alpha_0 = 1 runs)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is unknown: use one of {OBJECTIVES}")
    if objective == "low_var" and cfg.alpha_0 != 1.0:
        raise ValueError(f"objective='low_var' applies to alpha_0 = 1 models (mdlm, bd3lm, eso_* with "
                         f"alpha_0: 1.0); {cfg.family} has alpha_0={cfg.alpha_0}: use 'nelbo'")


def training_objective(cfg: ModelConfig, objective: str) -> str:
    """The objective a model of ``cfg`` trains on when the study asks for ``objective``
    (``train.objective``): ``low_var`` reaches the alpha_0 = 1 models only (MDLM, BD3-LM and
    Eso-LMs with alpha_0 = 1, as in the authors' alpha_0 = 1 runs); a model with a sequential
    part (AR, Eso-LMs with alpha_0 < 1) trains on the NELBO."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is unknown: use one of {OBJECTIVES}")
    return objective if cfg.alpha_0 == 1.0 else "nelbo"


def check_tokens(cfg: ModelConfig, x: Tensor) -> None:
    """Clear errors for inputs the model cannot take."""
    if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be an integer tensor [batch, length], got {tuple(x.shape)} "
                         f"of {x.dtype}")
    if x.shape[1] > cfg.length:
        raise ValueError(f"input length {x.shape[1]} exceeds the model's length={cfg.length}")
    if cfg.family_record.blocks and x.shape[1] % cfg.block_size:
        raise ValueError(f"input length {x.shape[1]} is not a multiple of block_size={cfg.block_size}")
    allowed_max = cfg.vocab_size - 1 if cfg.pad_token_id is None else max(cfg.vocab_size - 1,
                                                                           cfg.pad_token_id)
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi > allowed_max or (cfg.mask_token_id < cfg.vocab_size and
                                      bool((x == cfg.mask_token_id).any())):
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size - 1}] (or be pad_token_id) and "
                         f"never be the mask id {cfg.mask_token_id}; got ids in [{lo}, {hi}]")


Term = Callable[[Backbone, Tensor, Tensor, Draws], Tensor]
TERMS: dict[str, Term] = {"ar_nll": ar_nll, "mdlm_nll": mdlm_nll, "bd3lm_nll": bd3lm_nll,
                          "eso_diffusion_nll": eso_diffusion_nll, "sequential_nll": sequential_nll}
"""The NELBO terms the family records name (``Family.terms``)."""
"""A NELBO term: (model, x [B, L], valid [B, L], draws of these rows) -> summed NLL of its rows."""
