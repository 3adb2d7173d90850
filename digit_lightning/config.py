"""Where the Hydra configs live, composing them from Python the way the CLI does, and checking them before a run.

`validate_config` runs before any data is touched or a model built: a bad value or a misspelt key fails at once,
in one line that names the key, the value and what is allowed, instead of deep inside Lightning minutes later.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from digit_lightning import resolvers  # noqa: F401  (registers ${launch_time:} and ${rank_zero_only:})

# A wheel ships the configs inside the package; a source checkout keeps them at the top level.
_PACKAGED = Path(__file__).resolve().parent / "conf"
CONFIG_DIR = str(_PACKAGED if _PACKAGED.is_dir() else _PACKAGED.parent.parent / "conf")
MNIST_TRAIN_IMAGES = 60_000  # data.val_size is carved out of these


class ConfigError(ValueError):
    """A setting the user can fix; the message is one line naming the key, its value and what is allowed."""


def compose_config(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """Compose `conf/<config_name>.yaml` with command-line style overrides, outside of a Hydra run.

    `paths.output_dir` comes from the Hydra run directory on the command line; pass it as an override here.
    """
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(low: int, null: bool = False) -> Callable[[Any], bool]:
    return lambda v: (null and v is None) or (_is_int(v) and v >= low)


def _fraction_or_count(v: Any) -> bool:
    return v is None or (_is_int(v) and v >= 0) or (_is_number(v) and 0.0 <= v <= 1.0)


def _positive_number(v: Any) -> bool:
    return _is_number(v) and v > 0


_BATCHES = "a fraction of the batches in [0, 1] or a number of batches >= 0"
# key -> (check, what is allowed). Only keys present in the config are checked; Lightning checks the rest.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.data_dir": (lambda v: isinstance(v, str) and v.strip() != "", "a directory path"),
    "data.batch_size": (_int_at_least(1), "an integer >= 1"),
    "data.val_size": (
        lambda v: _is_int(v) and 1 <= v < MNIST_TRAIN_IMAGES,
        f"an integer from 1 to {MNIST_TRAIN_IMAGES - 1} (images held out of the {MNIST_TRAIN_IMAGES:,} for validation)",
    ),
    "data.num_workers": (_int_at_least(0), "an integer >= 0"),
    "data.pin_memory": (lambda v: isinstance(v, bool), "true or false"),
    "data.split_seed": (_is_int, "an integer"),
    "model.optimizer.lr": (_positive_number, "a finite number > 0"),
    "model.scheduler.max_lr": (_positive_number, "a finite number > 0"),
    "trainer.max_epochs": (_int_at_least(-1, null=True), "an integer >= 0, or -1 for no limit"),
    "trainer.min_epochs": (_int_at_least(0, null=True), "an integer >= 0"),
    "trainer.max_steps": (_int_at_least(-1), "an integer >= 0, or -1 for no limit"),
    "trainer.min_steps": (_int_at_least(0, null=True), "an integer >= 0"),
    "trainer.check_val_every_n_epoch": (_int_at_least(1, null=True), "an integer >= 1"),
    "trainer.accumulate_grad_batches": (_int_at_least(1), "an integer >= 1"),
    "trainer.gradient_clip_val": (lambda v: v is None or (_is_number(v) and v >= 0), "a number >= 0"),
    **{f"trainer.{k}": (_fraction_or_count, _BATCHES) for k in ("overfit_batches", "limit_train_batches")},
    **{f"trainer.limit_{k}_batches": (_fraction_or_count, _BATCHES) for k in ("val", "test", "predict")},
    "seed": (lambda v: v is None or (_is_int(v) and 0 <= v < 2**32), "an integer from 0 to 2**32-1, or null"),
    "train": (lambda v: isinstance(v, bool), "true or false"),
    "test": (lambda v: isinstance(v, bool), "true or false"),
}


def show(value: Any) -> str:
    """A value the way one would type it in an override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show(v) for v in value) + "]"
    return str(value) if str(value) else "''"


def locate(target: str) -> Any:
    """The object a `_target_` names (like Hydra's own lookup, without its error logging)."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"no module named {parts[0]!r}")


def target_arguments(target: str) -> list[str] | None:
    """The keyword arguments `target` accepts; None when it takes **kwargs (then any key may be fine)."""
    try:
        params = inspect.signature(locate(target)).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind is not p.VAR_POSITIONAL]


def unknown_key(line: str, path: str, key: str, allowed: Sequence[str], owner: str) -> str:
    """One line for a key that `owner` does not have: a close match if there is one, and what is allowed."""
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {path + '.' if path else ''}{close[0]}?)" if close else ""
    listing = ", ".join(sorted(allowed)) if len(allowed) <= 20 else f"the arguments of {owner}"
    return f"{line}: {owner} has no key {key!r}{hint}; allowed: {listing}"


def _check_keys(node: dict[str, Any], path: str) -> None:
    """Every key of a `_target_` node must be an argument of its target; recurse into all nodes."""
    target = node.get("_target_")
    if isinstance(target, str) and "${" not in target:
        try:
            allowed = target_arguments(target)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"{path}._target_={target}: cannot be imported ({e}); check the spelling") from None
        if allowed is not None:
            for key, value in node.items():
                if not (key.startswith("_") and key.endswith("_")) and key not in allowed:
                    line = f"{path}.{key}={show(value)}"
                    raise ConfigError(unknown_key(line, path, key, allowed, target.rsplit(".", 1)[-1]))
    for key, value in node.items():
        if isinstance(value, dict):
            _check_keys(value, f"{path}.{key}" if path else str(key))


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError (one line) for a value of the wrong type or range, or a key no target accepts."""
    tree = OmegaConf.to_container(cfg, resolve=False)
    tree.pop("hydra", None)
    _check_keys(tree, "")
    missing = object()
    for key, (ok, allowed) in RULES.items():
        value = OmegaConf.select(cfg, key, default=missing)
        if value is not missing and not ok(value):
            raise ConfigError(f"{key}={show(value)}: must be {allowed}")
    sources = OmegaConf.select(cfg, "data.sources", default=None)
    if sources is not None:
        from digit_lightning.data import SOURCES  # torchvision is slow to import; only here

        names = list(sources) if isinstance(sources, (ListConfig, list)) else [sources]
        if not names or any(s not in SOURCES for s in names):
            raise ConfigError(f"data.sources={show(names)}: must be a list of sources from {show(list(SOURCES))}")


def one_line_error(error: Exception) -> str:
    """Hydra's and OmegaConf's multi-line messages for a bad command line, as one line that says what to change."""
    if isinstance(error, MissingConfigException) and error.options is not None and error.missing_cfg_file:
        group, _, option = error.missing_cfg_file.rpartition("/")
        return f"{group}={option}: no such option in group '{group}'; choose from: {', '.join(error.options)}"
    if isinstance(error, OverrideParseException):
        return f"cannot parse the override {error.override!r}: {str(error).splitlines()[0]}"
    cause = error.__cause__
    added = re.search(r"use \+(\S+)", str(error))
    if (
        added
        and isinstance(cause, (ConfigKeyError, ConfigAttributeError))
        and isinstance(cause.parent_node, DictConfig)
    ):
        line, parent, key = added.group(1), cause.parent_node, str(cause.key)
        path = cause.full_key.rpartition(".")[0]
        target = parent.get("_target_") if "_target_" in parent else None
        allowed = (target_arguments(target) if isinstance(target, str) else None) or list(parent.keys())
        if key in allowed:  # a real argument that the yaml does not set: Hydra wants it added with +
            return f"{line}: {path or 'the config'} does not set {key!r} yet; add it with +{line}"
        owner = target.rsplit(".", 1)[-1] if isinstance(target, str) else (path or "the config")
        return unknown_key(line, path, key, [k for k in allowed if not k.startswith("_") and k != "hydra"], owner)
    text = " ".join(part.strip() for part in str(error).split("Config search path")[0].splitlines() if part.strip())
    if isinstance(cause, Exception) and str(cause):
        text += f" ({str(cause).splitlines()[0]})"
    return text


def run_cli(hydra_task: Callable[[], Any]) -> None:
    """Run a `@hydra.main` task so that Hydra's own errors (a bad override, an unknown option) end in one line.

    Hydra reports a bad command line in several lines; here it is `error: ...` that says what to change, and exit
    status 1. `-m`, `--cfg`, `--help` work as usual; HYDRA_FULL_ERROR=1 shows the full traceback instead.
    """
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        hydra_task()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises its errors to us instead of printing them
    try:
        hydra_task()
    except (HydraException, OmegaConfBaseException) as e:
        sys.exit(f"error: {one_line_error(e)}")


@contextmanager
def user_errors_exit(*errors: type[Exception]) -> Iterator[None]:
    """Inside a Hydra task: turn `errors` (a bad checkpoint, an unreadable input) into one line on stderr, status 2.

    Caught inside the task, because Hydra's job runner would print a line of its own for an exception leaving it.
    """
    try:
        yield
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
