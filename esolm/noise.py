"""The log-linear masking schedule scaled by alpha_0 (method.md section 2)."""

from __future__ import annotations

import torch
from torch import Tensor


def alpha(t: Tensor, alpha_0: float, eps: float = 1e-3) -> Tensor:
    """alpha_t = alpha_0 * (1 - (1 - eps) * t): probability that a position is clean at time t."""
    return alpha_0 * (1.0 - (1.0 - eps) * t)


def alpha_prime(alpha_0: float, eps: float = 1e-3) -> float:
    """d alpha_t / dt = -alpha_0 * (1 - eps) (constant for the log-linear schedule)."""
    return -alpha_0 * (1.0 - eps)


def diffusion_weight(t: Tensor, alpha_0: float, eps: float = 1e-3) -> Tensor:
    """-alpha'_t / (1 - alpha_t) >= 0: the NELBO weight of each masked position's NLL."""
    return -alpha_prime(alpha_0, eps) / (1.0 - alpha(t, alpha_0, eps)).clamp_min(1e-8)


def antithetic_times(n: int, generator: torch.Generator | None = None, eps: float = 1e-3,
                     t_max: float = 1.0) -> Tensor:
    """Stratified t in [eps, t_max] for n rows, as the reference (t_max = 1): row i draws its own
    u_i ~ U[0, 1) inside stratum i, t_i = eps + (t_max - eps) * (i + u_i) / n. Never t near 0,
    where the NELBO weight -alpha'_t / (1 - alpha_t) of alpha_0 = 1 grows like 1 / t.
    ``t_max`` < 1 serves the masking warm-up of training (``train.mask_warmup_steps``) only."""
    if not eps < t_max <= 1.0:
        raise ValueError(f"t_max={t_max!r} is invalid: use a largest time in (eps={eps}, 1]")
    u = torch.rand(n, generator=generator, device=_gen_device(generator))
    strata = (torch.arange(n, device=u.device) + u) / max(n, 1)
    return eps + (t_max - eps) * strata


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """U[0, 1) draws made on the generator's device, returned on ``device``."""
    return torch.rand(shape, generator=generator, device=_gen_device(generator)).to(device)
