"""Keeps ``torch._dynamo`` out of a prediction process until something compiles a network.

Stock's predictor module (``nnunetv2.inference.predict_from_raw_data``) imports ``OptimizedModule`` from
``torch._dynamo`` for two ``isinstance`` checks. That import loads torch's compiler stack, triton and sympy with it:
measured with torch 2.14.1 (cu130 wheel), 158 MB of resident memory and 2.7 s, in a process that never compiles
(the CPU predictor, OpenVINO or torch eager). That is most of what stands between the predictor's peak and a quarter
of stock's, and most of its start-up.

:func:`defer_dynamo_import` puts a stand-in module under that name before stock's module is imported:

- its ``OptimizedModule`` answers ``isinstance``/``issubclass`` like the real class. Only a compiled module is an
  instance, and compiling (``torch.compile``) loads the real ``torch._dynamo`` first;
- any other attribute (``torch._dynamo.reset``, the ``__path__`` a submodule's import asks for, ...) imports the
  real package, which replaces the stand-in everywhere: ``sys.modules`` and ``torch._dynamo``. Other dunder names
  are not there (``inspect.getmodule`` asks every module for ``__file__``: that must not load it).

So ``nnUNet_compile=1`` and everything else that uses torch._dynamo work as before; they pay its import when they
use it. A process that already imported torch._dynamo (a trainer) is left as it is.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
import types

MODULE = "torch._dynamo"
_lock = threading.RLock()


def _real_module() -> types.ModuleType | None:
    """The real torch._dynamo if it is loaded, else None."""
    module = sys.modules.get(MODULE)
    return None if module is None or isinstance(module, _DeferredDynamo) else module


def _real_optimized_module() -> type | None:
    """The real OptimizedModule class if its module is loaded (no instance can exist before), else None."""
    return getattr(sys.modules.get(MODULE + ".eval_frame"), "OptimizedModule", None)


class _OptimizedModuleType(type):
    """Metaclass whose checks defer to the real ``torch._dynamo.eval_frame.OptimizedModule`` once it exists."""

    def __instancecheck__(cls, instance) -> bool:
        real = _real_optimized_module()
        return real is not None and isinstance(instance, real)

    def __subclasscheck__(cls, subclass) -> bool:
        real = _real_optimized_module()
        return real is not None and issubclass(subclass, real)


class OptimizedModule(metaclass=_OptimizedModuleType):
    """Stands for ``torch._dynamo.OptimizedModule`` in ``isinstance`` checks without importing it."""

    def __new__(cls, *args, **kwargs):
        return load_real_dynamo().OptimizedModule(*args, **kwargs)


def load_real_dynamo() -> types.ModuleType:
    """Import the real torch._dynamo (once) in the stand-in's place and return it."""
    with _lock:
        real = _real_module()
        if real is not None:
            return real
        sys.modules.pop(MODULE, None)
        torch = sys.modules["torch"]
        if isinstance(torch.__dict__.get("_dynamo"), _DeferredDynamo):
            del torch._dynamo
        return importlib.import_module(MODULE)


class _ModuleAlreadyLoaded(importlib.abc.Loader):
    """Hands the import system a submodule that the real package's ``__init__`` has just imported."""

    def __init__(self, module: types.ModuleType):
        self.module = module

    def create_module(self, spec):
        return self.module

    def exec_module(self, module) -> None:
        pass


class _RealPackageFirst(importlib.abc.MetaPathFinder):
    """Before a submodule of torch._dynamo is imported under the stand-in, imports the real package (whose
    ``__init__`` must run first). A submodule that ``__init__`` imported is handed over as it is: found again by
    the path finder, it would run a second time (the import system has already decided to load it)."""

    def find_spec(self, name, path, target=None):
        if not name.startswith(MODULE + ".") or _real_module() is not None:
            return None
        load_real_dynamo()
        module = sys.modules.pop(name, None)
        return None if module is None else importlib.util.spec_from_loader(name, _ModuleAlreadyLoaded(module))


class _DeferredDynamo(types.ModuleType):
    """The stand-in module: ``OptimizedModule`` is answered here, everything else by the real torch._dynamo.

    ``__path__`` is the real package's folder: ``from torch._dynamo import OptimizedModule`` asks a package for it
    (and must not load it), and a submodule import (``torch.compile`` imports ``torch._dynamo.utils``) looks there
    after :class:`_RealPackageFirst` has loaded the package."""

    OptimizedModule = OptimizedModule

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__") and name != "__all__":
            # module scans (inspect.getmodule asks every module for __file__) must not load the real one
            raise AttributeError(name)
        return getattr(load_real_dynamo(), name)


def defer_dynamo_import() -> bool:
    """Install the stand-in unless torch._dynamo is already imported; True if installed (or installed before)."""
    with _lock:
        current = sys.modules.get(MODULE)
        if current is not None:
            return isinstance(current, _DeferredDynamo)
        import torch

        spec = importlib.machinery.PathFinder.find_spec(MODULE, torch.__path__)  # found, not executed
        if spec is None or not spec.submodule_search_locations:
            return False
        stand_in = _DeferredDynamo(MODULE, __doc__)
        stand_in.__path__ = list(spec.submodule_search_locations)
        sys.modules[MODULE] = stand_in
        if not any(isinstance(finder, _RealPackageFirst) for finder in sys.meta_path):
            sys.meta_path.insert(0, _RealPackageFirst())
        return True
