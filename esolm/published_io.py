"""Reading and writing the authors' published checkpoints (``esolm import``, ``esolm export
--layout authors``, ``esolm.load('hf:...')``); the layout itself is ``esolm.published``.

Sources: a Hugging Face folder (``config.json`` + ``model.safetensors``, keys
``backbone.<DiT name>``), a hub id ``hf:owner/name`` (``huggingface_hub.snapshot_download``
of those files only; offline, a cached copy or an error saying to give a local folder), or
an authors' Lightning ``.ckpt`` read by ``esolm.safe_pickle`` (EMA weights by default, the
raw ``state_dict`` with ``raw=True``). No code from a checkpoint or a hub repository is ever
run (no ``trust_remote_code``, no unrestricted unpickling).

Tokenizers: the model file embeds one. ``tokenizer=None`` takes the folder's
``tokenizer.json``, else GPT-2 (``gpt2``, as every published model) when the vocabulary is
GPT-2's 50257 tokens, else ``chars``: a placeholder character-level tokenizer of exactly the
model's vocabulary (id 0 ``<|endoftext|>``, the last real id ``<unk>``) for toy models such
as the test fixtures. Any tokenizer name of ``esolm.data.tokenizers`` works too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from esolm.checkpoint import AUTHORS_EXPORT_FORMAT, check_export_folder, model_card, ordinary_modes, save_model
from esolm.config import ModelConfig
from esolm.families import family as family_record
from esolm.io import atomic_path, safe_load, write_json, write_text_atomic
from esolm.model.backbone import Backbone
from esolm.published import (
    ESO_ATTENTION,
    MODEL_TYPES,
    alpha_from_name,
    ema_to_dit,
    export_config,
    has_adaln,
    strip,
    to_dit,
    to_esolm,
    width,
)

GPT2_VOCAB = 50257
CHARS = " etaoinshrdlcumwfgypbvkjxqz.,'\"-:;!?()0123456789\n"
HUB_FILES = ["config.json", "*.safetensors", "tokenizer.json", "README.md"]


@dataclass
class Imported:
    """A published checkpoint read into our layout: config, weights (and EMA), where from."""

    config: ModelConfig
    weights: dict
    ema_weights: dict | None
    source: dict
    folder: Path | None = None
    tokenizer_hint: str | None = None
    skipped: list[str] = field(default_factory=list)


def fetch_hub(source: str) -> Path:
    """The local folder of hub id ``hf:owner/name`` (config, safetensors, tokenizer, card only)."""
    repo = source[3:]
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, allow_patterns=HUB_FILES))
    except Exception as err:  # offline, unknown repo, no network: one line
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false")
        hint = ("HF_HUB_OFFLINE is set and no copy is cached: download the folder where there is network "
                "(huggingface-cli download " + repo + ") and import that folder" if offline else
                "check the name and the network, or import a local folder")
        raise RuntimeError(f"cannot fetch {source} from the Hugging Face hub ({type(err).__name__}); {hint}") from None


def _config(family: str, hf_like: dict, rows: int, mlp_rows: int, overrides: dict) -> ModelConfig:
    d = width(hf_like)
    mask = int(hf_like.get("mask_index", rows - 1))
    values = {"family": family, "vocab_size": rows - 1 if mask == rows - 1 else rows, "mask_token_id": mask,
              "length": int(hf_like["model_length"]), "n_layers": int(hf_like["n_blocks"]), "d_model": d,
              "n_heads": int(hf_like["n_heads"]), "cond_dim": int(hf_like["cond_dim"]),
              "dropout": float(hf_like.get("dropout", 0.1)), "mlp_ratio": mlp_rows // d}
    if "block_size" in hf_like:
        values["block_size"] = int(hf_like["block_size"])
    values.update({k: v for k, v in overrides.items() if v is not None})
    if family_record(family).fixed_alpha_0 is not None:
        values.pop("alpha_0", None)  # implied by the family
    return ModelConfig(**values)


def _family(kind: str, dit: dict, given: str | None, attn_mode: str | None = None) -> str:
    if given:
        return given
    from esolm.families import FAMILIES

    if not has_adaln(dit):  # the AR baseline: causal blocks without adaLN
        return next(f.name for f in FAMILIES.values() if f.autoregressive)
    if kind == "esolm" and attn_mode is not None:
        if attn_mode not in ESO_ATTENTION:
            raise ValueError(f"Eso-LM with diffusion_attn_mode={attn_mode!r} has no family here: give --family")
        return ESO_ATTENTION[attn_mode]
    if kind not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {kind!r}: give --family (one of ar, mdlm, bd3lm, eso_a, eso_b)")
    return MODEL_TYPES[kind]


def read_folder(folder: Path, family: str | None = None, alpha_0: float | None = None,
                batch_split: float | None = None, name: str | None = None) -> Imported:
    """A Hugging Face folder in the authors' layout (safetensors only)."""
    from safetensors.torch import load_file

    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: {folder} is not a Hugging Face model folder")
    hf = json.loads(config.read_text())
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} has no .safetensors file: only safetensors are read from folders")
    state: dict = {}
    for f in files:
        state.update(load_file(str(f)))
    dit = strip(state)
    tag = hf.get("esolm") if isinstance(hf.get("esolm"), dict) else {}
    fam = _family(str(hf.get("model_type", "")).lower(), dit, family or tag.get("family"))
    alpha = alpha_0 if alpha_0 is not None else tag.get("alpha_0", alpha_from_name(name or folder.name))
    if alpha is None and family_record(fam).fixed_alpha_0 is None:
        print(f"esolm import: {name or folder} does not say its alpha_0: the family default "
              f"{family_record(fam).default_alpha_0} (give --alpha-0)")
    cfg = _config(fam, hf, dit["vocab_embed.embedding"].shape[0], dit["blocks.0.mlp.0.weight"].shape[0],
                  {"alpha_0": alpha, "batch_split": batch_split if batch_split is not None else tag.get("batch_split")})
    weights, skipped = to_esolm(dit, cfg)
    return Imported(cfg, weights, None, {"from": name or str(folder), "layout": "hf"}, folder, None, skipped)


def read_lightning(path: Path, family: str | None = None, alpha_0: float | None = None,
                   batch_split: float | None = None, raw: bool = False) -> Imported:
    """An authors' Lightning file, read by the restricted unpickler: the raw weights and
    (unless ``raw``) the EMA weights, the config from its pickled hyper-parameters."""
    from esolm.safe_pickle import plain, restricted_load

    ckpt = restricted_load(path)
    hp = plain(ckpt.get("hyper_parameters") or {})
    conf = hp.get("config") or {}
    model, algo = conf.get("model") or {}, conf.get("algo") or {}
    if "state_dict" not in ckpt:
        raise ValueError(f"{path} has no state_dict: not a Lightning checkpoint")
    dit = strip(ckpt["state_dict"])
    if not dit:
        raise ValueError(f"{path}: its state_dict has no backbone.* weights")
    causal = bool(algo.get("causal_attention")) and not has_adaln(dit)
    fam = _family("ar" if causal else str(algo.get("name", "")).lower(), dit, family,
                  algo.get("diffusion_attn_mode"))
    hf_like = {"hidden_size": model.get("hidden_size"), "model_length": model.get("length"),
               "dropout": model.get("dropout", 0.1), **{k: model.get(k) for k in ("n_blocks", "n_heads", "cond_dim")}}
    if "block_size" in conf:
        hf_like["block_size"] = conf["block_size"]
    if any(v is None for v in hf_like.values()):
        raise ValueError(f"{path}: hyper_parameters.config.model lacks {[k for k, v in hf_like.items() if v is None]}")
    cfg = _config(fam, hf_like, dit["vocab_embed.embedding"].shape[0], dit["blocks.0.mlp.0.weight"].shape[0],
                  {"alpha_0": alpha_0 if alpha_0 is not None else algo.get("alpha_0"),
                   "batch_split": batch_split if batch_split is not None else algo.get("batch_split")})
    weights, skipped = to_esolm(dit, cfg)
    ema = None
    shadow = (ckpt.get("ema") or {}).get("shadow_params") if isinstance(ckpt.get("ema"), dict) else None
    if not raw and shadow is not None:
        ema, _ = to_esolm({**dit, **ema_to_dit(shadow, dit, cfg.n_layers)}, cfg)
    hint = (conf.get("data") or {}).get("tokenizer_name_or_path")
    source = {"from": str(path), "layout": "lightning", "weights": "raw" if raw or ema is None else "ema",
              "step": ckpt.get("global_step")}
    return Imported(cfg, weights, ema, source, None, hint, skipped)


def read_source(source: str | os.PathLike, family: str | None = None, alpha_0: float | None = None,
                batch_split: float | None = None, raw: bool = False) -> Imported:
    """Any published source: ``hf:owner/name``, a folder, or a Lightning ``.ckpt``."""
    text = str(source)
    if text.startswith("hf:"):
        return read_folder(fetch_hub(text), family, alpha_0, batch_split, name=text)
    path = Path(text)
    if path.is_dir():
        return read_folder(path, family, alpha_0, batch_split)
    return read_lightning(path, family, alpha_0, batch_split, raw)


def chars_tokenizer(vocab_size: int) -> Tokenizer:
    """A placeholder character-level tokenizer of exactly ``vocab_size`` ids (toy models)."""
    if vocab_size < 3:
        raise ValueError("a chars tokenizer needs a vocabulary of at least 3 tokens")
    chars = list(dict.fromkeys(CHARS + "".join(chr(i) for i in range(0x21, 0x2500))))[: vocab_size - 2]
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(chars)}, "<unk>": vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<|endoftext|>"])
    return tok


def choose_tokenizer(name: str | None, imported: Imported, cache_dir: str | Path = "data/raw") -> Tokenizer:
    """The tokenizer to embed (module doc); its vocabulary must fit the model's."""
    from esolm.data.tokenizers import load_tokenizer

    vocab = imported.config.vocab_size
    folder_tok = None if imported.folder is None else imported.folder / "tokenizer.json"
    if name is None:
        if folder_tok is not None and folder_tok.is_file():
            name = f"file:{folder_tok}"
        else:
            name = "gpt2" if vocab == GPT2_VOCAB else "chars"
            print(f"esolm import: tokenizer {name!r} (give --tokenizer to choose another)")
    tok = chars_tokenizer(vocab) if name == "chars" else load_tokenizer(name, cache_dir=cache_dir)
    if tok.get_vocab_size() > vocab:
        raise ValueError(f"tokenizer {name!r} has {tok.get_vocab_size()} tokens but the model only {vocab}")
    return tok


def import_model(source: str | os.PathLike, out: str | os.PathLike, *, family: str | None = None,
                 alpha_0: float | None = None, batch_split: float | None = None, raw: bool = False,
                 tokenizer: str | None = None) -> Path:
    """Write ``out`` (a ``model.ckpt``) from a published source, through ``save_model``."""
    imp = read_source(source, family, alpha_0, batch_split, raw)
    tok = choose_tokenizer(tokenizer, imp)
    Backbone(imp.config).load_state_dict(imp.weights)  # every name and shape checked before writing
    out = Path(out)
    save_model(out, imp.config, imp.weights, imp.ema_weights, int(imp.source.get("step") or 0), None,
               tokenizer=tok, source={**imp.source, "skipped": imp.skipped})
    return out


def load_published(source: str | os.PathLike, device: str | torch.device = "cpu", ema: bool = True,
                   tokenizer: str | None = None) -> tuple[Backbone, Tokenizer]:
    """(model in eval mode, tokenizer) of a published source, in memory (``esolm.load``)."""
    imp = read_source(source, raw=not ema)
    model = Backbone(imp.config)
    model.load_state_dict(imp.ema_weights if ema and imp.ema_weights is not None else imp.weights)
    return model.to(device).eval(), choose_tokenizer(tokenizer, imp)


def is_published(path: str | os.PathLike) -> bool:
    """Whether ``esolm.load`` should read ``path`` as a published source: a hub id, or a folder
    whose config.json is in the authors' layout (their model_type or config keys); any other
    folder goes to ``checkpoint.load_run`` (an esolm export, or its error)."""
    text = str(path)
    if text.startswith("hf:"):
        return True
    config = Path(text) / "config.json"
    if not config.is_file():
        return False
    cfg = json.loads(config.read_text())
    tag = cfg.get("esolm") if isinstance(cfg.get("esolm"), dict) else {}
    if str(cfg.get("format", "")).startswith("esolm-export"):  # our own export (model_type esolm)
        return False
    return (str(cfg.get("model_type", "")).lower() in MODEL_TYPES or tag.get("format") == AUTHORS_EXPORT_FORMAT
            or {"n_blocks", "model_length"} <= set(cfg))


def export_authors(path: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> Path:
    """Write the model file ``path`` as a folder in the authors' layout (their names and config
    keys; the EMA weights when present), with tokenizer.json and a model card."""
    from safetensors.torch import save_file

    from esolm.checkpoint import _tokenizer_of

    path, out = Path(path), Path(out)
    check_export_folder(out, force)
    ckpt = safe_load(path)
    cfg = ModelConfig.from_dict(ckpt["config"])
    weights = ckpt["ema_weights"] if ckpt.get("ema_weights") is not None else ckpt["weights"]
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(to_dit(weights, cfg), str(tmp), metadata={"format": "pt"})
    write_json(out / "config.json", export_config(cfg, AUTHORS_EXPORT_FORMAT))
    write_text_atomic(out / "tokenizer.json", _tokenizer_of(ckpt, path).to_str(pretty=True))
    write_text_atomic(out / "README.md", model_card(ckpt, path.parent))
    ordinary_modes(out)
    return out
