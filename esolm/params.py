"""params.yaml: load it, apply ``--set dotted.key=value`` overrides, reject unknown keys."""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, plus YAML 1.2 floats: ``1e-3`` and ``3E+4`` are numbers
    (PyYAML reads a float without a dot as a string, so ``lr: 1e-3`` silently became text)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def yaml_load(text: str) -> Any:
    """Parse YAML text with the loader above (the one parser of params and overrides)."""
    return yaml.load(text, Loader=_Loader)


SECTIONS = ("preset", "presets", "data", "model", "variants", "train", "evaluate", "judge", "sample",
            "curve", "bench", "search")
"""The top-level keys a params file may hold (every one but ``preset`` a mapping)."""


def _yaml_problem(err: yaml.YAMLError) -> tuple[str, str, bool]:
    """(where: "line N", what is wrong, whether it is a refused tag) of a YAML error: a tag such
    as ``!!python/object/apply:...`` is refused by the safe loader, never constructed."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}" if mark is not None else ""
    if isinstance(err, yaml.reader.ReaderError):
        code = ord(err.character) if isinstance(err.character, str) else int(err.character)
        return "", f"it holds the character 0x{code:02x} at offset {err.position}, not text", False
    problem = " ".join(str(getattr(err, "problem", None) or err).split())
    tag = re.search(r"the tag '([^']*)'", problem)
    if isinstance(err, yaml.constructor.ConstructorError) and tag:
        name = tag.group(1).replace("tag:yaml.org,2002:", "!!")
        return where, (f"the tag {name} is refused (values are plain YAML, read and never executed): "
                       "remove the tag"), True
    return where, problem, False


def _closest(key: str, options: list[str], noun: str = "valid keys") -> str:
    """'; did you mean X?' for a near miss, else the list of ``noun`` there are."""
    match = difflib.get_close_matches(key, options, n=1)
    return f"; did you mean {match[0]!r}?" if match else f"; {noun}: {sorted(options)}"


def parse_set(item: str) -> tuple[list[str], Any]:
    """'a.b=3' -> (['a', 'b'], 3); values are YAML (numbers, lists, booleans, strings)."""
    if "=" not in item:
        raise ValueError(f"--set {item!r} must look like dotted.key=value")
    key, raw = item.split("=", 1)
    try:
        return key.strip().split("."), yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        _, problem, tag = _yaml_problem(err)
        raise ValueError(f"--set {item}: {problem}" if tag else f"--set {item}: {raw.strip()!r} is not "
                         f"a YAML value ({problem}); quote a text value: --set '{key}=\"...\"'") from None


def apply_sets(params: dict, sets: list[str]) -> dict:
    """Override existing keys only: an unknown key is an error naming the closest valid one."""
    for item in sets:
        path, value = parse_set(item)
        node = params
        for depth, part in enumerate(path):
            if not isinstance(node, dict) or part not in node:
                where = ".".join(path[:depth]) or "the top level"
                options = list(node) if isinstance(node, dict) else []
                raise ValueError(f"unknown parameter {'.'.join(path)!r} (no {part!r} under {where})"
                                 + _closest(part, options))
            if depth == len(path) - 1:
                if isinstance(node[part], dict) and not isinstance(value, dict):
                    what = f"section {part!r}" if depth == 0 else f"mapping {'.'.join(path)!r}"
                    example = next(iter(node[part]), "KEY")
                    raise ValueError(f"--set {item} would replace the {what} by {value!r}: set one of "
                                     f"its keys, --set {'.'.join(path)}.KEY=VALUE (e.g. "
                                     f"{'.'.join(path)}.{example}=...)")
                node[part] = value
            else:
                node = node[part]
    return params


def merge(base: dict, over: dict) -> dict:
    """Deep merge: values of ``over`` replace those of ``base``; unknown keys are errors."""
    for key, value in over.items():
        if key not in base:
            raise ValueError(f"preset key {key!r} is not a parameter" + _closest(key, list(base)))
        if isinstance(value, dict) and isinstance(base[key], dict) and key != "variants":
            merge(base[key], value)
        else:
            base[key] = value
    return base


def load_params(path: str | Path = "params.yaml", sets: list[str] | None = None) -> dict:
    """params.yaml, then the chosen preset merged over its sections, then the --set overrides
    (a --set of ``preset`` itself is applied first)."""
    path = Path(path)
    params = read_params_file(path)
    sets = list(sets or [])
    apply_sets(params, [s for s in sets if s.split("=", 1)[0].strip() == "preset"])
    name = params.get("preset")
    if name is not None:
        presets = params.get("presets", {})
        if name not in presets:
            raise ValueError(f"preset {name!r} is not defined" + _closest(name, list(presets)))
        merge(params, presets[name] or {})
    params = apply_sets(params, [s for s in sets if s.split("=", 1)[0].strip() != "preset"])
    check_sections(params, path)
    check_names(params.get("variants") or {})
    check_search_variant(params)
    check_judge_names(params)
    return params


def read_params_file(path: Path) -> dict:
    """The mapping a params file holds; a folder, a binary or empty file, a YAML error (with its
    line) or an unknown section (with the closest name) is one line naming the file and the fix."""
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a parameter file: pass the file, e.g. "
                         f"--params {path / 'params.yaml'}")
    if not path.exists():
        raise FileNotFoundError(f"parameter file {path} does not exist; run from the project root "
                                "or pass --params PATH")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                         f"{err.start}): pass a YAML params file (--params PATH), e.g. the "
                         "project's params.yaml") from None
    try:
        params = yaml_load(text)
    except yaml.YAMLError as err:
        where, problem, tag = _yaml_problem(err)
        raise ValueError(f"{path} {where}: {problem}" if tag else f"{path} is not valid YAML"
                         f"{' at ' + where if where else ''}: {problem}; fix it or pass --params PATH") from None
    if params is None:
        raise ValueError(f"{path} is empty: it must hold the sections of the study (data:, model:, "
                         "train:, ...); restore it (git checkout params.yaml) or pass --params PATH")
    if not isinstance(params, dict):
        raise ValueError(  # noqa: TRY004 - a bad file, reported like the others
            f"{path} must hold a mapping of sections (data:, model:, train:, ...), "
            f"not a {type(params).__name__}: pass a params file (--params PATH)")
    for key in params:
        if key not in SECTIONS:
            raise ValueError(f"{path}: unknown section {key!r}" + _closest(str(key), list(SECTIONS), "sections")
                             + " (rename or remove it)")
    return params


def check_sections(params: dict, path: Path | str = "params.yaml") -> None:
    """Every section but ``preset`` is a mapping (an empty one is read as {})."""
    for key in SECTIONS[1:]:
        if params.get(key, {}) is None:
            params[key] = {}
        elif not isinstance(params.get(key, {}), dict):
            raise ValueError(f"{path}: section {key!r} must be a mapping of its settings "
                             f"({key}: {{key: value, ...}}), not the {type(params[key]).__name__} "
                             f"{params[key]!r}")


def choose_preset(text: str, name: str) -> str:
    """The text of a params file with ``preset: name`` chosen, for DVC. The ``esolm`` verbs merge
    a preset's sections themselves, but ``dvc.yaml`` expands one stage per name of the top-level
    ``variants:`` block, so a preset that sets its own variants has them copied into that block
    here. Everything else in the file (comments included) is kept."""
    params = yaml_load(text) or {}
    presets = params.get("presets") or {}
    if name not in presets:
        raise ValueError(f"preset {name!r} is not defined" + _closest(name, list(presets)))
    lines = text.splitlines(keepends=True)
    at = [i for i, line in enumerate(lines) if re.match(r"preset\s*:", line)]
    if not at:
        raise ValueError("the params file has no top-level `preset:` line to set")
    lines[at[0]] = f"preset: {name}\n"
    variants = (presets[name] or {}).get("variants")
    if variants is not None:
        check_names(variants)
        start = next((i for i, line in enumerate(lines) if re.match(r"variants\s*:", line)), None)
        if start is None:
            raise ValueError("the params file has no top-level `variants:` block to replace")
        end = next((i for i in range(start + 1, len(lines)) if re.match(r"[A-Za-z_]", lines[i])), len(lines))
        while end > start + 1 and not lines[end - 1].strip():
            end -= 1  # keep the blank lines before the next section
        body = yaml.safe_dump(variants, sort_keys=False, default_flow_style=False)
        block = [f"variants:                      # copied from preset {name} (esolm preset)\n"]
        block += ["  " + line + "\n" for line in body.splitlines()]
        lines[start:end] = block
    return "".join(lines)


VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
NAME_RULE = "use letters, digits, '_' and '-', starting with a letter or digit, at most 64 characters"


def _shown(name: Any) -> str:
    """``repr(name)``, cut short for a very long one."""
    return repr(name) if len(repr(name)) <= 70 else f"{repr(name)[:40]}... ({len(name)} characters)"


def check_name(name: Any, what: str) -> None:
    """A run folder name (a variant, the judge): it becomes a folder and a word of DVC stage
    commands, so letters, digits, ``_`` and ``-`` only (no ``/``, ``..``, ``;``, quote or space),
    at most 64 characters (a ``.`` would also split DVC's dotted ``variants.<name>`` params)."""
    if not isinstance(name, str) or not VARIANT_NAME.fullmatch(name):
        raise ValueError(f"{what} is invalid: {NAME_RULE} (rename it in params.yaml)")


def check_names(variants: dict) -> None:
    """Variant names become folders and words of DVC stage commands (``check_name``)."""
    for name in variants:
        check_name(name, f"variant name {_shown(name)}")


def check_judge_names(params: dict) -> None:
    """``judge.name`` (the judge stage's run folder) and ``sample.judge`` (a run folder, or
    ``hf:<name>``) follow the rule of variant names: ``../../x`` would write or read a model
    outside the project."""
    judge = params.get("judge") or {}
    if "name" in judge:
        check_name(judge["name"], f"judge.name={_shown(judge['name'])}")
    chosen = (params.get("sample") or {}).get("judge")
    if chosen is not None and not (isinstance(chosen, str) and chosen.startswith("hf:")):
        check_name(chosen, f"sample.judge={_shown(chosen)} (a run folder name, or hf:<name>)")


def check_search_variant(params: dict) -> None:
    """``search.variant`` is one of ``variants:`` (the search stage reads its trained model): a
    variant removed from the study while the search still names it fails here, not after the
    trainings."""
    variants = params.get("variants") or {}
    chosen = (params.get("search") or {}).get("variant")
    if variants and chosen is not None and chosen not in variants:
        raise ValueError(f"search.variant={chosen!r} is not a variant of this study"
                         + _closest(str(chosen), list(variants), "variants")
                         + " (set search.variant to one of them)")


def check_variant(params: dict, name: str, also: tuple[str, ...] = ()) -> None:
    """``name`` is a variant of ``variants:`` (or one of ``also``, e.g. run folders with a model
    file); else one line naming the closest and every valid name."""
    variants = list(params.get("variants") or {})
    if name in variants or name in also:
        return
    others = [n for n in also if n not in variants]
    match = difflib.get_close_matches(name, variants + others, n=1)
    raise ValueError(f"unknown variant {name!r}" + (f" (did you mean {match[0]!r}?)" if match else "")
                     + f"; the variants are: {', '.join(variants) or 'none (variants: is empty)'}"
                     + (f"; other run folders with a model file: {', '.join(others)}" if others else ""))


def section(params: dict, name: str) -> dict:
    if name not in params:
        raise ValueError(f"{name!r} section missing from params" + _closest(name, list(params)))
    return params[name]


def build(cls: type, values: dict, where: str) -> Any:
    """A frozen config dataclass from a params section; unknown keys name the closest one."""
    from dataclasses import fields

    names = [f.name for f in fields(cls)]
    for key in values:
        if key not in names:
            raise ValueError(f"unknown parameter {where}.{key}" + _closest(key, names))
    types = {f.name: str(f.type) for f in fields(cls)}
    values = {k: _typed(f"{where}.{k}", types[k], tuple(v) if isinstance(v, list) else v)
              for k, v in values.items()}
    return cls(**values)


_SCALARS = ("bool", "int", "float", "str", "None")


def _typed(name: str, annotation: str, value: Any) -> Any:
    """``value`` checked against a field's annotation (numbers given as text are parsed; an int
    is a valid float); a mismatch is an error naming the key, before any file is touched."""
    kinds = [a.strip() for a in annotation.split("|")]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    for kind in kinds:
        if kind not in _SCALARS:
            return value  # tuples and the like: the dataclass validates them
        if (kind == "None" and value is None) or (kind == "bool" and isinstance(value, bool)) \
                or (kind == "int" and number and isinstance(value, int)) \
                or (kind == "str" and isinstance(value, str)):
            return value
        if kind == "float" and number:
            return float(value)
    if "float" in kinds and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if "str" in kinds and number:
        return str(value)  # e.g. precision: 32
    raise ValueError(f"{name}={value!r} is not a {annotation}: write a plain {kinds[0]} value")


def params_hash(params: dict) -> str:
    """sha256 of the params as sorted JSON: the second half of a run id (``store.run_id``)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()


NOT_A_MODEL_SETTING = ("steps", "log_every", "val_every", "val_batches", "ckpt_every",
                       # how the global batch is spread over processes: the same rows, draws and losses
                       "devices", "num_nodes", "micro_batch_size", "strategy", "accelerator")
"""``train:`` keys that do not change what a model is (raising ``steps`` continues a run;
logging; the spread over devices): left out of the training fingerprint (``esolm.training``) and
of the report's "trained with other settings" check (``esolm.report_results``)."""
