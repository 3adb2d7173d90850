"""A Hydra sweeper on a current Optuna: `hydra/sweeper=optuna` (conf/hparams_search/mnist_optuna.yaml uses it).

Optuna samples, stores and prunes; this file only turns Optuna trials into Hydra jobs and their results back into
trial states. Each batch of `n_jobs` trials is asked from the study, launched through Hydra's configured launcher
(basic, joblib, SLURM), and told COMPLETE, PRUNED (the job raised optuna.TrialPruned) or FAIL. The study lives in
`storage`, so running the command again adds `n_trials` more trials, several commands on one storage work as
workers of one study, and a trial interrupted with its process is failed and queued again on the next start.
Each job gets `hydra.sweeper.trial=<number>`, by which digit_lightning.callbacks.pruning finds its trial.

Its settings keep the names of the upstream hydra-optuna-sweeper (sampler, direction, storage, study_name, n_trials,
n_jobs, params) and add pruner, heartbeat_interval, retries. It exists because hydra-optuna-sweeper 1.3.0, the newest
release, pins optuna<3; an upstream release on Optuna >= 4 with pruning would let this plugin be deleted.

Hydra imports every plugin at start-up, in every Hydra app of the environment, so discovering this one imports
neither Optuna nor digit_lightning and registers no resolvers (tests/test_layout.py); both come when a sweep runs.
(Hydra imports plugins outside sys.modules, where `from __future__ import annotations` breaks dataclasses: none
here.)
"""

import logging
import math
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf, read_write

log = logging.getLogger(__name__)


class UserError(HydraException):
    """A sweep setting the user can fix; the entry point prints it as one `error:` line (a Hydra error, so that
    discovering this plugin imports nothing of digit_lightning)."""


@dataclass
class OptunaSweeperConf:
    """`hydra.sweeper` for `hydra/sweeper=optuna`; the sampler and pruner are config groups of their own."""

    _target_: str = "hydra_plugins.digit_lightning_optuna.optuna_sweeper.OptunaSweeper"
    _recursive_: bool = False  # the sampler and pruner are built by the sweeper (and the pruning callback)
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "median"}])
    sampler: Any = MISSING  # hydra/sweeper/sampler=tpe|random, or {_target_: optuna.samplers.X, ...}
    pruner: Any = MISSING  # hydra/sweeper/pruner=median|percentile|hyperband|threshold|nop, or {_target_: ...}
    direction: str = "maximize"  # of the value the task returns: maximize | minimize
    storage: str = "sqlite:///${paths.log_dir}/optuna/${hydra.sweeper.study_name}.db"  # a URL or a journal file
    study_name: str = "${task_name}"
    n_trials: int = 20  # trials this command runs (added to those the study has)
    n_jobs: int = 1  # trials launched at once; with hydra/launcher=joblib (or slurm) they run at once
    params: dict[str, str] | None = None  # key: sweep syntax, e.g. tag(log, interval(1e-4, 1e-2)), choice(32, 64)
    heartbeat_interval: int = 60  # seconds; a trial silent for twice this is failed (database storages)
    retries: int = 1  # times a failed-by-heartbeat (interrupted) trial is queued again with the same parameters
    trial: int | None = None  # set for each job by the sweeper: the number of the trial it runs


SAMPLERS = {
    "tpe": {"_target_": "optuna.samplers.TPESampler", "seed": None, "n_startup_trials": 10},
    "random": {"_target_": "optuna.samplers.RandomSampler", "seed": None},
}
PRUNERS = {
    # n_startup_trials: finished trials before a trial can be pruned; n_warmup_steps: epochs before it can be pruned
    "median": {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 5, "n_warmup_steps": 0},
    "percentile": {"_target_": "optuna.pruners.PercentilePruner", "percentile": 25.0, "n_startup_trials": 5},
    "hyperband": {"_target_": "optuna.pruners.HyperbandPruner"},
    "threshold": {"_target_": "optuna.pruners.ThresholdPruner", "lower": None, "upper": None},  # e.g. lower=0.5
    "nop": {"_target_": "optuna.pruners.NopPruner"},
}
store = ConfigStore.instance()
store.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="digit_lightning")
for _name, _node in SAMPLERS.items():
    store.store(group="hydra/sweeper/sampler", name=_name, node=_node, provider="digit_lightning")
for _name, _node in PRUNERS.items():
    store.store(group="hydra/sweeper/pruner", name=_name, node=_node, provider="digit_lightning")


def distribution(override: Override) -> Any:
    """The Optuna distribution of a sweep override (`choice`, `range`, `interval`, `tag(log, interval)`), or the
    value as a string for a plain `key=value`."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    value = override.value()
    if override.is_choice_sweep() or (isinstance(value, RangeSweep) and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if isinstance(value, RangeSweep):  # range(start, stop, step): stop excluded, as in Python
        step = value.step or 1
        last = value.start + step * (math.ceil((value.stop - value.start) / step) - 1)
        if any(isinstance(v, float) for v in (value.start, value.stop, step)):
            return FloatDistribution(float(value.start), float(last), step=float(step))
        return IntDistribution(int(value.start), int(last), step=int(step))
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise UserError(f"{override.input_line}: the Optuna sweeper takes choice(), range() and interval() sweeps")


def search_space(arguments: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """The distributions to sample (by key), and the overrides every trial gets as they are."""
    from optuna.distributions import BaseDistribution, CategoricalDistribution

    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}  # key -> override; a later value of a key (the command line) wins, sweep or not
    for override in OverridesParser.create().parse_overrides(list(arguments)):
        key = override.get_key_element()
        if override.is_delete() or override.is_add() or override.is_force_add():
            fixed[key] = override.input_line
            continue
        found = distribution(override)
        if isinstance(found, BaseDistribution) and found.single():  # one value: nothing to search
            found = found.choices[0] if isinstance(found, CategoricalDistribution) else found.low
        if isinstance(found, BaseDistribution):
            space[key] = found
            fixed.pop(key, None)
        else:
            space.pop(key, None)
            fixed[key] = f"{key}={found}"
    return space, list(fixed.values())


def suggest(trial: Any, name: str, dist: Any) -> Any:
    """Sample `dist` for `name` in `trial` through Optuna's public suggest API."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


@contextmanager
def heartbeats(storage: Any, trial_ids: list[int]) -> Iterator[None]:
    """Record the trials' heartbeats in the storage while the block runs (what tells a live trial from a dead one)."""
    import optuna

    interval = storage.get_heartbeat_interval() if isinstance(storage, optuna.storages.RDBStorage) else None
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            for trial_id in trial_ids:
                storage.record_heartbeat(trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class OptunaSweeper(Sweeper):
    """Runs `n_trials` trials of an Optuna study (created or extended) as Hydra jobs, `n_jobs` at a time."""

    def __init__(self, sampler: DictConfig, pruner: DictConfig, direction: str, storage: str, study_name: str,
                 n_trials: int, n_jobs: int, params: DictConfig | None, heartbeat_interval: int, retries: int,
                 trial: int | None = None) -> None:  # fmt: skip
        if direction not in ("maximize", "minimize"):
            raise UserError(f"hydra.sweeper.direction={direction}: must be maximize or minimize")
        if n_trials < 1 or n_jobs < 1:
            raise UserError(f"hydra.sweeper.n_trials={n_trials}, n_jobs={n_jobs}: both must be >= 1")
        if not isinstance(study_name, str) or not re.fullmatch(r"[\w.=,+ -]+", study_name):
            raise UserError(f"hydra.sweeper.study_name={study_name}: use letters, digits and - _ . = , + only "
                            "(it names the storage file, in a URL where ? # % / mean something else)")  # fmt: skip
        self.sampler_cfg, self.pruner_cfg = sampler, pruner
        self.direction, self.storage_spec, self.study_name = direction, storage, study_name
        self.n_trials, self.n_jobs, self.params = n_trials, n_jobs, params or {}
        self.heartbeat_interval, self.retries = heartbeat_interval, retries
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        """Keep the config and build Hydra's configured launcher, which runs every trial."""
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    def sweep(self, arguments: list[str]) -> None:
        """Run this command's trials; write `optimization_results.yaml` (the study's best so far) in the sweep dir."""
        try:
            import optuna
        except ImportError:
            raise UserError("the Optuna sweeper needs Optuna: pip install 'digit-lightning[sweeps]'") from None
        from digit_lightning.study import absolute, open_storage, trial_id

        # Heartbeats with ask/tell are what this sweeper is built on: Optuna's notes about them are no news here.
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")

        space, fixed = search_space([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        if not space:
            raise UserError("hydra.sweeper.params: nothing to search; e.g. hydra.sweeper.params={model.optimizer.lr: "
                            "'interval(1e-4,1e-2)'}, or a sweep on the command line")  # fmt: skip
        if self.n_jobs > 1 and type(self.launcher).__name__ == "BasicLauncher":
            log.warning(f"hydra.sweeper.n_jobs={self.n_jobs} with Hydra's basic launcher runs the trials one after "
                        "another; add hydra/launcher=joblib to run them at once")  # fmt: skip
        self.storage_spec = absolute(self.storage_spec)  # valid from any directory, e.g. for the sweep report
        storage = open_storage(self.storage_spec, self.heartbeat_interval, self.retries)
        sweep_dir = self._claim_sweep_dir()
        pruner = instantiate(self.pruner_cfg)
        study = optuna.create_study(storage=storage, study_name=self.study_name, direction=self.direction,
                                    pruner=pruner, load_if_exists=True)  # fmt: skip
        log.info(f"Study {self.study_name!r} in {self.storage_spec}: {len(study.trials)} trials so far; "
                 f"running {self.n_trials}, {self.n_jobs} at a time")  # fmt: skip
        sampled: optuna.Study | None = None  # the study with this command's sampler, once the first trial is asked
        failures: list[BaseException] = []
        completed = 0
        for start in range(0, self.n_trials, self.n_jobs):
            self._fail_stale(study)
            trials = []
            for _ in range(min(self.n_jobs, self.n_trials - start)):
                if sampled is None:  # seed this command's sampler by its first trial's number: workers differ
                    first = study.ask()
                    sampled = optuna.load_study(study_name=self.study_name, storage=storage, pruner=pruner,
                                                sampler=self._sampler(first.number))  # fmt: skip
                    trials.append(optuna.trial.Trial(sampled, trial_id(storage, self.study_name, first.number)))
                else:
                    trials.append(sampled.ask())
            batch = [self._overrides(t, space, fixed, sweep_dir, self.job_idx + i) for i, t in enumerate(trials)]
            try:
                with heartbeats(storage, [trial_id(storage, self.study_name, t.number) for t in trials]):
                    returns = self.launcher.launch(batch, initial_job_idx=self.job_idx)
            except BaseException as e:  # a job's exit (a user error), Ctrl-C: no trial of the batch stays RUNNING
                for trial in trials:
                    with suppress(Exception):  # the storage itself may be what failed
                        sampled.tell(trial, state=optuna.trial.TrialState.FAIL)
                log.warning(f"Trials {[t.number for t in trials]} failed: the sweep stopped ({type(e).__name__})")
                raise
            self.job_idx += len(returns)
            for trial, ret in zip(trials, returns, strict=True):
                error = self._tell(sampled, trial, ret)
                completed += error is None
                if error is not None and not isinstance(error, optuna.TrialPruned):
                    failures.append(error)
            if failures and not completed and len(failures) == self.job_idx:
                raise failures[0]  # every trial so far failed: the same error would end every other one
        self._save_results(sampled or study, sweep_dir)

    def _claim_sweep_dir(self) -> Path:
        """Make this command's sweep dir, one no other command has: two workers started in the same second get the
        same `hydra.sweep.dir` (its time has seconds), and their jobs would then share run dirs. The second one gets
        `<dir>_2` (then `_3`, ...), and every job of this command is told so."""
        base = Path(self.config.hydra.sweep.dir).resolve()
        base.parent.mkdir(parents=True, exist_ok=True)
        for n in range(1, 1000):
            claimed = base if n == 1 else base.with_name(f"{base.name}_{n}")
            try:
                claimed.mkdir()
                break
            except FileExistsError:
                continue
        else:
            raise UserError(f"hydra.sweep.dir={base}: 999 sweeps already have this dir; pass another hydra.sweep.dir")
        if claimed != base:
            log.info(f"{base} is another sweep's; this one writes to {claimed}")
        with read_write(self.config.hydra):  # the launcher and the end-of-sweep report read it from here
            self.config.hydra.sweep.dir = str(claimed)
        return claimed

    def _sampler(self, offset: int) -> Any:
        """The configured sampler; a seeded one is seeded `seed + offset`, so each command draws its own points."""
        cfg = self.sampler_cfg
        if cfg.get("seed") is None:
            return instantiate(cfg)
        log.info(f"Sampler {cfg._target_.rsplit('.', 1)[-1]} seeded {cfg.seed} + {offset} (this command's first trial)")
        return instantiate(cfg, seed=int(cfg.seed) + offset)

    def _fail_stale(self, study: Any) -> None:
        """Fail the trials whose process stopped beating (killed, preempted); Optuna queues them again."""
        import optuna

        running = {t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))}
        optuna.storages.fail_stale_trials(study)
        still = {t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))}
        if running - still:
            log.warning(f"Trials {sorted(running - still)} were interrupted (no heartbeat): marked failed and "
                        f"queued again (up to {self.retries} time(s))")  # fmt: skip

    def _overrides(self, trial: Any, space: dict[str, Any], fixed: list[str], sweep_dir: Path, job: int) -> list[str]:
        """The job's overrides: the trial's parameters, the fixed ones, and which trial it is."""
        params = {name: suggest(trial, name, dist) for name, dist in space.items()}
        trial.set_user_attr("sweep_dir", str(sweep_dir))  # where its run dir is: <sweep_dir>/<job>
        trial.set_user_attr("job", job)
        return [*(f"{k}={v}" for k, v in params.items()), *fixed, f"hydra.sweeper.trial={trial.number}",
                f"hydra.sweep.dir={sweep_dir}"]  # fmt: skip

    def _tell(self, study: Any, trial: Any, ret: JobReturn) -> BaseException | None:
        """Record the job's outcome in the study; return its error (None when it completed)."""
        import optuna

        if ret.status == JobStatus.COMPLETED:
            value = ret.return_value
            if isinstance(value, (int, float)) and math.isfinite(value):
                study.tell(trial, float(value))
                return None
            error: BaseException = ValueError(f"trial {trial.number} returned {value!r}, not a finite number")
        else:
            try:
                error = ValueError(f"trial {trial.number} returned {ret.return_value!r}")  # re-raises the job's error
            except BaseException as raised:  # noqa: BLE001  (whatever the job raised is the trial's outcome)
                error = raised
        if isinstance(error, optuna.TrialPruned):
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            log.info(f"Trial {trial.number} pruned: {error}")
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log.warning(f"Trial {trial.number} failed: {type(error).__name__}: {' '.join(str(error).split())}")
        return error

    def _save_results(self, study: Any, sweep_dir: Path) -> None:
        """`optimization_results.yaml`: the study's best trial so far, its counts and where it is stored."""
        import optuna

        states = [t.state for t in study.get_trials(deepcopy=False)]
        results: dict[str, Any] = {
            "name": "optuna",
            "study_name": self.study_name,
            "storage": self.storage_spec,
            "direction": self.direction,
            "trials": {s.name.lower(): states.count(s) for s in optuna.trial.TrialState if states.count(s)},
        }
        try:
            best = study.best_trial
            results.update(best_params=best.params, best_value=best.value, best_trial=best.number)
            log.info(f"Best of {len(states)} trials: trial {best.number}, value {best.value}, params {best.params}")
        except ValueError:
            log.warning("No trial of the study has completed yet")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
