"""The nets, by name. `model.net.name` picks one; the other keys of `model.net` are its arguments.

Checkpoints store this name and these arguments as plain data, and `build_net` is the only way a net is rebuilt
from one: a name outside `MODELS`, or an argument of the wrong type or out of range, is refused, and no `_target_`
from a file is ever instantiated. Adding a model: a module here whose class is decorated with `@register("<name>")`
(every module of this package is imported below, so that is all), and one yaml in `conf/model/`.
"""

from __future__ import annotations

import importlib
import inspect
import math
import pkgutil
from typing import Any

from torch import nn

from digit_lightning.errors import UserError
from digit_lightning.models.registry import MODELS, register

for _module in pkgutil.iter_modules(__path__):  # each net module registers its class(es) when imported
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["MODELS", "ModelError", "build_net", "count_parameters", "register"]
PLAIN = (bool, int, float, str)
MAX_SIZE = 4096  # the largest channel count or width a net is built with


class ModelError(UserError):
    """A net that cannot be built as named; one line saying which name or argument is wrong."""


def _fits(value: Any, annotation: Any) -> bool:
    """Whether a plain value fits an argument annotated `int`, `float`, `bool`, `str` or a tuple of them."""
    kind = {"int": int, "float": float, "bool": bool, "str": str}.get(
        getattr(annotation, "__name__", str(annotation)).split("|")[0].strip()
    )
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, PLAIN) and not isinstance(v, bool) for v in value)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return kind is not None and isinstance(value, kind)


def build_net(name: str, **args: Any) -> nn.Module:
    """The net `MODELS[name](**args)`, after checking that each argument is a plain value of the annotated type."""
    if not isinstance(name, str) or name not in MODELS:
        raise ModelError(f"model.net.name={name}: no such model; choose from: {', '.join(MODELS)}")
    params = inspect.signature(MODELS[name]).parameters
    for key, value in args.items():
        if key not in params:
            raise ModelError(f"model.net.{key}: {name} has no argument {key!r}; its arguments: {', '.join(params)}")
        if not _fits(value, params[key].annotation):
            raise ModelError(f"model.net.{key}={value!r}: must be {params[key].annotation} for {name}")
        if not _bounded(value):
            raise ModelError(f"model.net.{key}={value!r}: out of range for {name}; a whole-number argument is a size, "
                             f"from 1 to {MAX_SIZE}, a number must be finite")  # fmt: skip
    try:
        return MODELS[name](**args)
    except (ValueError, RuntimeError) as e:  # e.g. nn.Dropout refuses p outside [0, 1]
        raise ModelError(f"model.net of {name}: {' '.join(str(e).split())[:200]}") from None


def _bounded(value: Any) -> bool:
    """Whether a checked plain value is in range: whole numbers are layer sizes (an unbounded width from a file
    would allocate without limit), numbers finite."""
    if isinstance(value, (list, tuple)):
        return all(_bounded(v) for v in value)
    if isinstance(value, int) and not isinstance(value, bool):
        return 1 <= value <= MAX_SIZE
    return not isinstance(value, float) or math.isfinite(value)


def count_parameters(net: nn.Module) -> int:
    """The number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
