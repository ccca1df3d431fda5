"""``esolm doctor``: the quick check on this CPU, a broken backend caught, and the full check's
driver (every part's file, a part that raises, a part killed at its share of the budget)."""

from __future__ import annotations

import importlib
import json
import time

import pytest

from esolm import doctor
from esolm.cli import main
from esolm.doctor_full import PARTS, Ctx, Rows, run_full


def test_quick_doctor_passes_on_this_cpu_and_reports_every_backend(tmp_path, capsys):
    assert main(["doctor", "--device", "cpu", "--json", str(tmp_path / "doctor.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    result = json.loads((tmp_path / "doctor.json").read_text())
    assert result["ok"] and not result["failed"]
    status = {c["name"]: c["status"] for c in result["checks"]}
    for backend in ("sdpa", "math", "flex", "flash"):
        assert any(line.startswith(f"attention {backend} ") for line in lines), backend
    assert status["attention sdpa"] == status["attention math"] == status["attention flex"] == "ok"
    assert status["attention flash"] == "unavailable"  # CUDA only
    assert status["cuda graphs"] == "not applicable"
    assert status["dtype float32"] == "ok"
    checked = {c["name"]: c for c in result["checks"]}
    assert checked["attention sdpa"]["error"] < 1e-4 and "gradients" in checked["attention sdpa"]["detail"]


def test_a_backend_that_returns_wrong_values_is_reported_failed(monkeypatch, capsys):
    att = importlib.import_module("esolm.model.attention")
    real = att._flex
    monkeypatch.setattr(att, "_flex", lambda q, k, v, mask: real(q, k, v, mask) * 1.01)
    monkeypatch.setattr(doctor, "check_compile", lambda device: doctor.Check("torch.compile", doctor.OK))
    with pytest.raises(SystemExit) as exit_:
        main(["doctor", "--device", "cpu"])
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    flex = next(line for line in out.splitlines() if line.startswith("attention flex "))
    assert "FAILED" in flex and "max err" in flex
    assert "FAILED: attention flex" in out
    assert "FAILED" not in next(line for line in out.splitlines() if line.startswith("attention sdpa "))


def test_full_smoke_writes_every_part_file_the_log_and_the_summary(tmp_path, capsys):
    out = tmp_path / "doctor"
    t0 = time.time()
    assert main(["doctor", "--full", "--smoke", "--budget", "90", "--out", str(out)]) == 0
    assert time.time() - t0 < 90
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["parts"]) == list(PARTS)
    for name, part in PARTS.items():
        assert summary["parts"][name]["status"] == "ok", (name, summary["parts"][name])
        for f in part.files:
            counts = summary["parts"][name]["files"][f]
            assert (out / f).stat().st_size > 0 and counts["rows"] >= 1 and counts["failed"] == 0, (name, f)
    assert summary["ok"] and summary["smoke"]
    log = (out / "run.log").read_text()
    assert all(f"===== part {name}: ok" in log for name in PARTS)
    bench = [json.loads(x) for x in (out / "e_bench.jsonl").read_text().splitlines()]
    assert {r["variant"] for r in bench} >= {"eso_b", "mdlm", "ar"}
    assert any(r.get("extrapolated_from_nfe") for r in bench if r["variant"] == "mdlm")  # labelled


# parts of one's own, run by the driver as module:function in their own processes
def first_part(ctx: Ctx) -> bool:
    return Rows(ctx.out / "first.json").add({"ok": True})["ok"]


def raising_part(ctx: Ctx) -> bool:
    raise RuntimeError("deliberate failure of a part")


def sleeping_part(ctx: Ctx) -> bool:
    Rows(ctx.out / "sleeping.jsonl").add({"row": 1, "ok": True})  # on disk before the part is killed
    time.sleep(120)
    return True


def last_part(ctx: Ctx) -> bool:
    return Rows(ctx.out / "last.json").add({"ok": True, "deadline_in_s": ctx.left()})["ok"]


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("doctor")
    shares = {"first_part": 6, "raising_part": 6, "sleeping_part": 3, "last_part": 6}  # sleeping: ~5 s
    t0 = time.time()
    summary = run_full(out, budget=20, parts=[(f"tests.test_doctor:{n}", s) for n, s in shares.items()],
                       min_part_s=0)
    return out, summary, time.time() - t0


def test_a_part_that_raises_records_its_error_and_the_others_still_write(faulty_run):
    out, summary, _ = faulty_run
    parts = summary["parts"]
    raised = parts["tests.test_doctor:raising_part"]
    assert raised["status"] == "error" and "RuntimeError: deliberate failure of a part" in raised["error"]
    assert parts["tests.test_doctor:first_part"]["status"] == "ok" and (out / "first.json").exists()
    assert parts["tests.test_doctor:last_part"]["status"] == "ok" and (out / "last.json").exists()
    assert "Traceback" in (out / "run.log").read_text()
    assert json.loads((out / "summary.json").read_text())["ok"] is False


def test_a_part_over_its_share_is_killed_as_a_timeout_and_the_next_part_runs(faulty_run):
    out, summary, seconds = faulty_run
    slept = summary["parts"]["tests.test_doctor:sleeping_part"]
    assert slept["status"] == "timeout" and "killed after" in slept["error"]
    assert slept["seconds"] <= slept["limit_s"] + 2 < 12
    assert json.loads((out / "sleeping.jsonl").read_text())["row"] == 1  # what it wrote survives
    assert summary["parts"]["tests.test_doctor:last_part"]["status"] == "ok"
    assert seconds < 20 + 5
