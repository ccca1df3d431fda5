"""``esolm params [SECTION]``: every settable key of params.yaml with its value and its doc.

The docs are the ones already in the code, read with ``ast`` (nothing is imported, so listing
the keys costs no torch import): a field's attribute docstring in the section's config class,
else the sentence the class docstring gives it (``name: ...``), then the key's comment in
params.yaml. A field of the class that params.yaml leaves out is listed with the code's default
(``--set`` reaches only keys the file has: add it to the file to change it).
"""

from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass

import yaml

from esolm.codedeps import module_file

# section -> (module, config class, fields that are not keys of that section)
SECTIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "data": ("esolm.data.config", "DataConfig", ()),
    # from the prepared data (vocab_size, length, pad_token_id) or per variant (under variants:)
    "model": ("esolm.config", "ModelConfig", ("family", "vocab_size", "length", "alpha_0", "batch_split",
                                              "block_size", "mask_token_id", "pad_token_id")),
    "variants": ("esolm.config", "ModelConfig", ()),
    "train": ("esolm.train_config", "TrainConfig", ()),
    "evaluate": ("esolm.config", "EvalConfig", ()),
    "sample": ("esolm.config", "SampleConfig", ()),
    "curve": ("esolm.config", "CurveConfig", ()),
    "bench": ("esolm.bench", "BenchConfig", ()),
    "search": ("esolm.search.config", "SearchConfig", ()),
}
VARIANT_KEYS = ("family", "alpha_0", "batch_split", "block_size")  # a variant may also override any model key
OTHER_DOCS = {  # keys no config class holds, where params.yaml has no comment for them
    "preset": "The preset study merged over these sections (a name under presets:; esolm preset NAME "
              "chooses one for DVC).",
    "bench.out": "The bench's rows (JSON); the figure is written beside it (.png).",
    "bench.device": "auto (a GPU when present, else the CPU), cpu, or a CUDA device; --device overrides it.",
    "search.device": "auto (a GPU when present, else the CPU), cpu, or a CUDA device.",
}


@dataclass(frozen=True)
class Field:
    name: str
    default: str
    doc: str


@dataclass(frozen=True)
class Entry:
    key: str
    """The dotted key, as --set and dvc exp run -S spell it."""
    value: str
    """Its value in the params file (after the preset), as YAML; else the code's default."""
    doc: str
    in_file: bool
    """Whether the params file has the key (only then can --set change it)."""


def _source_text(node: ast.expr | None) -> str:
    if node is None:
        return "(required)"
    try:
        return _yaml(ast.literal_eval(node))
    except ValueError:
        return ast.unparse(node)


def _yaml(value: object) -> str:
    """A value as --set takes it (YAML flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _flat(text: str) -> str:
    return " ".join(text.split())


def _class_doc_parts(doc: str, names: list[str]) -> dict[str, str]:
    """The sentence(s) a class docstring gives each field, written ``name: text``."""
    doc = _flat(doc)
    marks = sorted((m.start(), m.end(), m.group(1)) for m in
                   re.finditer(r"(?<![\w.`])(" + "|".join(map(re.escape, names)) + r"):\s", doc))
    out = {}
    for i, (_, end, name) in enumerate(marks):
        stop = marks[i + 1][0] if i + 1 < len(marks) else len(doc)
        out.setdefault(name, doc[end:stop].strip())
    return out


def class_fields(module: str, cls: str) -> list[Field]:
    """The fields of a dataclass (its bases in the same module first) with their defaults and
    docs, from the source."""
    path = module_file(module)
    if path is None:
        raise ValueError(f"{module} is not a module of esolm")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    node = classes[cls]
    fields: list[Field] = []
    for base in node.bases:
        if isinstance(base, ast.Name) and base.id in classes:
            fields += class_fields(module, base.id)
    body = node.body
    own = []
    for i, stmt in enumerate(body):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) \
                and "ClassVar" not in ast.unparse(stmt.annotation):
            nxt = body[i + 1] if i + 1 < len(body) else None
            doc = nxt.value.value if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) \
                and isinstance(nxt.value.value, str) else ""
            own.append((stmt.target.id, _source_text(stmt.value), _flat(doc)))
    parts = _class_doc_parts(ast.get_docstring(node) or "", [n for n, _, _ in own])
    fields = [f for f in fields if f.name not in {n for n, _, _ in own}]
    return fields + [Field(n, d, doc or parts.get(n, "")) for n, d, doc in own]


_KEY = re.compile(r"^(\s*)([A-Za-z_][\w-]*)\s*:(.*)$")


def _comment(rest: str) -> tuple[str, int] | None:
    """The comment of a YAML line's remainder (outside quotes) and its offset in ``rest``."""
    quote = None
    for i, ch in enumerate(rest):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1].isspace()):
            return rest[i + 1:].strip(), i
    return None


def yaml_comments(text: str) -> dict[str, str]:
    """Dotted key -> the comment on its line in a YAML file (and the comment lines right under
    it, aligned with it)."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    last, column = None, -1
    for line in text.splitlines():
        m = _KEY.match(line)
        if m is None:
            stripped = line.lstrip()
            if last and stripped.startswith("#") and len(line) - len(stripped) == column:
                out[last] = (out[last] + " " + stripped[1:].strip()).strip()
            else:
                last = None
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        dotted = ".".join(k for _, k in stack)
        found = _comment(rest)
        if found:
            out[dotted] = found[0]
            last, column = dotted, len(line) - len(rest) + found[1]
        else:
            last = None
    return out


def _expand(key: str, value: object) -> list[tuple[str, object]]:
    """A mapping value as one key per leaf (search.space.steps, judge.model.n_layers)."""
    if isinstance(value, dict) and value:
        return [kv for k, v in value.items() for kv in _expand(f"{key}.{k}", v)]
    return [(key, value)]


def entries(params: dict, params_text: str) -> list[Entry]:
    """Every settable key: the sections' config fields and the params file's other keys."""
    comments = yaml_comments(params_text)
    out: list[Entry] = []

    def add(key: str, value: object, in_file: bool, doc: str = "", parent: str = "") -> None:
        note = comments.get(key) or comments.get(parent, "")
        doc = doc or OTHER_DOCS.get(key, "")
        text = doc if not note or note in doc else (f"{doc} [params.yaml: {note}]" if doc else note)
        out.append(Entry(key, value if isinstance(value, str) and not in_file else _yaml(value), text, in_file))

    if "preset" in params:
        add("preset", params["preset"], True)
    for name, values in params.items():
        if name in ("preset", "presets") or not isinstance(values, dict):
            continue
        fields = class_fields(*SECTIONS[name][:2]) if name in SECTIONS else []
        docs = {f.name: f.doc for f in fields}
        if name == "variants":
            for variant, settings in values.items():
                for key, value in (settings or {}).items():
                    add(f"variants.{variant}.{key}", value, True, docs.get(key, ""))
            continue
        skip = SECTIONS[name][2] if name in SECTIONS else ()
        for f in fields:
            if f.name in skip:
                continue
            if f.name in values:
                for key, value in _expand(f"{name}.{f.name}", values[f.name]):
                    add(key, value, True, f.doc, f"{name}.{f.name}")
            else:
                add(f"{name}.{f.name}", f.default, False, f.doc)
        for key in values:
            if key not in docs:
                for dotted, value in _expand(f"{name}.{key}", values[key]):
                    add(dotted, value, True, OTHER_DOCS.get(f"{name}.{key}", ""), f"{name}.{key}")
    return out


def select(items: list[Entry], prefix: str | None) -> list[Entry]:
    """The entries of a section or under a dotted prefix (``train``, ``search.space``, ``train.lr``);
    an unknown one is an error naming the closest."""
    if not prefix:
        return items
    chosen = [e for e in items if e.key == prefix or e.key.startswith(prefix + ".")]
    if not chosen:
        import difflib

        sections = sorted({e.key.split(".")[0] for e in items})
        close = difflib.get_close_matches(prefix, sections + [e.key for e in items], n=1)
        raise ValueError(f"no parameter {prefix!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                         + f" (sections: {', '.join(sections)})")
    return chosen


def format_entries(items: list[Entry], width: int = 100) -> str:
    """``key = value`` per line, the doc wrapped under it; keys the file lacks say so."""
    lines: list[str] = []
    section, said = None, set()
    for e in items:
        head = e.key.split(".")[0]
        if head != section:
            if section is not None:
                lines.append("")
            section, said = head, set()
        lines.append(f"{e.key} = {e.value}" + ("" if e.in_file else "   (code default; not in the params "
                                                                    "file: add it there to change it)"))
        if e.doc and e.doc not in said:  # a doc shared by several keys (search.space.*, variants) once
            said.add(e.doc)
            lines += textwrap.wrap(e.doc, width=max(40, width), initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines)
