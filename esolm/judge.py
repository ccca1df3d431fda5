"""Quality of samples: generative perplexity under a judge LM, and unigram entropy.

The judge is never a contestant. ``load_judge(judge_name)`` gives either the pipeline's dedicated AR
judge (``judge``: trained by its own stage, larger or longer than the contestants) or any other
esolm AR model file, or ``hf:<name or folder>``: a Hugging Face causal LM through
``transformers`` (GPT-2 Large in the paper), ``trust_remote_code`` never. Samples are decoded to
text and re-encoded with the judge's own tokenizer, scored left to right in batches; a judge is
loaded once per process.
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
    """An esolm AR model and its tokenizer; ``score(texts)`` gives generative perplexity."""

    def __init__(self, model: Backbone, tokenizer: Tokenizer, name: str) -> None:
        if not model.config.family_record.autoregressive:
            raise ValueError(f"the judge must be an AR model, got family {model.config.family!r}")
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: torch.device) -> Judge:
        from esolm.checkpoint import load_run

        return cls(*load_run(path, device=device), Path(path).parent.name)

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


class HFJudge:
    """A Hugging Face causal LM (a hub name, or a local folder written by ``save_pretrained``)."""

    def __init__(self, name_or_path: str, device: torch.device, batch_size: int = 8) -> None:
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as err:
            raise ValueError("sample.judge=hf:... needs the transformers package: pip install 'esolm[hf]'") from err
        try:  # remote code is never run: trust_remote_code stays False
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
            self.model = AutoModelForCausalLM.from_pretrained(name_or_path, trust_remote_code=False)
        except OSError as err:
            raise ValueError(f"judge hf:{name_or_path} cannot be loaded ({err}); give a local folder, or "
                             "a hub name on a machine that reaches the hub") from err
        self.model = self.model.to(device).eval()
        self.name, self.device, self.batch_size = f"hf:{name_or_path}", device, batch_size
        self.max_length = int(getattr(self.model.config, "n_positions", None)
                              or getattr(self.model.config, "max_position_embeddings", 1024))

    @torch.no_grad()
    def score(self, texts: list[str]) -> dict:
        """As ``Judge.score``: every token is scored, the first after the BOS (or EOS) token."""
        bos = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        encoded = [[bos, *self.tokenizer.encode(t, add_special_tokens=False)][: self.max_length] for t in texts]
        total, count, per_sample = 0.0, 0, []
        for first in range(0, len(encoded), self.batch_size):
            rows = encoded[first:first + self.batch_size]
            width = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            keep = torch.zeros(len(rows), width, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
                keep[i, : len(r)] = 1
            ids, keep = ids.to(self.device), keep.to(self.device)
            logits = self.model(input_ids=ids, attention_mask=keep).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            nll = nll * keep[:, 1:]
            for i, r in enumerate(rows):
                n = len(r) - 1
                per_sample.append(float(nll[i].sum()) / n if n else float("nan"))
                total += float(nll[i].sum())
                count += n
        ppl = math.exp(total / count) if count else float("nan")
        return {"gen_ppl": ppl, "nll_per_token": total / count if count else float("nan"),
                "tokens": count, "per_sample_nll": per_sample}


def load_judge(judge_name: str, run_dir: Path, device: torch.device,
               contestants: tuple[str, ...] = ()) -> Judge | HFJudge:
    """``hf:<name or folder>`` -> ``HFJudge``; any other name -> the esolm AR model file
    ``run_dir / name / model.ckpt`` (the dedicated judge is ``judge``). A contestant's name is
    refused: no model grades its own samples."""
    if judge_name.startswith("hf:"):
        return HFJudge(judge_name[3:], device)
    if judge_name in contestants:
        raise ValueError(f"sample.judge={judge_name!r} is a contestant (a variant under variants:), so it would grade "
                         "its own samples: use judge (the dedicated AR judge stage) or hf:<model>")
    path = run_dir / judge_name / "model.ckpt"
    if not path.exists():
        raise FileNotFoundError(f"judge model {path} not found: train it first (esolm judge, or dvc repro judge)")
    return Judge.from_checkpoint(path, device)
