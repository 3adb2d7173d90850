"""Run directories: which checkpoint `ckpt_path` names, a run's saved config read back as data, one run per dir.

`ckpt_path` takes a checkpoint file, a run dir (its `checkpoints/last.ckpt`), or `last`: the newest `last.ckpt`
of any run under `paths.log_dir`. A resumed training continues in the run dir of its checkpoint (`hydra.run.dir`
resolves to it) with the settings of that run's `.hydra/config.yaml`, which is loaded as *data*: it may only name
`_target_`s that this package's own configs name, and the keys typed on the command line win.
"""

from __future__ import annotations

import os
import shlex
from functools import cache
from pathlib import Path

import yaml
from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from digit_lightning import CONFIG_DIR
from digit_lightning.atomic import TMP_PREFIX
from digit_lightning.errors import UserError

LAST = "last.ckpt"
# Keys whose change would not take effect on a resumed run (the checkpoint's optimizer state and data split win).
FIXED_ON_RESUME = ("model", "data.val_size", "data.split_seed", "seed")
CHANGES_GROUPS = ("experiment", "hparams_search", "debug", "model")


class ResumeError(UserError):
    """A `ckpt_path` or run dir that cannot be used as asked; the message is one line with the fix."""


def find_checkpoint(spec: str | Path, log_dir: str | Path = "logs") -> Path:
    """Resolve a `ckpt_path` value: a file, a run dir (its last.ckpt) or `last` (the newest under `log_dir`)."""
    if str(spec) == "last":
        patterns = (f"*/runs/*/checkpoints/{LAST}", f"*/multiruns/*/*/checkpoints/{LAST}")
        found = [p for pattern in patterns for p in Path(log_dir).glob(pattern)]
        if not found:
            raise ResumeError(f"ckpt_path=last: no run under {log_dir}/ has checkpoints/{LAST}; train a run first")
        return max(found, key=lambda p: p.stat().st_mtime).resolve()
    path = Path(spec).expanduser()
    for candidate in (path, path / "checkpoints" / LAST, path / LAST):
        if candidate.is_file():
            return candidate.resolve()
    raise ResumeError(f"ckpt_path={spec}: no such checkpoint file or run dir with checkpoints/{LAST}")


def requeued_checkpoint(run_dir: str | Path) -> Path | None:
    """In a SLURM job that SLURM requeued (preemption, `scontrol requeue`, Lightning's auto-requeue on SIGUSR1), the
    checkpoint to go on from: the newer of `<run_dir>/checkpoints/last.ckpt` (saved on SIGTERM or at an epoch end) and
    Lightning's `<run_dir>/hpc_ckpt_N.ckpt` (saved on SIGUSR1). None in a job's first run, or with neither file.
    The requeued job runs the same sweep job again, in the same run dir (submitit pickles its resolved config)."""
    if int(os.environ.get("SLURM_RESTART_COUNT") or 0) < 1:
        return None
    run_dir = Path(run_dir)
    found = [p for p in [run_dir / "checkpoints" / LAST, *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime).resolve() if found else None


def run_dir_of(ckpt: Path) -> Path | None:
    """The Hydra run dir that wrote `ckpt` (`<run>/checkpoints/<name>.ckpt` beside `<run>/.hydra/`), if any."""
    run = ckpt.parent.parent
    return run if ckpt.parent.name == "checkpoints" and (run / ".hydra" / "config.yaml").is_file() else None


def resume_dir(ckpt_path: str | None, log_dir: str, new_dir: str) -> str:
    """`hydra.run.dir`: a training resumed from a run's checkpoint continues in that run's dir, others get `new_dir`."""
    if not isinstance(ckpt_path, str) or ckpt_path in ("", "null"):
        return new_dir  # a list of checkpoints (an ensemble) resumes nothing: the task reports it in one line
    try:
        run = run_dir_of(find_checkpoint(ckpt_path, log_dir))
    except ResumeError:
        return new_dir  # the task reports the bad ckpt_path in one line
    return str(run) if run is not None else new_dir


def resume_subdir(ckpt_path: str | None, log_dir: str) -> str:
    """`hydra.output_subdir`: where Hydra records this command; a resumed run keeps its `.hydra/config.yaml`."""
    return ".hydra" if resume_dir(ckpt_path, log_dir, "") == "" else ".hydra/resume"


def resume_command(ckpt: Path) -> str:
    """The command that resumes from `ckpt` (its run's settings are reloaded from its run dir)."""
    return f"python -m digit_lightning.train {shlex.quote(f'ckpt_path={ckpt}')}"


@cache
def known_targets() -> frozenset[str]:
    """Every `_target_` this package's own configs name: the only ones a run dir's config may name."""
    found: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("_target_"), str):
                found.add(node["_target_"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in Path(CONFIG_DIR).rglob("*.yaml"):
        walk(yaml.safe_load(path.read_text()))
    return frozenset(found)


def _check_data_only(node: object, path: str, source: Path) -> None:
    """Refuse a config that names a `_target_` our configs do not, or passes positional `_args_`."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if key == "_target_" and value not in known_targets():
                raise ResumeError(f"{source}: {where}={value} is not a target this package's configs use; refusing "
                                  "to run code named by a run dir (start a new run instead)")  # fmt: skip
            if key == "_args_":
                raise ResumeError(f"{source}: {where} passes positional arguments; refusing a run dir config that "
                                  "adds code to run (start a new run instead)")  # fmt: skip
            _check_data_only(value, where, source)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_data_only(value, f"{path}[{i}]", source)


def saved_config(run_dir: Path) -> DictConfig:
    """The settings a run was started with (`<run>/.hydra/config.yaml`), checked to name no code of its own."""
    source = run_dir / ".hydra" / "config.yaml"
    try:
        tree = yaml.safe_load(source.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ResumeError(f"{source}: cannot be read as YAML ({' '.join(str(e).split())[:150]})") from None
    if not isinstance(tree, dict):
        raise ResumeError(f"{source}: not a config (a mapping of settings)")
    tree.pop("hydra", None)
    _check_data_only(tree, "", source)
    return OmegaConf.create(tree)


def resumed_config(cfg: DictConfig, run_dir: Path, typed: list[str]) -> DictConfig:
    """The config of a resumed run: its saved settings, with the keys typed now (`typed`: `key=value`) on top."""
    saved = saved_config(run_dir)
    current_keys = set(cfg)
    for override in typed:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in CHANGES_GROUPS or any(key == k or key.startswith(k + ".") for k in FIXED_ON_RESUME):
            if OmegaConf.select(saved, key, default=None) != OmegaConf.select(cfg, key, default=None):
                raise ResumeError(f"{override}: a resumed run keeps the model, optimizer state and data split of its "
                                  "checkpoint; drop this override, or start a new run (without ckpt_path)")  # fmt: skip
            continue
        if key.split(".")[0] not in current_keys:
            continue
        OmegaConf.update(saved, key, OmegaConf.select(cfg, key), merge=False, force_add=True)
    unknown = sorted(set(saved) - current_keys)
    if unknown:
        raise ResumeError(f"{run_dir}/.hydra/config.yaml: unknown setting {unknown[0]!r}; this package does not "
                          "have it, so the run dir is not one of its runs")  # fmt: skip
    saved.ckpt_path = cfg.ckpt_path
    saved.paths.output_dir = str(run_dir)
    return saved


def lock_run_dir(run_dir: Path) -> FileLock:
    """Hold `<run>/.lock` for the run's lifetime: a second training in the same dir fails in one line."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run_dir / ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ResumeError(f"{run_dir}: another training is running in this run dir; wait for it to finish, or "
                          "pass another hydra.run.dir") from None  # fmt: skip
    for stale in (run_dir / "checkpoints").glob(TMP_PREFIX + "*"):  # a save killed mid-write; never valid
        stale.unlink(missing_ok=True)
    return lock
