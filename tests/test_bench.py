"""The benchmark: settings stated, KV-cache bytes exact, MDLM extrapolation labelled, profile."""

from __future__ import annotations

import pytest
import torch

from esolm.bench import BenchConfig, format_rows, kv_cache_bytes, run_bench, settings_line
from esolm.config import ScheduleSettings
from esolm.profiling import profile_step
from esolm.throughput import BenchRow, write_bench

TINY = dict(lengths=(16,), repeats=1, warmup=1, d_model=32, n_layers=2, n_heads=4, vocab_size=11)


def test_rows_state_memory_settings_and_ratios():
    bc = BenchConfig(variants=("eso_b", "mdlm", "bd3lm_l4", "ar"), mdlm_max_steps=4, **TINY)
    rows = run_bench(bc, torch.device("cpu"), progress=False)
    by = {r.variant: r for r in rows}
    assert by["bd3lm_l4"].family == "bd3lm" and by["eso_b"].family == "eso_b"
    for r in rows:
        assert r.d_model == 32 and r.n_layers == 2 and r.vocab_size == 11 and r.dtype == "float32"
        assert r.nfe == 16 and r.median_s > 0 and r.batch_size == 1 and r.peak_mem_kind
        assert set(r.speedup_vs) == set(r.cpu_speedup_vs) == set(by) - {r.variant}
    # K and V, per layer, for every position: 2 x 2 layers x 16 x 32 x 4 bytes
    assert by["eso_b"].kv_cache_bytes == 2 * 2 * 16 * 32 * 4 == by["ar"].kv_cache_bytes
    assert by["mdlm"].kv_cache_bytes == 0
    assert by["mdlm"].extrapolated_from_nfe == 4 and by["eso_b"].extrapolated_from_nfe is None
    assert by["eso_b"].speedup_vs["mdlm"] == pytest.approx(by["mdlm"].median_s / by["eso_b"].median_s)
    assert by["eso_b"].to_json()["speedup_vs_mdlm"] == by["eso_b"].speedup_vs["mdlm"]  # flat in bench.json
    assert "scaled linearly" in format_rows(rows)
    line = settings_line(bc, torch.device("cpu"))
    for key in ("d_model=32", "n_layers=2", "vocab_size=11", "batch_size=1", "nfe=('L',)",
                "dtype=float32", "mdlm_max_steps=4", "repeats=1"):
        assert key in line


def test_kv_cache_bytes_match_the_cache_the_sampler_allocates():
    from esolm.bench import _model

    bc = BenchConfig(**TINY)
    model = _model(bc, "eso_b", 16, torch.device("cpu"))
    cache = model.new_cache(3)
    assert kv_cache_bytes(model, 3) == cache.k.nbytes + cache.v.nbytes


def test_the_paper_gpu_suite_resolves_to_the_papers_table_settings():
    bc = BenchConfig(suite="paper-gpu").resolved()
    assert bc.lengths == (2048, 8192) and (bc.d_model, bc.n_layers, bc.n_heads) == (768, 12, 12)
    assert set(bc.variants) == {"eso_b", "mdlm", "bd3lm_l4", "ar"}  # the paper's Table 3 rows
    assert bc.batches(2048) == [1, 256] and bc.batches(8192) == [1, 64]  # the authors' batches too
    assert bc.mode(torch.device("cpu")) == "dynamic" and bc.dtype == "bfloat16"
    with pytest.raises(ValueError, match="bench.suite='fastest' is unknown"):
        BenchConfig(suite="fastest")


def test_batch_sizes_name_the_bad_value_and_the_paper_lengths():
    with pytest.raises(ValueError, match="batch_sizes.*0"):
        BenchConfig(batch_sizes=(1, 0))
    with pytest.raises(ValueError, match="L=1024"):
        BenchConfig(batch_sizes=("paper",)).batches(1024)
    assert BenchConfig(batch_sizes=(2, 1, 2)).batches(16) == [2, 1]


def test_every_cell_is_handed_out_as_soon_as_it_is_timed(monkeypatch):
    """Rows were returned only when the whole bench ended: a run cut short lost everything.
    Here the second cell fails; the first cell's rows were already handed out, with ratios."""
    import esolm.bench as bench

    seen: list[list[BenchRow]] = []
    real = bench.time_cell

    def flaky(bc, families, length, nfe, device, batch=None):
        if batch == 2:
            raise RuntimeError("out of time")
        return real(bc, families, length, nfe, device, batch=batch)

    monkeypatch.setattr(bench, "time_cell", flaky)
    bc = BenchConfig(variants=("eso_b", "ar"), batch_sizes=(1, 2), **TINY)
    with pytest.raises(RuntimeError, match="out of time"):
        run_bench(bc, torch.device("cpu"), progress=False, on_cell=lambda rows: seen.append(list(rows)))
    assert len(seen) == 1 and {r.variant for r in seen[0]} == {"eso_b", "ar"}
    assert all(r.batch_size == 1 and r.step_mode == "dynamic" for r in seen[0])
    assert seen[0][0].speedup_vs["ar"] == pytest.approx(seen[0][1].median_s / seen[0][0].median_s)


def test_warm_up_runs_the_first_steps_of_the_timed_configuration(monkeypatch):
    """The warm-up of AR and BD3-LM was a full L-step run of other shapes (compilation and
    captures then fell in the timed runs): it now runs the timed settings, cut after
    ``WARMUP_STEPS`` forward passes."""
    import esolm.bench as bench

    calls = []
    real = bench.generate
    monkeypatch.setattr(bench, "generate", lambda model, settings, **kw: (
        calls.append((model.config.family, settings, kw)), real(model, settings, **kw))[1])
    bench.run_bench(BenchConfig(variants=("eso_b", "ar", "bd3lm_l4"), **TINY), torch.device("cpu"), progress=False)
    for family in ("eso_b", "ar", "bd3lm"):
        (_, warm_s, warm), (_, timed_s, timed) = [c for c in calls if c[0] == family][:2]
        assert warm["stop_after"] == bench.WARMUP_STEPS and "stop_after" not in timed
        assert warm_s.replace(seed=0) == timed_s.replace(seed=0)
        assert {k: v for k, v in warm.items() if k != "stop_after"} == timed


def test_generate_stops_after_the_forward_passes_asked_for():
    from esolm import generate
    from tests.conftest import sharp_model

    for family in ("eso_b", "ar", "mdlm"):
        model = sharp_model(family, **({"alpha_0": 0.5} if family == "eso_b" else {}))
        g = generate(model, ScheduleSettings(steps=8, seed=0), num_samples=2, stop_after=3)
        assert g.nfe == 3
        assert (g.tokens == model.config.mask_token_id).any()  # not finished
    with pytest.raises(ValueError, match="stop_after=0"):
        generate(model, num_samples=1, stop_after=0)


@pytest.mark.parametrize("family", ["eso_b", "ar"])
def test_profile_counts_operators_per_layer(family):
    r = profile_step(family, d_model=32, n_layers=2, n_heads=4, vocab_size=11, length=32, fill=16,
                     repeats=5)
    assert 0 < r["ops_per_layer"] < r["ops_per_step"] <= r["ops_per_step_all"]
    assert r["ms_per_layer"] > 0 and r["ms_per_step"] >= r["ms_per_layer"]


def test_bench_rows_are_ingested_with_their_settings_into_old_and_new_databases(tmp_path):
    """A database created before the new throughput columns gains them; old bench.json rows
    (without them) ingest as NULL, new ones with their values; the report's figure draws."""
    import json

    import duckdb

    from esolm.report import fig_speedup
    from esolm.store import ingest, query

    db = tmp_path / "results.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE throughput (run_id VARCHAR, family VARCHAR, length BIGINT, nfe_budget "
                "VARCHAR, nfe BIGINT, batch_size BIGINT, median_s DOUBLE, tokens_per_s DOUBLE, "
                "device VARCHAR, PRIMARY KEY (run_id, family, length, nfe_budget))")
    con.close()
    reports = tmp_path / "reports"
    reports.mkdir()
    rows = run_bench(BenchConfig(variants=("eso_b", "mdlm"), mdlm_max_steps=4, **TINY),
                     torch.device("cpu"), progress=False)
    old = {k: rows[0].to_json()[k] for k in ("family", "length", "nfe_budget", "nfe", "batch_size", "median_s",
                                             "tokens_per_s", "device")}
    write_bench(reports / "bench.json", rows)
    ingest({"variants": {}}, tmp_path / "runs", reports, db, rid="new")
    (reports / "bench.json").write_text(json.dumps([old]))
    ingest({"variants": {}}, tmp_path / "runs", reports, db, rid="old")
    _, got = query("SELECT run_id, variant, d_model, kv_cache_bytes, extrapolated_from_nfe FROM throughput "
                   "ORDER BY run_id, variant", db)
    assert got == [("new", "eso_b", 32, 2 * 2 * 16 * 32 * 4, None), ("new", "mdlm", 32, 0, 4),
                   ("old", "eso_b", None, None, None)]
    assert fig_speedup(db, "new", tmp_path / "speedup.png")


def test_profile_runs_on_the_chosen_device_and_dtype_and_waits_for_it(monkeypatch):
    """``--profile`` ignored ``--device`` (always the CPU) and read clocks without waiting for
    queued GPU work: now the model is built on the given device and dtype, and every clock
    reading follows a ``synchronize`` of that device."""
    import esolm.profiling as prof

    waited = []
    monkeypatch.setattr(prof, "synchronize", lambda device: waited.append(device))
    r = prof.profile_step("ar", d_model=32, n_layers=2, n_heads=4, vocab_size=11, length=32, fill=16,
                          repeats=4, device="cpu", dtype=torch.bfloat16)
    assert r["device"] == "cpu" and r["dtype"] == "bfloat16"
    # before and after every timed step (4) and around each of its 2 blocks
    assert len(waited) >= 4 * 2 + 4 * 2 * 2 and set(map(str, waited)) == {"cpu"}


def test_an_old_database_keys_throughput_by_variant_and_batch_size_and_keeps_its_rows(tmp_path):
    """Rows of several batch sizes per cell broke the old key (run, family, length, NFE), whose
    ``family`` held bench entries such as bd3lm_l4 (variants of the bench): an old table is
    rebuilt keyed by variant and batch size, its rows kept."""
    import json

    import duckdb

    from esolm.store import connect, ingest, query

    db = tmp_path / "results.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE throughput (run_id VARCHAR, family VARCHAR, length BIGINT, nfe_budget "
                "VARCHAR, nfe BIGINT, batch_size BIGINT, median_s DOUBLE, tokens_per_s DOUBLE, "
                "device VARCHAR, PRIMARY KEY (run_id, family, length, nfe_budget))")
    con.execute("INSERT INTO throughput VALUES ('old', 'ar', 16, 'L', 16, 1, 0.5, 32.0, 'cpu')")
    con.execute("INSERT INTO throughput VALUES ('old', 'bd3lm_l4', 16, 'L', 16, 1, 0.7, 22.0, 'cpu')")
    con.close()
    connect(db).close()
    reports = tmp_path / "reports"
    reports.mkdir()
    rows = run_bench(BenchConfig(variants=("eso_b", "ar"), batch_sizes=(1, 2), **TINY), torch.device("cpu"),
                     progress=False)
    write_bench(reports / "bench.json", rows)
    ingest({"variants": {}}, tmp_path / "runs", reports, db, rid="new")
    _, got = query("SELECT run_id, variant, family, batch_size, step_mode FROM throughput "
                   "ORDER BY run_id, variant, batch_size", db)
    assert got == [("new", "ar", "ar", 1, "dynamic"), ("new", "ar", "ar", 2, "dynamic"),
                   ("new", "eso_b", "eso_b", 1, "dynamic"), ("new", "eso_b", "eso_b", 2, "dynamic"),
                   ("old", "ar", "ar", 1, None), ("old", "bd3lm_l4", None, 1, None)]  # a bench entry, not a family
    # a bench.json written before the rename (family: the entry, variant: the family) ingests renamed
    old_row = {**rows[0].to_json(), "family": "bd3lm_l4", "variant": "bd3lm"}
    (reports / "bench.json").write_text(json.dumps([old_row]))
    ingest({"variants": {}}, tmp_path / "runs", reports, db, rid="renamed")
    _, got = query("SELECT variant, family FROM throughput WHERE run_id = 'renamed'", db)
    assert got == [("bd3lm_l4", "bd3lm")]
