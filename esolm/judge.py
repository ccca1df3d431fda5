"""Quality of samples: generative perplexity under a judge LM, and unigram entropy.

The default judge is the AR checkpoint of this pipeline. Samples are decoded to text and
re-encoded with the judge's own tokenizer (here the same file, but the path through text
keeps the door open to any judge), scored left to right, loaded once per process.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch
from tokenizers import Tokenizer

from esolm.model.backbone import Backbone
from esolm.objectives import ar_token_nll


def unigram_entropy(ids: list[int]) -> float:
    """Entropy (nats) of the token frequency distribution of one sample."""
    if not ids:
        return 0.0
    counts = Counter(ids)
    n = len(ids)
    return -sum(c / n * math.log(c / n) for c in counts.values())


class Judge:
    """An AR model and its tokenizer; ``score(texts)`` gives generative perplexity."""

    def __init__(self, model: Backbone, tokenizer: Tokenizer, name: str) -> None:
        if model.config.variant != "ar":
            raise ValueError(f"the judge must be an AR model, got variant {model.config.variant!r}")
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: torch.device) -> Judge:
        from esolm.training import load_run

        return cls(*load_run(path, device=device), str(path))

    @torch.no_grad()
    def score(self, texts: list[str]) -> dict:
        """Token-weighted generative perplexity over ``texts`` and each sample's NLL per token."""
        device = next(self.model.parameters()).device
        vocab = self.model.config.vocab_size
        total, count, per_sample = 0.0, 0, []
        for text in texts:
            ids = [i for i in self.tokenizer.encode(text).ids if i < vocab][: self.model.config.length]
            if not ids:
                per_sample.append(float("nan"))
                continue
            nll = ar_token_nll(self.model, torch.tensor([ids], device=device))[0]
            total += float(nll.sum())
            count += len(ids)
            per_sample.append(float(nll.mean()))
        ppl = math.exp(total / count) if count else float("nan")
        return {"gen_ppl": ppl, "nll_per_token": total / count if count else float("nan"),
                "tokens": count, "per_sample_nll": per_sample}
