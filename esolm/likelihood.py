"""Exact fixed-order likelihood, the importance-weighted bound and the NELBO (method.md section 5).

With causal attention over a permutation an Eso-LM is an any-order autoregressive model:
``log p(x | sigma) = sum_j log p(x_{sigma_j} | x_{sigma_<j})`` is exact and takes one
forward pass (the sequential-term machinery with every position masked). AR is exact
left to right only. MDLM and BD3-LM (bidirectional inside their context) need one forward
pass per position: L passes of the full sequence for MDLM, L passes of [x_t ; x] for
BD3-LM, batched ``chunk`` positions at a time.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from esolm.config import EvalConfig
from esolm.model.backbone import Backbone
from esolm.model.masks import clean_mask, two_stream_mask
from esolm.objectives import (
    ar_token_nll,
    check_tokens,
    combine,
    key_padding,
    loss,
    sequential_nll_for_order,
    token_nll,
    valid_tokens,
)
from esolm.ordering import clean_first_order


def left_to_right(batch: int, length: int, device: torch.device | None = None) -> Tensor:
    """The left-to-right order [B, L]."""
    return torch.arange(length, device=device).expand(batch, length).clone()


def random_order(batch: int, length: int, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random order per row [B, L] (on the generator's device, CPU by default)."""
    device = generator.device if generator is not None else None
    return torch.argsort(torch.rand(batch, length, generator=generator, device=device), dim=1)


def sampler_order(batch: int, length: int, alpha_0: float,
                  generator: torch.Generator | None = None) -> Tensor:
    """The sampler's order at NFE = L: a Binomial(L, alpha_0) random prefix per row, then the
    remaining positions left to right."""
    device = generator.device if generator is not None else None
    n_diff = torch.binomial(torch.full((batch, 1), float(length), device=device),
                            torch.full((batch, 1), alpha_0, device=device), generator=generator)
    key = torch.rand(batch, length, generator=generator, device=device)
    in_prefix = torch.argsort(torch.argsort(key, 1), 1) < n_diff
    pos = torch.arange(length, device=device) / length
    return torch.argsort(torch.where(in_prefix, key - 1.0, pos), dim=1)


def check_order(order: Tensor, x: Tensor) -> None:
    if order.shape != x.shape:
        raise ValueError(f"order shape {tuple(order.shape)} must equal the tokens' shape {tuple(x.shape)}")
    expected = torch.arange(x.shape[1], device=order.device).expand_as(order)
    if not torch.equal(torch.sort(order, dim=1).values, expected):
        raise ValueError("every row of order must be a permutation of 0..L-1")


def _in_inference(fn: Callable) -> Callable:
    """Run ``fn(model, ...)`` inside ``model.inference()``: eval mode (no dropout, so the same
    call gives the same value), no autograd, the caller's mode restored afterwards."""

    @functools.wraps(fn)
    def wrapper(model: Backbone, *args, **kwargs):
        with model.inference():
            return fn(model, *args, **kwargs)

    return wrapper


@_in_inference
def order_log_prob(model: Backbone, x: Tensor, order: Tensor, chunk: int = 16,
                   progress: bool = False) -> Tensor:
    """Exact log p(x | order) in nats, [B]; padding excluded (pad positions are generated
    last, after every real token, so no real token conditions on them; they never count).
    How it is computed is the family's (``model.config.family_record.exact``).

    x, order: LongTensor[B, L]; order[b] lists positions in generation order.
    """
    cfg = model.config
    check_tokens(cfg, x)
    order = order.to(x.device)
    check_order(order, x)
    return EXACT[cfg.family_record.exact](model, x, order, valid_tokens(cfg, x), chunk, progress)


def _pads_last(order: Tensor, valid: Tensor) -> Tensor:
    """``order`` with the padding positions moved after every real token (real tokens as asked)."""
    rank = torch.argsort(order, dim=1).float() / order.shape[1]  # generation step of each position
    return clean_first_order(valid, rank, rank, padding=~valid)


def exact_left_to_right(model: Backbone, x: Tensor, order: Tensor, valid: Tensor, chunk: int = 16,
                        progress: bool = False) -> Tensor:
    """AR: one causal pass, exact for the left-to-right order only."""
    if not torch.equal(order, left_to_right(*x.shape, x.device)):
        raise ValueError("an AR model has an exact likelihood for the left-to-right order only")
    return -(ar_token_nll(model, x) * valid).sum(1)


def exact_any_order(model: Backbone, x: Tensor, order: Tensor, valid: Tensor, chunk: int = 16,
                    progress: bool = False) -> Tensor:
    """Eso-LMs: one pass of the sequential-term machinery with every position masked."""
    none = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    return -sequential_nll_for_order(model, x, valid, _pads_last(order, valid), none).sum(1)


def exact_per_position(model: Backbone, x: Tensor, order: Tensor, valid: Tensor, chunk: int = 16,
                       progress: bool = False) -> Tensor:
    """MDLM / BD3-LM (bidirectional inside their context): one pass per generation step."""
    return -_per_position(model, x, valid, _pads_last(order, valid), chunk, progress)


def _per_position(model: Backbone, x: Tensor, valid: Tensor, order: Tensor, chunk: int,
                  progress: bool) -> Tensor:
    """MDLM / BD3-LM: one forward per generation step j, with order[j:] masked; ``chunk``
    steps are stacked along the batch dimension of one call."""
    cfg = model.config
    B, L = x.shape
    if cfg.family_record.blocks:
        blocks = order // cfg.block_size
        if (blocks[:, 1:] < blocks[:, :-1]).any():
            raise ValueError("a BD3-LM order must finish each block before the next one starts")
    rank = torch.argsort(order, dim=1)
    total = torch.zeros(B, device=x.device)
    pos = torch.arange(L, device=x.device)
    for j0 in tqdm(range(0, L, chunk), disable=None if progress else True, desc="exact likelihood", leave=False):
        js = torch.arange(j0, min(j0 + chunk, L), device=x.device)
        n = len(js)
        masked = rank.unsqueeze(0) >= js.view(n, 1, 1)  # [n, B, L]
        z = torch.where(masked, cfg.mask_token_id, x.unsqueeze(0)).reshape(n * B, L)
        target = order[:, js].T.reshape(n * B, 1)  # position decoded at step j
        logits = _bidirectional_logits(model, z, x.repeat(n, 1), pos.expand(n * B, L), target,
                                       valid.repeat(n, 1))
        nll = token_nll(logits, x.repeat(n, 1).gather(1, target)).view(n, B)
        total += (nll * valid.gather(1, order[:, js]).T).sum(0)
    return total


def _bidirectional_logits(model: Backbone, z: Tensor, x: Tensor, pos: Tensor, target: Tensor,
                          valid: Tensor) -> Tensor:
    """Logits at ``target`` of one pass over z (the family's clean mask) or over [z ; x] (its
    two-stream mask, when it has one)."""
    cfg = model.config
    if cfg.family_record.two_stream_mask is None:
        return model(z, pos, clean_mask(cfg, keep=key_padding(valid)), logits_for=target)
    mask = two_stream_mask(cfg, z.shape[1], keep=key_padding(torch.cat((valid, valid), 1)))
    return model(torch.cat((z, x), 1), torch.cat((pos, pos), 1), mask, logits_for=target)


def bd3lm_random_order(batch: int, length: int, block: int,
                       generator: torch.Generator | None = None) -> Tensor:
    """Blocks left to right, a uniformly random order inside each block."""
    key = torch.rand(batch, length, generator=generator)
    key = key + (torch.arange(length) // block).float()
    return torch.argsort(key, dim=1)


IW_LAWS = ("sampler", "uniform")


def left_to_right_law(cfg, batch: int, length: int, law: str,
                      generator: torch.Generator | None = None) -> Tensor:
    """AR: left to right, its only order (under every law)."""
    return left_to_right(batch, length)


def block_law(cfg, batch: int, length: int, law: str, generator: torch.Generator | None = None) -> Tensor:
    """BD3-LM: blocks left to right, a uniformly random order inside each block (every law)."""
    return bd3lm_random_order(batch, length, cfg.block_size, generator)


def any_order_law(cfg, batch: int, length: int, law: str, generator: torch.Generator | None = None) -> Tensor:
    """sampler: the sampler's order at NFE = L (a Binomial(L, alpha_0) random prefix, then left
    to right); uniform: a uniformly random order."""
    if law == "sampler":
        return sampler_order(batch, length, cfg.alpha_0, generator)
    return random_order(batch, length, generator)


def draw_orders(model: Backbone, batch: int, length: int, law: str = "sampler",
                generator: torch.Generator | None = None) -> Tensor:
    """Orders [B, L] from the law of the importance-weighted bound, as the family draws them
    (``model.config.family_record.order_law``). sampler (the paper's): the sampler's order at NFE = L;
    uniform: a uniformly random order. AR has one order; BD3-LM is random inside its blocks."""
    if law not in IW_LAWS:
        raise ValueError(f"law={law!r} is unknown: use one of {IW_LAWS}")
    cfg = model.config
    return ORDER_LAWS[cfg.family_record.order_law](cfg, batch, length, law, generator)


@_in_inference
def iw_log_prob(model: Backbone, x: Tensor, num_orders: int = 1,
                generator: torch.Generator | None = None, progress: bool = False,
                law: str = "sampler") -> Tensor:
    """log (1/K) sum_k p(x | order_k) over K orders drawn from ``law`` (see ``draw_orders``;
    ``sampler`` is the paper's definition), [B] nats (padding excluded)."""
    if num_orders < 1:
        raise ValueError(f"num_orders={num_orders!r} is invalid: use an integer >= 1")
    B, L = x.shape
    lps = []
    for _ in tqdm(range(num_orders), disable=None if progress else True, desc="orders", leave=False):
        order = draw_orders(model, B, L, law, generator)
        lps.append(order_log_prob(model, x, order.to(x.device)))
    return torch.logsumexp(torch.stack(lps), dim=0) - math.log(num_orders)


# ----------------------------------------------------------------------------- split-level metrics

OrderFn = Callable[[int, int, torch.Generator], Tensor]


@_in_inference
def nelbo_per_token(model: Backbone, batches: Iterable[Tensor], draws: int = 4,
                    generator: torch.Generator | None = None, progress: bool = False, paired: int = 0) -> dict:
    """Monte Carlo NELBO over a split: ``draws`` passes (fresh antithetic t each), each giving
    the per-token NELBO of the whole split; returns mean, standard error and token count. With
    ``paired`` > 0 also ``"paired"``: the same summary over the first ``paired`` batches alone,
    from the same draws (the tokens the exact likelihoods are computed on: one row compares
    like with like)."""
    if draws < 1:
        raise ValueError(f"draws={draws!r} is invalid: use an integer >= 1")
    batches = list(batches)
    if not batches:
        raise ValueError("the split is empty: no batches to evaluate")
    values, firsts, tokens, first_tokens = [], [], 0, 0
    for _ in tqdm(range(draws), disable=None if progress else True, desc="NELBO draws", leave=False):
        sums = torch.zeros(4, dtype=torch.float64)
        first = torch.zeros(4, dtype=torch.float64)
        for i, x in enumerate(batches):
            out = loss(model, x, generator=generator)
            piece = torch.stack([out.diffusion_nll, out.diffusion_tokens, out.sequential_nll,
                                 out.sequential_tokens]).double().cpu()
            sums += piece
            tokens += int(out.num_tokens) if not values else 0
            if i < paired:
                first += piece
                first_tokens += int(out.num_tokens) if not values else 0
        values.append(float(combine(*sums)))
        if paired:
            firsts.append(float(combine(*first)))
    summary = _draw_summary(values, tokens)
    if paired:
        summary["paired"] = _draw_summary(firsts, first_tokens)
    return summary


def _draw_summary(values: list[float], tokens: int) -> dict:
    """Mean over independent draws, its standard error (NaN for one draw), tokens, draws."""
    draws = len(values)
    mean = sum(values) / draws
    var = sum((v - mean) ** 2 for v in values) / (draws - 1) if draws > 1 else float("nan")
    return {"nats_per_token": mean, "stderr": math.sqrt(var / draws) if draws > 1 else float("nan"),
            "tokens": tokens, "draws": draws}


@_in_inference
def exact_per_token(model: Backbone, batches: Iterable[Tensor], order_fn: OrderFn,
                    generator: torch.Generator | None = None, progress: bool = False) -> dict:
    """Exact -log p(x | order) summed over a split, per counted (non-pad) token, with the
    standard error of that ratio over sequences (``ratio_stderr``)."""
    per_row, counts = [], []
    for x in tqdm(list(batches), disable=None if progress else True, desc="exact likelihood", leave=False):
        order = order_fn(x.shape[0], x.shape[1], generator).to(x.device)
        per_row += (-order_log_prob(model, x, order)).double().cpu().tolist()
        counts += valid_tokens(model.config, x).sum(1).cpu().tolist()
    return ratio_summary(per_row, counts)


def ratio_summary(nll: list[float], tokens: list[int]) -> dict:
    """Per-token NLL sum(nll) / sum(tokens) over sequences and its standard error (the delta
    method for a ratio of means: sqrt(var(nll_i - m n_i) / N) / mean(n_i))."""
    total, n_tok = sum(nll), sum(tokens)
    if n_tok == 0:
        raise ValueError("the split is empty: no tokens to evaluate")
    m, n = total / n_tok, len(nll)
    resid = [a - m * b for a, b in zip(nll, tokens)]
    var = sum(r * r for r in resid) / (n - 1) if n > 1 else float("nan")
    return {"nats_per_token": m, "tokens": n_tok, "stderr": math.sqrt(var / n) / (n_tok / n) if n > 1
            else float("nan")}



def _ppl(nats: float) -> float:
    return math.exp(nats) if nats < 700 else float("inf")


def evaluate_split(model: Backbone, batches: list[Tensor], ev: EvalConfig, bytes_per_token: float,
                   progress: bool = False) -> dict:
    """Every likelihood metric of one split (method.md section 5), as ``esolm evaluate`` stores
    it in ``likelihood.json``: the Monte Carlo NELBO over ``batches`` (``ev.nelbo_draws`` passes;
    ``nelbo_paired_*``: the same draws on the exact metrics' tokens alone),
    and on the first ``ev.exact_batches`` of them the exact likelihood left to right (and under
    the sampler's order where the family's differs) and each importance-weighted bound; nats per
    token, perplexities, standard errors and bits per byte."""
    cfg, record = model.config, model.config.family_record
    gen = torch.Generator().manual_seed(ev.seed)
    nelbo = nelbo_per_token(model, batches, ev.nelbo_draws, gen, progress, paired=ev.exact_batches)
    exact = batches[: ev.exact_batches]
    same = nelbo["paired"]  # the NELBO on the exact metrics' own tokens: "exact <= NELBO" compares these
    out = {"nelbo_nats": nelbo["nats_per_token"], "nelbo_ppl": _ppl(nelbo["nats_per_token"]),
           "nelbo_stderr": nelbo["stderr"], "nelbo_tokens": nelbo["tokens"],
           "nelbo_paired_nats": same["nats_per_token"], "nelbo_paired_ppl": _ppl(same["nats_per_token"]),
           "nelbo_paired_stderr": same["stderr"]}
    l2r = exact_per_token(model, exact, lambda b, n, g: left_to_right(b, n), gen, progress)
    out.update(exact_l2r_nats=l2r["nats_per_token"], exact_l2r_ppl=_ppl(l2r["nats_per_token"]),
               exact_l2r_stderr=l2r["stderr"], tokens=l2r["tokens"])
    if record.sampler_metric:
        smp = exact_per_token(model, exact, lambda b, n, g: draw_orders(model, b, n, "sampler", g), gen, progress)
        out.update(exact_sampler_nats=smp["nats_per_token"], exact_sampler_ppl=_ppl(smp["nats_per_token"]),
                   exact_sampler_stderr=smp["stderr"])
    for k in ev.iw_orders:  # the paper's bound (sampler-law orders), then uniform orders
        for law in record.iw_laws:  # AR has one order, BD3-LM is random inside blocks: one law
            name = f"iw{k}" if law == "sampler" else f"iw{k}_{law}"
            rows = [v for x in exact for v in (-iw_log_prob(model, x, k, gen, law=law)).double().cpu().tolist()]
            iw = ratio_summary(rows, [n for x in exact for n in valid_tokens(cfg, x).sum(1).cpu().tolist()])
            out[f"{name}_nats"], out[f"{name}_stderr"] = iw["nats_per_token"], iw["stderr"]
            out[f"{name}_ppl"] = _ppl(iw["nats_per_token"])
    out["bits_per_byte"] = l2r["nats_per_token"] / math.log(2) / bytes_per_token
    out["nats_per_token"] = l2r["nats_per_token"]
    return out


EXACT: dict[str, Callable[..., Tensor]] = {"left_to_right": exact_left_to_right, "any_order": exact_any_order,
                                           "per_position": exact_per_position}
"""Exact log p(x | order) by the family records' names (``Family.exact``):
(model, x, order, valid, chunk, progress) -> [B] nats."""
ORDER_LAWS: dict[str, Callable[..., Tensor]] = {"left_to_right": left_to_right_law, "any_order": any_order_law,
                                                "blocks": block_law}
"""Orders of the IW bound and the sampler-order metric (``Family.order_law``):
(cfg, batch, length, law, generator) -> [B, L]."""
