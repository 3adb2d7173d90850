"""Checkpoints and run dirs a user is handed are data: crafted ones run nothing (a marker file must not appear)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from composition import compose
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from digit_lightning import CONFIG_DIR
from digit_lightning.checkpoint import AtomicCheckpointIO, CheckpointError, load_checkpoint
from digit_lightning.cli import EXIT_USER_ERROR, RunDirGuard, compose_config, instantiate_group
from digit_lightning.errors import UserError
from digit_lightning.export import ExportError, export
from digit_lightning.models import ModelError, build_net
from digit_lightning.module import DigitClassifier
from digit_lightning.runs import (
    ResumeError,
    lock_run_dir,
    plan_resume,
    refuse_links,
    resume_command,
    resumed_config,
    run_model,
)
from digit_lightning.sweep_report import write_report
from digit_lightning.train import train

TOUCH = "digit_lightning.data.mnist.Path.touch"  # reachable through a module attribute: the old allow-list's hole
WRITE = "digit_lightning.data.mnist.Path.write_text"
DATA = Path(os.environ.get("DIGIT_LIGHTNING_DATA", Path(__file__).resolve().parent.parent / "data")).resolve()


def gadgets(marker: Path) -> dict[str, dict]:
    """hyper_parameters of crafted checkpoints, each of which would create `marker` if it were instantiated."""
    call = {"_target_": TOUCH, "_args_": [str(marker)]}
    return {
        "compile_target": {"net": {"name": "digit"}, "compile": call},
        "net_target": {"net": {"_target_": WRITE, "self": str(marker), "data": "pwned"}},
        "net_name_with_target": {"net": {"name": "digit", "_target_": TOUCH, "_args_": [str(marker)]}},
        "net_argument_target": {"net": {"name": "digit", "width": call}},
        "unknown_model": {"net": {"name": "os.system", "command": f"touch {marker}"}},
        "old_model_config": {"model_config": {"_target_": "digit_lightning.module.DigitClassifier", "net": call}},
        "optimizer_target": {"net": {"name": "digit"}, "optimizer": call, "scheduler": call},
    }


def craft(good: Path, tmp: Path, name: str, hparams: dict) -> Path:
    checkpoint = torch.load(good, weights_only=True)
    path = tmp / f"{name}.ckpt"
    torch.save({**checkpoint, "hyper_parameters": hparams}, path)
    return path


@pytest.mark.parametrize("gadget", list(gadgets(Path("m"))))
def test_crafted_checkpoint_runs_nothing(base_run, tmp_path: Path, gadget: str):
    marker = tmp_path / "marker"
    path = craft(base_run / "checkpoints" / "last.ckpt", tmp_path, gadget, gadgets(marker)[gadget])
    try:
        model = load_checkpoint(path)
    except CheckpointError as e:
        assert "\n" not in str(e) and str(path) in str(e)
    else:  # loaded by name: the extra keys were ignored, never built
        assert isinstance(model, DigitClassifier) and model.optimizer_factory is None
    # Lightning's own classmethod passes every hyperparameter to __init__, which only takes names and flags.
    with contextlib.suppress(Exception):
        DigitClassifier.load_from_checkpoint(path)
    assert not marker.exists(), "a crafted checkpoint ran code"


def test_weights_that_do_not_fit_are_refused_before_anything_is_built(base_run, make_cfg, tmp_path: Path):
    checkpoint = torch.load(base_run / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["state_dict"]["net.fc1.weight"] = torch.zeros(3, 3)
    torch.save(checkpoint, tmp_path / "shape.ckpt")
    with pytest.raises(CheckpointError, match="weights do not fit the model it names.*wrong shape: net.fc1.weight"):
        load_checkpoint(tmp_path / "shape.ckpt")
    with pytest.raises(CheckpointError, match="weights do not fit"):  # the resume path, before fit
        train(make_cfg(f"ckpt_path={tmp_path / 'shape.ckpt'}", *RESUME))


@pytest.mark.slow  # the CLI twin of an in-process test above
def test_entry_points_on_crafted_checkpoints_run_nothing(small_checkpoint, run_cli, tmp_path: Path, make_photo):
    """predict, eval and export, each on a different gadget, as a user would run them."""
    marker = tmp_path / "marker"
    g = gadgets(marker)
    photo = tmp_path / "seven.png"
    ink = (np.random.default_rng(0).random((28, 28)) > 0.8).astype("uint8") * 255
    make_photo(ink, np.random.default_rng(0)).save(photo)
    a, b, c = (craft(small_checkpoint[0], tmp_path, n, g[k]) for n, k in
               (("a", "compile_target"), ("b", "net_target"), ("c", "net_argument_target")))  # fmt: skip
    predict = run_cli("digit_lightning.predict", f"ckpt_path={a}", f"inputs=[{photo}]", cwd=tmp_path)
    assert predict.returncode in (0, 1) and "Traceback" not in predict.stderr, predict.stderr  # predicts, by name
    export = run_cli("digit_lightning.export", f"ckpt_path={b}", "format=torchscript", cwd=tmp_path)
    assert export.returncode == EXIT_USER_ERROR and "not a digit_lightning checkpoint" in export.stderr
    evaluate = run_cli("digit_lightning.eval", f"ckpt_path={c}", "hydra.run.dir=eval", cwd=tmp_path)
    assert evaluate.returncode == EXIT_USER_ERROR and len(evaluate.stderr.strip().splitlines()) == 1, evaluate.stderr
    assert not marker.exists()


def planted_run(small_checkpoint: Path, root: Path, edit) -> Path:
    """A run dir someone hands you: a real checkpoint and a `.hydra/` that `edit` tampers with."""
    run = root / "logs" / "train" / "runs" / "planted"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(small_checkpoint, run / "checkpoints" / "last.ckpt")
    (run / ".hydra").mkdir()
    cfg = OmegaConf.to_container(compose(["paths.output_dir=${hydra:runtime.output_dir}", "trainer=cpu"]))
    overrides: list[str] = []
    edit(cfg, overrides)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    return run


@pytest.mark.parametrize(
    ("where", "node"),
    [
        ("callbacks", lambda m: {"x": {"_target_": TOUCH, "_args_": [str(m)]}}),
        ("logger", lambda m: {"tensorboard": {"_target_": WRITE, "self": str(m), "data": "x"}}),
        ("trainer", lambda m: {"plugins": [{"_target_": "builtins.exec", "_args_": [f"open('{m}','w')"]}]}),
        ("callbacks", lambda m: {"y": {"_target_": "lightning.pytorch.callbacks.ModelCheckpoint", "_args_": [str(m)]}}),
        ("callbacks", lambda m: {"model_checkpoint": {"_target_": TOUCH, "_args_": [str(m)]}}),
    ],
)
def test_planted_targets_in_a_run_dir_config_are_never_taken(base_run, tmp_path: Path, where: str, node):
    """Targets come from the package's config for the run's recorded choices, never from its config.yaml."""
    marker = tmp_path / "marker"

    def edit(cfg: dict, overrides: list[str]) -> None:
        section = cfg[where]
        section.update(node(marker)) if isinstance(section, dict) else None

    _, cfg = resume_planted(base_run, tmp_path, edit)
    text = OmegaConf.to_yaml(cfg)
    assert TOUCH not in text and WRITE not in text and "builtins" not in text and "_args_" not in text
    assert cfg.callbacks.model_checkpoint._target_ == "lightning.pytorch.callbacks.ModelCheckpoint"
    instantiate_group(cfg.callbacks), instantiate_group(cfg.logger)
    assert not marker.exists()


@pytest.mark.slow  # the CLI twin of an in-process test above
def test_training_from_a_planted_run_dir_runs_nothing(small_checkpoint, run_cli, tmp_path: Path):
    """Through the CLI: a tampered config.yaml is refused in one line; overrides.yaml is never replayed."""
    marker = tmp_path / "marker"

    def plant_config(cfg: dict, overrides: list[str]) -> None:
        cfg["callbacks"]["x"] = f"${{oc.create:{{_target_: {TOUCH}, self: {marker}}}}}"

    bad = planted_run(small_checkpoint[0], tmp_path / "a", plant_config)
    result = run_cli("digit_lightning.train", f"ckpt_path={bad}", cwd=tmp_path / "a")
    assert result.returncode == EXIT_USER_ERROR and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "is an interpolation" in result.stderr and not marker.exists()

    def plant_overrides(cfg: dict, overrides: list[str]) -> None:
        overrides.append(f"+callbacks.x._target_={TOUCH}")
        cfg["model"]["scheduler"] = None  # the checkpoint's 150 steps are more than this run's one-cycle length
        cfg["trainer"]["limit_train_batches"] = 2
        cfg["trainer"]["limit_val_batches"] = 2
        cfg["test"] = False

    replay = planted_run(small_checkpoint[0], tmp_path / "b", plant_overrides)
    result = run_cli("digit_lightning.train", f"ckpt_path={replay}", "trainer.max_epochs=2", cwd=tmp_path / "b")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not marker.exists()


# --- Resume rebuilds, never replays: the parts of a checkpoint Lightning restores are checked first (issue 25) ---

# 20 training batches of 16; 5 validation and 5 test batches of 100 (the checks are on what a resume reads and
# writes, not on accuracy)
RESUME = ["+trainer.limit_train_batches=20", "+trainer.limit_val_batches=5", "+trainer.limit_test_batches=5",
          "data.eval_batch_size=100", "callbacks.progress_bar=null", "logger=none"]  # fmt: skip


class Evil:
    """A pickle that runs a shell command when loaded without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def base_run(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The issue's setup: a finished one-epoch run of 20 batches (in process; its checkpoints dir is what counts)."""
    out = tmp_path_factory.mktemp("base")
    train(compose_config([f"paths.output_dir={out}", f"paths.data_dir={mnist_dir}", "trainer=cpu",
                          "trainer.max_epochs=1", *RESUME]))  # fmt: skip
    return out


def copied_run(base_run: Path, tmp_path: Path, edit) -> Path:
    """A copy of a finished run's checkpoints dir whose last.ckpt `edit(checkpoint, mc_state, run)` tampered with."""
    run = tmp_path / "run"
    shutil.copytree(base_run / "checkpoints", run / "checkpoints")
    path = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    mc = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("ModelCheckpoint"))
    edit(checkpoint, mc, run)
    torch.save(checkpoint, path)
    return run


@pytest.fixture
def evil_url(tmp_path: Path):
    """A pickle that touches `tmp_path/PWNED` when unpickled, served by a real http.server on 127.0.0.1; its URL."""
    served = tmp_path / "www"
    served.mkdir()
    torch.save({"x": Evil(tmp_path / "PWNED")}, served / "evil.ckpt")
    server = subprocess.Popen([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1"], cwd=served,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        port = int(server.stdout.readline().split(" port ")[1].split()[0])
        yield f"http://127.0.0.1:{port}/evil.ckpt"
    finally:
        server.terminate()
        server.wait()


def test_a_url_as_best_model_path_is_never_fetched(base_run, make_cfg, tmp_path: Path, evil_url: str):
    """Reproducer 1: MC.best_model_path = a served pickle; Lightning's test(ckpt_path=best) would unpickle it."""
    marker = tmp_path / "PWNED"

    def edit(checkpoint: dict, mc: dict, run: Path) -> None:
        mc.update(best_model_path=evil_url, dirpath=str(run / "checkpoints"), best_model_score=torch.tensor(0.0))

    run = copied_run(base_run, tmp_path, edit)
    for epochs in (1, 2):  # a finished run (nothing to fit), then one more epoch
        cfg = make_cfg(f"paths.output_dir={run}", f"ckpt_path={run}/checkpoints/last.ckpt",
                       f"trainer.max_epochs={epochs}", *RESUME)  # fmt: skip
        metrics = train(cfg)
        assert "test/acc" in metrics and not marker.exists()
    assert not marker.exists()


def test_recorded_checkpoint_paths_outside_the_run_are_never_deleted(base_run, make_cfg, tmp_path: Path):
    """Reproducer 2: ModelCheckpoint removes the files it believes it wrote; a crafted state names a victim."""
    victim_dir, victim_file = tmp_path / "VICTIM_dir", tmp_path / "VICTIM_file"
    victim_dir.mkdir()
    (victim_dir / "precious").write_text("keep")
    victim_file.write_text("keep")

    def edit(checkpoint: dict, mc: dict, run: Path) -> None:
        escape = f"{run}/checkpoints/../../{{}}"
        mc.update(dirpath=str(run / "checkpoints"), last_model_path=escape.format("VICTIM_dir"),
                  best_k_models={escape.format("VICTIM_file"): torch.tensor(0.0)},
                  kth_best_model_path=escape.format("VICTIM_file"), best_model_path=str(victim_file))  # fmt: skip

    run = copied_run(base_run, tmp_path, edit)
    cfg = make_cfg(f"paths.output_dir={run}", f"ckpt_path={run}", "trainer.max_epochs=2", *RESUME)
    train(cfg)
    assert (victim_dir / "precious").read_text() == "keep" and victim_file.read_text() == "keep"
    assert (run / "checkpoints" / "epoch_001.ckpt").is_file()  # the run went on, and saved its own


def test_a_copied_last_ckpt_tests_a_checkpoint_of_its_own_run(base_run, make_cfg, tmp_path: Path, caplog):
    """Reproducer 6: a copy of last.ckpt resumed elsewhere names the original run's best file, which must not be
    tested; and the net it names must be this run's net."""
    copy = tmp_path / "elsewhere" / "last.ckpt"
    copy.parent.mkdir()
    shutil.copy(base_run / "checkpoints" / "last.ckpt", copy)
    out = tmp_path / "new_run"
    train(make_cfg(f"paths.output_dir={out}", f"ckpt_path={copy}", "trainer.max_epochs=1", *RESUME))
    restored = [r.getMessage() for r in caplog.records if "Restoring states" in r.getMessage()]
    assert restored and all(str(base_run) not in m for m in restored), restored

    checkpoint = torch.load(copy, weights_only=True)
    checkpoint["hyper_parameters"]["net"] = {"name": "lenet5"}
    torch.save(checkpoint, copy)
    with pytest.raises(CheckpointError, match=r"a checkpoint of the net \{'name': 'lenet5'\}, but this run's model"):
        train(make_cfg(f"paths.output_dir={out}", f"ckpt_path={copy}", *RESUME))


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (lambda c: c["optimizer_states"][0]["param_groups"][0].update(lr="evil"), r"param_groups\[0\].lr: str 'evil'"),
        (lambda c: c["lr_schedulers"][0]["_schedule_phases"][0].update(start_lr="evil"), "_schedule_phases"),
        (lambda c: c["optimizer_states"][0]["state"][0].update(exp_avg=torch.zeros(7)), r"state\[0\].exp_avg"),
        (lambda c: c["loops"]["fit_loop"]["epoch_progress"]["total"].update(ready="1"), "epoch_progress.total.ready"),
        (lambda c: c["callbacks"]["ResumableRun"]["rng"].update(python=(3, (1, 2), None)), "rng.python"),
        (lambda c: c.update(global_step=-3), "global_step=-3"),
    ],
)
def test_crafted_training_states_are_refused_in_one_line(base_run, make_cfg, tmp_path: Path, edit, error):
    """Reproducer 7's crafted optimizer, scheduler, loop and RNG states: one line naming the file, before fitting."""
    run = copied_run(base_run, tmp_path, lambda checkpoint, mc, run: edit(checkpoint))
    with pytest.raises(CheckpointError, match=error) as raised:
        train(make_cfg(f"paths.output_dir={run}", f"ckpt_path={run}", "trainer.max_epochs=2", *RESUME))
    assert "\n" not in str(raised.value) and str(run) in str(raised.value)


def set_scores(mc: dict, value: torch.Tensor) -> None:
    mc["best_model_score"] = value
    mc["best_k_models"] = {k: value for k in mc["best_k_models"]}


@pytest.mark.parametrize(
    ("edit", "error"),
    [  # the attack review's: states of the right shape whose values Lightning or torch fail on later
        (lambda c: c["lr_schedulers"][0].update(last_epoch=10**9, _step_count=10**9), "last_epoch=1000000000"),
        (lambda c: c["loops"]["fit_loop"]["epoch_progress"]["total"].update(ready=-3.5), "epoch_progress.total.ready"),
        (
            lambda c: set_scores(
                next(v for k, v in c["callbacks"].items() if k.startswith("ModelCheckpoint{'monitor'")),
                torch.tensor(1 + 1j),
            ),
            "best_model_score",
        ),  # fmt: skip
    ],
)
def test_out_of_range_training_states_are_refused_in_one_line(base_run, make_cfg, tmp_path: Path, edit, error):
    run = copied_run(base_run, tmp_path, lambda checkpoint, mc, run: edit(checkpoint))
    with pytest.raises(CheckpointError, match=error) as raised:
        train(make_cfg(f"paths.output_dir={run}", f"ckpt_path={run}", "trainer.max_epochs=2", *RESUME))
    assert "\n" not in str(raised.value)


# --- A run dir's config is a stranger's input: rebuilt from the package's config, plain values only (issue 25) ---


def resume_planted(base_run: Path, tmp_path: Path, edit, *typed: str):
    """Plant a run dir (base_run's checkpoints, a .hydra/config.yaml that `edit` tampers with) and rebuild the
    config a resume from it runs with."""
    run = planted_run(base_run / "checkpoints" / "last.ckpt", tmp_path, edit)
    typed = (f"ckpt_path={run}", "trainer=cpu", *RESUME, *typed)
    cfg = compose([*typed, f"paths.data_dir={DATA}", f"paths.output_dir={tmp_path / 'new'}"])
    return run, resumed_config(cfg, run, list(typed))


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("callbacks.evil", "${oc.create:{_target_: pathlib.Path.touch, self: MARKER}}"),
        ("logger.evil", "${oc.create:{_target_: pathlib.Path.touch, self: MARKER}}"),
        ("model.optimizer.betas", "${oc.create:{_target_: pathlib.Path.touch, self: MARKER}}"),
        ("callbacks.evil", "${oc.create:{_target_: torch.load, f: PICKLE, weights_only: false}}"),
        ("trainer.max_epochs", "${oc.env:HOME}"),
    ],
)
def test_interpolations_in_a_run_dir_config_are_refused(base_run, tmp_path: Path, where: str, value: str):
    """Reproducer 3: the raw YAML held no `_target_`, but `${oc.create:...}` would build one when resolved."""
    marker = tmp_path / "PWNED"
    torch.save({"x": Evil(marker)}, tmp_path / "evil.pkl")
    value = value.replace("MARKER", str(marker)).replace("PICKLE", str(tmp_path / "evil.pkl"))

    def edit(cfg: dict, overrides: list[str]) -> None:
        node = cfg
        for key in where.split(".")[:-1]:
            node = node.setdefault(key, {}) if node.get(key) is not None else node.__setitem__(key, {}) or node[key]
        node[where.rsplit(".", 1)[1]] = value

    with pytest.raises(ResumeError, match=f"{where}=.* is an interpolation") as raised:
        resume_planted(base_run, tmp_path, edit)
    assert "\n" not in str(raised.value) and not marker.exists()


def test_a_run_dir_config_cannot_move_where_the_run_writes(base_run, tmp_path: Path):
    """Reproducer 4: checkpoint dirpath and filename, the logger's save_dir and an Optuna storage pointing outside
    the run are not taken; the resumed run writes only inside its run dir. Targets come from the package."""
    elsewhere = tmp_path / "elsewhere"

    def edit(cfg: dict, overrides: list[str]) -> None:
        cfg["callbacks"]["model_checkpoint"].update(dirpath=str(elsewhere), filename="../../../OUTSIDE_{epoch}")
        cfg["logger"] = {"tensorboard": {**cfg["logger"]["tensorboard"], "save_dir": str(elsewhere)}}
        cfg["callbacks"]["optuna_pruning"] = {"_target_": "digit_lightning.callbacks.pruning.OptunaPruning",
                                              "storage": str(elsewhere / "j.log"), "trial": 0}  # fmt: skip
        cfg["callbacks"]["resumable_run"]["dirpath"] = str(elsewhere)
        cfg["trainer"]["default_root_dir"] = str(elsewhere)
        cfg["data"]["batch_size"] = 32  # a plain setting: taken

    run, cfg = resume_planted(base_run, tmp_path, edit, "trainer.max_epochs=2", "logger=tensorboard")
    assert cfg.data.batch_size == 32 and "optuna_pruning" not in cfg.callbacks
    assert cfg.callbacks.model_checkpoint.filename == "epoch_{epoch:03d}"
    train(cfg)
    assert not elsewhere.exists() and not list(tmp_path.rglob("OUTSIDE_*"))
    assert (run / "checkpoints" / "epoch_001.ckpt").is_file() and list((run / "tensorboard").rglob("events.*"))


def put(tree: dict, where: str, value) -> None:
    *parents, key = where.split(".")
    for part in parents:
        tree = tree[part]
    tree[key] = value


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("model", None),
        ("trainer", None),
        ("data", None),
        ("model.optimizer", None),
        ("callbacks.finite_loss._partial_", True),
        ("callbacks.dashboards._args_", [1]),
    ],  # fmt: skip
)
def test_a_run_dir_config_cannot_null_a_node_or_add_hydra_keys(base_run, tmp_path: Path, where: str, value):
    """The attack review's: `model: null` (a traceback), `_partial_`/`_args_` added to a known target."""
    _, cfg = resume_planted(base_run, tmp_path, lambda tree, overrides: put(tree, where, value))
    assert OmegaConf.select(cfg, where.rsplit(".", 1)[0] if "._" in where else where) is not None
    assert OmegaConf.select(cfg, where) is None or not where.rsplit(".", 1)[-1].startswith("_")


@pytest.mark.parametrize(
    ("where", "value", "error"),
    [
        ("model.optimizer.betas", [2, 3], "model.optimizer: Invalid beta parameter"),
        ("model.scheduler.pct_start", 7, "model.scheduler: Expected float between 0 and 1 pct_start"),
    ],  # fmt: skip
)
def test_bad_plain_values_in_a_run_dir_config_are_one_line(base_run, tmp_path: Path, where: str, value, error):
    """Plain values are taken from a run dir's config; torch checks some only when it builds the optimizer."""
    _, cfg = resume_planted(base_run, tmp_path, lambda tree, overrides: put(tree, where, value))
    with pytest.raises(UserError, match=error) as raised:
        train(cfg)
    assert "\n" not in str(raised.value)


def test_net_arguments_from_a_run_dir_are_bounded(base_run, tmp_path: Path):
    """`hidden=10**13` in a run dir's config (model=fast) would allocate 32 PB: refused in one line when built."""

    def edit(cfg: dict, overrides: list[str]) -> None:
        cfg["model"]["net"] = {"name": "fast", "hidden": 10**13}

    run = planted_run(base_run / "checkpoints" / "last.ckpt", tmp_path, edit)
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": {"model": "fast"}}}}))
    typed = [f"ckpt_path={run}"]
    cfg = resumed_config(compose([*typed, f"paths.data_dir={DATA}"]), run, typed)
    assert cfg.model.net.hidden == 10**13  # a plain value: taken, then bounded where the net is built
    with pytest.raises(ModelError, match=r"model.net.hidden=10000000000000: out of range"):
        build_net(**cfg.model.net)


# --- Files in a run dir are never written through a planted link (issue 25, reproducer 5) ---


@pytest.mark.parametrize("link", ["train.log", ".hydra/resume", ".hydra/config.yaml", "checkpoints/epoch_000.ckpt",
                                  ".lock", "tensorboard"])  # fmt: skip
def test_a_run_dir_holding_links_is_refused(base_run, tmp_path: Path, link: str):
    """Hydra appends to train.log and writes .hydra/resume/ before any task code runs: such a run dir resumes in a
    new dir (where the task refuses it in one line), and is never locked nor written."""
    run = planted_run(base_run / "checkpoints" / "last.ckpt", tmp_path, lambda cfg, overrides: None)
    victim = tmp_path / "victim"
    victim.mkdir() if link in (".hydra/resume", "tensorboard") else victim.write_text("keep")
    (run / link).unlink(missing_ok=True)
    (run / link).symlink_to(run / link if link == ".lock" else victim)  # .lock: a link loop
    for refuse in (lambda run: plan_resume(str(run), tmp_path), refuse_links, lock_run_dir):  # plan: before Hydra
        with pytest.raises(ResumeError, match=f"{link} is a symbolic link; a run dir holding links or special"):
            refuse(run)


@pytest.mark.parametrize("link", ["checkpoints/last.ckpt", "checkpoints", "job0", "best"])
def test_a_link_inside_a_named_dir_never_leads_into_another_run(base_run, tmp_path: Path, link: str):
    """The second attack review: a crafted dir whose checkpoint (or checkpoints dir, or a sweep's job dir) is a link
    into a victim's run. Resolved, it would make the training continue in the victim's run (overwriting its last.ckpt
    and config, deleting its epoch_000.ckpt) and export write beside the victim's file. Every entry point's lookup
    refuses it in one line, before anything is written."""
    victim = planted_run(base_run / "checkpoints" / "last.ckpt", tmp_path / "victim", lambda cfg, overrides: None)
    shutil.copy(victim / "checkpoints" / "last.ckpt", victim / "checkpoints" / "epoch_000.ckpt")
    before = {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()}
    crafted = tmp_path / "crafted"
    if link == "job0":  # read as a sweep dir: its newest job is a link to the victim's run
        crafted.mkdir()
        (crafted / "job0").symlink_to(victim)
    else:
        run = planted_run(base_run / "checkpoints" / "last.ckpt", tmp_path / "crafted_root", lambda c, o: None)
        crafted = run
        if link == "checkpoints":
            shutil.rmtree(run / "checkpoints")
            (run / "checkpoints").symlink_to(victim / "checkpoints")
        elif link == "best":  # the run's model is its best epoch (constant lr), a link to the victim's
            config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
            config["model"]["scheduler"] = None
            (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
            (run / "checkpoints" / "epoch_000.ckpt").symlink_to(victim / "checkpoints" / "epoch_000.ckpt")
        else:
            (run / link).unlink()
            (run / link).symlink_to(victim / link)
    lookups = [lambda: run_model(str(crafted), tmp_path)]
    if link != "best":
        lookups.append(lambda: plan_resume(str(crafted), tmp_path))
    for lookup in lookups:
        with pytest.raises(ResumeError, match="is a symbolic link; a run's checkpoints are read only as its own") as e:
            lookup()
        assert "\n" not in str(e.value)
    assert {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()} == before


def test_a_run_dir_config_cannot_add_logger_arguments_or_turn_off_checks(base_run, tmp_path: Path):
    """The second attack review: keys added to a logger node (W&B's `log_model: all` copies every checkpoint out of
    the run) and `data.verify: false` (the md5 checks of the user's data) are not taken from a run dir."""

    def edit(cfg: dict, overrides: list[str]) -> None:
        cfg["logger"] = {"tensorboard": {**cfg["logger"]["tensorboard"], "log_model": "all"}}
        cfg["data"]["verify"] = False
        cfg["model"]["optimizer"]["amsgrad"] = True  # an argument added with +model.optimizer.amsgrad=true: taken

    _, cfg = resume_planted(base_run, tmp_path, edit, "logger=tensorboard")
    assert "log_model" not in cfg.logger.tensorboard and cfg.data.verify is True
    assert cfg.model.optimizer.amsgrad is True


@pytest.mark.parametrize(
    ("plant", "why"),
    [
        ("hard:train.log", "a hard link"),
        ("hard:.hydra/resume/overrides.yaml", "a hard link"),
        ("fifo:train.log", "not a regular file or directory"),
        ("file:.hydra/resume", "not a directory"),
        ("file:tensorboard", "not a directory"),
    ],
)
def test_a_run_dir_holding_hard_links_or_special_files_is_refused(base_run, tmp_path: Path, plant: str, why: str):
    """The attack review's cases: a hard link to a file outside (Hydra and the log would write into the victim), a
    FIFO as train.log (the run would hang), a file where a run writes a directory (Hydra's traceback)."""
    run = planted_run(base_run / "checkpoints" / "last.ckpt", tmp_path, lambda cfg, overrides: None)
    kind, name = plant.split(":")
    victim = tmp_path / "victim"
    victim.write_text("keep")
    target = run / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True) if not target.is_dir() else shutil.rmtree(target)
    {
        "hard": lambda: os.link(victim, target),
        "fifo": lambda: os.mkfifo(target),
        "file": lambda: target.write_text("x"),
    }[kind]()
    for refuse in (lambda run: plan_resume(str(run), tmp_path), refuse_links):  # the plan: before Hydra writes
        with pytest.raises(ResumeError, match=f"{name} is {why}"):
            refuse(run)
    assert victim.read_text() == "keep"


def test_export_replaces_a_hard_linked_default_output_instead_of_writing_through_it(base_run, tmp_path: Path):
    shutil.copytree(base_run / "checkpoints", tmp_path / "checkpoints")
    victim = tmp_path / "victim"
    victim.write_text("keep")
    os.link(victim, tmp_path / "checkpoints" / "last.pt")  # the format does not matter: TorchScript is quick
    cfg = compose_config([f"ckpt_path={tmp_path}/checkpoints/last.ckpt", "format=torchscript"], config_name="export")
    export(cfg)
    assert victim.read_text() == "keep" and (tmp_path / "checkpoints" / "last.pt").stat().st_size > 1000


def test_a_lock_that_cannot_be_opened_is_one_line(tmp_path: Path):
    (tmp_path / ".lock").mkdir()  # not a link, not a file
    with pytest.raises(ResumeError, match=r"\.lock: cannot be locked"):
        lock_run_dir(tmp_path)


TYPED_DIRS = {  # how a command line can name the dir Hydra writes into: (the arguments, where the link is planted)
    "run dir": (lambda run: [f"hydra.run.dir={run}"], "train.log"),
    "++run dir": (lambda run: [f"++hydra.run.dir={run}"], "train.log"),
    "interpolated": (
        lambda run: [f"paths.log_dir={run.parents[2]}", "hydra.run.dir=${paths.log_dir}/train/runs/planted"],
        ".hydra/overrides.yaml",
    ),
    "as a dict": (lambda run: [f"hydra.run={{dir:{run}}}"], ".hydra/overrides.yaml"),
    "output subdir": (lambda run: [f"hydra.run.dir={run}", "hydra.output_subdir=meta"], "meta/config.yaml"),
    "sweep dir": (lambda run: ["hydra.mode=MULTIRUN", f"hydra.sweep.dir={run.parent}"], "planted/train.log"),
    "nested sweep job": (
        lambda run: [
            "hydra.mode=MULTIRUN",
            f"hydra.sweep.dir={run.parents[1]}",
            "hydra.sweep.subdir=runs/${hydra.job.num}",
        ],
        "runs/planted/train.log",
    ),
}


def guard(args: list[str] | DictConfig) -> None:
    """What Hydra's run or multirun does first with the config it composed (`args`: the overrides, or that config):
    RunDirGuard's check, its one `error:` line (it exits: Hydra would turn an exception into a warning) raised here
    as the UserError it says."""
    cfg = args if isinstance(args, DictConfig) else compose_config(args, return_hydra_config=True)
    multirun = OmegaConf.select(cfg, "hydra.mode") == RunMode.MULTIRUN
    before = HydraConfig.instance().cfg  # the guard sets Hydra's config, as Hydra's run does: put it back
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            (RunDirGuard().on_multirun_start if multirun else RunDirGuard().on_run_start)(config=cfg)
        except SystemExit as stop:
            assert stop.code == EXIT_USER_ERROR
            raise UserError(err.getvalue().strip().removeprefix("error: ")) from None
        finally:
            HydraConfig.instance().cfg = before


@pytest.mark.parametrize("how", list(TYPED_DIRS))
def test_the_dir_hydra_writes_into_is_refused_before_it_writes_when_it_holds_links(base_run, tmp_path: Path, how):
    """The attack reviews: Hydra writes train.log and .hydra/ (or its output subdir) into the run dir, and
    multirun.yaml and the jobs' dirs into the sweep dir, before any task code runs. A Hydra callback checks the dirs
    of the config Hydra resolved, before it writes, however they were named (typed, interpolated, a dict, flags)."""
    run = planted_run(base_run / "checkpoints" / "last.ckpt", tmp_path, lambda cfg, overrides: None)
    args, link = TYPED_DIRS[how]
    cfg = compose_config(args(run), return_hydra_config=True)  # one config, checked before and after the link
    guard(cfg)  # no link yet: fine
    (run / link).parent.mkdir(parents=True, exist_ok=True)
    (run / link).unlink(missing_ok=True)
    (run / link).symlink_to(tmp_path / "victim.txt")
    with pytest.raises(UserError, match=r" is a symbolic link; a run dir holding links"):
        guard(cfg)


def test_the_dirs_hydra_writes_into_must_be_inside_the_run_or_sweep_dir(tmp_path: Path):
    with pytest.raises(UserError, match=r"hydra.output_subdir=/.*: must be a dir inside the run dir"):
        guard([f"hydra.run.dir={tmp_path / 'new'}", f"hydra.output_subdir={tmp_path / 'run' / '.hydra'}"])
    with pytest.raises(UserError, match=r"hydra.sweep.subdir=../x: must be a relative dir inside the sweep dir"):
        guard(["hydra.mode=MULTIRUN", "hydra.sweep.subdir=../x"])


def test_the_guard_sees_links_on_the_way_and_dirs_for_files_but_not_its_own_tools_links(
    base_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The third attack review: an output subdir reached through a link inside the run dir was written through; a
    directory where a run writes train.log was a traceback; `hydra.run.dir=.` and a second sweep into a sweep dir
    whose jobs W&B had linked its own files in were refused."""
    run = planted_run(base_run / "checkpoints" / "last.ckpt", tmp_path, lambda cfg, overrides: None)
    (tmp_path / "outside").mkdir()
    (run / "sub").mkdir()
    (run / "sub" / "x").symlink_to(tmp_path / "outside")
    with pytest.raises(UserError, match=r"sub/x is a symbolic link"):
        guard([f"hydra.run.dir={run}", "hydra.output_subdir=sub/x/.hydra"])
    (run / "sub" / "x").unlink()
    (run / "train.log").mkdir()
    with pytest.raises(UserError, match=r"train.log is a directory"):
        guard([f"hydra.run.dir={run}"])
    (run / "train.log").rmdir()
    (run / "wandb" / "run-1").mkdir(parents=True)
    (run / "wandb" / "latest-run").symlink_to(run / "wandb" / "run-1")  # W&B's own link
    guard(["hydra.mode=MULTIRUN", f"hydra.sweep.dir={run.parent}"])
    monkeypatch.chdir(tmp_path / "outside")
    guard(["hydra.run.dir=."])


def test_a_run_dir_that_is_itself_a_link_is_refused(base_run, tmp_path: Path):
    run = planted_run(base_run / "checkpoints" / "last.ckpt", tmp_path / "elsewhere", lambda cfg, overrides: None)
    (tmp_path / "handed").symlink_to(run)
    with pytest.raises(UserError, match=r"handed: it is a symbolic link; a run dir holding links"):
        guard([f"hydra.run.dir={tmp_path / 'handed'}"])
    with pytest.raises(ResumeError, match=r"handed: it is a symbolic link"):  # nor continued through the link
        plan_resume(str(tmp_path / "handed"), tmp_path)


def test_the_report_of_a_crafted_sweep_dir_creates_nothing_and_reads_what_it_can(tmp_path: Path):
    """The second attack review: a sweep dir's optimization_results.yaml named a storage the report opened for
    writing (a journal file and its dir created elsewhere; Optuna's tables added to another program's SQLite
    database), and a list or broken YAML in multirun.yaml was a traceback."""
    sweep = tmp_path / "sweep"
    (sweep / "0" / ".hydra").mkdir(parents=True)
    (sweep / "0" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["seed=1"]))
    (sweep / "0" / "metrics.json").write_text(json.dumps({"val/acc_best": 0.9}))
    other = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as db:
        db.execute("create table keep (x)")
        db.commit()
    before = other.read_bytes()
    for storage in (str(tmp_path / "outside" / "new" / "created.log"), f"sqlite:///{other}"):
        results = {"storage": storage, "study_name": "s", "best_params": [1]}
        (sweep / "optimization_results.yaml").write_text(yaml.safe_dump(results))
        assert "| 0 |" in write_report(sweep).read_text()
        assert not (tmp_path / "outside").exists() and other.read_bytes() == before
    for text in ("[1, 2]", "a: ["):
        (sweep / "multirun.yaml").write_text(text)
        (sweep / "optimization_results.yaml").write_text(text)
        assert "val/acc_best" in write_report(sweep).read_text()


def test_checkpoint_io_loads_only_what_was_handed_over(base_run, tmp_path: Path):
    """The third attack review: under SLURM, Lightning loads the newest `hpc_ckpt_N.ckpt` it finds in
    `trainer.default_root_dir` by itself (its ModelCheckpoint state then deleted files outside the run); the IO
    loads only checkpoints the resume rebuilt and handed over."""
    io = AtomicCheckpointIO()
    with pytest.raises(CheckpointError, match=r"hpc_ckpt_3.ckpt: Lightning found this checkpoint by itself"):
        io.load_checkpoint(str(tmp_path / "hpc_ckpt_3.ckpt"))
    io.hand_over(str(base_run / "checkpoints" / "last.ckpt"), {"rebuilt": True})
    assert io.load_checkpoint(str(base_run / "checkpoints" / "last.ckpt")) == {"rebuilt": True}


def test_export_is_not_written_beside_a_checkpoint_in_a_linked_dir(base_run, tmp_path: Path):
    (tmp_path / "outside").mkdir()
    shutil.copy(base_run / "checkpoints" / "last.ckpt", tmp_path / "outside" / "last.ckpt")
    (tmp_path / "outside" / "last.pt").write_text("keep")
    (tmp_path / "handed").mkdir()
    (tmp_path / "handed" / "checkpoints").symlink_to(tmp_path / "outside")
    cfg = compose_config([f"ckpt_path={tmp_path / 'handed' / 'checkpoints' / 'last.ckpt'}", "format=torchscript"],
                         config_name="export")  # fmt: skip
    with pytest.raises(ExportError, match=r"checkpoints is a symbolic link; .* pass output=<file>"):
        export(cfg)
    assert (tmp_path / "outside" / "last.pt").read_text() == "keep"


def test_the_printed_resume_command_resumes_from_a_dir_named_with_commas_and_spaces(tmp_path: Path):
    for name in ("runs a,b", "it's", "josé"):
        ckpt = tmp_path / name / "checkpoints" / "last.ckpt"
        (arg,) = shlex.split(resume_command(ckpt))[3:]
        assert compose_config([arg]).ckpt_path == str(ckpt)


CLI_FORMS = {  # the CLI twins: a resume plan, Hydra flags (no plan), a dir only Hydra can resolve, a sweep
    "plan": lambda run: [],
    "flags": lambda run: ["-cd", CONFIG_DIR, f"hydra.run.dir={run}"],
    "hydra resolver": lambda run: ["hydra.run.dir=${hydra:runtime.cwd}/logs/train/runs/planted"],
    "sweep": lambda run: ["-m", f"hydra.sweep.dir={run.parent}", "hydra.sweep.subdir=planted", "seed=1"],
}


@pytest.mark.slow  # the CLI twins of test_a_run_dir_holding_links_is_refused and of the guard's test
@pytest.mark.parametrize("form", list(CLI_FORMS))
def test_training_in_a_run_dir_with_a_linked_log_writes_nothing_through_it(base_run, run_cli, tmp_path: Path, form):
    run = planted_run(base_run / "checkpoints" / "last.ckpt", tmp_path, lambda cfg, overrides: None)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep\n")
    (run / "train.log").symlink_to(victim)
    typed = CLI_FORMS[form](run)
    result = run_cli("digit_lightning.train", *typed, f"ckpt_path={run}", cwd=tmp_path)
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-2000:]
    assert (
        result.stderr.strip().splitlines() == [result.stderr.strip()]
        and "train.log is a symbolic link" in result.stderr
    )
    assert victim.read_text() == "keep\n" and "Traceback" not in result.stdout + result.stderr
    assert [p.name for p in run.parent.iterdir()] == ["planted"]  # refused before Hydra made a run dir of its own


def test_export_never_writes_through_a_linked_default_output(base_run, tmp_path: Path):
    """`checkpoints/last.onnx` planted as a link: export's default output would overwrite the victim."""
    shutil.copytree(base_run / "checkpoints", tmp_path / "checkpoints")
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "checkpoints" / "last.onnx").symlink_to(victim)
    cfg = compose_config([f"ckpt_path={tmp_path}/checkpoints/last.ckpt", "format=onnx"], config_name="export")
    with pytest.raises(ExportError, match="last.onnx is a symbolic link; refusing to write through it"):
        export(cfg)
    assert victim.read_text() == "keep"


def test_sweep_report_replaces_a_linked_report_instead_of_writing_through_it(tmp_path: Path):
    sweep = tmp_path / "multirun"
    (sweep / "0" / ".hydra").mkdir(parents=True)
    (sweep / "0" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["data.batch_size=32"]))
    (sweep / "0" / "metrics.json").write_text('{"val/acc_best": 0.9}')
    victims = {}
    for name in ("sweep_report.csv", "sweep_report.md", "sweep_report.png"):
        victims[name] = tmp_path / f"victim_{name}"
        victims[name].write_text("keep")
        (sweep / name).symlink_to(victims[name])
    write_report(sweep)
    for name, victim in victims.items():
        assert victim.read_text() == "keep" and not (sweep / name).is_symlink() and (sweep / name).stat().st_size


@pytest.mark.slow  # the CLI twin of the URL and deletion reproducers above, on a run dir as the CLI reads it
def test_cli_resume_of_a_crafted_run_dir_fetches_and_deletes_nothing(base_run, run_cli, tmp_path: Path, evil_url):
    marker, victim = tmp_path / "PWNED", tmp_path / "VICTIM_file"
    victim.write_text("keep")
    run = planted_run(base_run / "checkpoints" / "last.ckpt", tmp_path, lambda cfg, overrides: None)
    path = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    mc = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("ModelCheckpoint"))
    escape = f"{run}/checkpoints/../../{victim.name}"
    mc.update(best_model_path=evil_url, dirpath=str(run / "checkpoints"),
              best_k_models={escape: torch.tensor(0.0)}, kth_best_model_path=escape)  # fmt: skip
    torch.save(checkpoint, path)
    result = run_cli("digit_lightning.train", f"ckpt_path={run}", "trainer.max_epochs=2", *RESUME, cwd=tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    assert "best_model_path='http://127.0.0.1" in result.stdout + result.stderr  # named in the "dropped" warning
    assert not marker.exists() and victim.read_text() == "keep"
    assert json.loads((run / "metrics.json").read_text())["test/acc"] > 0.5
