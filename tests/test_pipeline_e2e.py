"""The whole DVC pipeline on a tiny local corpus, from a fresh clone (slow: about 2-4 minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.data.conftest import write_txt_corpus

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def tiny_params(repo: Path, corpus: Path) -> None:
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["data"].update(source=f"files:{corpus}/*.txt", tokenizer="bpe:300", length=16)
    p["model"].update(d_model=32, n_heads=4, cond_dim=32)
    p["variants"] = {"ar": {"family": "ar"}, "mdlm": {"family": "mdlm"},
                     "eso_b_a05": {"family": "eso_b", "alpha_0": 0.5, "batch_split": 0.5}}
    p["train"].update(steps=20, batch_size=8, val_every=10, ckpt_every=10, log_every=5, warmup_steps=2)
    p["evaluate"].update(batch_size=4, nelbo_batches=2, exact_batches=1, nelbo_draws=2)
    p["sample"].update(num_samples=4, steps=4)
    p["judge"]["train"] = {"steps": 30}
    p["curve"] = {"steps": [2, 4], "num_samples": 2}
    p["bench"].update(lengths=[16], repeats=1, warmup=0, families=["eso_b", "mdlm", "ar"])
    p["search"].update(variant="eso_b_a05", n_trials=3, num_samples=2, default_steps=[2, 4], space={"steps": [2, 8]})
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_and_the_results_are_queryable(tmp_path):
    repo = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    tiny_params(repo, write_txt_corpus(tmp_path / "docs", n_docs=60))
    _run(["dvc", "repro"], repo)
    for name in ("ar", "mdlm", "eso_b_a05"):
        like = json.loads((repo / "runs" / name / "likelihood.json").read_text())
        assert {"nelbo_ppl", "nelbo_stderr", "exact_l2r_ppl", "iw4_ppl", "bits_per_byte", "tokens"} <= set(like["test"])
        assert json.loads((repo / "runs" / name / "generation.json").read_text())["nfe"] > 0
    html = (repo / "reports" / "index.html").read_text()
    assert "data:image/png;base64" in html and "<script" not in html
    assert "eso_b_a05" in _run(["dvc", "metrics", "show"], repo)
    rows = json.loads(_run(["esolm", "query", ("SELECT variant, metric, value FROM likelihood "
                                               "WHERE split = 'test' AND metric = 'exact_l2r_ppl'"),
                            "--format", "json"], repo))
    assert {r["variant"] for r in rows} == {"ar", "mdlm", "eso_b_a05", "unigram"}  # and the baseline row
    status = _run(["dvc", "status"], repo)
    assert "up to date" in status.lower() or status.strip() == ""


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_report_renders_in_a_headless_browser(tmp_path):
    """The self-contained report, opened by a real browser with the network off: the table and
    every embedded figure are there (needs Debian's chromium: apt-get install chromium)."""
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from esolm.report import _html

    png = tmp_path / "fig.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.plot([1, 2], [3, 4])
    plt.savefig(png)
    page = tmp_path / "index.html"
    page.write_text(_html("r1", ["variant", "ppl"], [("eso_b", 12.5)], [("figure", png)],
                          [("eso_b", 0, "<i>sample</i> & text")]))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "<td>eso_b</td>" in dom and "&lt;i&gt;sample&lt;/i&gt; &amp; text" in dom
    assert dom.count("data:image/png;base64") == 1
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1000,1400", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 5000
