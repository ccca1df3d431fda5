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
INFILL_MARKS = ("⟦", "⟧")  # around generated spans in terminal output (esolm sample --infill)


def check_infill(infill: str) -> None:
    """An infill text holds at least one ``[MASK]`` (text without one would only be a prompt)."""
    if MASK_MARK not in infill:
        raise ValueError(f"the infill text has no {MASK_MARK}: write one {MASK_MARK} per token to fill, e.g. "
                         f"--infill 'The {MASK_MARK} {MASK_MARK} of the Union' (to continue a text, use --prompt)")


def load(path: str | os.PathLike, device: str = "cpu", ema: bool = True) -> tuple[Backbone, Tokenizer]:
    """The model (EMA weights when present) and its embedded tokenizer from a ``model.ckpt``, a
    folder written by ``esolm export``, or a published model in the authors' layout: a hub id
    ``hf:owner/name`` or its folder (``esolm.published_io``; ``esolm import`` keeps it as a file)."""
    from esolm.checkpoint import load_run
    from esolm.published_io import is_published, load_published

    if is_published(path):
        return load_published(path, device, ema)
    return load_run(path, ema, device)


def encode_given(tokenizer: Tokenizer, length: int, prompt: str | None = None,
                 infill: str | None = None) -> dict[int, int]:
    """Position -> token id of the given tokens: a prompt fills positions 0..P-1; an infill text
    is split at ``[MASK]`` marks, its pieces encoded in place and each mark left to generate."""
    if (prompt is None) == (infill is None):
        raise ValueError("give exactly one of prompt= (a prefix) or infill= (text with [MASK] marks)")
    if infill is not None:
        check_infill(infill)
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
    return sample_text(model, tokenizer, settings, prompt=prompt, infill=infill, num_samples=num_samples)[0]


def sample_text(model: Backbone, tokenizer: Tokenizer, settings: ScheduleSettings | None = None, *,
                prompt: str | None = None, infill: str | None = None, num_samples: int = 1,
                marks: tuple[str, str] | None = None) -> tuple[list[str], dict | None]:
    """``generate_text`` and the schedule settings that ran (``Generation.settings``); with
    ``marks`` (e.g. ``INFILL_MARKS``), each span of generated tokens is wrapped in them."""
    given = None if prompt is None and infill is None else encode_given(tokenizer, model.config.length, prompt, infill)
    g = generate(model, settings, prompt=given, num_samples=num_samples)
    rows = g.tokens.tolist()
    if marks is None or not given:
        return tokenizer.decode_batch(rows, skip_special_tokens=True), g.settings
    return [marked_text(tokenizer, row, set(given), marks) for row in rows], g.settings


def marked_text(tokenizer: Tokenizer, ids: list[int], given: set[int], marks: tuple[str, str]) -> str:
    """The text of ``ids`` with every run of positions outside ``given`` wrapped in ``marks``.
    Each run's text is the growth of the decoded prefix, so the spacing is the full decode's."""
    bounds = [0] + [p for p in range(1, len(ids)) if (p in given) != (p - 1 in given)] + [len(ids)]
    out, before = [], ""
    for start, stop in zip(bounds, bounds[1:]):
        text = tokenizer.decode(ids[:stop], skip_special_tokens=True)
        piece = text[len(before):] if text.startswith(before) else tokenizer.decode(ids[start:stop],
                                                                                   skip_special_tokens=True)
        before = text
        if start in given or not piece.strip():
            out.append(piece)
        else:  # the mark hugs the generated words: leading space outside it
            lead = piece[: len(piece) - len(piece.lstrip())]
            out.append(f"{lead}{marks[0]}{piece.strip()}{marks[1]}{piece[len(piece.rstrip()):]}")
    return "".join(out)
