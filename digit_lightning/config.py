"""Checks of our own settings, run before any data is touched or a model built.

Types and ranges are declared once, beside each field, in digit_lightning/schema.py: OmegaConf checks the types of
the typed groups while Hydra composes (`type_error` says that refusal in our words), `validate_config` checks every
range, typed or plain config alike. Lightning checks its Trainer's arguments itself; here are also misspelt keys
anywhere (a `_target_`'s arguments, the top-level keys), which would otherwise be ignored until late, or forever, and
the checks that span keys (folds, a resumed training's one checkpoint). Each failure is one `ConfigError` line
naming the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from pathlib import Path
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigTypeError, ValidationError

from digit_lightning import CONFIG_DIR, schema
from digit_lightning.errors import UserError


class ConfigError(UserError):
    """A setting the user can fix; the message names the key, its value and what is allowed."""


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
    for key, setting in schema.settings():
        value = OmegaConf.select(cfg, key, default=missing)
        if value is not missing and not setting.metadata["ok"](value):
            raise ConfigError(f"{key}={show(value)}: must be {setting.metadata['allowed']}")
    ckpt = cfg.get("ckpt_path")
    if config_name == "train" and ckpt is not None and not isinstance(ckpt, str):
        raise ConfigError(f"ckpt_path={show(ckpt)}: a training resumes one run; pass one checkpoint (last, a run dir "
                          "or a .ckpt file); eval, predict and export take a list")  # fmt: skip
    if problem := schema.fold_problem(OmegaConf.select(cfg, "data.num_folds"), OmegaConf.select(cfg, "data.fold")):
        raise ConfigError(problem)


def type_error(error: BaseException) -> ConfigError | None:
    """OmegaConf's refusal of a typed setting (schema.py), raised while Hydra composes, or as the cause of Hydra's
    error, as one line: a value of the wrong type (ValidationError) as `validate_config` says a bad value, the removal
    of a typed key (`~data.fold`: ConfigTypeError) with what to set instead; None for any other error."""
    cause = error if isinstance(error, (ValidationError, ConfigTypeError)) else error.__cause__
    if not isinstance(cause, (ValidationError, ConfigTypeError)) or cause.full_key is None:
        return None
    key = str(cause.full_key)
    allowed = {name: f.metadata["allowed"] for name, f in schema.settings()}.get(key)
    if not allowed:
        return None
    if isinstance(cause, ConfigTypeError):
        return ConfigError(f"~{key}: a typed setting cannot be removed; set it instead ({key}=..., {allowed})")
    return ConfigError(f"{key}={show(cause.value)}: must be {allowed}")


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
