"""``prepare``: corpus -> tokenizer -> token shards + tokenizer.json + meta.json on disk.

Output folder ``<out_dir>/<dataset>/``: ``train.bin``, ``valid.bin``, ``test.bin`` (token ids
[rows, length]), ``tokenizer.json`` and ``meta.json``. A new dataset is written into a new
folder beside the old one and swapped in only once complete, so a failed or killed run
leaves the previous dataset (and its ``meta.json``) as it was. A rerun whose config hash and input checksums match the
existing ``meta.json`` does nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from esolm.data.config import DataConfig
from esolm.data.identity import text_sha256
from esolm.data.shards import ShardWriter, SplitStats, token_dtype
from esolm.data.sources import SPLITS, input_checksums, load_corpus
from esolm.data.tokenizers import add_pad_token, load_tokenizer, separator_token, tokenizer_inputs
from esolm.io import process_alive

FORMAT_VERSION = 1
READ_DOCS = 1024  # documents read from a source at a time
ENCODE_CHARS = 1 << 20  # characters per encode_batch call (bounds memory, keeps bars moving)
_NOT_HASHED = ("out_dir", "cache_dir", "allow_network")  # where/how, not what


def config_hash(cfg: DataConfig) -> str:
    """sha256 of every config field that changes the output (and of the shard format)."""
    fields = {k: v for k, v in asdict(cfg).items() if k not in _NOT_HASHED}
    fields["format"] = FORMAT_VERSION
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _console() -> Console:
    return Console(stderr=True)


def _outputs_complete(out: Path, meta: dict) -> bool:
    """Whether tokenizer.json and every shard of ``meta`` exist with the expected sizes."""
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split, info in meta["splits"].items():
        path = out / f"{split}.bin"
        if not path.is_file() or path.stat().st_size != info["rows"] * meta["length"] * itemsize:
            return False
    return (out / "tokenizer.json").is_file()


def _is_up_to_date(out: Path, cfg: DataConfig, digest: str) -> bool:
    """Whether ``out`` holds complete outputs of this config made from the same inputs."""
    try:
        meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
        if meta["config_hash"] != digest or not _outputs_complete(out, meta):
            return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return meta.get("inputs") == {**input_checksums(cfg), **tokenizer_inputs(cfg.tokenizer)}


def _encode(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, encoded in parallel without post-processing."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=False)]


def _text_chunks(texts: Sequence[str]) -> Iterator[tuple[int, list[str]]]:
    """Yield (documents read, non-empty texts) in chunks of at most ENCODE_CHARS characters."""
    for i in range(0, len(texts), READ_DOCS):
        batch = list(texts[i:i + READ_DOCS])
        chunk: list[str] = []
        size = read = 0
        for text in batch:
            read += 1
            if text.strip():
                chunk.append(text)
                size += len(text)
            if size >= ENCODE_CHARS:
                yield read, chunk
                chunk, size, read = [], 0, 0
        yield read, chunk


def _write_split(path: Path, split: str, texts: Sequence[str], tok: Tokenizer, cfg: DataConfig,
                 dtype: np.dtype, ids: tuple[int, int | None], progress: bool) -> SplitStats:
    """Encode one split and write its rows to ``path``; an empty result is a ValueError."""
    writer = ShardWriter(path, cfg.packing, cfg.length, dtype, *ids)
    with tqdm(total=len(texts), desc=f"tokenize {split}", unit="doc", disable=None if progress else True,
              leave=False) as bar:
        try:
            for read, chunk in _text_chunks(texts):
                writer.add(_encode(tok, chunk), sum(len(t.encode("utf-8")) for t in chunk))
                bar.update(read)
        finally:
            stats = writer.close()
    if stats.rows == 0:
        raise ValueError(
            f"split {split!r} is empty: {stats.documents} document(s), {stats.tokens} tokens, not "
            f"one full row of length {cfg.length}; use a smaller length or more data"
        )
    return stats


def _build_meta(cfg: DataConfig, tok: Tokenizer, ids: tuple[int, int | None], dtype: np.dtype,
                stats: dict[str, SplitStats], inputs: dict[str, str]) -> dict:
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    return {
        "format": FORMAT_VERSION, "dataset": cfg.dataset, "source": cfg.source,
        "tokenizer": cfg.tokenizer, "vocab_size": vocab_size, "mask_id": vocab_size,
        "eos_id": ids[0], "separator_id": ids[0], "separator": separator_token(cfg.tokenizer),
        "pad_id": ids[1], "dtype": dtype.name, "length": cfg.length, "packing": cfg.packing,
        "splits": {s: st.as_dict() for s, st in stats.items()},
        "inputs": inputs, "config": asdict(cfg), "config_hash": config_hash(cfg),
    }


def unigram_ppl(folder: Path, meta: dict, smoothing: float = 0.5) -> dict[str, float]:
    """The baseline every model must beat: perplexity of the held-out splits under the unigram
    distribution of the training tokens (add-``smoothing`` counts; padding never counts)."""
    vocab, pad, dtype = meta["vocab_size"], meta.get("pad_id"), np.dtype(meta["dtype"])

    def counts(split: str) -> np.ndarray:
        ids = np.fromfile(folder / f"{split}.bin", dtype=dtype)
        c = np.bincount(ids, minlength=vocab).astype(np.float64)[:vocab]
        if pad is not None and pad < vocab:
            c[pad] = 0.0
        return c

    train = counts("train") + smoothing
    if pad is not None and pad < vocab:
        train[pad] = 0.0
    logp = np.log(np.where(train > 0, train, 1.0) / train.sum())
    out = {}
    for split in ("valid", "test"):
        c = counts(split)
        out[split] = float(np.exp(-(c * logp).sum() / c.sum())) if c.sum() else float("nan")
    return out


def _summary(meta: dict, seconds: float) -> None:
    """A rich table (to stderr): documents, rows, tokens and bytes per token per split."""
    table = Table(title=f"{meta['dataset']}: {meta['tokenizer']} (vocabulary {meta['vocab_size']}),"
                        f" {meta['packing']} L={meta['length']}, {meta['dtype']}",
                  caption=f"prepared in {seconds:.1f} s")
    for col in ("split", "documents", "rows", "tokens", "bytes", "bytes/token"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for split, s in meta["splits"].items():
        table.add_row(split, f"{s['documents']:,}", f"{s['rows']:,}", f"{s['tokens']:,}",
                      f"{s['bytes']:,}", f"{s['bytes_per_token'] or 0:.3f}")
    _console().print(table)


def _remove_leftovers(out: Path) -> None:
    """Remove the staging folders (``.<name>.new-<pid>-*``, ``.<name>.old-<pid>-*``) that a
    killed prepare (SIGKILL, a power cut: no clean-up runs) left beside ``out``; those of a
    process still running are kept."""
    for kind in ("new", "old"):
        prefix = f".{out.name}.{kind}-"
        for folder in out.parent.glob(f"{prefix}*"):
            pid = folder.name.removeprefix(prefix).split("-", 1)[0]
            if folder.is_dir() and pid.isdigit() and not process_alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM (``kill PID``, a CI timeout) raises SystemExit here, so the clean-up below runs
    instead of the process vanishing mid-write (only in the main thread, where signals land)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A new folder beside ``out`` to write into; on success it replaces ``out`` (two renames,
    the old folder removed after), on failure or SIGTERM it is removed and ``out`` is untouched.
    The folders carry this process's id, so that the next prepare removes what a SIGKILL left."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-{os.getpid()}-", dir=out.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _swap(stage, out)


def _swap(stage: Path, out: Path) -> None:
    """``stage`` becomes ``out``; the previous ``out`` is removed after the rename. SIGTERM waits
    until both renames are done (never an ``out`` missing between them)."""
    import signal

    old = out.with_name(f".{out.name}.old-{os.getpid()}-{stage.name.rsplit('-', 1)[-1]}")
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        if out.exists():
            os.replace(out, old)
        os.replace(stage, out)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    shutil.rmtree(old, ignore_errors=True)


def prepare(cfg: DataConfig, progress: bool = True) -> Path:
    """Write ``<out_dir>/<dataset>/`` for ``cfg`` (or do nothing when it is up to date).

    Shards hold ids [rows, length] in uint16 when vocab_size + 1 ids fit (else uint32):
    'wrap' joins the documents, each followed by the separator, and drops the last partial
    row; 'pad' gives each document a row: its tokens (truncated to length), the separator if
    it fits, then the pad id. Returns the output folder.
    """
    with _terminate_as_exit():  # a `kill` cleans up like an error: no partial folder or download left
        return _prepare(cfg, progress)


def _prepare(cfg: DataConfig, progress: bool) -> Path:
    start = time.perf_counter()
    out = Path(cfg.out_dir) / cfg.dataset
    digest = config_hash(cfg)
    if _is_up_to_date(out, cfg, digest):
        if progress:
            _console().print(f"[green]{out} is up to date[/green] (config {digest[:12]})")
        return out
    corpus = load_corpus(cfg, progress)
    tok = load_tokenizer(cfg.tokenizer, corpus.splits["train"], cfg.cache_dir, cfg.allow_network,
                         progress=progress)
    ids = (int(tok.token_to_id(separator_token(cfg.tokenizer))),
           add_pad_token(tok, cfg.tokenizer) if cfg.packing == "pad" else None)
    dtype = token_dtype(tok.get_vocab_size(with_added_tokens=True), cfg.token_dtype)
    with _staging(out) as stage:  # the old dataset stays usable until the new one is complete
        stats = {split: _write_split(stage / f"{split}.bin", split, corpus.splits[split], tok, cfg,
                                     dtype, ids, progress) for split in SPLITS}
        tok_text = tok.to_str(pretty=True)
        (stage / "tokenizer.json").write_text(tok_text, encoding="utf-8")
        inputs = {**corpus.inputs, **tokenizer_inputs(cfg.tokenizer)}
        meta = _build_meta(cfg, tok, ids, dtype, stats, inputs)
        meta["tokenizer_sha256"] = text_sha256(tok_text)  # the shards' identity (esolm.data.identity)
        meta["unigram_ppl"] = unigram_ppl(stage, meta)
        (stage / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    if progress:
        _summary(meta, time.perf_counter() - start)
    return out
