"""Where a search study lives: an Optuna storage from a URL, and a SQLite snapshot of a study.

``search.storage`` is any Optuna storage URL: SQLite beside the outputs by default
(``<out_dir>-study.db``, outside them, so that DVC caches the outputs and the study outlives a
rerun), PostgreSQL or MySQL through SQLAlchemy, or ``journal:PATH`` for a journal file on a shared
filesystem. An RDB storage (SQLite included) records each running trial's heartbeat; Optuna fails a
trial whose heartbeat is older than the grace period (its worker died) and
``RetryHeartbeatStaleTrialCallback`` queues it again. A journal file has no heartbeats in Optuna:
a dead worker's trial stays RUNNING there.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from esolm.search.config import STORAGE_FORMS

if TYPE_CHECKING:
    from esolm.search.config import SearchConfig


def storage_url(sc: SearchConfig) -> str:
    """``search.storage``, or the default SQLite file ``<out_dir>-study.db`` (beside the outputs)."""
    out = Path(sc.out_dir)
    return sc.storage or f"sqlite:///{out.with_name(out.name + '-study.db')}"


def open_storage(url: str, heartbeat_interval: int = 10, grace_period: int = 120) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL: ``journal:PATH`` (a journal file, for shared filesystems)
    or any SQLAlchemy URL (sqlite:///..., postgresql://..., mysql+pymysql://...), the latter with
    heartbeats: a running trial silent for ``grace_period`` seconds is failed and queued again
    (at most twice) by the next worker that asks for a trial (``optuna.storages.fail_stale_trials``)."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # several processes write one SQLite file: wait for its lock instead of failing
        storage = _rdb(url, {"connect_args": {"timeout": 120}}, heartbeat_interval, grace_period)
        _begin_immediate(storage.engine)
        return storage
    try:
        return _rdb(url, {"pool_pre_ping": True}, heartbeat_interval, grace_period)
    except ImportError as err:  # the database's driver package: name it, as cli.missing_extra does
        raise ValueError(f"search.storage={url!r} needs a database driver that is not installed "
                         f"({' '.join(str(err).split())}): install it (PostgreSQL: pip install "
                         "'esolm[postgres]'), or use sqlite:///PATH or journal:PATH") from err
    except Exception as err:  # sqlalchemy.exc.ArgumentError / NoSuchModuleError: an unknown dialect or driver
        if type(err).__module__.startswith("sqlalchemy"):
            raise ValueError(f"search.storage={url!r} cannot be opened ({' '.join(str(err).split())}): "
                             f"use {STORAGE_FORMS}") from err
        raise


def _rdb(url: str, engine_kwargs: dict, heartbeat_interval: int, grace_period: int) -> optuna.storages.RDBStorage:
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2))


def _begin_immediate(engine: Any) -> None:
    """SQLite ignores ``SELECT ... FOR UPDATE``, so two workers could pop the same queued trial
    (``study.ask``): start every transaction with ``BEGIN IMMEDIATE`` (SQLite's write lock) so that
    reading a waiting trial and marking it RUNNING is atomic, as it is on PostgreSQL and MySQL."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()


def copy_to_sqlite(study_name: str, storage: str | optuna.storages.BaseStorage, path: Path) -> None:
    """A SQLite snapshot of study ``study_name`` of ``storage`` at ``path`` (replacing the file):
    the DVC output that records the trials the outputs were computed from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    optuna.copy_study(from_study_name=study_name, from_storage=storage, to_storage=f"sqlite:///{tmp}")
    os.replace(tmp, path)
