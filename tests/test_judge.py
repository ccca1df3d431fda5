"""Judges: a Hugging Face causal LM scores text offline from a local folder the test builds."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf: judge needs transformers (the dev extra)")


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A 1-layer GPT-2 with a small byte-level BPE, saved with save_pretrained (no hub)."""
    from tokenizers import ByteLevelBPETokenizer

    folder = tmp_path_factory.mktemp("gpt2")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the state of the union is strong", "we the people of the united states"] * 20,
                            vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                               eos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model.eval(), tok


def test_hf_judge_scores_like_a_manual_forward(tiny_gpt2, monkeypatch):
    from esolm.judge import load_judge

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, model, tok = tiny_gpt2
    texts = ["the state of the union", "we the people", "strong union of the states of the people"]
    judge = load_judge(f"hf:{folder}", None, torch.device("cpu"))
    judge.batch_size = 2  # two batches, one of them padded
    out = judge.score(texts)
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[tok.bos_token_id, *tok.encode(text, add_special_tokens=False)]])
            logits = model(input_ids=ids).logits[0, :-1]
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
            total, count = total + float(nll), count + ids.shape[1] - 1
    assert out["tokens"] == count
    assert out["gen_ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert judge.name == f"hf:{folder}" and len(out["per_sample_nll"]) == 3


def test_hf_judge_that_cannot_load_is_a_clear_error(tmp_path, monkeypatch):
    from esolm.judge import load_judge

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="judge hf:.*cannot be loaded"):
        load_judge(f"hf:{tmp_path / 'nothing'}", None, torch.device("cpu"))
