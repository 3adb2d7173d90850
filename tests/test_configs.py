"""Every option of every config group composes, and what it describes can be built."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from composition import compose
from omegaconf import OmegaConf

from digit_lightning.cli import CONFIG_DIR, compose_config, instantiate_group
from digit_lightning.config import validate_config
from digit_lightning.module import DigitClassifier

GROUPS = ["data", "model", "trainer", "logger", "callbacks", "paths", "extras", "debug", "experiment", "hparams_search"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((Path(CONFIG_DIR) / g).glob("*.yaml"))]
NEEDS_GPU = {("trainer", "gpu"), ("trainer", "ddp")}
NEEDS_EXTRA = {("logger", "mlflow"): "mlflow", ("logger", "many"): "mlflow", ("logger", "wandb"): "wandb"}  # tracking


def test_every_group_has_options():
    assert {g for g, _ in OPTIONS} == set(GROUPS)


@pytest.mark.parametrize(
    ("group", "option"),
    # Building MLflow's and W&B's loggers imports them (3.5 s): slow, as test_tracking's runs with them
    [pytest.param(g, o, marks=pytest.mark.slow) if (g, o) in NEEDS_EXTRA else (g, o) for g, o in OPTIONS],
    ids=[f"{g}={o}" for g, o in OPTIONS],
)
def test_option_composes_validates_and_instantiates(make_cfg, group: str, option: str):
    cfg = make_cfg(f"{group}={option}")
    validate_config(cfg)  # every shipped option passes the checks a run makes before it builds anything
    if (group, option) in NEEDS_GPU and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    if (group, option) in NEEDS_EXTRA:
        pytest.importorskip(NEEDS_EXTRA[group, option], reason="the `tracking` extra is not installed")
    assert isinstance(hydra.utils.instantiate(cfg.data), L.LightningDataModule)
    assert isinstance(hydra.utils.instantiate(cfg.model, _convert_="all"), DigitClassifier)
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=instantiate_group(cfg.get("callbacks")), logger=instantiate_group(cfg.get("logger"))
    )
    assert isinstance(trainer, L.Trainer)


TRACKING_LOGGERS = {"mlflow": {"MLFlowLogger"}, "wandb": {"WandbLogger"}, "many": {"TensorBoardLogger", "MLFlowLogger"}}


@pytest.mark.parametrize("option", sorted(TRACKING_LOGGERS))
def test_tracking_options_compose_and_validate(make_cfg, option: str):
    """The fast half of the slow cases above: MLflow's and W&B's options compose, pass a run's checks and name the
    loggers they would build."""
    cfg = make_cfg(f"logger={option}")
    validate_config(cfg)
    assert {node._target_.rsplit(".", 1)[-1] for node in cfg.logger.values()} == TRACKING_LOGGERS[option]


@pytest.mark.parametrize(
    "overrides",
    [
        ["paths.output_dir=/tmp/a", "trainer=cpu", "paths.output_dir=/tmp/b", "ckpt_path=/tmp/run"],
        ["paths.data_dir=/d", "model=strong", "ckpt_path=last", "paths.output_dir=${hydra:runtime.output_dir}"],
        ["ckpt_path='/tmp/a, b'", "paths.output_dir=/tmp/x y"],  # quoted or spaced: Hydra parses them
    ],
)
def test_the_tests_shared_compositions_are_hydras(overrides: list[str]):
    """tests/composition.py sets plain paths on a copy of a shared composition: the same config Hydra composes."""
    hydras = OmegaConf.to_yaml(compose_config(overrides))
    for _ in range(2):  # the first composes, the second copies
        assert OmegaConf.to_yaml(compose(overrides)) == hydras


def test_defaults_are_the_tutorials():
    cfg = compose_config(["paths.output_dir=/tmp/x"])
    assert cfg.data.batch_size == 16
    assert cfg.model.optimizer._target_ == "torch.optim.Adam" and cfg.model.optimizer.lr == 1e-3
    assert cfg.trainer.max_epochs == 10 and cfg.trainer.accelerator == "auto"
    assert cfg.optimized_metric == "val/acc_best" and cfg.train and cfg.test and cfg.ckpt_path is None
