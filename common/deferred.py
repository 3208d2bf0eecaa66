"""Modules a process imports only when it first uses them.

A library can import much that a process never uses: pandapower imports its plotting package
(matplotlib.pyplot, network layouts) and its state estimation (scipy.stats) as it starts, about
0.8 s of the DSO service's start-up on a 2-core machine, and the DSO neither draws nor estimates.
:func:`defer` puts a stand-in for such a module in ``sys.modules``. The stand-in is replaced by the
real module the first time one of its attributes is used, so code that does use the module still
works, only later; a deferred package's submodules can be imported without it (its ``__path__`` is
the real one). Nothing is imported by :func:`defer` itself, not even the module's parent packages.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types

__all__ = ["Deferred", "defer"]


class Deferred(types.ModuleType):
    """Stands in for a module until one of its attributes is used."""

    def __getattr__(self, attr: str):
        real = self.__dict__.get("_deferred_real")
        if real is None:
            real = _load(self)
        return getattr(real, attr)


def _load(stand_in: Deferred) -> types.ModuleType:
    name = stand_in.__name__
    if sys.modules.get(name) is stand_in:
        del sys.modules[name]
    real = importlib.import_module(name)
    stand_in.__dict__["_deferred_real"] = real
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:
        setattr(sys.modules[parent], child, real)
    return real


def _find_spec(name: str) -> importlib.machinery.ModuleSpec | None:
    """The module's spec, found without importing its parent packages (``importlib.util.find_spec``
    would import them)."""
    parts = name.split(".")
    spec = importlib.util.find_spec(parts[0])  # a top-level name: nothing is imported
    for depth in range(1, len(parts)):
        if spec is None or spec.submodule_search_locations is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[:depth + 1]),
                                                         list(spec.submodule_search_locations))
    return spec


def defer(*names: str) -> list[str]:
    """Defer each module of ``names`` not imported yet; returns those deferred (a name that is
    already imported, or that is not installed, is left alone)."""
    done = []
    for name in names:
        if name in sys.modules:
            continue
        spec = _find_spec(name)
        if spec is None:
            continue
        stand_in = Deferred(name)
        stand_in.__spec__ = spec
        if spec.submodule_search_locations is not None:
            stand_in.__path__ = list(spec.submodule_search_locations)
        sys.modules[name] = stand_in
        done.append(name)
    return done
