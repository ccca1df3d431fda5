"""The results database: one DuckDB file, filled by one writer from the stages' files.

Every pipeline run or experiment has a run id (git revision + hash of the effective
params); re-ingesting a run replaces its rows, so nothing is duplicated. A process that
finds the file locked by another writer retries with backoff instead of failing.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path
from typing import Any

import duckdb

from esolm.config import renamed_family
from esolm.families import FAMILIES
from esolm.io import read_jsonl
from esolm.params import params_hash
from esolm.results import CurveResult, GenerationResult, LikelihoodResult
from esolm.throughput import BENCH_CORE, read_bench

DEFAULT_DB = Path("reports/results.duckdb")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY, git_rev VARCHAR, params_hash VARCHAR, label VARCHAR,
    ingested_at TIMESTAMP, params JSON);
CREATE TABLE IF NOT EXISTS variants (
    run_id VARCHAR, variant VARCHAR, family VARCHAR, alpha_0 DOUBLE, steps BIGINT, tokens BIGINT,
    final_train_loss DOUBLE, final_valid_loss DOUBLE, wall_s DOUBLE, tokens_per_s DOUBLE,
    PRIMARY KEY (run_id, variant));
CREATE TABLE IF NOT EXISTS training (
    run_id VARCHAR, variant VARCHAR, step BIGINT, loss DOUBLE, lr DOUBLE, grad_norm DOUBLE,
    tokens_per_s DOUBLE, PRIMARY KEY (run_id, variant, step));
CREATE TABLE IF NOT EXISTS likelihood (
    run_id VARCHAR, variant VARCHAR, split VARCHAR, metric VARCHAR, value DOUBLE,
    PRIMARY KEY (run_id, variant, split, metric));
CREATE TABLE IF NOT EXISTS sampling (
    run_id VARCHAR, variant VARCHAR, family VARCHAR, nfe BIGINT, seconds DOUBLE,
    seconds_per_sample DOUBLE, tokens_per_s DOUBLE, gen_ppl DOUBLE, entropy DOUBLE, judge VARCHAR,
    num_samples BIGINT, schedule JSON, PRIMARY KEY (run_id, variant));
CREATE TABLE IF NOT EXISTS curves (
    run_id VARCHAR, variant VARCHAR, family VARCHAR, alpha_0 DOUBLE, steps BIGINT, nfe BIGINT,
    seconds_per_sample DOUBLE, gen_ppl DOUBLE, entropy DOUBLE, judge VARCHAR,
    PRIMARY KEY (run_id, variant, nfe, steps));
CREATE TABLE IF NOT EXISTS generations (
    run_id VARCHAR, variant VARCHAR, sample_index BIGINT, text VARCHAR, entropy DOUBLE,
    judge_nll DOUBLE, PRIMARY KEY (run_id, variant, sample_index));
CREATE TABLE IF NOT EXISTS throughput (
    run_id VARCHAR, variant VARCHAR, family VARCHAR, length BIGINT, nfe_budget VARCHAR, nfe BIGINT,
    batch_size BIGINT, median_s DOUBLE, tokens_per_s DOUBLE, device VARCHAR,
    PRIMARY KEY (run_id, variant, length, nfe_budget, batch_size));
ALTER TABLE variants ADD COLUMN IF NOT EXISTS objective VARCHAR;
ALTER TABLE variants ADD COLUMN IF NOT EXISTS settings JSON;
ALTER TABLE training ADD COLUMN IF NOT EXISTS t_max DOUBLE;
ALTER TABLE throughput ADD COLUMN IF NOT EXISTS median_cpu_s DOUBLE;
ALTER TABLE throughput ADD COLUMN IF NOT EXISTS d_model BIGINT;
ALTER TABLE throughput ADD COLUMN IF NOT EXISTS n_layers BIGINT;
ALTER TABLE throughput ADD COLUMN IF NOT EXISTS vocab_size BIGINT;
ALTER TABLE throughput ADD COLUMN IF NOT EXISTS dtype VARCHAR;
ALTER TABLE throughput ADD COLUMN IF NOT EXISTS kv_cache_bytes BIGINT;
ALTER TABLE throughput ADD COLUMN IF NOT EXISTS peak_mem_bytes BIGINT;
ALTER TABLE throughput ADD COLUMN IF NOT EXISTS extrapolated_from_nfe BIGINT;
ALTER TABLE throughput ADD COLUMN IF NOT EXISTS step_mode VARCHAR;
CREATE TABLE IF NOT EXISTS search_trials (
    run_id VARCHAR, variant VARCHAR, trial BIGINT, state VARCHAR, feasible BOOLEAN,
    gen_ppl DOUBLE, seconds DOUBLE, nfe DOUBLE, entropy DOUBLE, params JSON,
    PRIMARY KEY (run_id, variant, trial));
ALTER TABLE search_trials ADD COLUMN IF NOT EXISTS seconds_min DOUBLE;
ALTER TABLE search_trials ADD COLUMN IF NOT EXISTS seconds_max DOUBLE;
ALTER TABLE variants ADD COLUMN IF NOT EXISTS init VARCHAR;
ALTER TABLE variants ADD COLUMN IF NOT EXISTS mask_warmup_start DOUBLE;
ALTER TABLE variants ADD COLUMN IF NOT EXISTS mask_warmup_steps BIGINT;
CREATE TABLE IF NOT EXISTS judges (
    run_id VARCHAR, judge VARCHAR, split VARCHAR, metric VARCHAR, value DOUBLE,
    PRIMARY KEY (run_id, judge, split, metric));
CREATE TABLE IF NOT EXISTS search_points (
    run_id VARCHAR, variant VARCHAR, kind VARCHAR, point BIGINT, trial BIGINT, steps BIGINT,
    seconds DOUBLE, gen_ppl DOUBLE, nfe DOUBLE, entropy DOUBLE, feasible BOOLEAN,
    PRIMARY KEY (run_id, kind, point));
ALTER TABLE sampling ADD COLUMN IF NOT EXISTS load_avg DOUBLE;
ALTER TABLE sampling ADD COLUMN IF NOT EXISTS cpus BIGINT;
CREATE TABLE IF NOT EXISTS seed_runs (
    run_id VARCHAR, variant VARCHAR, seed BIGINT, exact_ppl DOUBLE, nelbo_ppl DOUBLE,
    experiment VARCHAR, revision VARCHAR, params_hash VARCHAR, same_params BOOLEAN, command VARCHAR,
    finished VARCHAR, machine VARCHAR, PRIMARY KEY (run_id, variant, seed));
"""
# What the report reads and no stage table above holds, so that it reads the database only:
# variants.init / mask_warmup_* (runs/<variant>/train.json: how a contestant was trained; NULL
# when train.json did not record it), judges (runs/<judge>/likelihood.json: the judge's own
# likelihood, long format as in likelihood) and search_points (reports/search/pareto.json: kind
# 'front' = the searched schedule's Pareto front in its order, trial = its search trial; kind
# 'default' = the default schedule over the grid of T, steps = its T), seed_runs
# (reports/seeds.json, written by `esolm spread`: every variant retrained under other training
# seeds at ``revision``; same_params: that revision's params equal this run's but for train.seed).

# bench columns added later (older bench.json files lack them: NULL)
BENCH_EXTRA = ("median_cpu_s", "d_model", "n_layers", "vocab_size", "dtype", "kv_cache_bytes",
               "peak_mem_bytes", "extrapolated_from_nfe", "step_mode")
TABLES = ("runs", "variants", "training", "likelihood", "sampling", "curves", "generations", "throughput",
          "search_trials", "judges", "search_points", "seed_runs")


def git_revision(cwd: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "nogit"


def run_id(params: dict, cwd: str | Path = ".") -> str:
    """<git revision, 10 chars>-<params hash, 10 chars>."""
    return f"{git_revision(cwd)[:10]}-{params_hash(params)[:10]}"


def connect(path: str | Path = DEFAULT_DB, read_only: bool = False, retries: int = 20,
            wait: float = 0.25) -> duckdb.DuckDBPyConnection:
    """Open the database, retrying while another process holds its write lock."""
    path = Path(path)
    if read_only and not path.exists():
        raise FileNotFoundError(f"results database {path} does not exist yet; run the pipeline "
                                "(dvc repro) or `esolm report` first")
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries):
        try:
            con = duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as err:
            if "lock" not in str(err).lower() or attempt == retries - 1:
                raise
            time.sleep(wait * (1.5 ** attempt))
            continue
        if not read_only:
            _rekey_throughput(con)
            con.execute(SCHEMA)
        return con
    raise RuntimeError("unreachable")


def _rekey_throughput(con: duckdb.DuckDBPyConnection) -> None:
    """Older databases keyed throughput rows by (run, family, length, NFE[, batch]), with the
    bench entry's name (``bd3lm_l4``, a variant of the bench) in ``family``. DuckDB cannot alter
    a primary key, so such a table is rebuilt keyed by variant and batch size, rows kept: the old
    ``family`` becomes ``variant``, and ``family`` is kept only where it names a family."""
    keys = con.execute("SELECT constraint_column_names FROM duckdb_constraints() "
                       "WHERE table_name = 'throughput' AND constraint_type = 'PRIMARY KEY'").fetchall()
    if not keys or {"variant", "batch_size"} <= set(keys[0][0]):
        return
    con.execute("ALTER TABLE throughput RENAME TO throughput_old")
    con.execute(SCHEMA)
    cols = [r[0] for r in con.execute("SELECT column_name FROM duckdb_columns() "
                                      "WHERE table_name = 'throughput_old'").fetchall() if r[0] != "family"]
    names = ", ".join("?" for _ in FAMILIES)
    con.execute(f"INSERT INTO throughput ({', '.join(cols)}, variant, family) SELECT {', '.join(cols)}, family, "
                f"CASE WHEN family IN ({names}) THEN family END FROM throughput_old", list(FAMILIES))
    con.execute("DROP TABLE throughput_old")


def _rows_jsonl(path: Path) -> list[dict]:
    return read_jsonl(path)


def _replace(con: duckdb.DuckDBPyConnection, table: str, where: dict, rows: list[dict]) -> int:
    """Delete the rows matching ``where`` then insert ``rows`` (parameterised SQL)."""
    cond = " AND ".join(f"{k} = ?" for k in where)
    con.execute(f"DELETE FROM {table} WHERE {cond}", list(where.values()))
    if rows:
        cols = list(rows[0])
        sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})"
        con.executemany(sql, [[r[c] for c in cols] for r in rows])
    return len(rows)


def _summary_row(rid: str, name: str, s: dict, like: LikelihoodResult | None) -> dict:
    """The variants row of one train.json (and the alpha_0 of its likelihood.json)."""
    warmup = s.get("mask_warmup") or {}
    return {"run_id": rid, "variant": name, "family": renamed_family(s).get("family"),
            "alpha_0": like.alpha_0 if like else None, "steps": s["steps"], "tokens": s["tokens"],
            "final_train_loss": s["final_train_loss"], "final_valid_loss": s["final_valid_loss"],
            "wall_s": s["wall_s"], "tokens_per_s": s["tokens_per_s"],
            "objective": s.get("objective", "nelbo"),  # older train.json: the NELBO
            "settings": json.dumps(s["settings"]) if s.get("settings") else None,  # as trained
            "init": s.get("init"), "mask_warmup_start": warmup.get("start"), "mask_warmup_steps": warmup.get("steps")}


def _variant_rows(rid: str, name: str, run: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    like = LikelihoodResult.read(run) if (run / LikelihoodResult.FILE).exists() else None
    if (run / "train.json").exists():
        out["variants"] = [_summary_row(rid, name, json.loads((run / "train.json").read_text()), like)]
    out["training"] = [{"run_id": rid, "variant": name, "step": r["step"], "loss": r["loss"], "lr": r["lr"],
                        "grad_norm": r["grad_norm"], "tokens_per_s": r["tokens_per_s"],
                        "t_max": r.get("t_max", 1.0)}  # older train.jsonl: no masking warm-up
                       for r in _rows_jsonl(run / "train.jsonl")]
    if like is not None:
        out["likelihood"] = [{"run_id": rid, "variant": name, **r} for r in like.long_rows()]
    if (run / GenerationResult.FILE).exists():
        g = GenerationResult.read(run)
        out["sampling"] = [{"run_id": rid, "variant": name, "family": g.family, "nfe": g.nfe,
                            "seconds": g.seconds, "seconds_per_sample": g.seconds_per_sample,
                            "tokens_per_s": g.tokens_per_s, "gen_ppl": g.gen_ppl,
                            "entropy": g.entropy, "judge": g.judge, "num_samples": g.num_samples,
                            "schedule": json.dumps(g.schedule), "load_avg": g.load_avg, "cpus": g.cpus}]
    if (run / CurveResult.FILE).exists():
        c = CurveResult.read(run)
        out["curves"] = [{"run_id": rid, "variant": name, "family": c.family, "alpha_0": c.alpha_0,
                          "steps": p.steps if p.steps is not None else -1, "nfe": p.nfe,
                          "seconds_per_sample": p.seconds_per_sample, "gen_ppl": p.gen_ppl,
                          "entropy": p.entropy, "judge": c.judge} for p in c.points]
    out["generations"] = [{"run_id": rid, "variant": name, "sample_index": r["index"], "text": r["text"],
                           "entropy": r["entropy"], "judge_nll": r["judge_nll"]}
                          for r in _rows_jsonl(run / "samples.jsonl")]
    return out


def _judge_names(params: dict) -> set[str]:
    """``judge.name`` of the params, if any (the judges named by samples and curves join it)."""
    judge = params.get("judge")
    return {str(judge["name"])} if isinstance(judge, dict) and judge.get("name") else set()


def _judge_rows(rid: str, names: set[str], runs_dir: Path) -> list[dict]:
    """The own likelihood (runs/<judge>/likelihood.json) of every judge named by the samples,
    the curves or ``judge.name``; a judge with no such file (not trained here) has no rows."""
    rows = []
    for name in sorted(names):
        if (runs_dir / name / LikelihoodResult.FILE).is_file():
            rows += [{"run_id": rid, "judge": name, **r} for r in LikelihoodResult.read(runs_dir / name).long_rows()]
    return rows


def _baseline_rows(rid: str, params: dict) -> dict[str, list[dict]]:
    """The unigram baseline of the prepared data (meta.json's ``unigram_ppl``) as a row beside
    the variants: the perplexity every model must beat."""
    data = params.get("data", {})
    meta_path = Path(data.get("out_dir", "data/processed")) / str(data.get("dataset", "")) / "meta.json"
    if not meta_path.is_file():
        return {}
    uni = json.loads(meta_path.read_text()).get("unigram_ppl")
    if not uni:
        return {}
    return {"variants": [{"run_id": rid, "variant": "unigram", "family": "unigram", "alpha_0": None,
                          "steps": 0, "tokens": 0, "final_train_loss": None, "final_valid_loss": None,
                          "wall_s": 0.0, "tokens_per_s": None, "objective": None}],
            "likelihood": [{"run_id": rid, "variant": "unigram", "split": split, "metric": "exact_l2r_ppl",
                            "value": value} for split, value in uni.items()]}


def ingest(params: dict, runs_dir: Path = Path("runs"), reports: Path = Path("reports"),
           db: Path = DEFAULT_DB, label: str = "pipeline", rid: str | None = None) -> dict[str, int]:
    """Load every stage output of this run into the database; returns rows written per table."""
    rid = rid or run_id(params)
    counts: dict[str, int] = dict.fromkeys(TABLES, 0)
    con = connect(db)
    try:
        con.execute("BEGIN TRANSACTION")
        _replace(con, "runs", {"run_id": rid}, [{
            "run_id": rid, "git_rev": rid.split("-")[0], "params_hash": params_hash(params), "label": label,
            "ingested_at": time.strftime("%Y-%m-%d %H:%M:%S"), "params": json.dumps(params, default=str)}])
        counts["runs"] = 1
        judges = _judge_names(params)
        for name in params.get("variants", {}):
            for table, rows in _variant_rows(rid, name, runs_dir / name).items():
                counts[table] += _replace(con, table, {"run_id": rid, "variant": name}, rows)
                judges |= {str(r["judge"]) for r in rows if table in ("sampling", "curves") and r["judge"]}
        counts["judges"] = _replace(con, "judges", {"run_id": rid}, _judge_rows(rid, judges, runs_dir))
        for table, rows in _baseline_rows(rid, params).items():
            counts[table] += _replace(con, table, {"run_id": rid, "variant": "unigram"}, rows)
        counts.update(_ingest_reports(con, rid, reports))
        counts["seed_runs"] = _replace(con, "seed_runs", {"run_id": rid}, _seed_rows(rid, params, reports))
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    finally:
        con.close()
    return counts


def _ingest_reports(con: duckdb.DuckDBPyConnection, rid: str, reports: Path) -> dict[str, int]:
    from esolm.search.results import read_front, read_trials  # the one reader of the search's files

    out: dict[str, int] = {}
    bench = reports / "bench.json"
    if bench.exists():
        rows = [{"run_id": rid, **{k: getattr(r, k) for k in BENCH_CORE + BENCH_EXTRA}}
                for r in read_bench(bench)]  # the one reader: older rows' names put right, later keys None
        out["throughput"] = _replace(con, "throughput", {"run_id": rid}, rows)
    trials = reports / "search" / "trials.parquet"
    if trials.exists():
        rows = [{"run_id": rid, **r.to_row()} for r in read_trials(trials.parent)]
        out["search_trials"] = _replace(con, "search_trials", {"run_id": rid}, rows)
    pareto = reports / "search" / "pareto.json"
    if pareto.exists():
        out["search_points"] = _replace(con, "search_points", {"run_id": rid},
                                        _search_points(rid, read_front(pareto.parent).to_json()))
    return out


def _seed_rows(rid: str, params: dict, reports: Path) -> list[dict]:
    """reports/seeds.json (``esolm spread``) as rows of this run; none when the file is absent."""
    from esolm.spread import read_spread, seed_free_hash  # the one reader of the file

    spread = read_spread(reports / "seeds.json")
    if spread is None:
        return []
    same = spread.params_hash == seed_free_hash(params)
    return [{"run_id": rid, "variant": r.variant, "seed": r.seed, "exact_ppl": r.exact_ppl,
             "nelbo_ppl": r.nelbo_ppl, "experiment": r.experiment, "revision": spread.revision,
             "params_hash": spread.params_hash, "same_params": same, "command": spread.command,
             "finished": spread.finished, "machine": spread.machine} for r in spread.rows]


def _search_points(rid: str, pareto: dict) -> list[dict]:
    """pareto.json's front (trial rows) and default-schedule comparison (one point per T) as
    rows of search_points, each kind in its file's order."""
    kinds = {"front": pareto.get("front") or [], "default": (pareto.get("comparison") or {}).get("default") or []}
    return [{"run_id": rid, "variant": pareto.get("variant"), "kind": kind, "point": i, "trial": p.get("trial"),
             "steps": p.get("steps"), "seconds": p.get("seconds"), "gen_ppl": p.get("gen_ppl"), "nfe": p.get("nfe"),
             "entropy": p.get("entropy"), "feasible": p.get("feasible")}
            for kind, points in kinds.items() for i, p in enumerate(points)]


def _plain(value: Any) -> Any:
    """numpy scalars and NaN from pandas -> Python values / NULL."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


QUERY_KINDS = ("SELECT", "EXPLAIN")
# what DuckDB parses as one of QUERY_KINDS, spelled as a user writes it (the read-only error names them all)
READ_ONLY_FORMS = ("SELECT", "WITH ... SELECT", "FROM <table>", "VALUES", "SHOW TABLES", "SHOW <table>",
                   "DESCRIBE <table>", "SUMMARIZE <table>", "EXPLAIN [ANALYZE] <query>")


def query(sql: str, db: Path = DEFAULT_DB, params: list[Any] | None = None) -> tuple[list[str], list[tuple]]:
    """Run one read-only statement (SELECT, WITH ... SELECT, SHOW, DESCRIBE, EXPLAIN); returns
    (column names, rows). Statements that write anywhere are refused before they run (COPY ...
    TO, EXPORT, ATTACH, INSTALL/LOAD, DDL, DML), and the connection has no file-system access."""
    con = connect(db, read_only=True)
    try:
        con.execute("SET enable_external_access = false")
        statements = con.extract_statements(sql)
        if not statements:
            raise ValueError('the query is empty: give one statement, e.g. "SELECT * FROM runs"')
        for st in statements:
            if st.type.name not in QUERY_KINDS:
                raise ValueError(f"esolm query is read-only: a {st.type.name} statement is refused; "
                                 f"allowed: {', '.join(READ_ONLY_FORMS)} (list the tables with --tables, "
                                 "a table's columns with --schema TABLE; write files with --format csv/json)")
        if len(statements) > 1:
            raise ValueError(f"give one statement per query, not {len(statements)}")
        cur = con.execute(sql, params or [])
        cols = [d[0] for d in cur.description] if cur.description else []
        return cols, cur.fetchall()
    finally:
        con.close()


def tables(db: Path = DEFAULT_DB) -> list[tuple[str, int, int]]:
    """(table, rows, columns) of every table of the database (``esolm query --tables``)."""
    con = connect(db, read_only=True)
    try:
        names = con.execute("SELECT table_name, count(*) FROM information_schema.columns "
                            "WHERE table_schema = 'main' GROUP BY table_name ORDER BY table_name").fetchall()
        # a table name cannot be a parameter: the names come from the catalogue, quoted
        return [(name, con.execute(f'SELECT count(*) FROM "{name.replace(chr(34), chr(34) * 2)}"').fetchone()[0],
                 ncols) for name, ncols in names]
    finally:
        con.close()


def schema(table: str, db: Path = DEFAULT_DB) -> list[tuple[str, str, bool, bool]]:
    """(column, type, nullable, in the primary key) of ``table`` (``esolm query --schema``); an
    unknown table is an error naming the closest one."""
    import difflib

    con = connect(db, read_only=True)
    try:
        cols = con.execute("SELECT column_name, data_type, is_nullable = 'YES' FROM information_schema.columns "
                           "WHERE table_schema = 'main' AND table_name = ? ORDER BY ordinal_position",
                           [table]).fetchall()
        if not cols:
            names = [r[0] for r in con.execute("SELECT DISTINCT table_name FROM information_schema.columns "
                                               "WHERE table_schema = 'main' ORDER BY 1").fetchall()]
            close = difflib.get_close_matches(table, names, n=1)
            raise ValueError(f"no table {table!r} in {db}" + (f"; did you mean {close[0]!r}?" if close else "")
                             + f" (tables: {', '.join(names)})")
        keys = con.execute("SELECT constraint_column_names FROM duckdb_constraints() WHERE table_name = ? "
                           "AND constraint_type = 'PRIMARY KEY'", [table]).fetchall()
        key = set(keys[0][0]) if keys else set()
        return [(name, kind, nullable, name in key) for name, kind, nullable in cols]
    finally:
        con.close()
