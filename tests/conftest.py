"""Shared helpers: tiny models whose weights are all random and far from uniform predictions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

for _k, _v in {"DVC_NO_ANALYTICS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MPLBACKEND": "Agg",
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}.items():
    os.environ.setdefault(_k, _v)

from esolm import ModelConfig, build_model  # noqa: E402 - after the offline switches

FAMILY_NAMES = ("ar", "mdlm", "bd3lm", "eso_a", "eso_b")


def sharp_model(family: str = "eso_b", std: float = 0.18, dtype=torch.float32, seed: int = 0, **kw):
    """A random model in eval mode with weights large enough that predictions are far from
    uniform (so any leak through attention shows in the numbers) but not deterministic:
    at std 0.18 a 2-layer model has about 0.7 nats/token of entropy over 3 tokens (std 0.3
    makes it nearly deterministic, which would let normalisation checks pass vacuously)."""
    torch.manual_seed(seed)
    base = dict(family=family, vocab_size=7, length=16, n_layers=2, d_model=32, n_heads=4,
                dropout=0.0, cond_dim=32)
    base.update(kw)
    model = build_model(ModelConfig(**base)).to(dtype)
    randomize(model, std)
    return model.eval()


def randomize(model: torch.nn.Module, std: float = 0.18) -> torch.nn.Module:
    """Every weight of every linear and embedding layer Normal(0, std), biases zero.

    ``build_model`` uses the training init (adaLN-Zero: modulations and output layer zero,
    uniform predictions), on which every equality the tests check would hold trivially."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
    assert all(bool(p.abs().sum() > 0) for n, p in model.named_parameters() if "bias" not in n)
    return model


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def trained_project(tmp: Path) -> Path:
    """A checkout-like folder: tiny params, prepared shards, two trained variants (``ar`` and
    ``eso_b_a05``, the searched one) and the dedicated judge, made with the ``esolm`` verbs."""
    from tests.data.conftest import write_txt_corpus

    root = Path(__file__).resolve().parents[1]
    corpus = write_txt_corpus(tmp / "docs", n_docs=40)
    p = yaml.safe_load((root / "params.yaml").read_text())
    p["data"].update(dataset="tiny", source=f"files:{corpus}/*.txt", tokenizer="bpe:300", length=16)
    p["model"].update(d_model=32, n_heads=4, cond_dim=32)
    p["variants"] = {"ar": {"family": "ar"}, "eso_b_a05": {"family": "eso_b", "alpha_0": 0.5, "batch_split": 0.5}}
    p["train"].update(steps=4, batch_size=8, val_every=2, ckpt_every=2, log_every=2, warmup_steps=1)
    p["search"].update(variant="eso_b_a05", num_samples=2, default_steps=[2], sampler="tpe", space={"steps": [2, 8]})
    p["judge"]["train"] = {"steps": 4}
    p["evaluate"].update(batch_size=8, nelbo_batches=2, exact_batches=1)  # the tiny test split holds 32 rows
    (tmp / "params.yaml").write_text(yaml.safe_dump(p))
    (tmp / "dvc.yaml").write_text((root / "dvc.yaml").read_text())  # a checkout holds both (flows check it)
    env = {**os.environ, "PYTHONPATH": str(root)}
    verbs = [["prepare", "--quiet"], ["train", "--variant", "ar", "--quiet"],
             ["train", "--variant", "eso_b_a05", "--quiet"], ["judge", "--quiet"]]
    script = f"from esolm.cli import main\nfor args in {verbs!r}:\n    assert main(args) == 0, args\n"
    subprocess.run([sys.executable, "-c", script], cwd=tmp, env=env, check=True, capture_output=True)
    return tmp
