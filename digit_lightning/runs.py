"""Run directories: which checkpoint `ckpt_path` names, a run's saved config read back as data, one run per dir.

`ckpt_path` takes a checkpoint file, a run dir (its `checkpoints/last.ckpt`), a sweep dir (its newest job's), or
`last`: the newest `last.ckpt` of a single run (not a sweep job) under `paths.log_dir`. `plan_resume` is the one place
that decides what a training resumes from and where: the CLI asks it before Hydra picks a run dir, and a resumed
training continues in the run dir of its checkpoint (passed to Hydra as `hydra.run.dir`) with the settings of that
run's `.hydra/config.yaml`, rebuilt as *data* (`resumed_config`: the package's own configs, that file's plain values
on top, the keys typed on the command line on top of all).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path

import yaml
from filelock import FileLock, Timeout
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from digit_lightning import CONFIG_DIR
from digit_lightning.atomic import TMP_PREFIX
from digit_lightning.errors import UserError

LAST = "last.ckpt"
# Keys whose change would not take effect on a resumed run (the checkpoint's optimizer state and data split win).
FIXED_ON_RESUME = ("model", "data.val_size", "data.split_seed", "seed")
CHANGES_GROUPS = ("experiment", "hparams_search", "debug", "model")
# Never taken from a run dir's config: where this command runs, keeps its data and writes (paths), and Hydra's own.
NOT_TAKEN = ("paths", "hydra", "ckpt_path")
# Arguments that say where a callback, logger or trainer writes: the package's values (inside the run dir) win.
WRITES_TO = frozenset({"dirpath", "filename", "save_dir", "default_root_dir", "name", "version", "sub_dir", "storage",
                       "log_dir", "root_dir", "data_dir", "output_dir", "filepath", "path", "task_name"})  # fmt: skip
RUN_SUBDIRS = (".hydra", "checkpoints", "tensorboard", "csv")  # what a run writes into, besides its top level
RUN_FILES = ("train.log", "eval.log", "metrics.json")  # files a run writes at its top level
REQUIRED_NODES = frozenset({"model", "model.net", "model.optimizer", "data", "trainer", "extras"})  # never null
SAFETY = frozenset({"data.verify"})  # checks a run dir's config cannot turn off
ADDS_ARGUMENTS = ("trainer", "model", "data")  # where a run dir's +key=value arguments are taken (not logger)
log = logging.getLogger(__name__)


class ResumeError(UserError):
    """A `ckpt_path` or run dir that cannot be used as asked; the message is one line with the fix."""


def newest(found: list[Path]) -> Path:
    """The most recently written of `found` (by mtime)."""
    return max(found, key=lambda p: p.stat().st_mtime)


def own_file(named: Path, found: Path, spec: object) -> Path:
    """`found`, a checkpoint found inside `named` (a run, sweep or log dir), as an absolute path, not resolved: it is
    refused when it, or a dir between `named` and it, is a symbolic link, since a run's files must be its own (through
    a link, a resumed run would continue in, write into and delete from the run the link points to)."""
    for part in (found, *found.parents):
        if part == named:
            break
        if part.is_symlink():
            raise ResumeError(f"ckpt_path={spec}: {part.relative_to(named)} is a symbolic link; a run's checkpoints "
                              "are read only as its own files; pass the file you mean as ckpt_path=<file>")  # fmt: skip
    return Path(os.path.abspath(found))


def find_checkpoint(spec: str | Path, log_dir: str | Path = "logs") -> Path:
    """Resolve a `ckpt_path` value: a file, a run dir (its last.ckpt), a sweep dir (its newest job's last.ckpt) or
    `last`: the newest single run's (`<log_dir>/*/runs/*`; sweep jobs only when their sweep dir is named)."""
    if str(spec) == "last":
        found = list(Path(log_dir).glob(f"*/runs/*/checkpoints/{LAST}"))
        if found:
            return own_file(Path(log_dir), newest(found), spec)
        sweeps = sorted(Path(log_dir).glob(f"*/multiruns/*/*/checkpoints/{LAST}"), key=lambda p: p.stat().st_mtime)
        hint = f"; for a sweep's job, name its sweep dir: ckpt_path={sweeps[-1].parents[2]}" if sweeps else ""
        raise ResumeError(f"ckpt_path=last: no run under {log_dir}/ has checkpoints/{LAST}; train a run first{hint}")
    path = Path(spec).expanduser()
    for candidate in (path, path / "checkpoints" / LAST, path / LAST):
        if candidate.is_file():
            return own_file(path, candidate, spec)
    jobs = list(path.glob(f"*/checkpoints/{LAST}")) if path.is_dir() else []
    if jobs:  # a sweep dir: its newest job
        return own_file(path, newest(jobs), spec)
    raise ResumeError(f"ckpt_path={spec}: no such checkpoint file or run dir with checkpoints/{LAST}")


def final_weights_are_the_model(cfg: DictConfig | dict) -> bool:
    """The selection rule (docs/resume.md, "Which checkpoint is the run's model"): `run_model=last` or `best`, or by
    default (`auto`) the final weights when the run anneals them, with a one-cycle schedule (its lr ends near 0) or an
    EMA of the weights, and the best val/acc epoch otherwise. `cfg` is read as plain data (nothing is resolved)."""
    tree = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    choice = tree.get("run_model", "auto")
    if choice != "auto":
        return choice == "last"
    scheduler = (tree.get("model") or {}).get("scheduler") or {}
    callbacks = tree.get("callbacks") or {}
    targets = [str(c.get("_target_", "")) for c in callbacks.values() if isinstance(c, dict)]
    return str(scheduler.get("_target_", "")).endswith("OneCycleLR") or any(t.endswith(".EMA") for t in targets)


def run_model(spec: str | Path, log_dir: str | Path = "logs") -> Path:
    """The checkpoint that is a run's model, for `ckpt_path` in eval, predict and export: a file as given; for a
    run (`last`, a run dir, a sweep dir's newest job) its `last.ckpt` or its best epoch, by the run's own settings."""
    ckpt = find_checkpoint(spec, log_dir)
    run = run_dir_of(ckpt)
    if Path(spec).expanduser().is_file() or ckpt.name != LAST or run is None:
        return ckpt
    tree = _read_yaml(run / ".hydra" / "config.yaml")
    if not isinstance(tree, dict) or final_weights_are_the_model(tree):
        return ckpt
    best = sorted((run / "checkpoints").glob("epoch_*.ckpt"))
    if len(best) != 1:
        raise ResumeError(f"{run}: its model is its best val/acc epoch, but checkpoints/ holds {len(best)} "
                          "epoch_*.ckpt files; pass the one you mean as ckpt_path=<file>")  # fmt: skip
    return own_file(run, best[0], spec)


@dataclass(frozen=True)
class Plan:
    """What a training resumes from: `checkpoint` (None: it starts from scratch) and `run_dir`, the run it continues
    in that run's own dir with that run's settings (None: in this command's run dir, with the settings typed)."""

    checkpoint: Path | None = None
    run_dir: Path | None = None
    requeued: bool = False  # SLURM requeued the job, and `checkpoint` is where it had got to

    def hydra_overrides(self) -> list[str]:
        """The Hydra overrides that run this command in the continued run's dir, recording its own Hydra files in
        `.hydra/resume/` (the run's `.hydra/hydra.yaml` keeps its group choices); none for a new run dir."""
        if self.run_dir is None:
            return []
        if any(c in str(self.run_dir) for c in "'\\$"):  # Hydra's override grammar would read them as syntax
            raise ResumeError(f"{self.run_dir}: a run dir whose path holds ', \\ or $ cannot be continued in place; "
                              "rename it, or resume in a new run dir with hydra.run.dir=<new dir>")  # fmt: skip
        return [f"hydra.run.dir='{self.run_dir}'", "hydra.output_subdir=${rank_zero_only:.hydra/resume}"]

    def config(self, cfg: DictConfig, typed: list[str]) -> DictConfig:
        """The settings to train with: the continued run's own, rebuilt (`resumed_config`, `typed` on top), else
        `cfg` as composed."""
        return cfg if self.run_dir is None else resumed_config(cfg, self.run_dir, typed)


def plan_resume(ckpt_path: object, log_dir: str | Path, here: str | Path | None = None) -> Plan:
    """What a training resumes from, and where it runs (docs/resume.md), decided once:

    - `ckpt_path` (a file, run dir, sweep dir or `last`, see `find_checkpoint`): that checkpoint. When it belongs to
      a run dir, that run dir is refused if it holds links or special files (`refuse_links`), and the training goes
      on there with that run's settings when it has no run dir yet (`here` None: the CLI, before Hydra picks one)
      or `here` is that run dir; else it resumes in `here` with the settings typed.
    - no `ckpt_path`, in a SLURM job that SLURM requeued (preemption, `scontrol requeue`, Lightning's auto-requeue on
      SIGUSR1): the newer of `here`'s `checkpoints/last.ckpt` and Lightning's `hpc_ckpt_N.ckpt`, if any. The
      requeued job runs the same sweep job again, in the same run dir (submitit pickles its resolved config).
      Not requeued: an `hpc_ckpt_N.ckpt` in `here` all the same (Lightning would load it itself under SLURM).
    - else a new run.

    A `ckpt_path` that is not one string (a list: an ensemble) plans nothing; `validate_config` refuses it.
    """
    if isinstance(ckpt_path, str) and ckpt_path not in ("", "null"):
        checkpoint = find_checkpoint(ckpt_path, log_dir)
        run = run_dir_of(checkpoint)
        if run is None:
            return Plan(checkpoint)
        refuse_links(run)
        continues = here is None or Path(here).resolve() == run.resolve()
        return Plan(checkpoint, run if continues else None)
    if here is None:
        return Plan()
    here = Path(here)
    requeued = int(os.environ.get("SLURM_RESTART_COUNT") or 0) >= 1
    # Lightning resumes by itself from an hpc_ckpt_N.ckpt it finds in its root dir under SLURM, requeued or not,
    # replaying the file: planned here instead, it is rebuilt like every resume (resume.for_fit).
    odd = [p for p in here.glob("*hpc_ckpt_*") if not re.fullmatch(r"hpc_ckpt_\d+\.ckpt", p.name)]
    if odd:  # Lightning's own scan reads the number of any name holding hpc_ckpt_, and fails on this one
        raise ResumeError(f"{odd[0]}: not a checkpoint Lightning can number (hpc_ckpt_<N>.ckpt); rename or remove it")
    candidates = [here / "checkpoints" / LAST] if requeued else []
    found = [p for p in [*candidates, *here.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return Plan(newest(found), requeued=requeued) if found else Plan()


def run_dir_of(ckpt: Path) -> Path | None:
    """The Hydra run dir that wrote `ckpt` (`<run>/checkpoints/<name>.ckpt` beside `<run>/.hydra/`), if any."""
    run = ckpt.parent.parent
    return run if ckpt.parent.name == "checkpoints" and (run / ".hydra" / "config.yaml").is_file() else None


def _unsafe(path: Path) -> str | None:
    """Why a run may not write at `path`: a symbolic link, a hard link (a file with other names, maybe outside the
    run), or a FIFO, socket or device (a write would block or go elsewhere); None for a plain file or directory."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    if stat.S_ISLNK(info.st_mode):
        return "a symbolic link"
    if stat.S_ISREG(info.st_mode):
        return "a hard link (a file with another name)" if info.st_nlink > 1 else None
    return None if stat.S_ISDIR(info.st_mode) else "not a regular file or directory"


def has_links(run_dir: Path, also: tuple[str, ...] = (), whole: bool = False) -> list[tuple[Path, str]]:
    """What a run must not write through in its dir, with why: the dir itself as a symbolic link, links and special
    files at its top level (train.log, .lock, metrics.json, ...) and anywhere in what a run writes into (.hydra/,
    checkpoints/, tensorboard/, csv/, and the subdirs in `also`, every dir on the way to them), or anywhere at all
    (`whole`: a sweep dir, whose job dirs may nest; but not in the `wandb/` dirs W&B links itself), a file where a
    run writes a directory, and a directory where it writes a file."""
    run_dir = Path(run_dir)
    found = [(run_dir, "a symbolic link")] if run_dir.is_symlink() else []
    entries = [] if whole or not run_dir.is_dir() else list(run_dir.iterdir())
    for sub in ("",) if whole else (*RUN_SUBDIRS, ".hydra/resume", *also):
        path = run_dir / sub
        entries += [run_dir / parent for parent in Path(sub).parents[:-1]]  # the dirs on the way (all but ".")
        if sub and path.exists() and not path.is_dir():
            found.append((path, "not a directory"))
        for root, dirs, files in os.walk(path):  # links to dirs are listed, not followed
            entries += [Path(root, name) for name in dirs + files]
            dirs[:] = [d for d in dirs if d != "wandb"]
    found += [
        (run_dir / name, "a directory where a run writes a file") for name in RUN_FILES if (run_dir / name).is_dir()
    ]
    return found + [(p, why) for p in dict.fromkeys(entries) if (why := _unsafe(p))]


def refuse_links(run_dir: Path, also: tuple[str, ...] = (), whole: bool = False) -> None:
    """Refuse a run dir that is or holds a link or a special file where a run writes (`has_links`): through a
    planted link it would write, append or delete elsewhere (a FIFO would block it)."""
    found = has_links(run_dir, also, whole)
    if found:
        path, why = found[0]
        what = "it" if path == Path(run_dir) else path.relative_to(run_dir)
        raise ResumeError(f"{run_dir}: {what} is {why}; a run dir holding links or special files "
                          "is refused (a run would write through them); remove it, or start a new run")  # fmt: skip


def resume_command(ckpt: Path) -> str:
    """The command that resumes from `ckpt` (its run's settings are reloaded from its run dir)."""
    path = str(ckpt)
    if not re.fullmatch(r"[A-Za-z0-9_./-]+", path):  # in Hydra's override grammar `,` makes a list, a space splits
        path = "'" + path.replace("'", "\\'") + "'"
    return f"python -m digit_lightning.train {shlex.quote(f'ckpt_path={path}')}"


def _read_yaml(source: Path) -> object:
    try:
        return yaml.safe_load(source.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ResumeError(f"{source}: cannot be read as YAML ({' '.join(str(e).split())[:150]})") from None


def recorded_choices(run_dir: Path) -> list[str]:
    """The run's config-group choices (`.hydra/hydra.yaml`'s `hydra.runtime.choices`) as `group=option` overrides,
    each an option of this package's own `conf/<group>/` (none recorded: the defaults)."""
    source = run_dir / ".hydra" / "hydra.yaml"
    if not source.is_file():
        return []
    tree = _read_yaml(source)
    runtime = tree.get("hydra", {}).get("runtime", {}) if isinstance(tree, dict) else {}
    choices = runtime.get("choices", {}) if isinstance(runtime, dict) else {}
    overrides = []
    for group, option in (choices if isinstance(choices, dict) else {}).items():
        if not isinstance(group, str) or group.startswith("hydra") or option is None:
            continue
        options = sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml")) if "/" not in group else []
        if option not in options:
            raise ResumeError(f"{source}: {group}={option!r} is not one of this package's {group} configs "
                              f"({', '.join(options)}); start a new run instead")  # fmt: skip
        overrides.append(f"{group}={option}")
    return overrides


def package_config(overrides: list[str]) -> DictConfig:
    """`conf/train.yaml` composed with `overrides` (inside a Hydra app too: then with the app's own Hydra)."""
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train", overrides=overrides)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _plain(value: object) -> bool:
    """Plain data: no interpolation, no Hydra key (`_target_`, `_args_`, ...), only YAML scalars and containers."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and not k.startswith("_") and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and "${" not in value)


def _refuse_interpolations(saved: object, base: object, where: str, source: Path) -> None:
    """Every `${...}` of a run dir's config must be the package's own, at the same key; any other is refused."""
    if isinstance(saved, dict):
        for key, value in saved.items():
            below = base.get(key) if isinstance(base, dict) else None
            _refuse_interpolations(value, below, f"{where}.{key}" if where else str(key), source)
    elif isinstance(saved, list):
        for i, value in enumerate(saved):
            below = base[i] if isinstance(base, list) and i < len(base) else None
            _refuse_interpolations(value, below, f"{where}[{i}]", source)
    elif isinstance(saved, str) and "${" in saved and saved != base:
        raise ResumeError(f"{source}: {where}={saved[:80]!r} is an interpolation this package's config does not "
                          "have there; a run dir's settings are read as plain values (start a new run)")  # fmt: skip


def _writes(where: str) -> bool:
    """Whether the setting `where` says where something is written (the model's own keys never do)."""
    return where.rsplit(".", 1)[-1] in WRITES_TO and not where.startswith("model.")


def _overlay(base: object, saved: object, where: str, dropped: list[str]) -> object:
    """`saved`'s plain values over the package's config `base`: targets, interpolations (derived settings) and the
    paths a run writes to stay the package's; a node `base` does not have is dropped (listed in `dropped`)."""
    if saved == base:
        return base
    if isinstance(base, dict) and isinstance(saved, dict):
        if base.get("_target_") != saved.get("_target_"):
            dropped.append(where)
            return base
        merged = dict(base)
        for k, v in saved.items():
            below = f"{where}.{k}"
            if k in base and not str(k).startswith("_"):
                merged[k] = _overlay(base[k], v, below, dropped)
            elif (
                k not in base and "_target_" in base and not str(k).startswith("_") and _plain(v) and not _writes(below)
                and below.startswith(ADDS_ARGUMENTS)
            ):  # fmt: skip
                merged[k] = v  # an argument added with +key=value
            elif v != base.get(k):
                dropped.append(below)
        return merged
    derived = isinstance(base, str) and "${" in base
    node = isinstance(base, dict) or (isinstance(base, list) and not _plain(base))
    required = where in REQUIRED_NODES
    if derived or _writes(where) or where in SAFETY or not _plain(saved) or (node and (saved is not None or required)):
        dropped.append(where)
        return base
    return saved


def resumed_config(cfg: DictConfig, run_dir: Path, typed: list[str]) -> DictConfig:
    """The config of a resumed run, rebuilt: the package's own config for the run's recorded group choices, the
    plain values of its `.hydra/config.yaml` on top (no target, interpolation or write path of its own), `paths`
    from this command, and the keys typed now (`typed`: `key=value`) on top of all."""
    source = run_dir / ".hydra" / "config.yaml"
    tree = _read_yaml(source)
    if not isinstance(tree, dict):
        raise ResumeError(f"{source}: not a config (a mapping of settings)")
    tree.pop("hydra", None)
    base = OmegaConf.to_container(package_config(recorded_choices(run_dir)), resolve=False)
    unknown = sorted(set(tree) - set(base))
    if unknown:
        raise ResumeError(f"{source}: unknown setting {unknown[0]!r}; this package does not have it, so the run dir "
                          "is not one of its runs")  # fmt: skip
    _refuse_interpolations(tree, base, "", source)
    dropped: list[str] = []
    merged = {k: v if k in NOT_TAKEN else _overlay(v, tree.get(k, v), k, dropped) for k, v in base.items()}
    if dropped:
        log.warning(f"{source}: kept this package's own settings for {', '.join(dropped[:8])}: a run dir's config "
                    "names no code and no place to write; type them on the command line to change them")  # fmt: skip
    saved = OmegaConf.create(merged)
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
    saved.paths = cfg.paths
    saved.ckpt_path = cfg.ckpt_path
    saved.paths.output_dir = str(run_dir)
    return saved


def lock_run_dir(run_dir: Path) -> FileLock:
    """Hold `<run>/.lock` for the run's lifetime: a second training in the same dir fails in one line."""
    run_dir.mkdir(parents=True, exist_ok=True)
    refuse_links(run_dir)
    lock = FileLock(run_dir / ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ResumeError(f"{run_dir}: another training is running in this run dir; wait for it to finish, or "
                          "pass another hydra.run.dir") from None  # fmt: skip
    except OSError as e:
        raise ResumeError(f"{run_dir}/.lock: cannot be locked ({e.strerror or e}); remove it") from None
    for stale in (run_dir / "checkpoints").glob(TMP_PREFIX + "*"):  # a save killed mid-write; never valid
        stale.unlink(missing_ok=True)
    return lock
