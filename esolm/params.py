"""params.yaml: load it, apply ``--set dotted.key=value`` overrides, reject unknown keys."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml


def _closest(key: str, options: list[str]) -> str:
    match = difflib.get_close_matches(key, options, n=1)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {sorted(options)}"


def parse_set(item: str) -> tuple[list[str], Any]:
    """'a.b=3' -> (['a', 'b'], 3); values are YAML (numbers, lists, booleans, strings)."""
    if "=" not in item:
        raise ValueError(f"--set {item!r} must look like dotted.key=value")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


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
    params = yaml.safe_load(path.read_text()) or {}
    sets = list(sets or [])
    apply_sets(params, [s for s in sets if s.split("=", 1)[0].strip() == "preset"])
    name = params.get("preset")
    if name is not None:
        presets = params.get("presets", {})
        if name not in presets:
            raise ValueError(f"preset {name!r} is not defined" + _closest(name, list(presets)))
        merge(params, presets[name] or {})
    return apply_sets(params, [s for s in sets if s.split("=", 1)[0].strip() != "preset"])


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
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**values)
