"""Text in, text out: load a model file and generate strings, with a prefix prompt or infilling.

    model, tokenizer = esolm.load("runs/eso_b_a025/model.ckpt")
    texts = esolm.generate_text(model, tokenizer, prompt="Fellow citizens", num_samples=2)

``infill`` takes text in which each ``[MASK]`` marks one token to generate; the given tokens
keep their places and every position after the text is generated too. Infilling needs a
family that decodes in any order (Eso-LMs, MDLM, BD3-LM); AR takes a prefix only.
"""

from __future__ import annotations

import os
import re

from tokenizers import Tokenizer

from esolm.config import ScheduleSettings
from esolm.model.backbone import Backbone
from esolm.sampling import generate

MASK_MARK = "[MASK]"


def load(path: str | os.PathLike, device: str = "cpu", ema: bool = True) -> tuple[Backbone, Tokenizer]:
    """The model (EMA weights when present) and its embedded tokenizer from a ``model.ckpt`` or
    from a folder written by ``esolm export``."""
    from esolm.checkpoint import load_run

    return load_run(path, ema, device)


def encode_given(tokenizer: Tokenizer, length: int, prompt: str | None = None,
                 infill: str | None = None) -> dict[int, int]:
    """Position -> token id of the given tokens: a prompt fills positions 0..P-1; an infill text
    is split at ``[MASK]`` marks, its pieces encoded in place and each mark left to generate."""
    if (prompt is None) == (infill is None):
        raise ValueError("give exactly one of prompt= (a prefix) or infill= (text with [MASK] marks)")
    pieces = [prompt] if prompt is not None else re.split(re.escape(MASK_MARK), infill)
    given, pos = {}, 0
    for i, piece in enumerate(pieces):
        ids = tokenizer.encode(piece, add_special_tokens=False).ids if piece else []
        given.update({pos + j: t for j, t in enumerate(ids)})
        pos += len(ids) + (1 if i < len(pieces) - 1 else 0)  # one generated token per mark
    if pos > length:
        raise ValueError(f"the text takes {pos} tokens but the model's length is {length}: shorten it")
    if not given:
        raise ValueError("the text encodes to no tokens: give some text (or sample unconditionally)")
    return given


def generate_text(model: Backbone, tokenizer: Tokenizer, settings: ScheduleSettings | None = None, *,
                  prompt: str | None = None, infill: str | None = None, num_samples: int = 1) -> list[str]:
    """``num_samples`` strings of the model's length continuing ``prompt`` or filling ``infill``,
    sampled with ``settings`` (``esolm.generate``)."""
    given = None if prompt is None and infill is None else encode_given(tokenizer, model.config.length, prompt, infill)
    g = generate(model, settings, prompt=given, num_samples=num_samples)
    return tokenizer.decode_batch(g.tokens.tolist(), skip_special_tokens=True)
