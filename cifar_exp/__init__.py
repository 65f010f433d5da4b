"""cifar_exp: Hydra-configured, MLflow-tracked PyTorch experiments on CIFAR-10/100."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

__version__ = "0.1.0"

# Modules that moved into the role folders, by their old names: configs saved before the
# move name them (`_target_: cifar_exp.sweep.SweepTracking`), and an install made before it
# runs `cifar-exp-report` from the old path; both still load.
MOVED_MODULES = {
    "cifar_exp.sweep": "cifar_exp.tracking.sweep",
    "cifar_exp.tools.report": "cifar_exp.tracking.report",  # an older install's script
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module name as the module it became (one module object, two names)."""

    def find_spec(self, name: str, path: object = None, target: object = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if name not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(MOVED_MODULES[spec.name])
        self._specs = {**getattr(self, "_specs", {}), module.__name__: module.__spec__}
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Already executed under its new name; the import gave it the alias's spec, so it
        gets its own back."""
        module.__spec__ = self._specs[module.__name__]


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
