"""Name -> builder registries, so that a new model, optimizer, schedule or augmentation
is one Python file (which registers itself) plus one YAML file.

Builders may also come from other installed packages, through entry points in the group
`cifar_exp.<kind>s` (`cifar_exp.models`, `cifar_exp.optimizers`, ...): the entry point's
name is the builder's name, its value the builder (`tiny_mlp = "my_pkg.tiny_mlp:build"`).
Installing the package is the act of trust; a config still names only a builder's name."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from importlib import metadata
from typing import Any

from cifar_exp.errors import ConfigError, one_line


class Registry:
    """Builders of one kind (e.g. models), looked up by the `name` key of their config."""

    def __init__(self, kind: str, package: str) -> None:
        self.kind = kind
        self.package = package
        self.entry_point_group = f"cifar_exp.{kind}s"
        self._builders: dict[str, Callable[..., Any]] = {}
        self._loaded = False
        self._declared: dict[str, list[metadata.EntryPoint]] | None = None
        self._installed: dict[str, Callable[..., Any]] = {}  # entry points loaded so far

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

    def _entry_points(self) -> dict[str, list[metadata.EntryPoint]]:
        """The installed packages' entry points of this kind, by name: read from their
        metadata once per process, none of them imported."""
        if self._declared is None:
            self._declared = {}
            for entry_point in metadata.entry_points(group=self.entry_point_group):
                self._declared.setdefault(entry_point.name, []).append(entry_point)
        return self._declared

    def names(self) -> list[str]:
        self._load()
        return sorted({*self._builders, *self._entry_points()})

    def get(self, name: str) -> Callable[..., Any]:
        self._load()
        declared = self._entry_points().get(name, [])
        if name in self._builders:
            if declared:  # either could be meant: say so rather than pick one
                raise ConfigError(f"{self.kind} {name!r} is built into cifar_exp and also "
                                  f"declared by {_origin(declared[0])}; rename it there")
            return self._builders[name]
        if not declared:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of {self.names()}")
        if len(declared) > 1:
            origins = " and by ".join(_origin(entry_point) for entry_point in declared)
            raise ConfigError(f"{self.kind} {name!r} is declared by {origins}; "
                              f"rename it in one of them or uninstall one")
        if name not in self._installed:
            self._installed[name] = self._load_entry_point(declared[0])
        return self._installed[name]

    def _load_entry_point(self, entry_point: metadata.EntryPoint) -> Callable[..., Any]:
        """Import the package's builder; its failure is said in one line, not a traceback
        from inside someone else's package."""
        try:
            builder = entry_point.load()
        except Exception as error:  # any import-time failure of the package's code
            raise ConfigError(f"{self.kind} {entry_point.name!r} could not be loaded from "
                              f"{_origin(entry_point)}: {type(error).__name__}: "
                              f"{one_line(error)}; `python -c 'import {entry_point.module}'` "
                              f"shows where") from None
        if not callable(builder):
            raise ConfigError(f"{self.kind} {entry_point.name!r} from {_origin(entry_point)} "
                              f"is not a builder function; point it at one")
        return builder

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


def _origin(entry_point: metadata.EntryPoint) -> str:
    """`package <name> (entry point <name> = <module:attr> in <group>)`, for messages."""
    package = entry_point.dist.name if entry_point.dist is not None else "an installed package"
    return (f"package {package} (entry point {entry_point.name} = {entry_point.value} "
            f"in {entry_point.group})")
