"""Register ``Smai`` with anomalib as soon as ``anomalib.models`` is imported.

anomalib has no plugin registry: ``get_model("smai")`` and the CLI's ``--model Smai`` look
for direct subclasses of ``AnomalibModule`` that are already imported, and ``model: Smai``
in YAML is resolved as ``anomalib.models.Smai``. The ``smai_plugin.pth`` file installed with
the package imports this module at interpreter start-up; it only adds a cheap import hook.
When ``anomalib.models`` finishes loading, the hook imports :class:`smai_plugin.Smai`,
exposes it as ``anomalib.models.Smai`` and allows ``smai_plugin`` class paths in
``get_model``.
"""

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

_TARGET = "anomalib.models"


def register() -> None:
    """Import the Lightning model, which adds itself to ``anomalib.models``; a no-op while it is being imported."""
    if "smai_plugin.lightning_model" not in sys.modules:
        importlib.import_module("smai_plugin.lightning_model")


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader of ``anomalib.models``, then :func:`register`."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        register()


class _AnomalibModelsFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader that the other finders choose for ``anomalib.models``."""

    def find_spec(
        self,
        fullname: str,
        path: object = None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Install the hook once; register right away if anomalib is already imported."""
    if _TARGET in sys.modules:
        register()
    elif not any(isinstance(finder, _AnomalibModelsFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AnomalibModelsFinder())


install()
