"""Where a search study lives: an Optuna storage from a URL, and a SQLite snapshot of a study.

``search.storage`` is any Optuna storage URL: SQLite next to the outputs by default, PostgreSQL or
MySQL through SQLAlchemy, or ``journal:PATH`` for a journal file on a shared filesystem.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from esolm.search.config import STORAGE_FORMS

if TYPE_CHECKING:
    from esolm.search.config import SearchConfig


def storage_url(sc: SearchConfig) -> str:
    """``search.storage``, or the default SQLite file ``<out_dir>/study.db``."""
    return sc.storage or f"sqlite:///{Path(sc.out_dir) / 'study.db'}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL: ``journal:PATH`` (a journal file, for shared filesystems)
    or any SQLAlchemy URL (sqlite:///..., postgresql://..., mysql+pymysql://...)."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # several processes write one SQLite file: wait for its lock instead of failing
        storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}})
        _begin_immediate(storage.engine)
        return storage
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    except ImportError as err:  # the database's driver package: name it, as cli.missing_extra does
        raise ValueError(f"search.storage={url!r} needs a database driver that is not installed "
                         f"({' '.join(str(err).split())}): install it (PostgreSQL: pip install "
                         "'esolm[postgres]'), or use sqlite:///PATH or journal:PATH") from err
    except Exception as err:  # sqlalchemy.exc.ArgumentError / NoSuchModuleError: an unknown dialect or driver
        if type(err).__module__.startswith("sqlalchemy"):
            raise ValueError(f"search.storage={url!r} cannot be opened ({' '.join(str(err).split())}): "
                             f"use {STORAGE_FORMS}") from err
        raise


def _begin_immediate(engine: Any) -> None:
    """SQLite ignores ``SELECT ... FOR UPDATE``, so two workers could claim the same ticket:
    start every transaction with ``BEGIN IMMEDIATE`` (SQLite's write lock) so that reading a
    ticket and marking it RUNNING is atomic, as it is on PostgreSQL and MySQL."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()


def copy_to_sqlite(study: optuna.Study, path: Path) -> None:
    """A SQLite snapshot of ``study`` at ``path`` (replacing the file), for a study kept in a
    server database: the DVC output then records the trials the outputs were computed from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    optuna.copy_study(from_study_name=study.study_name, from_storage=study._storage,
                      to_storage=f"sqlite:///{tmp}")
    os.replace(tmp, path)
