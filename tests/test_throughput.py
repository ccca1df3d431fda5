"""The bench's typed rows (``esolm.throughput.BenchRow``): bench.json's JSON unchanged, old files load."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from esolm.throughput import BENCH_CORE, BenchRow, read_bench, write_bench

ROOT = Path(__file__).resolve().parents[1]

ROW = {"variant": "bd3lm_l4", "family": "bd3lm", "length": 256, "nfe": 256, "nfe_budget": "L", "batch_size": 1,
       "median_s": 0.2, "median_cpu_s": 0.4, "tokens_per_s": 1280.0, "repeats": 2, "warmup": 1,
       "device": "cpu (2 threads)", "d_model": 128, "n_layers": 4, "n_heads": 4, "vocab_size": 512,
       "dtype": "float32", "step_mode": "dynamic", "schedule": "power", "params": 1400705,
       "kv_cache_bytes": 1048576, "peak_mem_bytes": None, "peak_mem_kind": "cpu peak RSS growth of the process (VmHWM)",
       "torch": "2.13.0+cpu", "extrapolated_from_nfe": None,
       "speedup_vs_eso_b": 0.5, "cpu_speedup_vs_eso_b": 0.6, "speedup_vs_mdlm": 8.0, "cpu_speedup_vs_mdlm": 7.5}
"""A row as ``esolm bench`` writes it today (its keys in their order)."""


def test_a_row_round_trips_through_json_unchanged():
    row = BenchRow.from_json(ROW)
    assert row.variant == "bd3lm_l4" and row.family == "bd3lm" and row.peak_mem_bytes is None
    assert row.speedup_vs == {"eso_b": 0.5, "mdlm": 8.0} and row.cpu_speedup_vs == {"eso_b": 0.6, "mdlm": 7.5}
    assert row.to_json() == ROW and list(row.to_json()) == list(ROW)  # the same keys, in the same order
    assert BenchRow.from_json(row.to_json()) == row
    with pytest.raises(AttributeError):
        row.median_s = 1.0  # frozen


def test_the_file_round_trips_and_its_reader_names_bad_rows(tmp_path):
    rows = [BenchRow.from_json(ROW), BenchRow.from_json({**ROW, "variant": "ar", "family": "ar"})]
    write_bench(tmp_path / "bench.json", rows)
    assert read_bench(tmp_path / "bench.json") == rows
    assert json.loads((tmp_path / "bench.json").read_text()) == [r.to_json() for r in rows]
    (tmp_path / "bench.json").write_text(json.dumps([{**ROW, "median_z": 1.0}]))
    with pytest.raises(ValueError, match=r"bench.json row 0: unknown keys \['median_z'\]"):
        read_bench(tmp_path / "bench.json")
    (tmp_path / "bench.json").write_text(json.dumps([{k: v for k, v in ROW.items() if k != "median_s"}]))
    with pytest.raises(ValueError, match=r"missing keys \['median_s'\]"):
        read_bench(tmp_path / "bench.json")
    with pytest.raises(FileNotFoundError, match="esolm bench"):
        read_bench(tmp_path / "none.json")


def test_old_rows_load_with_later_keys_none_and_their_names_put_right():
    """The first bench.json (the bench entry in ``family``, no ``variant``, wall-time ratios
    only), rows written before the rename (entry and family swapped) and rows before the
    columns added later (store.BENCH_EXTRA) all load."""
    from esolm.store import BENCH_EXTRA

    oldest = {"family": "bd3lm_l4", "length": 256, "nfe": 256, "nfe_budget": "L", "batch_size": 1,
              "median_s": 0.2, "tokens_per_s": 1280.0, "repeats": 3, "device": "cpu", "d_model": 128,
              "n_layers": 4, "speedup_vs_eso_b": 0.5, "speedup_vs_ar": 0.4}
    row = BenchRow.from_json(oldest)
    assert (row.variant, row.family) == ("bd3lm_l4", None)  # an entry alone, not a family
    assert row.speedup_vs == {"eso_b": 0.5, "ar": 0.4} and row.cpu_speedup_vs == {}
    assert all(getattr(row, k) is None for k in BENCH_EXTRA if k not in oldest)
    assert row.n_heads is None and row.warmup is None and row.torch is None
    assert BenchRow.from_json(row.to_json()) == row  # written back, with the later keys as null
    assert BenchRow.from_json({**oldest, "family": "ar"}).family == "ar"
    renamed = BenchRow.from_json({**ROW, "variant": "bd3lm", "family": "bd3lm_l4"})
    assert (renamed.variant, renamed.family) == ("bd3lm_l4", "bd3lm")
    core = BenchRow.from_json({k: ROW[k] for k in BENCH_CORE})  # the keys every row has
    assert core.median_cpu_s is None and core.speedup_vs == {} and core.length == 256
    assert {f.name for f in fields(BenchRow)} >= set(BENCH_EXTRA) | set(BENCH_CORE)


def test_the_committed_bench_json_loads_and_is_written_back_byte_for_byte(tmp_path):
    path = ROOT / "reports" / "bench.json"
    if not path.exists():
        pytest.skip("reports/bench.json is not checked out (dvc pull / dvc repro bench)")
    rows = read_bench(path)
    assert rows and all(isinstance(r, BenchRow) and r.speedup_vs for r in rows)
    raw = json.loads(path.read_text())
    assert [r.to_json() for r in rows] == raw and [list(r.to_json()) for r in rows] == [list(r) for r in raw]
    write_bench(tmp_path / "bench.json", rows)
    assert (tmp_path / "bench.json").read_text() == path.read_text()


def test_the_doctor_projects_and_compares_typed_rows():
    from esolm.bench import BenchConfig
    from esolm.doctor_speed import projected_run_s, speedups

    eso = BenchRow.from_json({**ROW, "variant": "eso_b", "family": "eso_b", "median_s": 0.1, "nfe": 256})
    ar = BenchRow.from_json({**ROW, "variant": "ar", "family": "ar", "median_s": 0.05})
    bc = BenchConfig(lengths=(256, 1024))
    assert projected_run_s(bc, "eso_b", 1024, 1, [eso, ar]) == pytest.approx(0.1 / 256 * 2 * 1024)
    assert projected_run_s(bc, "mdlm", 1024, 1, [eso, ar]) is None
    assert speedups([eso, ar]) == ["L=256 batch=1: eso_b 0.100s; speedup over ar 0.50x"]
