"""Checks of our own settings, run before any data is touched or a model built.

Lightning checks its Trainer's arguments itself, and Hydra's instantiation reports an argument a class does not
take; here are only the keys this package defines, and misspelt keys anywhere (which would otherwise be ignored
until late, or forever). Each failure is one `ConfigError` line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from digit_lightning import CONFIG_DIR
from digit_lightning.errors import UserError

MNIST_TRAIN_IMAGES = 60_000  # data.val_size is carved out of these


class ConfigError(UserError):
    """A setting the user can fix; the message names the key, its value and what is allowed."""


def _int(low: int, high: float = math.inf) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


# key -> (check, what is allowed); a key absent from the config is not checked.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.data_dir": (lambda v: isinstance(v, str) and v.strip() != "", "a directory path"),
    "data.batch_size": (_int(1), "an integer >= 1"),
    "data.eval_batch_size": (lambda v: v is None or _int(1)(v), "an integer >= 1, or null"),
    "data.val_size": (_int(1, MNIST_TRAIN_IMAGES - 1), f"an integer from 1 to {MNIST_TRAIN_IMAGES - 1}"),
    "data.split_seed": (_int(-(2**63)), "an integer"),
    "data.num_folds": (lambda v: v is None or _int(2, MNIST_TRAIN_IMAGES)(v), "null (no folds) or an integer >= 2"),
    "data.fold": (_int(0), "an integer >= 0 (below data.num_folds)"),
    "model.optimizer.lr": (_positive, "a finite number > 0"),
    "model.scheduler.max_lr": (_positive, "a finite number > 0"),
    "seed": (lambda v: v is None or _int(0, 2**32 - 1)(v), "an integer from 0 to 2**32-1, or null"),
    "cpu_threads": (lambda v: v is None or v == "auto" or _int(1)(v), "auto, an integer >= 1, or null"),
    "flush_denormal": (_bool, "true or false"),
    "train": (_bool, "true or false"),
    "test": (_bool, "true or false"),
    "run_model": (lambda v: v in ("auto", "last", "best"), "auto, last or best"),
    "extras.print_config": (_bool, "true or false"),
    "tta": (_bool, "true or false"),
    "trainer.max_epochs": (lambda v: v is None or _int(-1)(v), "a whole number >= 0 (-1: no limit), or null"),
    "trainer.min_epochs": (lambda v: v is None or _int(0)(v), "a whole number >= 0, or null"),
    "trainer.max_steps": (_int(-1), "a whole number >= 0 (-1: no limit)"),
}


def show(value: Any) -> str:
    """A value the way one would type it in an override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple, ListConfig)):
        return "[" + ",".join(show(v) for v in value) + "]"
    return str(value) if str(value) else "''"


def _arguments(target: str) -> list[str] | None:
    """The keyword arguments `target` accepts; None when it takes **kwargs (then any key may be fine)."""
    hydra_log = logging.getLogger("hydra.utils")
    level, hydra_log.level = hydra_log.level, logging.CRITICAL  # get_object logs a failure as well as raising it
    try:
        obj = get_object(target)
    finally:
        hydra_log.setLevel(level)
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind is not p.VAR_POSITIONAL]


def _check_keys(node: dict[str, Any], path: str) -> None:
    """Every key of a `_target_` node must be an argument of its target (so a misspelt `+key` is caught)."""
    target = node.get("_target_")
    if isinstance(target, str) and "${" not in target:
        try:
            allowed = _arguments(target)
        except Exception:
            raise ConfigError(f"{path}._target_={target}: cannot be imported; check the spelling") from None
        for key, value in node.items():
            if allowed is not None and not (key.startswith("_") and key.endswith("_")) and key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean {path}.{close[0]}?" if close else f"its arguments: {', '.join(sorted(allowed))}"
                raise ConfigError(f"{path}.{key}={show(value)}: {target.rsplit('.', 1)[-1]} has no argument "
                                  f"{key!r}; {hint}")  # fmt: skip
    for key, value in node.items():
        if isinstance(value, dict):
            _check_keys(value, f"{path}.{key}" if path else str(key))


def top_level_keys(config_name: str) -> set[str]:
    """The keys a primary config (`conf/<name>.yaml`) and its config groups may put at the top level."""
    primary = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / f"{config_name}.yaml"))
    groups = {
        next(iter(d)).split("/")[0].split("@")[0].lstrip("/")
        for d in primary.pop("defaults", [])
        if isinstance(d, dict)
    }
    return set(primary) | {g.removeprefix("override ") for g in groups} | {"hydra"}


def validate_config(cfg: DictConfig, config_name: str = "train") -> None:
    """Raise ConfigError (one line) for a value of the wrong type or range, or a key nothing accepts."""
    tree = OmegaConf.to_container(cfg, resolve=False)
    tree.pop("hydra", None)
    unknown = sorted(set(tree) - top_level_keys(config_name))
    if unknown:
        known = sorted(top_level_keys(config_name) - {"hydra"})
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f"did you mean {close[0]}?" if close else f"the top-level keys are: {', '.join(known)}"
        raise ConfigError(f"{unknown[0]}={show(tree[unknown[0]])}: no such setting; {hint}")
    _check_keys(tree, "")
    missing = object()
    for key, (ok, allowed) in RULES.items():
        value = OmegaConf.select(cfg, key, default=missing)
        if value is not missing and not ok(value):
            raise ConfigError(f"{key}={show(value)}: must be {allowed}")
    ckpt = cfg.get("ckpt_path")
    if config_name == "train" and ckpt is not None and not isinstance(ckpt, str):
        raise ConfigError(f"ckpt_path={show(ckpt)}: a training resumes one run; pass one checkpoint (last, a run dir "
                          "or a .ckpt file); eval, predict and export take a list")  # fmt: skip
    folds, fold = OmegaConf.select(cfg, "data.num_folds"), OmegaConf.select(cfg, "data.fold")
    if folds is None and fold not in (None, 0):
        raise ConfigError(f"data.fold={fold}: folds need data.num_folds (e.g. data.num_folds=10); without it the run "
                          "validates on the fixed split of data.val_size images")  # fmt: skip
    if folds is not None and fold is not None and fold >= folds:
        raise ConfigError(f"data.fold={fold}: must be from 0 to {folds - 1} (data.num_folds={folds})")


def trainer_error(error: Exception, cfg: DictConfig) -> ConfigError:
    """Lightning's refusal of a trainer setting (its MisconfigurationException) as one line with the fix. A
    `limit_*_batches` fraction can be smaller than one batch; a whole number of batches always works."""
    trainer = cfg.get("trainer") or {}
    fractions = [k for k, v in trainer.items() if k.startswith("limit_") and isinstance(v, float) and 0 < v < 1]
    if fractions:
        hint = "or pass a whole number of batches instead, e.g. " + " ".join(f"+trainer.{k}=1" for k in fractions)
    else:
        hint = "change that trainer.* setting"
    return ConfigError(f"trainer: {' '.join(str(error).split())}; {hint}")
