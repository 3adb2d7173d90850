"""Bad configuration fails before any data is touched, in one line that names the key, the value and the fix."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, ValidationError

from digit_lightning import schema
from digit_lightning.cli import EXIT_USER_ERROR, compose_config, one_line
from digit_lightning.config import ConfigError, type_error, validate_config
from digit_lightning.train import train

# override -> the start of the one line the CLI must print (after "error: ")
BAD = {
    "data.batch_size=0": "data.batch_size=0: must be an integer >= 1",
    "data.batch_size=abc": "data.batch_size=abc: must be an integer >= 1",
    "model.optimizer.lr=-0.1": "model.optimizer.lr=-0.1: must be a finite number > 0",
    "data.val_size=60000": "data.val_size=60000: must be an integer from 1 to 59999",
    "trainer.max_epochs=-2": "trainer.max_epochs=-2: must be a whole number >= 0 (-1: no limit), or null",
    "data.batchsize=16": "data.batchsize: no such key; did you mean data.batch_size?",
    "+data.batchsize=16": (
        "data.batchsize=16: MNISTDataModule has no argument 'batchsize'; did you mean data.batch_size?"
    ),
    "+sed=7": "sed=7: no such setting; did you mean seed?",
    "model=nope": "model=nope: no such option in group 'model'; choose from: digit",
    "=5": "'=5': an override needs a key before '='",
    "+=5": "'+=5': an override needs a key before '='",
}


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m digit_lightning.train <args>` as a user would (importing Lightning takes seconds)."""
    return subprocess.run([sys.executable, "-m", "digit_lightning.train", *args], cwd=cwd,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600)  # fmt: skip


# A few through the real CLI in the fast suite (each start costs seconds); every one of them with `-m slow`.
FAST_CLI = ["trainer.max_epochs=-2", "+sed=7", "=5"]  # and data.batch_size=0 with HYDRA_FULL_ERROR=1


@pytest.mark.parametrize(
    "cases",
    [
        pytest.param(FAST_CLI, id="fast", marks=pytest.mark.slow),
        pytest.param(list(BAD), id="all", marks=pytest.mark.slow),
    ],
)
def test_cli_rejects_each_bad_setting_in_one_line_before_touching_data(tmp_path: Path, cases: list[str]):
    """One real CLI run per bad override (two at a time) plus one with HYDRA_FULL_ERROR=1."""
    data_dir = tmp_path / "data"
    bad = {k: BAD[k] for k in cases}

    def run(i: int, override: str) -> subprocess.CompletedProcess:
        return cli(override, f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path}/{i}", cwd=tmp_path)

    with ThreadPoolExecutor(max_workers=2) as pool:
        full = pool.submit(cli, "data.batch_size=0", f"hydra.run.dir={tmp_path}/full", cwd=tmp_path,
                           env={"HYDRA_FULL_ERROR": "1"})  # fmt: skip
        results = dict(zip(bad, pool.map(run, range(len(bad)), bad), strict=True))
    failures = [
        f"{override}: rc={r.returncode}, stderr={r.stderr[-2000:]!r}"
        for override, r in results.items()
        if r.returncode != EXIT_USER_ERROR
        or len(r.stderr.splitlines()) != 1
        or not r.stderr.startswith(f"error: {bad[override]}")
        or "Traceback" in r.stdout
    ]
    assert not failures, "\n".join(failures)
    assert not data_dir.exists()  # every run failed before any data was touched
    assert full.result().returncode != 0 and "Traceback" in full.result().stderr
    assert "ConfigError: data.batch_size=0: must be an integer >= 1" in full.result().stderr
    # A failed run leaves its error in its log, not an empty run dir.
    assert BAD["+sed=7"] in (tmp_path / str(cases.index("+sed=7")) / "train.log").read_text()


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("trainer.max_epoch=3", "trainer.max_epoch: no such key; did you mean trainer.max_epochs?"),
        ("trainer.limit_train_batches=5", "trainer.limit_train_batches: no such key; to pass an argument the "
                                          "config leaves out, add it with +trainer.limit_train_batches=..."),
        ("mdel.x=1", "mdel: no such key; did you mean model?"),
        ("model=nope", BAD["model=nope"]),
        ("trainer=tpu", "trainer=tpu: no such option in group 'trainer'; choose from: cpu, ddp, ddp_sim, default, gpu"),
        ("data.batch_size=[", "cannot parse the override 'data.batch_size=['"),
    ],
)  # fmt: skip
def test_hydra_composition_errors_become_one_line(override: str, line: str):
    """What the CLI prints for errors Hydra raises while composing (the CLI path itself is tested above)."""
    with pytest.raises(Exception) as err:
        compose_config(["paths.output_dir=/tmp/x", override])
    message = one_line(err.value)
    assert message.startswith(line) and "\n" not in message, message


def test_a_group_another_command_lacks_is_one_line():  # in-process twin of the CLI cases below
    for command, override in (("predict", "logger=csv"), ("eval", "model=digit")):
        with pytest.raises(Exception) as err:
            compose_config(["ckpt_path=missing.ckpt", override], config_name=command)
        group = override.split("=")[0]
        assert one_line(err.value) == f"{group}: this command has no such config group; see --help for its groups"


def test_omegaconf_errors_are_named_by_their_key_not_their_text():
    """OmegaConf's errors carry the key (`full_key`) and the reason (`msg`) as attributes: one line from those."""
    cfg = compose_config(["paths.output_dir=/tmp/x", "data.batch_size=???"])
    with pytest.raises(MissingMandatoryValue) as missing:
        _ = cfg.data.batch_size
    assert one_line(missing.value) == "data.batch_size: has no value (???); set it, e.g. data.batch_size=..."

    @dataclass
    class Typed:  # a typed node outside schema.py's settings (those get config.type_error's line first)
        count: int = 1

    typed = OmegaConf.create({"custom": OmegaConf.structured(Typed)})
    with pytest.raises(ValidationError) as invalid:
        typed.custom.count = "abc"
    message = one_line(invalid.value)
    assert message.startswith("custom.count: Value 'abc' of type 'str' could not be converted to Integer")
    assert "\n" not in message and "full_key" not in message


def test_python_api_raises_config_error_before_building_anything(tmp_path: Path):
    cfg = compose_config([f"paths.output_dir={tmp_path}", f"paths.data_dir={tmp_path}/data", "data.val_size=60000"])
    with pytest.raises(ConfigError, match=r"^data.val_size=60000: must be an integer from 1 to 59999"):
        train(cfg)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "override",
    ["trainer.max_epochs=-1", "trainer.max_epochs=0", "data.val_size=59999", "model.optimizer.lr=1e-6",
     "model.scheduler=null", "+trainer.limit_train_batches=0.5", "+trainer.gradient_clip_val=1.0", "seed=null",
     "+model.optimizer.weight_decay=0.01"],
)  # fmt: skip
def test_good_edge_values_pass(override: str):
    validate_config(compose_config(["paths.output_dir=/tmp/x", override]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.batch_size=1.5", "data.batch_size=1.5: must be an integer >= 1"),
        ("data.batch_size=true", "data.batch_size=true: must be an integer >= 1"),
        ("model.optimizer.lr=inf", "model.optimizer.lr=inf: must be a finite number > 0"),
        ("data.val_size=0", "data.val_size=0: must be an integer from 1"),
        ("+data.batchsize=16", BAD["+data.batchsize=16"]),
        ("+model.optimizer.lrr=0.1", "model.optimizer.lrr=0.1: Adam has no argument 'lrr'; did you mean "
                                     "model.optimizer.lr?"),
        ("model.optimizer._target_=torch.optim.Adamm", "model.optimizer._target_=torch.optim.Adamm: cannot be"),
        ("+sed=7", BAD["+sed=7"]),
        ("extras.print_config=maybe", "extras.print_config=maybe: must be true or false"),
    ],
)  # fmt: skip
def test_more_bad_values_are_named(override: str, message: str):
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config(["paths.output_dir=/tmp/x", override]))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    ("entry_point", "override", "message"),
    [
        pytest.param("eval", "nope=1", "nope: no such key", marks=SLOW),
        pytest.param("eval", "data.batch_size=0", "data.batch_size=0: must be an integer >= 1", marks=SLOW),
        pytest.param("eval", "model=digit", "model: this command has no such config group", marks=SLOW),
        pytest.param("predict", "logger=csv", "logger: this command has no such config group", marks=SLOW),
        pytest.param("predict", "batch_size=0", "batch_size=0 must be a whole number >= 1", marks=SLOW),
        pytest.param("predict", "top_k=true", "top_k=True must be a whole number from 1 to 10", marks=SLOW),
        pytest.param("export", "opset=abc", "opset=abc must be a whole number >= 18", marks=SLOW),
        pytest.param("export", "opset=5", "opset=5 must be a whole number >= 18", marks=SLOW),
    ],
)
def test_other_entry_points_report_bad_settings_in_one_line(run_cli, tmp_path: Path, entry_point, override, message):
    args = [override, "hydra.run.dir=run"]
    if entry_point != "eval":
        args += ["ckpt_path=missing.ckpt", "inputs=[x.png]"] if entry_point == "predict" else ["ckpt_path=missing.ckpt"]
    result = run_cli(f"digit_lightning.{entry_point}", *args, cwd=tmp_path)
    assert result.returncode == EXIT_USER_ERROR, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr


# --- the schema (digit_lightning/schema.py): types while composing, ranges in validate_config, plain configs too ----


def test_a_type_error_is_classified_by_its_exception_type_not_its_text():
    cfg = compose_config(["paths.output_dir=/tmp/x"])
    with pytest.raises(ValidationError) as err:
        cfg.data.batch_size = "abc"
    assert str(type_error(err.value)) == "data.batch_size=abc: must be an integer >= 1"  # OmegaConf's own error
    with pytest.raises(ConfigError, match=r"^data\.batch_size=abc: must be an integer >= 1$"):
        compose_config(["paths.output_dir=/tmp/x", "data.batch_size=abc"])
    assert type_error(ValueError("data.batch_size=abc")) is None  # only OmegaConf's ValidationError


def test_a_plain_config_gets_the_same_checks_as_a_typed_one():
    """A resumed run's config is rebuilt as plain data (runs.resumed_config): the ranges and types still hold."""
    plain = OmegaConf.create(OmegaConf.to_container(compose_config(["paths.output_dir=/tmp/x"])))
    assert OmegaConf.get_type(plain.data) is dict
    validate_config(plain)
    plain.data.batch_size = "abc"
    with pytest.raises(ConfigError, match=r"^data\.batch_size=abc: must be an integer >= 1$"):
        validate_config(plain)


def test_the_typed_groups_are_checked_while_composing_and_the_open_ones_take_new_arguments():
    cfg = compose_config(
        ["paths.output_dir=/tmp/x", "+trainer.limit_train_batches=3", "+model.optimizer.betas=[0.7,0.9]"]
    )
    assert OmegaConf.get_type(cfg.data) is schema.Data and OmegaConf.get_type(cfg.model) is schema.Model
    assert cfg.trainer.limit_train_batches == 3 and list(cfg.model.optimizer.betas) == [0.7, 0.9]
    with pytest.raises(ConfigError, match=r"^extras\.print_config=maybe: must be true or false$"):
        compose_config(["paths.output_dir=/tmp/x", "extras.print_config=maybe"])
    with pytest.raises(ConfigError) as err:  # a typed key stays; a new argument of an open node can go
        compose_config(["paths.output_dir=/tmp/x", "~data.eval_batch_size"])
    assert str(err.value) == ("~data.eval_batch_size: a typed setting cannot be removed; set it instead "
                              "(data.eval_batch_size=..., an integer >= 1, or null)")  # fmt: skip
    assert "max_lr" not in compose_config(["paths.output_dir=/tmp/x", "~model.scheduler.max_lr"]).model.scheduler


def test_every_declared_setting_is_a_key_of_the_shipped_configs():
    """The schema and the yaml describe the same keys (a renamed key in one of them fails here)."""
    train, evaluate = compose_config(["paths.output_dir=/tmp/x"]), compose_config(["ckpt_path=x"], "eval")
    optional = {"model.optimizer.weight_decay", "trainer.max_steps", "tta"}  # their class's default unless set
    missing = object()
    absent = [key for key, _ in schema.settings()
              if key not in optional and OmegaConf.select(train, key, default=missing) is missing]  # fmt: skip
    assert not absent
    assert OmegaConf.select(evaluate, "tta") is False and OmegaConf.select(evaluate, "data.batch_size") == 16
