"""The schedule search on a real PostgreSQL server (Debian's package, started by the test on a
Unix socket in a temporary folder): two worker processes share one study (slow); a password
read from the environment (``${NAME}`` in search.storage) opens it and is never shown."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import trained_project

PG_BIN = Path("/usr/lib/postgresql")


def _pg_tool(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, else in Debian's versioned folder."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(PG_BIN.glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


def _as_postgres(args: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as Debian's ``postgres`` user then."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@contextmanager
def postgres_server(password: str | None = None):
    """Start a throwaway server on a Unix socket (``password``: the user ``esolm`` needs it, by
    SCRAM; else any local connection is trusted); yield its SQLAlchemy URL, which holds no
    password; stop and delete it."""
    initdb, pg_ctl = _pg_tool("initdb"), _pg_tool("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server programs are not installed (apt-get install postgresql)")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is part of the dev extra: pip install -e '.[dev]'")
    home = Path(tempfile.mkdtemp(prefix="esolm-pg-"))
    home.chmod(0o777)
    data, sock = home / "data", home / "sock"
    sock.mkdir()
    sock.chmod(0o777)
    auth = ["--auth=trust"]
    if password is not None:
        (home / "pw").write_text(password)
        auth = ["--auth=scram-sha-256", f"--pwfile={home / 'pw'}"]
    if os.geteuid() == 0:
        shutil.chown(home, "postgres")
        shutil.chown(sock, "postgres")
        if password is not None:
            shutil.chown(home / "pw", "postgres")
    subprocess.run(_as_postgres([initdb, "-D", str(data), "-U", "esolm", *auth, "-E", "UTF8"]),
                   check=True, capture_output=True)
    port = "54329"
    options = f"-c listen_addresses='' -k {sock} -p {port}"
    subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-o", options, "-l", str(home / "log"), "-w", "start"]),
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://esolm@/postgres?host={sock}&port={port}"
    finally:
        subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"]), check=False,
                       capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def postgres_url():
    with postgres_server() as url:
        yield url


def _esolm(repo: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-m", "esolm.cli", "search", *args], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


@pytest.mark.slow
def test_two_worker_processes_share_one_study_on_postgresql(tmp_path, postgres_url):
    import optuna

    from esolm.search import pareto

    repo = trained_project(tmp_path)
    sets = ["--set", f"search.storage={postgres_url}", "--set", "search.n_trials=8"]
    assert "queued 8 trials" in _wait(_esolm(repo, "--only", "queue", *sets))
    workers = [_esolm(repo, "--only", "join", "--quiet", *sets) for _ in range(2)]
    ran = [int(_wait(w).split("ran ")[1].split()[0]) for w in workers]
    print(f"trials per worker process: {ran}")
    assert sum(ran) == 8
    summary = _wait(_esolm(repo, "--only", "outputs", "--quiet", *sets))
    assert "8 trials (0 new)" in summary

    names = optuna.get_all_study_names(postgres_url)
    assert len(names) == 1 and names[0].startswith("schedule-eso_b_a05-")
    study = optuna.load_study(study_name=names[0], storage=postgres_url)
    assert sorted(t.number for t in study.trials) == list(range(8))
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert study.metric_names == ["gen_ppl", "seconds_per_sample"]
    by_worker = {w: sum(t.user_attrs["worker"] == w for t in study.trials)
                 for w in {t.user_attrs["worker"] for t in study.trials}}
    assert sorted(by_worker.values()) == sorted(n for n in ran if n)  # each process's own count

    snapshot = optuna.load_study(study_name=names[0], storage=f"sqlite:///{repo / 'reports/search/study.db'}")
    assert len(snapshot.trials) == 8  # the DVC output is a SQLite copy of the server's study
    import pandas as pd

    rows = pd.read_parquet(repo / "reports" / "search" / "trials.parquet").to_dict("records")
    assert len(rows) == 8
    front = json.loads((repo / "reports" / "search" / "pareto.json").read_text())["front"]
    expected = pareto([{**r, "params": json.loads(r["params"])} for r in rows if r["feasible"]])
    assert [(p["trial"], p["gen_ppl"]) for p in front] == [(p["trial"], p["gen_ppl"]) for p in expected]


@pytest.mark.slow
def test_a_worker_killed_mid_trial_on_postgresql_never_costs_a_live_trial(tmp_path, postgres_url):
    """Issue #25, item 5: on a real server, a worker killed mid-trial, a live worker and then a
    new search: the dead trial is failed and run again, the live one survives, the total is
    reached (tests/test_search.py states the scenario)."""
    from esolm.search import SearchConfig
    from tests.test_search import dead_and_live_workers

    dead_and_live_workers(SearchConfig(n_trials=3, out_dir=str(tmp_path / "search"), storage=postgres_url,
                                       space={"steps": [2, 16], "alpha_0": [0.0, 1.0], "order": ["random", "block"],
                                              "top_p": [0.8, 1.0]}))


@pytest.mark.slow  # a real PostgreSQL server (Debian's package), which CI does not install
def test_a_password_from_the_environment_opens_the_server_and_is_never_shown(tmp_path, monkeypatch):
    """search.storage holds ``${NAME}`` where the password goes (no PGPASSWORD, no ~/.pgpass): the
    server is opened with the variable's value, percent-encoded (it holds @ : / { } %); a wrong one
    is one line that shows neither password."""
    from esolm.search import SearchConfig, objective_for, open_study, run_study
    from tests.test_search import _toy

    secret = "s3cr@t:/{x}%"
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    with postgres_server(password=secret) as url:
        storage = url.replace("esolm@", "esolm:${ESOLM_TEST_DB_PASSWORD}@")
        sc = SearchConfig(n_trials=2, out_dir=str(tmp_path / "search"), storage=storage, space={"steps": [2, 16]})
        monkeypatch.setenv("ESOLM_TEST_DB_PASSWORD", secret)
        assert run_study(open_study(sc, "pw"), objective_for(_toy, sc.space, "eso_b", 0.0), 2) == 2
        monkeypatch.setenv("ESOLM_TEST_DB_PASSWORD", "wrong-" + secret)
        with pytest.raises(ValueError) as err:
            open_study(sc, "pw")
    line = str(err.value)
    assert "\n" not in line and "search.storage='postgresql+psycopg://esolm:***@/postgres?host=" in line
    assert "password authentication failed" in line and "s3cr" not in line and "%40" not in line
