"""``esolm query`` for people (issue 27): one line per row, numbers right-aligned with one precision
per column, long text cut with an ellipsis to the width (``--full``: whole), headers never cut,
``--tables`` and ``--schema``, and a read-only error that names every allowed statement."""

from __future__ import annotations

import json

import pytest

from esolm.cli import main
from esolm.tabular import format_table

duckdb = pytest.importorskip("duckdb")

SCHEDULE = json.dumps({"steps": 16, "alpha_0": 0.25, "order": "random", "schedule": "loglinear", "gamma": None,
                       "subcontexts": None, "shuffle": None, "top_p": 0.9, "kv_cache": True, "seed": 0})


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "r.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE sampling (variant VARCHAR, nfe BIGINT, gen_ppl DOUBLE, seconds_per_sample DOUBLE, "
                "schedule JSON, PRIMARY KEY (variant))")
    con.executemany("INSERT INTO sampling VALUES (?, ?, ?, ?, ?)",
                    [["ar", 16, 18.512345, 0.000943, SCHEDULE], ["mdlm", 13, 316.2, 0.0017961, SCHEDULE],
                     ["eso_b_a025", 16, 96.61, 0.001078, None]])
    con.execute("CREATE TABLE runs (run_id VARCHAR, label VARCHAR)")
    con.close()
    return path


def _query(db, capsys, *args) -> tuple[int, str, str]:
    rc = main(["query", "--db", str(db), *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_numbers_are_right_aligned_with_one_precision_per_column(db, capsys):
    rc, out, _ = _query(db, capsys, "SELECT variant, nfe, gen_ppl, seconds_per_sample FROM sampling")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == ["variant", "nfe", "gen_ppl", "seconds_per_sample"]  # headers whole
    rows = lines[2:5]
    assert len({len(r) for r in rows}) == 1 and len(rows[0]) == len(lines[0])  # right edges line up
    assert [r.split()[2] for r in rows] == ["18.51", "316.20", "96.61"]  # 4 significant digits of the median
    assert [r.split()[3] for r in rows] == ["0.000943", "0.001796", "0.001078"]
    assert rows[0].endswith("0.000943") and rows[1].split()[1] == "13"
    assert lines[-1] == "(3 rows)"


def test_long_json_is_cut_with_an_ellipsis_to_the_width_and_full_shows_it(db, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")  # the terminal's width (piped output: 120)
    rc, out, _ = _query(db, capsys, "SELECT * FROM sampling")
    assert rc == 0
    lines = out.splitlines()
    assert all(len(line) <= 60 for line in lines[:-1]), out
    assert lines[0].split() == ["variant", "nfe", "gen_ppl", "seconds_per_sample", "schedule"]
    assert lines[2].endswith("…") and len(out.splitlines()) == 6  # one line per row
    assert "NULL" in lines[4]
    rc, out, _ = _query(db, capsys, "--full", "SELECT * FROM sampling")
    assert SCHEDULE in out and "…" not in out and len(out.splitlines()) == 6


def test_headers_are_not_cut_when_piped():
    """Rich cut every header to three letters at its piped width of 80."""
    cols = ["run_id", "variant", "seconds_per_sample", "tokens_per_s", "schedule"]
    rows = [["a954673c12-2ac4c6d1f0", "eso_b_a0125", 0.001, 16972.4, "x" * 300]]
    text = format_table(cols, rows, width=80)
    header = text.splitlines()[0]
    assert header.split() == cols
    assert "…" in text.splitlines()[2]
    assert "x" * 300 in format_table(cols, rows, width=80, full=True)


def test_text_keeps_one_line_and_markup_verbatim():
    text = format_table(["text"], [["first line\nsecond [/Applause]"]], width=120)
    assert text.splitlines()[2] == "first line⏎second [/Applause]"


def test_tables_and_schema(db, capsys):
    rc, out, _ = _query(db, capsys, "--tables")
    assert rc == 0
    assert [line.split() for line in out.splitlines()[2:4]] == [["runs", "0", "2"], ["sampling", "3", "5"]]
    rc, out, _ = _query(db, capsys, "--schema", "sampling")
    assert rc == 0
    rows = [line.split() for line in out.splitlines()[2:-1]]
    assert rows[0] == ["variant", "VARCHAR", "false", "true"] and rows[4][:2] == ["schedule", "JSON"]
    rc, _, err = _query(db, capsys, "--schema", "sampeling")
    assert rc == 2 and "did you mean 'sampling'" in err
    rc, _, err = _query(db, capsys, "--format", "json", "--tables")
    assert rc == 0
    rc, _, err = _query(db, capsys)
    assert rc == 2 and "--tables" in err


def test_the_read_only_error_names_every_allowed_statement(db, capsys):
    rc, _, err = _query(db, capsys, "DELETE FROM sampling")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    for form in ("SELECT", "WITH", "SHOW TABLES", "DESCRIBE", "SUMMARIZE", "EXPLAIN", "--tables", "--schema"):
        assert form in err, form
    for sql in ("SHOW TABLES", "DESCRIBE sampling", "SUMMARIZE sampling", "EXPLAIN SELECT 1",
                "WITH a AS (SELECT 1 AS x) SELECT * FROM a", "FROM sampling", "VALUES (1)"):
        assert _query(db, capsys, sql)[0] == 0, sql
