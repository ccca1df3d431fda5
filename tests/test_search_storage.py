"""Where a search study lives (issue #25): ``${NAME}`` in search.storage from the environment, a
password never shown, and a journal file's RUNNING trials named, never failed."""

from __future__ import annotations

import pytest

pytest.importorskip("optuna")

from esolm.search import SearchConfig, open_study, queue_trials
from esolm.search.config import check_storage, mask_url
from esolm.search.storage import expand_url, open_storage, scrub

SECRET = "s3cr@t:/{x}%"  # every character a URL or str.format would misread


def test_variables_are_read_from_the_environment_when_the_storage_is_opened(monkeypatch, tmp_path):
    monkeypatch.setenv("ESOLM_TEST_PW", SECRET)
    monkeypatch.setenv("ESOLM_TEST_HOST", "db.internal")
    url = "postgresql+psycopg://esolm:${ESOLM_TEST_PW}@${ESOLM_TEST_HOST}:5432/optuna"
    SearchConfig(storage=url)  # check_storage takes the form as written
    expanded = expand_url(url)
    assert expanded == "postgresql+psycopg://esolm:s3cr%40t%3A%2F%7Bx%7D%25@db.internal:5432/optuna"
    from sqlalchemy.engine import make_url

    assert make_url(expanded).password == SECRET and make_url(expanded).host == "db.internal"
    assert expand_url("postgresql://u:$ESOLM_TEST_PW@h/db") == "postgresql://u:$ESOLM_TEST_PW@h/db"  # braces only
    monkeypatch.setenv("ESOLM_TEST_DIR", str(tmp_path / "shared"))
    sc = SearchConfig(n_trials=1, out_dir=str(tmp_path / "search"), storage="sqlite:///${ESOLM_TEST_DIR}/study.db")
    open_study(sc, "s")
    assert (tmp_path / "shared" / "study.db").is_file()
    monkeypatch.setenv("ESOLM_TEST_STORAGE", f"journal:{tmp_path / 'journal.log'}")
    check_storage("${ESOLM_TEST_STORAGE}")  # a whole URL from the environment, checked once expanded
    open_study(SearchConfig(storage="${ESOLM_TEST_STORAGE}"), "j")
    assert (tmp_path / "journal.log").stat().st_size > 0
    monkeypatch.setenv("ESOLM_TEST_STORAGE", "nope://")
    with pytest.raises(ValueError, match="is not a storage URL"):
        expand_url("${ESOLM_TEST_STORAGE}")


def test_an_unset_variable_is_one_line_naming_it_the_key_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.delenv("ESOLM_TEST_UNSET", raising=False)
    sc = SearchConfig(out_dir=str(tmp_path / "search"), storage="postgresql+psycopg://esolm:${ESOLM_TEST_UNSET}@h/db")
    with pytest.raises(ValueError) as err:
        open_study(sc, "s")
    line = str(err.value)
    assert "\n" not in line and "search.storage=" in line
    assert "ESOLM_TEST_UNSET, which is not set" in line and "export ESOLM_TEST_UNSET=..." in line


def test_a_password_is_never_printed_or_put_in_an_error(monkeypatch):
    assert mask_url(f"postgresql://esolm:{SECRET}@db/optuna") == "postgresql://esolm:***@db/optuna"
    assert mask_url("mysql+pymysql://u:pw@h:3306/db?charset=utf8") == "mysql+pymysql://u:***@h:3306/db?charset=utf8"
    for plain in ("postgresql://esolm@db/optuna", "sqlite:////tmp/a:b@c.db", "journal:/x/y.log", ""):
        assert mask_url(plain) == plain
    with pytest.raises(ValueError) as err:  # a password written into params.yaml, in a bad URL
        check_storage("postgres://u:hunter2@h/db")
    assert "hunter2" not in str(err.value) and "postgres://u:***@h/db" in str(err.value)
    monkeypatch.setenv("ESOLM_TEST_PW", SECRET)
    with pytest.raises(ValueError) as err:  # an unknown driver: SQLAlchemy's error, the URL masked
        open_storage("postgresql+nodriver://esolm:${ESOLM_TEST_PW}@h/db")
    assert "search.storage='postgresql+nodriver://esolm:***@h/db' cannot be opened" in str(err.value)
    assert "s3cr" not in str(err.value) and "%40" not in str(err.value)
    url = expand_url("postgresql://esolm:${ESOLM_TEST_PW}@h/db")
    assert scrub(f"connection to {url} failed for {SECRET}", url) == \
        "connection to postgresql://esolm:***@h/db failed for ***"


def test_a_journal_files_running_trials_are_named_on_stderr_and_never_failed(tmp_path, capsys):
    """Optuna's JournalStorage has no heartbeats: a trial whose worker died stays RUNNING. Opening
    the study says so in one line (which trials, why, the fix), once per process; no search fails
    them (they count towards n_trials)."""
    sc = SearchConfig(n_trials=3, out_dir=str(tmp_path / "search"), storage=f"journal:{tmp_path / 'study.log'}")
    study = open_study(sc, "j")
    assert capsys.readouterr().err == ""  # no RUNNING trial: nothing to say
    study.ask()
    study.ask()  # two workers asked for trials and died (or still run: a journal cannot tell)
    study = open_study(sc, "j")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("esolm search: warning: study j in the journal storage journal:")
    assert "2 RUNNING trial(s) (#0, #1)" in err and "no heartbeats" in err and "dead worker's trial" in err
    assert "sqlite:///PATH on a local disk or postgresql://" in err
    assert queue_trials(study, 3) == 1  # the RUNNING ones count and stay
    assert [t.state.name for t in open_study(sc, "j").trials] == ["RUNNING", "RUNNING", "WAITING"]
    assert capsys.readouterr().err == ""  # said once per process


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_an_rdb_storage_says_nothing_of_its_running_trials(tmp_path, capsys):
    sc = SearchConfig(n_trials=2, out_dir=str(tmp_path / "search"))
    open_study(sc, "r").ask()
    open_study(sc, "r")
    assert capsys.readouterr().err == ""
