"""An lm-evaluation-harness model ``esolm`` (lm-eval 0.4.x, the ``lmeval`` extra).

    python -m esolm.lm_eval_adapter --model esolm --model_args path=runs/V/model.ckpt --tasks ...

(the harness has no plugin discovery: this module registers the model, then runs its command
line; in Python, ``import esolm.lm_eval_adapter`` before ``lm_eval.simple_evaluate``).
``path`` is anything ``esolm.load`` reads (a model file, an export, ``hf:owner/name``).

What the numbers are, per the family's exact likelihood (``family_record.exact``):

- AR and Eso-LMs (``left_to_right`` / ``any_order``): ``loglikelihood`` is the **exact**
  log p(continuation | context) under the left-to-right order (one causal pass for AR, the
  two-stream pass with every position masked for Eso-LMs, method.md section 5);
  ``loglikelihood_rolling`` the exact left-to-right log p of each window.
- MDLM and BD3-LM (``per_position``): no exact likelihood exists. ``loglikelihood`` is the
  **lower bound** log p(continuation | context, order) of one order (context given, then the
  continuation left to right, one pass per token); ``loglikelihood_rolling`` the
  importance-weighted **bound** with ``iw_orders`` orders of the family's sampler law.

Texts longer than the model's length keep their last tokens (``loglikelihood``) or are cut into
windows of the model's length (``loglikelihood_rolling``, no context across windows).
``generate_until`` samples with ``esolm.generate`` (the family's sampler, prefix prompt).
"""

from __future__ import annotations

import sys

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from esolm.likelihood import iw_log_prob, left_to_right, order_log_prob
from esolm.model.masks import AttentionMask, clean_mask, two_stream_mask

BOUND_EXACT = "per_position"  # the family_record.exact of families without an exact likelihood


def _logprobs_exact(model, x: torch.Tensor) -> torch.Tensor:
    """log p(. | x_<i) [n, V] at every position of x [n] (AR, Eso-LMs): exact, left to right."""
    cfg, n = model.config, x.shape[0]
    pos = torch.arange(n, device=x.device).unsqueeze(0)
    if cfg.family_record.autoregressive:
        inp = torch.cat((x.new_tensor([cfg.mask_token_id]), x[:-1])).unsqueeze(0)
        logits = model(inp, pos, AttentionMask("causal"))
    else:  # every position masked; query i sees the clean x_<i (two-stream, left to right)
        z = torch.full((1, n), cfg.mask_token_id, device=x.device)
        mask = two_stream_mask(cfg, n, n_clean=torch.zeros(1, dtype=torch.long, device=x.device))
        logits = model(torch.cat((z, x.unsqueeze(0)), 1), torch.cat((pos, pos), 1), mask, logits_for=slice(0, n))
    return logits[0].log_softmax(-1)


def _logprobs_chain(model, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(x_j | x_<j, x_>=j masked) [n - start], greedy [n - start]) for j >= start: one
    order's chain, one pass per position, stacked into one batch (MDLM, BD3-LM)."""
    cfg, n = model.config, x.shape[0]
    js = torch.arange(start, n, device=x.device)
    z = torch.where(torch.arange(n, device=x.device)[None] >= js[:, None], cfg.mask_token_id, x[None])  # [k, n]
    pos = torch.arange(n, device=x.device).expand(len(js), n)
    target = js[:, None]
    if cfg.family_record.two_stream_mask is None:
        logits = model(z, pos, clean_mask(cfg), logits_for=target)
    else:
        xs = x.expand(len(js), n)
        logits = model(torch.cat((z, xs), 1), torch.cat((pos, pos), 1), two_stream_mask(cfg, n), logits_for=target)
    lp = logits[:, 0].log_softmax(-1)
    return lp.gather(1, x[js, None])[:, 0], lp.argmax(-1) == x[js]


@register_model("esolm")
class EsoLMHarness(LM):
    """lm-eval's model ``esolm``: model_args ``path`` (required), ``device`` (auto: the GPU when
    there is one; the harness's ``--device`` sets it, so give ``--device cpu`` on a CPU), ``iw_orders``
    (4: orders of the rolling bound of MDLM / BD3-LM), ``seed`` (0)."""

    def __init__(self, path: str, device: str | None = "auto", iw_orders: int = 4, seed: int = 0,
                 batch_size: int | str = 1, **_: object) -> None:
        super().__init__()
        from esolm.device import pick_device
        from esolm.text import load

        self.model, self.tok = load(path, device=pick_device(device or "auto"))
        self.iw_orders, self.seed = int(iw_orders), int(seed)
        rec = self.model.config.family_record
        self.exact = rec.exact != BOUND_EXACT
        self.what = ("exact log-likelihood, left-to-right order" if self.exact else
                     "lower bound: one order (loglikelihood), importance-weighted bound (rolling)")

    def _ids(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids if text else []

    @torch.no_grad()
    def _conditional(self, context: str, continuation: str) -> tuple[float, bool]:
        ctx, cont = self._ids(context), self._ids(continuation)
        L = self.model.config.length
        ids = (ctx + cont)[-L:]
        start = len(ids) - len(cont[-L:])
        x = torch.tensor(ids, device=self.model.head.weight.device)
        with self.model.inference():
            if self.exact:
                lp_all = _logprobs_exact(self.model, x)[start:]
                lp = lp_all.gather(1, x[start:, None])[:, 0]
                ok = lp_all.argmax(-1) == x[start:]
            else:
                lp, ok = _logprobs_chain(self.model, x, start)
        return float(lp.sum()), bool(ok.all())

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return [self._conditional(*r.args[:2]) for r in requests]

    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out, L = [], self.model.config.length
        g = torch.Generator().manual_seed(self.seed)
        for r in requests:
            ids = self._ids(r.args[0])
            total = 0.0
            for i in range(0, len(ids), L):
                x = torch.tensor([ids[i:i + L]], device=self.model.head.weight.device)
                if self.exact:
                    total += float(order_log_prob(self.model, x, left_to_right(*x.shape, x.device))[0])
                else:
                    total += float(iw_log_prob(self.model, x, self.iw_orders, g)[0])
            out.append(total)
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from esolm.config import ScheduleSettings
        from esolm.sampling import generate

        out, L = [], self.model.config.length
        for i, r in enumerate(requests):
            context, kwargs = r.args[0], (r.args[1] if len(r.args) > 1 else {}) or {}
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = self._ids(context)[-(L - 1):]
            given = dict(enumerate(ids)) or None
            g = generate(self.model, ScheduleSettings(seed=self.seed + i), prompt=given, num_samples=1)
            new = g.tokens[0, len(ids):len(ids) + int(kwargs.get("max_gen_toks", L))].tolist()
            text = self.tok.decode(new, skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``esolm`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
