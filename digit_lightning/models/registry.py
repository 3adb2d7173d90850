"""`MODELS`, the nets by name, and `@register(name)`, which a net's module uses to add its class to it."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

MODELS: dict[str, type[nn.Module]] = {}


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make the net available as `model.net.name=<name>` (and to checkpoints naming it)."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in MODELS and MODELS[name] is not cls:
            raise ValueError(f"two nets are registered as {name!r}: {MODELS[name].__qualname__} and {cls.__qualname__}")
        MODELS[name] = cls
        return cls

    return add
