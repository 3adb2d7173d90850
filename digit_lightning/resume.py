"""The resume boundary: a checkpoint a run resumes from (or tests) is data, read and rebuilt before Lightning sees it.

Lightning restores far more than the weights from a checkpoint: loop progress, optimizer and scheduler states, and
each callback's state, `ModelCheckpoint`'s included, whose paths it later loads (`trainer.test(ckpt_path=best)`,
through fsspec: URLs too) and deletes (the checkpoints it believes it wrote). So Lightning never reads the file:
`read_checkpoint` loads it with `torch.load(weights_only=True)`, and `for_fit` builds a new checkpoint from the
pieces that pass the checks below; anything else is dropped (with a warning) or refused (in one line). The rebuilt
dict reaches Lightning through `AtomicCheckpointIO.hand_over`, keyed by path.

- weights: exactly the names and shapes of this run's model, and the net the checkpoint names is this run's net;
- optimizer and LR-scheduler states: the structure and types of the ones this run's model configures (a throwaway
  optimizer and scheduler are built as templates and load the states first), optimizer tensors shaped like their
  parameters;
- loop progress: the structure and types of this trainer's loops, counters non-negative integers;
- callback states: only for callbacks this run has, each with the structure and types of its own fresh state;
  `ModelCheckpoint`'s paths are kept only as local regular files (no symlink) in this run's checkpoints dir.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import os
import random
import stat
from pathlib import Path, PurePath
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, WeightAveraging

from digit_lightning.checkpoint import AtomicCheckpointIO, CheckpointError, check_fit, net_spec, read_checkpoint
from digit_lightning.module import DigitClassifier, refused_as

log = logging.getLogger(__name__)
MC_PATHS = ("best_model_path", "kth_best_model_path", "last_model_path")


def _like(value: Any, template: Any, where: str) -> None:
    """Raise unless `value` has `template`'s structure: the same keys, list lengths and types (int and float mix),
    equal strings, tensors of the same shape and dtype; a None in the template also admits a number."""
    fail = CheckpointError(f"{where}: {_show(value)} where this run has {_show(template)}")
    if isinstance(template, dict):
        if not isinstance(value, dict) or set(value) != set(template):
            raise fail
        for key in template:
            _like(value[key], template[key], f"{where}.{key}")
    elif isinstance(template, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(value) != len(template):
            raise fail
        for i, (v, t) in enumerate(zip(value, template, strict=True)):
            _like(v, t, f"{where}[{i}]")
    elif isinstance(template, torch.Tensor):
        if not isinstance(value, torch.Tensor) or value.shape != template.shape or value.dtype != template.dtype:
            raise fail
    elif isinstance(template, bool) or isinstance(value, bool):
        if type(value) is not type(template):
            raise fail
    elif isinstance(template, (int, float)) or template is None:
        if template is None and value is None:
            return
        if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
            raise fail
        if isinstance(template, int) and not isinstance(template, bool) and not (isinstance(value, int) and value >= 0):
            raise fail  # counters are whole numbers >= 0
    elif value != template:  # strings (e.g. the keys a scheduler reads from param groups) and anything else
        raise fail


def _show(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, dict):
        return f"a mapping with keys {sorted(map(str, value))[:6]}"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    return f"{type(value).__name__} {str(value)[:40]!r}"


def _trial(where: str, load: Any, *args: Any) -> None:
    """Load a validated state into a throwaway object; a failure is a one-line CheckpointError."""
    try:
        load(*args)
    except Exception as e:  # torch, numpy and random raise many kinds for values of the right type but out of range
        raise CheckpointError(f"{where}: cannot be loaded ({' '.join(str(e).split())[:150]})") from None


def _optimizer_states(raw: dict, path: Path, model: DigitClassifier) -> tuple[list, list]:
    """The checkpoint's optimizer and scheduler states, checked against throwaway ones built from `model`'s config."""
    params = list(model.parameters())
    with refused_as("model.optimizer"):
        optimizer = model.optimizer_factory(params=params)
    schedulers = []
    if model.scheduler_factory is not None:
        extra = {"total_steps": 1000} if "total_steps" in _arguments(model.scheduler_factory) else {}
        with refused_as("model.scheduler"):
            schedulers.append(model.scheduler_factory(optimizer=optimizer, **extra))
    states, scheduled = raw.get("optimizer_states"), raw.get("lr_schedulers")
    if not isinstance(states, list) or not isinstance(scheduled, list):
        raise CheckpointError(f"{path}: holds weights but no training state; it cannot be resumed")
    dropped_scheduler = bool(scheduled) and not schedulers  # this run's config has none: Lightning's zip ignored it
    if dropped_scheduler:
        log.warning(f"{path}: this run's model has no LR scheduler; the checkpoint's scheduler state is not used")
        scheduled = []
    if len(states) != 1 or len(scheduled) != len(schedulers):
        raise CheckpointError(f"{path}: holds {len(states)} optimizer and {len(scheduled)} scheduler states; this "
                              f"run's model has 1 and {len(schedulers)}")  # fmt: skip
    state = states[0]
    template = optimizer.state_dict()
    if not isinstance(state, dict) or set(state) != {"state", "param_groups"}:
        raise CheckpointError(f"{path}: optimizer_states[0] is not an optimizer state")
    if dropped_scheduler and isinstance(state["param_groups"], list):  # and the keys it added to the groups
        keys = {k for group in template["param_groups"] for k in group}
        groups = [{k: v for k, v in g.items() if k in keys} if isinstance(g, dict) else g
                  for g in state["param_groups"]]  # fmt: skip
        state = {**state, "param_groups": groups}
        states = [state]
    _like(state["param_groups"], template["param_groups"], f"{path}: optimizer_states[0].param_groups")
    if not isinstance(state["state"], dict):
        raise CheckpointError(f"{path}: optimizer_states[0].state is not a mapping")
    for index, entries in state["state"].items():
        where = f"{path}: optimizer_states[0].state[{index}]"
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(entries, dict):
            raise CheckpointError(f"{where}: not the state of one of the model's {len(params)} parameters")
        for key, tensor in entries.items():
            fits = tensor is None or (
                isinstance(tensor, torch.Tensor) and tensor.shape in (params[index].shape, torch.Size([]))
            )
            if not isinstance(key, str) or not fits:
                raise CheckpointError(f"{where}.{key}: {_show(tensor)}, not shaped like its parameter")
    _trial(f"{path}: optimizer_states[0]", optimizer.load_state_dict, state)
    for i, (scheduler, saved) in enumerate(zip(schedulers, scheduled, strict=True)):
        _like(saved, scheduler.state_dict(), f"{path}: lr_schedulers[{i}]")
        _trial(f"{path}: lr_schedulers[{i}]", scheduler.load_state_dict, copy.deepcopy(saved))
        planned, reached = saved.get("total_steps"), saved.get("last_epoch")
        if isinstance(planned, int) and isinstance(reached, int) and not 0 <= reached <= planned:
            raise CheckpointError(f"{path}: lr_schedulers[{i}].last_epoch={reached}: outside its planned "
                                  f"{planned} steps")  # fmt: skip
    return states, scheduled


def _arguments(factory: Any) -> set[str]:
    return set(inspect.signature(factory).parameters)


def _loops(raw: dict, path: Path, trainer: L.Trainer) -> dict:
    loops = raw.get("loops")
    templates = {
        "fit_loop": trainer.fit_loop.state_dict(),
        "validate_loop": trainer.validate_loop.state_dict(),
        "test_loop": trainer.test_loop.state_dict(),
        "predict_loop": trainer.predict_loop.state_dict(),
    }
    if not isinstance(loops, dict) or not isinstance(loops.get("fit_loop"), dict):
        raise CheckpointError(f"{path}: holds weights but no training state; it cannot be resumed")
    _like(loops, templates, f"{path}: loops")
    return loops


def _rng(state: dict, where: str) -> None:
    """ResumableRun's states, loaded into throwaway generators first (values of the right type may still be out of
    range, e.g. a negative Mersenne Twister word)."""
    _trial(f"{where}.rng.torch", torch.Generator().set_state, state["rng"]["torch"])
    name, keys, pos, has_gauss, gauss = state["rng"]["numpy"]
    if not all(isinstance(k, int) and 0 <= k < 2**32 for k in keys):
        raise CheckpointError(f"{where}.rng.numpy: not a numpy random state (words outside 0..2**32-1)")
    numpy_state = (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss)
    _trial(f"{where}.rng.numpy", np.random.RandomState().set_state, numpy_state)
    version, internal, gauss_next = state["rng"]["python"]
    _trial(f"{where}.rng.python", random.Random().setstate, (version, tuple(internal), gauss_next))


def checkpoint_file(recorded: Any, directory: Path) -> str | None:
    """`recorded`, a path a ModelCheckpoint state names, as a file of `directory` (this run's checkpoints dir):
    a plain local path (no scheme, no `..`) whose file name is a regular file there (not a link), else None."""
    if not isinstance(recorded, str) or not recorded or "://" in recorded or ".." in PurePath(recorded).parts:
        return None
    name = PurePath(recorded).name
    candidate = directory / name
    try:
        mode = os.lstat(candidate).st_mode
    except OSError:
        return None
    return str(candidate) if stat.S_ISREG(mode) and name not in ("", ".") else None


def _score(value: Any) -> bool:
    """A metric value as ModelCheckpoint keeps it: a real floating-point scalar tensor (±inf before any score)."""
    return isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point() and not value.isnan()


def _model_checkpoint(state: Any, callback: ModelCheckpoint, where: str) -> dict:
    """ModelCheckpoint's state with only the paths that are regular files of this run's checkpoints dir."""
    template = callback.state_dict()
    if not isinstance(state, dict) or not set(template) <= set(state):
        raise CheckpointError(f"{where}: not a ModelCheckpoint state")
    for key in ("best_model_score", "current_score", "kth_value"):
        value = state[key]
        if value is not None and not _score(value):
            raise CheckpointError(f"{where}.{key}: {_show(value)}, not a score")
    if callback.dirpath is None:
        return {}
    directory = Path(os.path.realpath(callback.dirpath))
    dropped: list[str] = []

    def keep(key: str, recorded: Any) -> str | None:
        found = checkpoint_file(recorded, directory)
        if found is None and recorded:
            dropped.append(f"{key}={str(recorded)[:80]!r}")
        return found

    best_k = state["best_k_models"] if isinstance(state["best_k_models"], dict) else {}
    kept = {}
    for recorded, score in best_k.items():
        found = keep("best_k_models", recorded)
        if found and _score(score):
            kept[found] = score
    rebuilt = {**template, "best_k_models": kept, "dirpath": callback.dirpath, "current_score": state["current_score"]}
    for key in MC_PATHS:
        rebuilt[key] = keep(key, state[key]) or ""
    if rebuilt["best_model_path"]:
        rebuilt["best_model_score"] = state["best_model_score"]
    if rebuilt["kth_best_model_path"] in kept:
        rebuilt["kth_value"] = kept[rebuilt["kth_best_model_path"]]
    else:
        rebuilt["kth_best_model_path"] = ""
    if dropped:
        log.warning(f"{where}: dropped {', '.join(dropped)}: not a file of this run's checkpoints dir {directory}")
    return rebuilt


def _callbacks(raw: dict, path: Path, trainer: L.Trainer) -> dict:
    states = raw.get("callbacks") if isinstance(raw.get("callbacks"), dict) else {}
    rebuilt = {}
    for callback in trainer.callbacks:
        key = callback.state_key
        if key not in states:
            continue
        where = f"{path}: callbacks[{type(callback).__name__}]"
        if isinstance(callback, ModelCheckpoint):
            rebuilt[key] = _model_checkpoint(states[key], callback, where)
            continue
        template = callback.state_dict()
        if not template:
            continue
        _like(states[key], template, where)
        if "rng" in template:
            _rng(states[key], where)
        rebuilt[key] = states[key]
    return rebuilt


def for_fit(path: str | Path, model: DigitClassifier, trainer: L.Trainer) -> dict[str, Any]:
    """The checkpoint at `path` rebuilt from its validated pieces for `trainer.fit(model, ckpt_path=path)`."""
    path = Path(path)
    raw = read_checkpoint(path)
    spec = net_spec(raw, path)
    if dict(spec) != dict(model.hparams["net"]):
        raise CheckpointError(f"{path}: a checkpoint of the net {dict(spec)}, but this run's model is "
                              f"{dict(model.hparams['net'])}; resume with that model, or start a new run")  # fmt: skip
    check_fit(path, raw["state_dict"], model.state_dict())
    loops = _loops(raw, path, trainer)
    optimizer_states, lr_schedulers = _optimizer_states(raw, path, model)
    counters = {key: raw.get(key) for key in ("epoch", "global_step")}
    for key, value in counters.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"{path}: {key}={value!r} is not a non-negative integer")
    rebuilt = {
        **counters,
        "pytorch-lightning_version": L.__version__,
        "state_dict": raw["state_dict"],
        "loops": loops,
        "optimizer_states": optimizer_states,
        "lr_schedulers": lr_schedulers,
        "callbacks": _callbacks(raw, path, trainer),
        "hyper_parameters": dict(model.hparams),
    }
    if any(isinstance(c, WeightAveraging) for c in trainer.callbacks) and "current_model_state" in raw:
        check_fit(path, raw["current_model_state"], model.state_dict())
        averaging = raw.get("averaging_state")
        if not isinstance(averaging, dict) or set(averaging) != {"n_averaged"}:
            raise CheckpointError(f"{path}: its averaging_state is not an EMA's state")
        _like(averaging["n_averaged"], torch.tensor(0), f"{path}: averaging_state.n_averaged")
        rebuilt |= {"current_model_state": raw["current_model_state"], "averaging_state": averaging}
    for owner in (trainer.precision_plugin, trainer.datamodule):
        template = owner.state_dict() if owner is not None else None
        key = type(owner).__qualname__
        if template and key in raw:
            _like(raw[key], template, f"{path}: {key}")
            rebuilt[key] = raw[key]
    return rebuilt


def for_test(path: str | Path, model: DigitClassifier) -> dict[str, Any]:
    """The checkpoint at `path` rebuilt for `trainer.test(model, ckpt_path=path)`: its weights, checked to fit."""
    path = Path(path)
    raw = read_checkpoint(path)
    check_fit(path, raw["state_dict"], model.state_dict())
    return {"pytorch-lightning_version": L.__version__, "state_dict": raw["state_dict"]}


def hand_over(trainer: L.Trainer, path: str | Path, checkpoint: dict[str, Any]) -> str:
    """Make `trainer`'s checkpoint IO return `checkpoint` when Lightning loads `path`; returns the path to pass."""
    io = trainer.strategy.checkpoint_io
    if not isinstance(io, AtomicCheckpointIO):
        io = trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    io.hand_over(str(path), checkpoint)
    return str(path)


def tested_checkpoint(trainer: L.Trainer, final: bool = False) -> str:
    """The run's model, which the test after fit loads: `last.ckpt` (the ModelCheckpoint without a monitor) when
    `final`, else the best val/acc checkpoint; a file that callback wrote in this run's checkpoints dir, or "" (then
    the test uses the weights in memory)."""
    callback = next((c for c in trainer.checkpoint_callbacks if (c.monitor is None) == final), None)
    best = callback.best_model_path if callback is not None and callback.dirpath is not None else ""
    if not best:
        return ""
    directory = Path(os.path.realpath(callback.dirpath))
    found = checkpoint_file(best, directory)
    if found is None or Path(os.path.realpath(Path(best).parent)) != directory:
        log.warning(f"The checkpoint {best} is not a file of this run's checkpoints dir; testing the weights")
        return ""
    return found
