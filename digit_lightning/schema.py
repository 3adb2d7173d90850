"""The config's shape, written once: a dataclass per group a user types into, each checked setting's range beside it,
and the settings that describe a run (its HParams columns and its summary line: `column=`).

The closed groups (data=mnist, model's own arguments, extras, the top-level training keys) are the base of their yaml
(`defaults: [/<name>_schema@_here_, _self_]`), so OmegaConf checks their types while Hydra composes and a misspelt key
fails at once. Lightning's Trainer arguments and the optimizer's, scheduler's and net's stay open (any argument of
their class, added with `+key=value`); the few of their keys we check are declared here all the same, in classes that
are not a yaml's base. `config.validate_config` checks every range, whether the node is typed or plain data (a resumed
run's config is rebuilt as plain data). `register()` puts the bases in Hydra's ConfigStore; `digit_lightning.cli`
calls it, before any entry point composes.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional  # OmegaConf 2.3 reads the annotations: no `X | None`, no `dict[...]`

from hydra.core.config_store import ConfigStore
from hydra.utils import get_class

MNIST_TRAIN_IMAGES = 60_000  # data.val_size is carved out of these


def whole(low: float, high: float = math.inf, null: bool = False) -> Callable[[Any], bool]:
    """An integer (not a bool) from `low` to `high`, or None where `null`."""
    return lambda v: (null and v is None) or (isinstance(v, int) and not isinstance(v, bool) and low <= v <= high)


def positive(v: Any) -> bool:
    """A finite number > 0."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def boolean(v: Any) -> bool:
    """True or False."""
    return isinstance(v, bool)


def mapping_or_null(v: Any) -> bool:
    """None, or a mapping of settings."""
    return v is None or isinstance(v, Mapping)


def anything(v: Any) -> bool:
    """No range to check (the type alone, where OmegaConf checks it)."""
    return True


def class_name(node: Any) -> str:
    """The class a `_target_` node names, without its module; `none` for no node."""
    return str(node["_target_"]).rsplit(".", 1)[-1] if node and node.get("_target_") else "none"


def weight_decay(optimizer: Any) -> float:
    """The optimizer's weight decay: the config's, else its class default (AdamW's is 0.01, Adam's 0)."""
    if "weight_decay" in optimizer:
        return float(optimizer.weight_decay)
    try:
        default = inspect.signature(get_class(optimizer._target_)).parameters["weight_decay"].default
    except (ImportError, KeyError, ValueError, AttributeError):
        return 0.0
    return float(default) if isinstance(default, (int, float)) else 0.0


def setting(
    allowed: str = "",
    ok: Callable[[Any], bool] = anything,
    column: str | None = None,
    read: Callable[[Any, Any], Any] | None = None,
) -> Any:
    """A field with what is `allowed` (in words, for the error line) and its check `ok`; `column`: the HParams
    column (and summary value) it gives, `read(value, parent node)` -> what that column shows (default: the value)."""
    return field(metadata={"allowed": allowed, "ok": ok, "column": column, "read": read or (lambda value, node: value)})


A_BOOL = "true or false"


@dataclass
class Data:
    """conf/data/mnist.yaml: MNISTDataModule's arguments."""

    _target_: str = setting()
    _convert_: str = setting()
    data_dir: str = setting("a directory path", lambda v: isinstance(v, str) and v.strip() != "")
    batch_size: int = setting("an integer >= 1", whole(1), column="batch_size")
    eval_batch_size: Optional[int] = setting("an integer >= 1, or null", whole(1, null=True))
    val_size: int = setting(f"an integer from 1 to {MNIST_TRAIN_IMAGES - 1}", whole(1, MNIST_TRAIN_IMAGES - 1))
    split_seed: int = setting("an integer", whole(-(2**63)))
    sources: List[str] = setting("a list of sources (torchvision, pypi)")
    verify: bool = setting(A_BOOL)  # false: the raw files are read as they are (e.g. the tests' synthetic digits)
    # `Any`, not Optional[Dict]: OmegaConf 2.3 cannot merge an override such as `data.augment={degrees:10}` into a
    # typed mapping that is null
    augment: Any = setting(
        "null or a mapping such as {degrees: 10}",
        mapping_or_null, column="augmentation",
        read=lambda v, _: " ".join(f"{k}={x}" for k, x in v.items()) if v else "none",
    )  # fmt: skip
    num_folds: Optional[int] = setting("null (no folds) or an integer >= 2", whole(2, MNIST_TRAIN_IMAGES, True))
    fold: int = setting("an integer >= 0 (below data.num_folds)", whole(0))


def fold_problem(num_folds: int | None, fold: int | None) -> str | None:
    """What is wrong with `data.fold` given `data.num_folds`, or None: the one rule across the two keys, asked by
    config.validate_config before a run and by MNISTDataModule when built from Python."""
    if num_folds is None and fold not in (None, 0):
        return (f"data.fold={fold}: folds need data.num_folds (e.g. data.num_folds=10); without it the run "
                "validates on the fixed split of data.val_size images")  # fmt: skip
    if num_folds is not None and fold is not None and not 0 <= fold < num_folds:
        return f"data.fold={fold}: must be from 0 to {num_folds - 1} (data.num_folds={num_folds})"
    return None


@dataclass
class Model:
    """conf/model/*.yaml: DigitClassifier's arguments; the net, optimizer and scheduler are open (see below)."""

    _target_: str = setting()
    compile: bool = setting(A_BOOL)
    channels_last: Any = setting("auto, true or false", lambda v: v == "auto" or isinstance(v, bool))
    label_smoothing: float = setting("a number from 0 to 1", lambda v: v == 0 or (positive(v) and v <= 1))
    net: Dict[str, Any] = setting("a net: {name: ..., its arguments}", column="model",
                                  read=lambda v, _: v["name"])  # fmt: skip
    optimizer: Dict[str, Any] = setting("an optimizer: {_target_: ..., _partial_: true, lr: ...}")
    scheduler: Any = setting(  # Any: as data.augment
        "null or a scheduler: {_target_: ..., _partial_: true, ...}",
        mapping_or_null, column="schedule",
        read=lambda v, _: class_name(v).replace("none", "constant"),
    )  # fmt: skip


@dataclass
class Optimizer:
    """The optimizer's keys we check (open: any other argument of its class, e.g. `+model.optimizer.betas=...`)."""

    _target_: str = setting(column="optimizer", read=lambda v, node: class_name(node))
    lr: float = setting(allowed="a finite number > 0", ok=positive, column="lr", read=lambda v, _: float(v))
    weight_decay: float = setting(column="weight_decay", read=lambda v, node: weight_decay(node))


@dataclass
class Scheduler:
    """The scheduler's keys we check (open, like the optimizer)."""

    max_lr: float = setting(allowed="a finite number > 0", ok=positive)


@dataclass
class Trainer:
    """Lightning Trainer keys we check and show (open: every Trainer argument; Lightning checks the others)."""

    max_epochs: Optional[int] = setting(allowed="a whole number >= 0 (-1: no limit), or null", ok=whole(-1, null=True),
                                        column="epochs", read=lambda v, _: int(v))  # fmt: skip
    min_epochs: Optional[int] = setting(allowed="a whole number >= 0, or null", ok=whole(0, null=True))
    max_steps: int = setting(allowed="a whole number >= 0 (-1: no limit)", ok=whole(-1))
    precision: str = setting(column="precision", read=lambda v, _: str(v))


@dataclass
class Extras:
    """conf/extras/default.yaml: console behaviour."""

    print_config: bool = setting(A_BOOL)


@dataclass
class Train:
    """The top-level keys of conf/train.yaml that are settings (the config groups come from its defaults list)."""

    seed: Optional[int] = setting("an integer from 0 to 2**32-1, or null", whole(0, 2**32 - 1, True),
                                  column="seed", read=lambda v, _: "random" if v is None else v)  # fmt: skip
    train: bool = setting(A_BOOL)
    test: bool = setting(A_BOOL)
    run_model: str = setting("auto, last or best", lambda v: v in ("auto", "last", "best"))
    ckpt_path: Any = setting()  # one checkpoint (validate_config says why a list is not)
    cpu_threads: Any = setting("auto, an integer >= 1, or null", lambda v: v in (None, "auto") or whole(1)(v))
    flush_denormal: bool = setting(A_BOOL)
    # the rest of the top level: the config groups (typed by their own bases) and keys with no range
    task_name: str = setting("a name")
    tags: List[str] = setting("a list of tags")
    optimized_metric: Optional[str] = setting("a metric name, e.g. val/acc_best")
    data: Any = setting()
    model: Any = setting()
    callbacks: Any = setting()
    logger: Any = setting()
    trainer: Any = setting()
    paths: Any = setting()
    extras: Any = setting()


@dataclass
class Run:
    """The top-level keys eval.yaml shares with predict, export and serve (their own are checked by their module)."""

    tta: bool = setting(A_BOOL)


# where each class's fields sit in a config ("": the top level), in the order of the HParams columns
PLACES: list[tuple[str, type]] = [
    ("model", Model),
    ("model.optimizer", Optimizer),
    ("data", Data),
    ("trainer", Trainer),
    ("model.scheduler", Scheduler),
    ("", Train),
    ("", Run),
    ("extras", Extras),
]
BASES = {"data_schema": Data, "model_schema": Model, "extras_schema": Extras, "train_schema": Train}  # ConfigStore


def settings() -> Iterator[tuple[str, dataclasses.Field]]:
    """(full key, field) of every declared setting, e.g. ("data.batch_size", <field>)."""
    for where, cls in PLACES:
        for f in dataclasses.fields(cls):
            yield f"{where}.{f.name}" if where else f.name, f


def columns(cfg: Any) -> dict[str, tuple[str, Any]]:
    """The run's HParams columns, in order: column -> (the config key it shows, its value), read from `cfg`."""
    found = {}
    for key, f in settings():
        if f.metadata["column"]:
            where, _, name = key.rpartition(".")
            node = cfg if not where else _select(cfg, where)
            value = node.get(name) if node is not None else None
            found[f.metadata["column"]] = (key, f.metadata["read"](value, node))
    return found


def _select(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = cfg.get(part) if cfg is not None else None
    return cfg


def register() -> None:
    """Put the yaml bases in Hydra's ConfigStore (as `<name>_schema`, outside the config groups, so that no group
    lists them as an option). Called once by digit_lightning.cli; calling it again is harmless."""
    store = ConfigStore.instance()
    for name, cls in BASES.items():
        store.store(name=name, node=cls)
