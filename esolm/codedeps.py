"""The source files a command runs: one answer for DVC's ``deps`` and the training fingerprint.

``code_files("esolm.cli:cmd_train")`` follows imports from one function: the imports inside
it, the functions and tables of its module that it uses, and the module-level code of every
module imported on the way; an imported function is followed the same way, a module
imported whole counts with all it imports (an over-approximation: reached is not run).
``tests/test_dvc_deps.py`` checks that each stage of ``dvc.yaml`` lists (a folder of) every
file its ``esolm`` verb runs.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parent  # the esolm package


def module_file(module: str) -> Path | None:
    """The file of an ``esolm`` module (a package's ``__init__.py``), or None if not ours."""
    if module != "esolm" and not module.startswith("esolm."):
        return None
    parts = module.split(".")[1:]
    base = ROOT.joinpath(*parts)
    if base.is_dir():
        return base / "__init__.py"
    path = base.with_suffix(".py")
    return path if path.exists() else None


Entry = tuple[str, str | None]  # (module, function name, "" for top level only, None for all of it)


def _defs(tree: ast.Module) -> dict[str, ast.AST]:
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}


def _graph(tree: ast.Module) -> dict[str, ast.AST]:
    """Functions, classes and module-level assignments by name (a table of functions such as
    ``VERBS`` or ``FIGURES`` leads to every function it names)."""
    out = dict(_defs(tree))
    for n in tree.body:
        targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AnnAssign) else []
        out.update({t.id: n for t in targets if isinstance(t, ast.Name)})
    return out


def _entries(nodes: list[ast.AST], package: str) -> set[Entry]:
    """What these nodes import: ``from esolm.x import f`` gives (esolm.x, f) when f is a function
    or class of esolm.x, (esolm.x.f, None) when f is a submodule, else (esolm.x, None)."""
    out: set[Entry] = set()
    for node in nodes:
        for n in _walk(node):
            if isinstance(n, ast.Import):
                out |= {(a.name, None) for a in n.names if module_file(a.name)}
            elif isinstance(n, ast.ImportFrom):
                mod = n.module or ""
                if n.level:  # relative import
                    base = package.split(".")[: len(package.split(".")) - n.level + 1]
                    mod = ".".join(base + ([mod] if mod else []))
                path = module_file(mod)
                if path is None:
                    continue
                defs = _defs(_tree(path))
                for a in n.names:
                    if module_file(f"{mod}.{a.name}"):
                        out.add((f"{mod}.{a.name}", None))
                    elif a.name in defs:
                        out.add((mod, a.name))
                    else:
                        out.add((mod, None))
    return out


def _walk(node: ast.AST):
    """ast.walk without ``if TYPE_CHECKING:`` blocks (imports for type checkers only)."""
    todo = [node]
    while todo:
        n = todo.pop()
        if isinstance(n, ast.If) and isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING":
            todo += n.orelse
            continue
        yield n
        todo += list(ast.iter_child_nodes(n))


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _called(defs: dict[str, ast.AST], name: str) -> set[str]:
    """``name`` and the functions and classes of the same module it uses, transitively."""
    todo, done = [name], set()
    while todo:
        n = todo.pop()
        if n not in done:
            done.add(n)
            todo += [x.id for x in ast.walk(defs[n]) if isinstance(x, ast.Name) and x.id in defs]
    return done


def _closure(entry: Entry, seen: set[Entry], files: set[Path]) -> None:
    if entry in seen:
        return
    seen.add(entry)
    module, func = entry
    path = module_file(module)
    files.add(path)
    parts = module.split(".")
    for i in range(1, len(parts)):  # importing esolm.a.b runs esolm/__init__ and esolm/a/__init__
        _closure((".".join(parts[:i]), ""), seen, files)
    tree = _tree(path)
    defs = _defs(tree)
    nodes: list[ast.AST] = [n for n in tree.body if not isinstance(n, ast.FunctionDef | ast.ClassDef)]
    if func is None:
        nodes += list(defs.values())
    elif func:
        graph = _graph(tree)
        nodes += [graph[n] for n in _called(graph, func)]
    for dep in _entries(nodes, _package_of(module, path)):
        _closure(dep, seen, files)


def code_files(entry: str) -> list[Path]:
    """Every esolm source file that ``module:function`` can run (module-level code of every
    module it imports included), sorted."""
    module, _, func = entry.partition(":")
    path = module_file(module)
    if path is None or func not in _defs(_tree(path)):
        raise ValueError(f"{entry!r} is not an esolm module:function")
    files: set[Path] = set()
    _closure((module, func), set(), files)
    return sorted(files)


def relative(paths: list[Path], root: Path = ROOT.parent) -> list[str]:
    return [p.relative_to(root).as_posix() for p in paths]


# each DVC stage -> the functions its command runs (cli verb and the library function behind it)
STAGES: dict[str, tuple[str, ...]] = {
    "prepare": ("esolm.cli:cmd_prepare",),
    "judge": ("esolm.cli:cmd_judge",),
    "train": ("esolm.cli:cmd_train",),
    "evaluate": ("esolm.cli:cmd_evaluate",),
    "sample": ("esolm.cli:cmd_sample",),
    "curve": ("esolm.cli:cmd_curve",),
    "bench": ("esolm.cli:cmd_bench",),
    "search": ("esolm.cli:cmd_search",),
    "report": ("esolm.cli:cmd_report",),
}


def stage_code(stage: str) -> list[str]:
    """Repository-relative source files of a DVC stage's command (``esolm.cli`` itself, its
    module-level imports and the verb's function; ``main`` only dispatches to it)."""
    files: set[Path] = set()
    for entry in STAGES[stage]:
        files |= set(code_files(entry))
    return relative(sorted(files))


def compact(files: list[str]) -> list[str]:
    """Files as DVC deps: a package folder whose every module is listed stands for them all."""
    out, folders = [], {}
    for f in files:
        folders.setdefault(f.rpartition("/")[0], []).append(f)
    for folder, listed in sorted(folders.items()):
        whole = sorted(p.relative_to(ROOT.parent).as_posix() for p in (ROOT.parent / folder).glob("*.py"))
        out += [folder] if folder != "esolm" and listed == whole else listed
    return sorted(out)


def covered(path: str, deps: list[str]) -> bool:
    """Whether a DVC deps list covers ``path`` (the file itself or a folder holding it)."""
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


if __name__ == "__main__":  # print the code deps of each stage: python -m esolm.codedeps
    for name in STAGES:
        print(f"{name}:", " ".join(compact(stage_code(name))))


def import_graph() -> dict[str, set[str]]:
    """Every module of the package -> the package's modules it imports (anywhere in its code,
    inside functions too; not under ``if TYPE_CHECKING:``). A package's ``__init__`` is the
    package's name. ``tests/test_families.py`` checks it has no circle."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = {module for module, _ in _entries([_tree(path)], _package_of(name, path))}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph
