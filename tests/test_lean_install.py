"""A lean install (issue 23): ``pip install esolm`` without the extras trains, evaluates, samples
and benchmarks; the pipeline's packages (DVC, Prefect, DuckDB, Optuna, pandas, ...) are imported
only by the features that need them, and their absence names the extra that installs them.

The lean run happens in a fresh interpreter whose ``sys.meta_path`` finders do not see the packages
of the extras, as if they were not installed (importing one raises ModuleNotFoundError), so an
import of one of them at module level on the path of ``esolm train | evaluate | sample | bench``,
or one that these verbs run, fails this test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# the packages of the extras (and the web/database stack they pull in): absent from a lean install
ABSENT = ("prefect", "dvc", "duckdb", "optuna", "pandas", "pyarrow", "matplotlib", "datasets", "fastapi",
          "sqlalchemy", "psycopg", "psycopg2", "transformers")
LEAN_VERBS = ("train", "evaluate", "sample", "bench")

LEAN_SCRIPT = r'''
import contextlib, importlib, io, json, sys
from pathlib import Path

ABSENT = frozenset(sys.argv[1].split(","))


def absent(name):
    """A module, or a distribution (psycopg-binary, dvc-data), of the packages not installed."""
    name = name.lower().replace("_", "-")
    return name.partition(".")[0] in ABSENT or name.partition("-")[0] in ABSENT


class NotInstalled:
    """A finder of sys.meta_path that does not see the extras' packages, as if they were not
    installed: ``import pandas`` raises ModuleNotFoundError, ``importlib.util.find_spec`` (which
    torch probes optional packages with) gives None, and importlib.metadata finds no distribution."""

    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        find = getattr(self._finder, "find_spec", None)
        return None if absent(name) or find is None else find(name, path, target)

    def find_distributions(self, *args, **kwargs):
        find = getattr(self._finder, "find_distributions", None)
        return iter(()) if find is None else (d for d in find(*args, **kwargs) if not absent(d.metadata["Name"] or ""))

    def __getattr__(self, attr):
        return getattr(self._finder, attr)


sys.meta_path[:] = [NotInstalled(f) for f in sys.meta_path]
assert not ABSENT & {m.partition(".")[0] for m in sys.modules}, "imported before the test began"

from esolm.cli import main
from esolm.codedeps import ROOT, code_files

try:  # the packages really are out of reach: a module of the pipeline does not import
    importlib.import_module("esolm.store")
    raise AssertionError("esolm.store imported without duckdb")
except ModuleNotFoundError as e:
    assert e.name == "duckdb", e
report = {}
# 1. every module on the path of each lean verb imports
for verb in sys.argv[2].split(","):
    for path in code_files(f"esolm.cli:cmd_{verb}"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # 2. the verb's --help
        try:
            main([verb, "--help"])
        except SystemExit as e:
            assert e.code == 0, (verb, e.code)
    assert "--params" in out.getvalue(), out.getvalue()


def run(*args):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(list(args))
    report[args[0]] = {"rc": rc, "stderr": err.getvalue()}
    return rc


# 3. the verbs for real on a tiny prepared corpus (prepare reads .txt files: no extra needed;
# the judge grades the samples)
for args in (["prepare"], ["train", "--variant", "eso_b"], ["evaluate", "--variant", "eso_b"], ["judge"],
             ["sample", "--variant", "eso_b"], ["sample", "--variant", "eso_b", "--prompt", "the"]):
    assert run(*args, "--quiet") == 0, report
run("bench", "--quiet", "--device", "cpu")
# 4. the library: a tiny model samples
import esolm

model = esolm.build_model(esolm.ModelConfig(family="eso_b", vocab_size=7, length=16, n_layers=2, d_model=32,
                                            n_heads=4, cond_dim=32, dropout=0.0)).eval()
g = esolm.generate(model, esolm.ScheduleSettings(steps=4, seed=0), num_samples=2)
report["generate"] = list(g.tokens.shape)
# 5. a pipeline-only verb names the missing package and the extra
run("query", "SELECT 1", "--db", "missing.duckdb")
report["loaded"] = sorted(ABSENT & {m.partition(".")[0] for m in sys.modules})
print("LEAN-REPORT " + json.dumps(report))
'''


def _tiny_project(tmp: Path) -> None:
    """params.yaml of a tiny study on a .txt corpus, and that corpus, in ``tmp``."""
    from tests.data.conftest import write_txt_corpus

    corpus = write_txt_corpus(tmp / "docs", n_docs=24)
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["data"].update(dataset="tiny", source=f"files:{corpus}/*.txt", tokenizer="bpe:300", length=16)
    p["model"].update(d_model=32, n_heads=4, cond_dim=32)
    p["variants"] = {"eso_b": {"family": "eso_b", "alpha_0": 0.5, "batch_split": 0.5}}
    p["search"]["variant"] = "eso_b"
    p["train"].update(steps=2, batch_size=8, val_every=2, ckpt_every=2, log_every=1, warmup_steps=1)
    p["evaluate"].update(batch_size=8, nelbo_batches=1, nelbo_draws=1, exact_batches=1, iw_orders=[])
    p["sample"].update(num_samples=2, steps=4)
    p["judge"]["train"] = {"steps": 2}
    p["bench"].update(variants=["eso_b", "ar"], lengths=[16], repeats=1, warmup=0, d_model=32, n_layers=2,
                      n_heads=4, vocab_size=11, mdlm_max_steps=0, out="bench.json")
    (tmp / "params.yaml").write_text(yaml.safe_dump(p))


def test_lean_verbs_import_and_run_without_the_extras(tmp_path):
    _tiny_project(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "DVC_NO_ANALYTICS": "1"}
    env.pop("MPLBACKEND", None)
    proc = subprocess.run([sys.executable, "-c", LEAN_SCRIPT, ",".join(ABSENT), ",".join(LEAN_VERBS)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("LEAN-REPORT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
    report = json.loads(lines[-1].removeprefix("LEAN-REPORT "))
    assert report["loaded"] == [] and report["generate"] == [2, 16]
    # bench times and writes its rows; the figure needs matplotlib and says how to get it
    assert report["bench"]["rc"] == 0, report["bench"]
    assert {r["variant"] for r in json.loads((tmp_path / "bench.json").read_text())} == {"eso_b", "ar"}
    assert not (tmp_path / "bench.png").exists()
    assert "matplotlib" in report["bench"]["stderr"] and "esolm[pipeline]" in report["bench"]["stderr"]
    # a verb of the pipeline fails cleanly, naming the package and the fix
    assert report["query"]["rc"] == 2
    assert "duckdb" in report["query"]["stderr"] and "pip install 'esolm[pipeline]'" in report["query"]["stderr"]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _minimum(requirement: str) -> tuple[int, ...]:
    m = re.search(r">=\s*([0-9][0-9.]*)", requirement)
    assert m, f"{requirement!r} has no minimum version"
    return tuple(int(x) for x in m.group(1).split("."))


def test_core_dependencies_are_lean_and_extras_hold_the_rest():
    project = _pyproject()["project"]
    core = {_name(r): r for r in project["dependencies"]}
    pipeline_pkgs = {"prefect", "dvc", "duckdb", "optuna", "pandas", "pyarrow", "matplotlib", "datasets", "fastapi",
                     "sqlalchemy", "psycopg", "psycopg2", "psycopg2-binary", "transformers", "flash-attn"}
    assert not pipeline_pkgs & set(core), sorted(pipeline_pkgs & set(core))
    assert {"torch", "numpy", "tokenizers", "safetensors", "lightning", "pyyaml", "tqdm", "rich"} <= set(core)
    assert _minimum(core["torch"]) >= (2, 6)  # flex attention: 2.5; torch.nn.utils.get_total_norm: 2.6
    extras = {k: {_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    assert {"dvc", "prefect", "duckdb", "optuna", "pandas", "pyarrow", "matplotlib", "datasets"} <= extras["pipeline"]
    assert "transformers" in extras["hf"] and "psycopg" in extras["postgres"] and "flash-attn" in extras["flash"]
    # `pip install -e '.[dev]'` (make setup) installs what every test needs; never flash-attn (GPU builds only)
    dev = project["optional-dependencies"]["dev"]
    self_ref = [r for r in dev if _name(r) == "esolm"]
    assert self_ref and {"pipeline", "hf", "postgres"} <= set(re.findall(r"\w+", self_ref[0].split("[")[1]))
    assert "flash" not in self_ref[0] and "flash-attn" not in extras["dev"]


def test_cli_names_the_extra_that_pyproject_declares():
    """Each optional package the CLI's error names is in the extra it tells users to install."""
    from esolm.cli import EXTRAS

    extras = {k: {_name(r) for r in v} for k, v in _pyproject()["project"]["optional-dependencies"].items()}
    for module, extra in EXTRAS.items():
        assert module.replace("_", "-") in extras[extra], (module, extra)


def test_build_requirement_is_met_by_older_setuptools():
    """An offline ``pip install --no-build-isolation`` builds with the setuptools already there:
    the minimum is the oldest with PEP 621 metadata and PEP 660 editable installs (64), so the
    metadata must not use fields that need more (an SPDX ``license`` string needs setuptools 77)."""
    data = _pyproject()
    (req,) = [r for r in data["build-system"]["requires"] if _name(r) == "setuptools"]
    assert _minimum(req) <= (64,)
    assert not isinstance(data["project"].get("license"), str)
    assert "license-files" not in data["project"]
