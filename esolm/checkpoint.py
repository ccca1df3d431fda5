"""Model files: the one home of reading, writing and exporting a trained model.

A ``model.ckpt`` holds the format tag, the ModelConfig, the live and EMA weights and the
tokenizer it was trained with (its text and sha256), so it loads from any directory and
re-preparing the data can never swap its vocabulary. Reading a model needs torch and
tokenizers only, never Lightning. ``export`` writes a Hugging Face style folder
(``config.json``, ``model.safetensors``, ``tokenizer.json``, ``README.md`` model card) that
``load`` reads back.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer

from esolm.config import ModelConfig, renamed_family
from esolm.data.tokenizers import read_tokenizer
from esolm.io import atomic_path, atomic_save, safe_load, write_json, write_text_atomic
from esolm.model.backbone import Backbone

MODEL_FORMAT = "esolm-model-v1"
EXPORT_FORMAT = "esolm-export-v1"
AUTHORS_EXPORT_FORMAT = "esolm-export-authors-v1"  # the authors' layout (esolm.published), tagged in config.json


def check_export_folder(out: Path, force: bool = False) -> None:
    """Refuse to write an export into ``out`` when it holds files and is not an esolm export
    (its config.json tagged ``EXPORT_FORMAT`` or ``AUTHORS_EXPORT_FORMAT``), unless ``force``:
    a user's README.md or config.json is never overwritten by accident."""
    if force or not out.is_dir() or not any(out.iterdir()):
        return
    try:
        cfg = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    tags = (cfg.get("format"), (cfg.get("esolm") or {}).get("format") if isinstance(cfg.get("esolm"), dict) else None)
    if EXPORT_FORMAT in tags or AUTHORS_EXPORT_FORMAT in tags:
        return
    raise ValueError(f"{out} is not empty and is not an esolm export: choose another --out, or "
                     "--force to overwrite its files")


def ordinary_modes(folder: Path) -> None:
    """Give the files of an export the modes of ordinary files (0666 less the umask, 0644 usually)."""
    mask = os.umask(0)
    os.umask(mask)
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~mask)


def tokenizer_record(data_dir: Path) -> dict:
    """The tokenizer fields of a model file: its path (for people), text and sha256; the file is
    checked first (it parses and is the one the shards were made with: ``esolm.data.identity``),
    so a corrupt tokenizer is never embedded into a model."""
    from esolm.data.batches import read_meta
    from esolm.data.identity import data_tokenizer

    text, sha = data_tokenizer(data_dir, read_meta(data_dir))
    return {"tokenizer": str(data_dir / "tokenizer.json"), "tokenizer_json": text, "tokenizer_sha256": sha}


def save_model(path: Path, cfg: ModelConfig, weights: dict, ema_weights: dict | None, step: int,
               data_dir: Path | None, *, tokenizer: Tokenizer | None = None, source: dict | None = None) -> None:
    """Write a ``model.ckpt`` (atomically): the format tag, the config, the live and EMA weights,
    the step and the tokenizer of ``data_dir`` (its text and sha256), or ``tokenizer`` itself
    (an imported model, ``source`` saying where it came from). The one writer of the format
    that ``load_run`` reads."""
    if tokenizer is not None:
        text = tokenizer.to_str()
        tok = {"tokenizer": "embedded", "tokenizer_json": text,
               "tokenizer_sha256": hashlib.sha256(text.encode()).hexdigest()}
    else:
        tok = tokenizer_record(Path(data_dir))
    extra = {} if source is None else {"source": source}
    atomic_save({"format": MODEL_FORMAT, "config": cfg.to_dict(), "step": step, "weights": weights,
                 "ema_weights": ema_weights, **tok, "data_dir": str(data_dir), **extra}, path)


def _tokenizer_of(ckpt: dict, path: Path) -> Tokenizer:
    text = ckpt.get("tokenizer_json")
    if text is None:  # files written before the tokenizer was embedded: a path from the run's cwd
        where = Path(ckpt["tokenizer"])
        if not where.is_file():
            raise FileNotFoundError(f"{path} names its tokenizer as {where}, which does not exist "
                                    f"from {Path.cwd()}; run from the project root or retrain")
        return read_tokenizer(where)
    if hashlib.sha256(text.encode()).hexdigest() != ckpt.get("tokenizer_sha256"):
        raise ValueError(f"{path}: the embedded tokenizer does not match its sha256; the file is corrupt")
    return Tokenizer.from_str(text)


def load_run(path: str | os.PathLike, ema: bool = True,
             device: str | torch.device = "cpu") -> tuple[Backbone, Tokenizer]:
    """(model in eval mode, tokenizer) of a ``model.ckpt`` or of a folder written by ``export``;
    EMA weights when present and ``ema``."""
    path = Path(path)
    if path.is_dir():
        return load_exported(path, device)
    ckpt = safe_load(path)
    if ckpt.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not an esolm model file (format {ckpt.get('format')!r}, "
                         f"expected {MODEL_FORMAT!r}); train one with `esolm train`")
    model = Backbone(ModelConfig.from_dict(ckpt["config"]))  # ``variant`` in files before the rename
    weights = ckpt["ema_weights"] if ema and ckpt.get("ema_weights") is not None else ckpt["weights"]
    model.load_state_dict(weights)
    tok = _tokenizer_of(ckpt, path)
    # where the weights came from, for the checks of the stages (esolm.stages.load_variant)
    model.provenance = {"path": str(path), "tokenizer_sha256": ckpt.get("tokenizer_sha256"),
                        "step": ckpt.get("step"), "source": ckpt.get("source")}
    return model.to(device).eval(), tok


def load_model(path: str | os.PathLike, ema: bool = True, device: str | torch.device = "cpu") -> Backbone:
    """The model of a ``model.ckpt`` (EMA weights when present and ``ema``), in eval mode."""
    return load_run(path, ema, device)[0]


def export(path: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> Path:
    """Write the model file ``path`` as a Hugging Face style folder ``out``: config.json,
    model.safetensors (the EMA weights when present), tokenizer.json and a model card with the
    run's metrics (likelihood.json / generation.json / train.json beside the model file).
    A non-empty ``out`` that is not an esolm export is refused unless ``force``."""
    from safetensors.torch import save_file

    path, out = Path(path), Path(out)
    check_export_folder(out, force)
    ckpt = safe_load(path)
    if ckpt.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not an esolm model file; export takes a runs/<variant>/model.ckpt")
    ema = ckpt.get("ema_weights") is not None
    weights = {k: v.contiguous() for k, v in (ckpt["ema_weights"] if ema else ckpt["weights"]).items()}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(weights, str(tmp), metadata={"format": EXPORT_FORMAT})
    write_json(out / "config.json", {"model_type": "esolm", "format": EXPORT_FORMAT,
                                     "weights": "ema" if ema else "live", "step": ckpt.get("step"),
                                     **renamed_family(ckpt["config"])})
    write_text_atomic(out / "tokenizer.json", _tokenizer_of(ckpt, path).to_str(pretty=True))
    write_text_atomic(out / "README.md", model_card(ckpt, path.parent))
    ordinary_modes(out)
    return out


def load_exported(folder: Path, device: str | torch.device = "cpu") -> tuple[Backbone, Tokenizer]:
    """(model, tokenizer) of a folder written by ``export``."""
    from safetensors.torch import load_file

    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: {folder} is not an exported esolm model")
    cfg = json.loads(config.read_text())
    if cfg.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{config} is not an esolm export (format {cfg.get('format')!r})")
    fields = set(ModelConfig.__dataclass_fields__)
    model = Backbone(ModelConfig(**{k: v for k, v in renamed_family(cfg).items() if k in fields}))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.to(device).eval(), read_tokenizer(folder / "tokenizer.json")


def model_card(ckpt: dict, run: Path) -> str:
    """A short README: what the model is, how to load it, and the run's headline metrics."""
    from esolm.results import GenerationResult, LikelihoodResult  # export only: not a dependency of training

    cfg = renamed_family(ckpt["config"])
    lines = [*card_front_matter(ckpt, run), f"# esolm {cfg['family']} (alpha_0 = {cfg['alpha_0']})", "",
             f"An esolm backbone ({cfg['d_model']}d, {cfg['n_layers']} layers, {cfg['n_heads']} heads, "
             f"length {cfg['length']}, vocabulary {cfg['vocab_size']}) trained {ckpt.get('step')} steps.", "",
             "```python", "import esolm", "model, tok = esolm.load('<this folder>')",
             "print(esolm.generate_text(model, tok, prompt='...', num_samples=2))", "```", ""]
    if (run / LikelihoodResult.FILE).exists():
        test = LikelihoodResult.read(run).splits.get("test", {})
        keys = [k for k in ("exact_l2r_ppl", "exact_sampler_ppl", "nelbo_ppl", "iw4_ppl", "bits_per_byte") if k in test]
        lines += ["| test metric | value |", "|---|---|"] + [f"| {k} | {test[k]:.4g} |" for k in keys] + [""]
    if (run / GenerationResult.FILE).exists():
        g = GenerationResult.read(run)
        lines += [f"Sampling: generative perplexity {g.gen_ppl:.4g} under {g.judge}, entropy "
                  f"{g.entropy:.3f}, {g.seconds_per_sample:.4g} s per sample, NFE {g.nfe}.", ""]
    return "\n".join(lines)


def card_front_matter(ckpt: dict, run: Path) -> list[str]:
    """The Hugging Face model card's YAML front matter: license, library, tags, pipeline and,
    when known, the data set, the source of an imported model (``base_model`` for a hub id), the
    variant, the run id (a model file that records one) and the exporting code's git revision."""
    import subprocess

    cfg = renamed_family(ckpt["config"])
    source = ckpt.get("source") or {}
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             timeout=10, cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    lines = ["---", "license: apache-2.0", "library_name: esolm", "pipeline_tag: text-generation",
             "tags:", "- esolm", "- diffusion-language-model", "- masked-diffusion", f"- {cfg['family']}"]
    data = Path(str(ckpt.get("data_dir") or "")).name
    if data and data != "None":
        lines += ["datasets:", f"- {data}"]
    if str(source.get("from", "")).startswith("hf:"):
        lines.append(f"base_model: {source['from'][3:]}")
    for key, value in (("esolm_variant", run.name or None), ("esolm_run_id", ckpt.get("run_id")),
                       ("esolm_source", source.get("from")), ("esolm_git_revision", rev),
                       ("esolm_step", ckpt.get("step"))):
        if value is not None:
            lines.append(f"{key}: {json.dumps(value)}")
    return [*lines, "---", ""]
