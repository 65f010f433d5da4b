"""Registries find builders by name and check their options."""

from __future__ import annotations

import pytest

from cifar_exp.errors import ConfigError
from cifar_exp.registry import Registry


def test_register_build_and_errors():
    registry = Registry("widget", "cifar_exp.models")
    registry._loaded = True  # nothing to import for this test

    @registry.register("square")
    def square(side: int, scale: int = 1) -> int:
        return side * side * scale

    assert registry.build("square", 3, scale=2) == 18
    assert registry.names() == ["square"]
    with pytest.raises(ConfigError, match=r"widget 'square' has no option\(s\) \['color'\]; "
                                          r"its options are \['scale'\]"):
        registry.build("square", 3, color="red")
    with pytest.raises(ConfigError, match="unknown widget 'circle'"):
        registry.build("circle", 1)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("square")(square)
