"""Checkpoints and run dirs a user is handed are data: crafted ones run nothing (a marker file must not appear)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from digit_lightning.checkpoint import CheckpointError, check_resumable, load_checkpoint
from digit_lightning.cli import EXIT_USER_ERROR, compose_config
from digit_lightning.module import DigitClassifier
from digit_lightning.runs import ResumeError, saved_config
from digit_lightning.train import train

TOUCH = "digit_lightning.data.mnist.Path.touch"  # reachable through a module attribute: the old allow-list's hole
WRITE = "digit_lightning.data.mnist.Path.write_text"


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
def test_crafted_checkpoint_runs_nothing(small_checkpoint, tmp_path: Path, gadget: str):
    marker = tmp_path / "marker"
    path = craft(small_checkpoint[0], tmp_path, gadget, gadgets(marker)[gadget])
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


def test_weights_that_do_not_fit_are_refused_before_anything_is_built(small_checkpoint, tmp_path: Path):
    checkpoint = torch.load(small_checkpoint[0], weights_only=True)
    checkpoint["state_dict"]["net.fc1.weight"] = torch.zeros(3, 3)
    torch.save(checkpoint, tmp_path / "shape.ckpt")
    with pytest.raises(CheckpointError, match="weights do not fit the model it names.*wrong shape: net.fc1.weight"):
        load_checkpoint(tmp_path / "shape.ckpt")
    with pytest.raises(CheckpointError, match="weights do not fit"):
        check_resumable(tmp_path / "shape.ckpt", DigitClassifier())


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
    cfg = OmegaConf.to_container(compose_config(["paths.output_dir=${hydra:runtime.output_dir}", "trainer=cpu"]))
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
    ],
)
def test_planted_run_dir_config_is_refused(small_checkpoint, tmp_path: Path, where: str, node):
    marker = tmp_path / "marker"

    def edit(cfg: dict, overrides: list[str]) -> None:
        section = cfg[where]
        section.update(node(marker)) if isinstance(section, dict) else None

    run = planted_run(small_checkpoint[0], tmp_path, edit)
    with pytest.raises(ResumeError) as error:
        saved_config(run)
    assert "\n" not in str(error.value) and "refusing" in str(error.value)
    assert not marker.exists()


@pytest.mark.slow  # the CLI twin of an in-process test above
def test_training_from_a_planted_run_dir_runs_nothing(small_checkpoint, run_cli, tmp_path: Path):
    """Through the CLI: a tampered config.yaml is refused in one line; overrides.yaml is never replayed."""
    marker = tmp_path / "marker"

    def plant_config(cfg: dict, overrides: list[str]) -> None:
        cfg["callbacks"]["x"] = {"_target_": TOUCH, "_args_": [str(marker)]}

    bad = planted_run(small_checkpoint[0], tmp_path / "a", plant_config)
    result = run_cli("digit_lightning.train", f"ckpt_path={bad}", cwd=tmp_path / "a")
    assert result.returncode == EXIT_USER_ERROR and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "refusing" in result.stderr and not marker.exists()

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

RESUME = ["+trainer.limit_train_batches=20", "+trainer.limit_val_batches=5", "+trainer.limit_test_batches=5",
          "callbacks.progress_bar=null", "logger=none"]  # fmt: skip


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


def test_a_url_as_best_model_path_is_never_fetched(base_run, make_cfg, tmp_path: Path):
    """Reproducer 1: MC.best_model_path = a served pickle; Lightning's test(ckpt_path=best) would unpickle it."""
    marker = tmp_path / "PWNED"
    served = tmp_path / "www"
    served.mkdir()
    torch.save({"x": Evil(marker)}, served / "evil.ckpt")
    server = subprocess.Popen([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1"], cwd=served,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        port = int(server.stdout.readline().split(" port ")[1].split()[0])
        url = f"http://127.0.0.1:{port}/evil.ckpt"

        def edit(checkpoint: dict, mc: dict, run: Path) -> None:
            mc.update(best_model_path=url, dirpath=str(run / "checkpoints"), best_model_score=torch.tensor(0.0))

        run = copied_run(base_run, tmp_path, edit)
        for epochs in (1, 2):  # a finished run (nothing to fit), then one more epoch
            cfg = make_cfg(f"paths.output_dir={run}", f"ckpt_path={run}/checkpoints/last.ckpt",
                           f"trainer.max_epochs={epochs}", *RESUME)  # fmt: skip
            metrics = train(cfg)
            assert "test/acc" in metrics and not marker.exists()
    finally:
        server.terminate()
        server.wait()
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
