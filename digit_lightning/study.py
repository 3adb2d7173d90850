"""Optuna studies as the sweeper, the pruning callback and the sweep report open them (needs the `sweeps` extra).

A storage is named by one string: a database URL (`sqlite:///logs/optuna/x.db`, `postgresql://user@host/db`), or
the path of an Optuna journal file (anything without `://`, e.g. `/shared/optuna/x.log`) for a shared filesystem.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from digit_lightning.errors import UserError

if TYPE_CHECKING:
    import optuna


class StorageError(UserError):
    """A storage that cannot be opened (a corrupt or foreign file); one line naming it and the fix."""


CREATE_ATTEMPTS = 4  # a new database's tables are created by whichever worker comes first
SQLITE_TIMEOUT_S = 60  # how long a worker waits for another's write lock on a SQLite file before failing


def open_storage(spec: str, heartbeat_interval: int | None = None, retries: int = 0) -> optuna.storages.BaseStorage:
    """The storage `spec` names; its directory is created for a SQLite or journal file.

    With `heartbeat_interval` (database storages only), a trial whose process stops beating for twice that long is
    failed by the next `optuna.storages.fail_stale_trials`, and queued again up to `retries` times.
    """
    import optuna
    from sqlalchemy.exc import DatabaseError, IntegrityError, OperationalError

    if "://" not in spec:
        Path(spec).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(Path(spec).expanduser())))
    engine_kwargs: dict[str, Any] = {}
    if spec.startswith("sqlite:///"):
        from sqlalchemy.engine import make_url

        database = make_url(spec).database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    stale = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=retries) if heartbeat_interval else None
    for attempt in range(CREATE_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(spec, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                                              heartbeat_stale_trial_callback=stale)  # fmt: skip
        except (IntegrityError, OperationalError):  # workers started together: another one is creating the tables
            if attempt + 1 == CREATE_ATTEMPTS:
                raise
            time.sleep(1 + attempt)
        except DatabaseError as e:  # a file that is not a database, or a corrupt one
            raise StorageError(f"hydra.sweeper.storage={spec}: not an Optuna database ({_reason(e)}); move that "
                               "file away or name another storage") from None  # fmt: skip
    return None  # not reached: the last attempt returns or raises


def _reason(error: Exception) -> str:
    """The database's own words for `error` (SQLAlchemy's wrapper adds the statement and a help link)."""
    return " ".join(str(getattr(error, "orig", None) or error).split())[:150]


def trial_id(storage: optuna.storages.BaseStorage, study_name: str, number: int) -> int:
    """The storage's id of trial `number` of the study (what `optuna.trial.Trial` takes)."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)


def load_trial(storage: str, study_name: str, number: int, pruner: Any = None) -> optuna.trial.Trial:
    """Trial `number` of a stored study, from any process, to report to and ask `should_prune()` with `pruner`."""
    import optuna

    opened = open_storage(storage)
    study = optuna.load_study(study_name=study_name, storage=opened, sampler=optuna.samplers.RandomSampler(),
                              pruner=pruner)  # fmt: skip
    return optuna.trial.Trial(study, trial_id(opened, study_name, number))


def absolute(spec: str) -> str:
    """`spec` with a relative SQLite or journal file path made absolute, so it names the same study from anywhere."""
    if "://" not in spec:
        return str(Path(spec).expanduser().resolve())
    path = spec.removeprefix("sqlite:///") if spec.startswith("sqlite:///") else None
    if path and path != ":memory:" and not path.startswith("/"):
        return "sqlite:///" + str(Path(path).expanduser().resolve())
    return spec
