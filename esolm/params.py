"""params.yaml: load it, apply ``--set dotted.key=value`` overrides, reject unknown keys."""

from __future__ import annotations

import difflib
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


def _closest(key: str, options: list[str], noun: str = "valid keys") -> str:
    """'; did you mean X?' for a near miss, else the list of ``noun`` there are."""
    match = difflib.get_close_matches(key, options, n=1)
    return f"; did you mean {match[0]!r}?" if match else f"; {noun}: {sorted(options)}"


def parse_set(item: str) -> tuple[list[str], Any]:
    """'a.b=3' -> (['a', 'b'], 3); values are YAML (numbers, lists, booleans, strings)."""
    if "=" not in item:
        raise ValueError(f"--set {item!r} must look like dotted.key=value")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml_load(raw) if raw.strip() else ""


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
    if not path.exists():
        raise FileNotFoundError(f"parameter file {path} does not exist; run from the project root "
                                "or pass --params PATH")
    try:
        params = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}".replace("\n", " ")) from err
    if not isinstance(params, dict):
        raise ValueError(  # noqa: TRY004 - a bad file, reported like the others
            f"{path} must hold a mapping of sections (data:, model:, train:, ...), "
            f"not a {type(params).__name__}")
    sets = list(sets or [])
    apply_sets(params, [s for s in sets if s.split("=", 1)[0].strip() == "preset"])
    name = params.get("preset")
    if name is not None:
        presets = params.get("presets", {})
        if name not in presets:
            raise ValueError(f"preset {name!r} is not defined" + _closest(name, list(presets)))
        merge(params, presets[name] or {})
    params = apply_sets(params, [s for s in sets if s.split("=", 1)[0].strip() != "preset"])
    check_names(params.get("variants") or {})
    check_search_variant(params)
    return params


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


VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def check_names(variants: dict) -> None:
    """Variant names become folders and words of DVC stage commands: letters, digits, ``_``
    and ``-`` only (a ``;`` would run a shell command through dvc.yaml)."""
    for name in variants:
        if not isinstance(name, str) or not VARIANT_NAME.fullmatch(name):
            raise ValueError(f"variant name {name!r} is invalid: use letters, digits, '_' and '-' "
                             "(starting with a letter or digit)")


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
