"""The layer just under the entry points: composing configs, one error path, a quiet console.

Every user error, Hydra's included, becomes one `error: ...` line and exit status 2 (digit_lightning.errors has the
codes). `HYDRA_FULL_ERROR=1` shows the full traceback instead of the one line.
"""

from __future__ import annotations

import difflib
import errno
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import (
    ConfigCompositionException,
    HydraException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from digit_lightning import CONFIG_DIR, resolvers, runs, schema  # noqa: F401  (resolvers: registers those conf/hydra uses)
from digit_lightning.config import type_error
from digit_lightning.errors import EXIT_SIGTERM, EXIT_SOME_FAILED, EXIT_USER_ERROR, UserError  # noqa: F401

SHOW_TRACEBACKS = os.environ.get("HYDRA_FULL_ERROR") == "1"  # read before run() sets it for its own use
schema.register()  # the typed bases of conf/ (Hydra's ConfigStore), before any entry point composes


def compose_config(
    overrides: Sequence[str] = (), config_name: str = "train", return_hydra_config: bool = False
) -> DictConfig:
    """Compose `conf/<config_name>.yaml` with command-line style overrides, outside of a Hydra run (with the `hydra`
    node if `return_hydra_config`).

    `paths.output_dir` comes from the Hydra run directory on the command line; pass it as an override here.
    """
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        try:
            return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
        except (HydraException, OmegaConfBaseException) as e:
            typed = type_error(e)  # a value of the wrong type: the same ConfigError as a value out of range
            if typed is None:
                raise
            raise typed from e


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every `_target_` entry of a config group such as `callbacks` or `logger`."""
    from hydra.utils import instantiate

    if not cfg:
        return []
    return [instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def one_line(error: BaseException) -> str:
    """A Hydra, OmegaConf or instantiation error as one line that says what to change."""
    cause = error.__cause__
    if (typed := type_error(error)) is not None:  # OmegaConf's ValidationError of a typed setting (schema.py)
        return str(typed)
    if isinstance(error, MissingConfigException) and error.options is not None and error.missing_cfg_file:
        group, _, option = error.missing_cfg_file.rpartition("/")
        return f"{group}={option}: no such option in group '{group}'; choose from: {', '.join(error.options)}"
    if isinstance(error, OverrideParseException):
        return f"cannot parse the override {error.override!r}; write key=value, e.g. trainer.max_epochs=5"
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and isinstance(cause.parent_node, DictConfig):
        # An override of a key the config does not have: a misspelling, or an argument the yaml leaves out.
        parent, key, path = cause.parent_node, str(cause.key), str(cause.full_key)
        allowed = [k for k in parent if not str(k).startswith("_")]
        close = difflib.get_close_matches(key, allowed, n=1)
        if close:
            hint = f"did you mean {path.rpartition('.')[0] + '.' if '.' in path else ''}{close[0]}?"
        elif "_target_" in parent:
            hint = f"to pass an argument the config leaves out, add it with +{path}=..."
        else:
            hint = f"the keys here are: {', '.join(map(str, allowed))}"
        return f"{path}: no such key; {hint}"
    if isinstance(error, MissingMandatoryValue):  # a `???` left in a config (a run dir's, or one's own)
        return f"{error.full_key}: has no value (???); set it, e.g. {error.full_key}=..."
    if isinstance(error, ValidationError) and error.full_key:  # a value a typed field cannot take
        # OmegaConf 2.3 keeps the reason only as the first line of its formatted `msg` (then full_key, object_type).
        return f"{error.full_key}: {str(error.msg).splitlines()[0].strip()}"
    if isinstance(error, InstantiationException) and cause is not None:
        # Lightning, torch or our classes refused an argument; their message says which. Hydra 1.3.8 gives the key
        # being instantiated only in its message's last line (`full_key: model.optimizer`), no attribute.
        text = str(error)
        where = text.rsplit("\nfull_key: ", 1)[1].strip() if "\nfull_key: " in text else type(cause).__name__
        return f"{where}: {' '.join(str(cause).split())}"
    # Hydra 1.3.8 appends its config search path to a composition error's message: not for a user's eyes.
    text = " ".join(str(error).split("Config search path")[0].split())
    if isinstance(error, ConfigCompositionException) and "No match in the defaults list" in text:
        # `group=option` for a group this command lacks. Hydra 1.3.8 names the group only in the message
        # ("Could not override 'model'. No match in the defaults list."): no attribute, no subclass to tell by.
        return f"{text.split(chr(39))[1]}: this command has no such config group; see --help for its groups"
    return text


# An OSError with one of these errnos is the machine's state, not a bug: the disk is full, the directory is read-only,
# a file stands where a directory must be made.
DISK_ERRNOS = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EROFS: "write to a writable directory",
    errno.EACCES: "fix its permissions or use another path",
    errno.EPERM: "fix its permissions or use another path",
    errno.EEXIST: "a file is where a directory must go; remove it or use another path",
    errno.ENOTDIR: "a file is where a directory must go; remove it or use another path",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.EISDIR: "a directory is where a file must go; remove it or use another path",
}
WHERE = "(training and eval: hydra.run.dir=... or paths.log_dir=...; export: output=...)"


def disk_error(error: OSError) -> str | None:
    """An OSError of the machine's state (DISK_ERRNOS) as one line with the fix; None for any other OSError."""
    fix = DISK_ERRNOS.get(error.errno)
    if fix is None:
        return None
    where = f"{error.filename}: " if error.filename else ""
    return f"{where}{error.strerror or os.strerror(error.errno)}; {fix} {WHERE}"


def log_to_file(message: str) -> None:
    """Write `message` to the run's log file only (the console gets the one `error:` line)."""
    record = logging.LogRecord("digit_lightning", logging.ERROR, "", 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def fail(message: str, to_log: bool = True) -> None:
    """Print `error: <message>` (one line) and exit with the user-error status."""
    if to_log:  # not when the disk is full or read-only: the log file could not take it
        log_to_file(message)
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turn a `UserError` (and Hydra's own errors) raised in the block into one line and status 2.

    Every Hydra task runs its body inside it too: an exception leaving a task makes Hydra print a line of its own.
    """
    try:
        yield
    except UserError as e:
        if SHOW_TRACEBACKS:
            raise
        fail(str(e))
    except (HydraException, OmegaConfBaseException) as e:
        if SHOW_TRACEBACKS:
            raise
        fail(one_line(e))
    except OSError as e:
        if SHOW_TRACEBACKS or disk_error(e) is None:
            raise
        fail(disk_error(e), to_log=False)


class RunDirGuard(Callback):
    """A Hydra callback (conf/hydra/default.yaml, the first callback): Hydra writes its log and `.hydra/` into the run
    dir, and `multirun.yaml` and the jobs' dirs into the sweep dir, before any task code runs. They are checked here,
    as Hydra resolved them, before it writes: a dir that is or holds a link or a special file where Hydra or a run
    writes (`runs.refuse_links`), or an output subdir outside the run dir, is one `error:` line and status 2. It
    exits rather than raises: Hydra turns a callback's exception into a warning and goes on."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """The run dir, before Hydra makes it, configures its log file and saves its config there."""
        HydraConfig.instance().set_config(config)  # as Hydra's run_job does first: ${hydra:...} resolves
        try:
            run_dir, subdir = Path(str(config.hydra.run.dir)), config.hydra.output_subdir
        except OmegaConfBaseException:
            return  # Hydra cannot resolve it either, and reports it
        with exit_on_user_error():
            if subdir is not None:
                inside = os.path.abspath(run_dir / str(subdir))
                if os.path.isabs(str(subdir)) or not inside.startswith(os.path.abspath(run_dir) + os.sep):
                    raise UserError(f"hydra.output_subdir={subdir}: must be a dir inside the run dir (e.g. .hydra)")
            if run_dir.is_symlink() or run_dir.is_dir():
                runs.refuse_links(run_dir, also=() if subdir is None else (str(subdir),))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """The sweep dir, all of it (its jobs' dirs), before the launcher writes multirun.yaml and the jobs run."""
        HydraConfig.instance().set_config(config)
        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
        except OmegaConfBaseException:
            return
        subdir = str(OmegaConf.to_container(config.hydra.sweep, resolve=False)["subdir"])
        with exit_on_user_error():
            if os.path.isabs(subdir) or ".." in Path(subdir).parts:
                raise UserError(f"hydra.sweep.subdir={subdir}: must be a relative dir inside the sweep dir")
            if sweep_dir.is_symlink() or sweep_dir.is_dir():
                runs.refuse_links(sweep_dir, whole=True)


class NoTips(logging.Filter):
    """Drops Lightning's advertising tips ("💡 Tip: ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every record but a tip."""
        return "💡" not in str(record.msg)


class NoPlannedEnd(logging.Filter):
    """Drops Lightning's "`Trainer.fit` stopped: `max_epochs=N` reached." (or `max_steps=N`) from the console: the
    planned end of a run, which Lightning logs while the progress bar is still drawn, so that it lands inside the
    bar. The run's log file keeps it; the other reasons to stop (no batches, a stop request) still print."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every record but that one."""
        return not str(record.msg).startswith("`Trainer.fit` stopped: `max_")


THIRD_PARTY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "torchmetrics")


def quiet() -> None:
    """Filter, in this one place, the third-party warnings and tips that print on every run and say nothing."""
    for message in (
        ".*does not have many workers.*",  # the data is in memory: worker processes would only cost
        ".*LeafSpec.*",  # torch's pytree deprecation, raised inside Lightning and torchmetrics
        ".*The number of training batches .* is smaller than the logging interval.*",
        ".*The `srun` command is available on your system but is not used.*",  # a SLURM login node, not a job
    ):
        warnings.filterwarnings("ignore", message)
    for name in THIRD_PARTY_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(NoTips())


def route_lightning_logs() -> None:
    """Send Lightning's and torchmetrics' messages through the root logger that Hydra configured, so that they
    reach the run's log file as well as the console (they bring console handlers of their own when imported)."""
    root = logging.getLogger()
    if not root.handlers:
        return
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    for handler in root.handlers:
        handler.addFilter(NoTips())
        if not isinstance(handler, logging.FileHandler):
            handler.addFilter(NoPlannedEnd())


def answer_help(module: str, config_name: str) -> None:
    """Answer `--help` and `--hydra-help` of a Hydra entry point, then exit, when `module` (the caller's `__name__`)
    runs as the command (`python -m digit_lightning.<name>` or the `digit-<name>` script). The entry points call it
    above their imports of torch and Lightning, which take seconds and which the help text does not need."""
    command = f"digit-{config_name}"
    if module != "__main__" and Path(sys.argv[0]).name != command:
        return
    if not {"-h", "--help", "--hydra-help"} & set(sys.argv[1:]):
        return
    run(hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)(lambda cfg: None))
    sys.exit(0)  # Hydra exits after printing help; a call that printed nothing must not go on to import torch


def run(hydra_main: Callable[[], Any]) -> None:
    """Run a `@hydra.main` task with one error path: any user error, Hydra's included, is one line and status 2."""
    quiet()
    for arg in sys.argv[1:]:
        if not arg.startswith("-") and "=" in arg and not arg.split("=", 1)[0].lstrip("+~"):
            fail(f"{arg!r}: an override needs a key before '='; write key=value, e.g. trainer.max_epochs=5")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises its errors to us instead of printing them
    with exit_on_user_error():
        hydra_main()
