"""Name -> builder registries, so that a new model, optimizer, schedule or augmentation
is one Python file (which registers itself) plus one YAML file."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from typing import Any

from cifar_exp.errors import ConfigError, one_line


class Registry:
    """Builders of one kind (e.g. models), looked up by the `name` key of their config."""

    def __init__(self, kind: str, package: str) -> None:
        self.kind = kind
        self.package = package
        self._builders: dict[str, Callable[..., Any]] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(builder: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._builders[name] = builder
            return builder

        return decorator

    def _load(self) -> None:
        # Importing every module of the package runs their @register decorators.
        if not self._loaded:
            package = importlib.import_module(self.package)
            for module in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{self.package}.{module.name}")
            self._loaded = True

    def names(self) -> list[str]:
        self._load()
        return sorted(self._builders)

    def get(self, name: str) -> Callable[..., Any]:
        self._load()
        if name not in self._builders:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of {self.names()}")
        return self._builders[name]

    def build(self, name: str, *args: Any, **options: Any) -> Any:
        """Call the builder registered as `name`; unknown options are a ConfigError."""
        builder = self.get(name)
        accepted = inspect.signature(builder).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        unknown = sorted(set(options) - set(accepted)) if not takes_any else []
        if unknown:
            known = list(accepted)[len(args) :]
            raise ConfigError(
                f"{self.kind} {name!r} has no option(s) {unknown}; its options are {known}"
            )
        try:
            return builder(*args, **options)
        except ConfigError:
            raise
        except (ValueError, TypeError) as error:  # e.g. torch's own checks of its options
            raise ConfigError(f"{self.kind} {name!r} refused its options ({one_line(error)}); "
                              f"fix the {self.kind}.* values") from error
