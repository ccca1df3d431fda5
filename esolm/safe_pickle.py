"""Reading foreign Lightning checkpoints safely: a restricted unpickler.

A Lightning ``.ckpt`` is a ``torch.save`` zip whose ``data.pkl`` may name any Python object;
``torch.load(weights_only=True)`` refuses the authors' files (they pickle an OmegaConf config
and a tokenizer object) and ``weights_only=False`` runs whatever the pickle says. This module
reads them through torch's own zip/storage path (``torch.load(pickle_module=...)``) with an
unpickler that

- rebuilds tensors (torch's storage and ``_rebuild_*`` functions) and plain containers;
- decodes OmegaConf containers (``DictConfig``, ``ListConfig`` and their nodes) as plain data
  (dicts, lists, values): no OmegaConf code runs and OmegaConf need not be installed;
- keeps objects of any other class as inert ``Skipped`` records (the pickled tokenizer),
  built without running any of their code and without importing their module;
- refuses every call it does not know (``os.system``, ``subprocess.*``, ``builtins.eval``,
  ... and any unknown function a pickle asks to call), with one line naming what it refused.

Nothing a refused pickle names is ever imported or called. ``UnsafePickle`` is a ValueError,
so the command line reports it as one line.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
from pathlib import Path
from typing import Any, ClassVar

import torch

# (module, name) the unpickler may return as themselves: tensor rebuilding and plain containers
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
    ("builtins", "complex"): complex, ("builtins", "bytearray"): bytearray,
    ("__builtin__", "set"): set, ("__builtin__", "frozenset"): frozenset,
}
# plain types a pickle may name as data (OmegaConf metadata: object_type=dict)
_PLAIN_TYPES = {"dict": dict, "list": list, "tuple": tuple, "str": str, "int": int, "float": float,
                "bool": bool, "bytes": bytes, "NoneType": type(None)}
_OMEGACONF = ("omegaconf.", "omegaconf")
_DANGEROUS_MODULES = ("os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "pty", "runpy",
                      "importlib", "code", "codeop", "ctypes", "multiprocessing", "webbrowser",
                      "pickle", "_pickle", "marshal", "types", "functools", "operator", "io", "pathlib")
_DANGEROUS_BUILTINS = ("eval", "exec", "compile", "open", "getattr", "setattr", "delattr",
                       "__import__", "globals", "locals", "vars", "input", "breakpoint", "apply")


class UnsafePickle(ValueError):
    """A pickle asked for something this loader refuses (a call, a dangerous name)."""


class Skipped:
    """An object of a class this loader does not rebuild (e.g. a pickled tokenizer): its
    qualified name and the state the pickle gave it, as data. None of its code ran."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Skipped:  # NEWOBJ: cls.__new__(cls, *args)
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE / INST / OBJ call the class
        raise UnsafePickle(f"refused to call {self.qualname}{_short(args)}: the pickle calls an unknown "
                           "function or class; nothing was run")

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<skipped {self.qualname}>"


class OmegaNode(Skipped):
    """An OmegaConf container or node, kept as data and decoded by ``plain``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise UnsafePickle(f"refused to call {self.qualname}{_short(args)}")


def _short(args: tuple) -> str:
    text = repr(args)
    return text if len(text) <= 120 else text[:117] + "...)"


def _refuse(module: str, name: str) -> UnsafePickle:
    return UnsafePickle(f"refused {module}.{name}: the checkpoint's pickle names a callable that "
                        "could run code (nothing was run; the file is hostile or not a checkpoint)")


def _find(module: str, name: str) -> Any:
    """What the restricted unpickler returns for the global ``module.name``."""
    if (module, name) in _ALLOWED:
        return _ALLOWED[(module, name)]
    if module in ("builtins", "__builtin__"):
        if name in _PLAIN_TYPES:
            return _Named(_PLAIN_TYPES[name])
        raise _refuse(module, name)
    top = module.partition(".")[0]
    if top in _DANGEROUS_MODULES or name in _DANGEROUS_BUILTINS:
        raise _refuse(module, name)
    if module == "typing":
        return _Named(f"typing.{name}")
    base = OmegaNode if module.startswith(_OMEGACONF) else Skipped
    return type(name, (base,), {"qualname": f"{module}.{name}", "__module__": __name__})


class _Named:
    """A plain type or typing name a pickle mentions as data (never called)."""

    def __init__(self, what: Any) -> None:
        self.what = what

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if isinstance(self.what, type) and self.what in (dict, list, tuple, str, int, float, bool, bytes):
            return self.what(*args, **kwargs)  # building a plain value is harmless
        raise UnsafePickle(f"refused to call {self.what}")

    def __repr__(self) -> str:
        return f"<type {self.what}>"


class RestrictedUnpickler(pickle._Unpickler):  # the pure-Python one: its dispatch can be guarded
    """``pickle`` unpickler that resolves globals through ``_find`` only."""

    def find_class(self, module: str, name: str) -> Any:
        return _find(module, name)

    dispatch: ClassVar[dict] = dict(pickle._Unpickler.dispatch)

    def load_reduce(self) -> None:
        """REDUCE calls ``func(*args)``: only the allowed rebuild functions and plain types."""
        args = self.stack.pop()
        func = self.stack[-1]
        if not (func in _ALLOWED.values() or isinstance(func, _Named)
                or (isinstance(func, type) and issubclass(func, Skipped))):
            raise UnsafePickle(f"refused to call {func!r}{_short(tuple(args))}")
        self.stack[-1] = func(*args)

    dispatch[pickle.REDUCE[0]] = load_reduce


class _PickleModule:
    """What ``torch.load(pickle_module=...)`` needs: an Unpickler class and ``load``."""

    Unpickler = RestrictedUnpickler
    __name__ = "esolm.safe_pickle"

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return RestrictedUnpickler(file, **kwargs).load()


def plain(obj: Any) -> Any:
    """``obj`` with OmegaConf containers decoded to dicts/lists/values, recursively; skipped
    objects become the string ``<skipped module.Class>``."""
    if isinstance(obj, OmegaNode):
        state = obj.__dict__.get("_state") or {}
        if isinstance(state, tuple):  # (dict state, slots) form
            state = state[0] or {}
        if "_content" in state:
            return plain(state["_content"])
        return plain(state.get("_val"))
    if isinstance(obj, Skipped):
        return repr(obj)
    if isinstance(obj, dict):
        return {plain(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    return obj


def restricted_load(path: str | os.PathLike) -> dict:
    """The checkpoint dict of a ``torch.save`` / Lightning file, read safely (module doc):
    tensors on the CPU, OmegaConf containers as plain data, other objects skipped. A file whose
    pickle would call anything else is refused with an ``UnsafePickle`` (a ValueError) naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PickleModule)
    except UnsafePickle as err:
        raise UnsafePickle(f"{path}: {err}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, io.UnsupportedOperation) as err:
        raise ValueError(f"{path} cannot be read as a checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(obj, dict):
        raise ValueError(  # noqa: TRY004 - a bad file, reported like the others
            f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj
