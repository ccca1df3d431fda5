"""Where a search study lives: an Optuna storage from a URL, and a SQLite snapshot of a study.

``search.storage`` is any Optuna storage URL: SQLite beside the outputs by default
(``<out_dir>-study.db``, outside them, so that DVC caches the outputs and the study outlives a
rerun), PostgreSQL or MySQL through SQLAlchemy, or ``journal:PATH`` for a journal file on a shared
filesystem. An RDB storage (SQLite included) records each running trial's heartbeat; Optuna fails a
trial whose heartbeat is older than the grace period (its worker died) and
``RetryHeartbeatStaleTrialCallback`` queues it again.

**A journal file has no heartbeats in Optuna** (``JournalStorage`` implements none, Optuna 5.1): a
dead worker's trial stays RUNNING there, cannot be told from a live worker's, and counts towards
``search.n_trials``. It is never failed here; opening a journal study that holds RUNNING trials
says so on stderr, once per process (``note_running``). Use an RDB storage (SQLite on a local disk,
PostgreSQL) for dead workers' trials to be run again.

**``${NAME}`` in the URL is read from the environment** when the storage is opened
(``expand_url``), so that a password or host never sits in params.yaml, DVC's lock or an
experiment: ``postgresql+psycopg://esolm:${ESOLM_DB_PASSWORD}@${ESOLM_DB_HOST}/optuna`` (for
drivers that do not read ``PGPASSWORD``), or the whole URL, ``${ESOLM_STORAGE}``. Only the braced
form is expanded (a bare ``$NAME`` stays as written). A variable that is the whole password holds
it as it is (it is percent-encoded into the URL); anywhere else its value goes in as it is. An
unset variable is one line naming it and the fix (``export NAME=...``). The password of a URL is
never printed, logged or put in an error: those show ``config.mask_url``'s
``postgresql://user:***@host/db``.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from esolm.search.config import STORAGE_FORMS, check_storage, mask_url

if TYPE_CHECKING:
    from esolm.search.config import SearchConfig


def storage_url(sc: SearchConfig) -> str:
    """``search.storage``, or the default SQLite file ``<out_dir>-study.db`` (beside the outputs)."""
    out = Path(sc.out_dir)
    return sc.storage or f"sqlite:///{out.with_name(out.name + '-study.db')}"


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PASSWORD_VARIABLE = re.compile(r"[A-Za-z][\w+.-]*://[^:/@]*:(\$\{[A-Za-z_][A-Za-z0-9_]*\})@")


def expand_url(url: str, key: str = "search.storage") -> str:
    """``url`` with each ``${NAME}`` replaced by the environment variable ``NAME`` (percent-encoded
    when it is the whole password); an unset one is a ValueError naming it, ``key`` and the fix."""
    from urllib.parse import quote

    password = _PASSWORD_VARIABLE.match(url)

    def value(m: re.Match) -> str:
        name = m.group(1)
        if name not in os.environ:
            raise ValueError(f"{key}={mask_url(url)!r} reads the environment variable {name}, which is not set: "
                             f"export {name}=... where the search runs (every worker's machine), or write "
                             f"the value into {key}")
        whole = password is not None and m.span() == password.span(1)
        return quote(os.environ[name], safe="") if whole else os.environ[name]

    expanded = _VARIABLE.sub(value, url)
    if expanded != url:
        check_storage(expanded)
    return expanded


def scrub(text: str, url: str) -> str:
    """``text`` (an error of a database driver, ...) with the password of ``url`` as ``***``."""
    from urllib.parse import unquote

    masked = mask_url(url)
    if masked == url:
        return text
    password = url.partition("://")[2].rpartition("@")[0].split(":", 1)[1]
    for secret in {url, password, unquote(password)} - {""}:
        text = text.replace(secret, masked if secret == url else "***")
    return text


def open_storage(url: str, heartbeat_interval: int = 10, grace_period: int = 120) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL (``${NAME}`` read from the environment, ``expand_url``):
    ``journal:PATH`` (a journal file, for shared filesystems) or any SQLAlchemy URL
    (sqlite:///..., postgresql://..., mysql+pymysql://...), the latter with heartbeats: a running
    trial silent for ``grace_period`` seconds is failed and queued again (at most twice) by the next
    worker that asks for a trial (``optuna.storages.fail_stale_trials``)."""
    url = expand_url(url)
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
    shown = mask_url(url)
    try:
        return _rdb(url, {"pool_pre_ping": True}, heartbeat_interval, grace_period)
    except ImportError as err:  # the database's driver package: name it, as cli.missing_extra does
        raise ValueError(f"search.storage={shown!r} needs a database driver that is not installed "
                         f"({scrub(' '.join(str(err).split()), url)}): install it (PostgreSQL: pip install "
                         "'esolm[postgres]'), or use sqlite:///PATH or journal:PATH") from None
    except Exception as err:  # sqlalchemy.exc.ArgumentError / NoSuchModuleError: an unknown dialect or driver
        if not type(err).__module__.startswith("sqlalchemy"):
            raise
        from sqlalchemy.exc import DBAPIError

        fix = ("check that the server runs and takes this user and password (PGPASSWORD, ~/.pgpass or ${NAME} "
               "in the URL)" if isinstance(err, DBAPIError) else f"use {STORAGE_FORMS}")  # reached, or not a URL
        raise ValueError(f"search.storage={shown!r} cannot be opened ({scrub(' '.join(str(err).split()), url)}): "
                         f"{fix}") from None


_NOTED: set[tuple[str, tuple[int, ...]]] = set()


def note_running(storage: optuna.storages.BaseStorage, study: optuna.Study, url: str = "") -> None:
    """On a journal storage (no heartbeats), one line on stderr when ``study`` holds RUNNING trials:
    how many, their numbers, why none of them is ever failed, and the fix (once per process for the
    same trials). Other storages: nothing (their heartbeats tell dead trials from live ones)."""
    if not isinstance(storage, optuna.storages.JournalStorage):
        return
    running = tuple(t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
    if not running or (study.study_name, running) in _NOTED:
        return
    _NOTED.add((study.study_name, running))
    where = f"the journal storage {mask_url(url)}" if url else "its journal storage"
    print(f"esolm search: warning: study {study.study_name} in {where} holds {len(running)} RUNNING "
          f"trial(s) (#{', #'.join(map(str, running))}): a journal file has no heartbeats, so a dead "
          "worker's trial cannot be told from a live one; they are left RUNNING (never failed or run "
          "again) and count towards search.n_trials; for dead workers' trials to be re-queued use an "
          "RDB storage: search.storage=sqlite:///PATH on a local disk or postgresql://...", file=sys.stderr)


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
