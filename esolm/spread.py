"""Spread across training seeds: the study's likelihood numbers, retrained under other seeds.

One run's perplexities are one draw. At the embedded study's size the training seed moves
MDLM's exact perplexity by 20-30 %, more than its standard error over test tokens, so a number
is stated with its spread across seeds. ``esolm spread --seeds 0 1 2`` measures it:

- each seed is one DVC experiment, ``dvc exp run --temp -S train.seed=N evaluate`` (every
  variant trained and evaluated in a temporary copy of the checkout: the workspace,
  ``params.yaml`` and ``dvc.lock`` are never touched; the experiment stays listed by
  ``dvc exp show``). A seed already run at this revision and these params is restored from
  DVC's run cache or reused by name (``seed-<N>-<revision>-<params>``), so an interrupted
  spread starts again where it stopped and params.yaml's own seed costs nothing after `dvc repro`;
- each experiment's ``reports/metrics/<variant>/likelihood.json`` is read from its commit;
- ``reports/seeds.json`` (this module is its one writer and its one reader) records every
  (seed, variant) number with the command, revision, params hash, machine and wall time.

The report stage ingests that file (table ``seed_runs``) and shows, beside each variant's
number of the run, the mean, standard deviation and range across the seeds, naming the
revision they were measured at and whether that run had this run's params. The file is
committed; it is a dependency of the report stage, not an output of any stage.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from esolm.io import write_text_atomic
from esolm.params import params_hash

SPREAD_FILE = Path("reports/seeds.json")
METRICS = ("exact_ppl", "nelbo_ppl")
# what a seed experiment reruns: every variant's training and likelihood (not sampling, search
# or the report, which a seed of the contestants does not change)
TARGET = "evaluate"


@dataclass(frozen=True)
class SeedRow:
    """One variant trained under one seed and evaluated."""

    seed: int
    """``train.seed`` of the experiment."""
    variant: str
    """A name under ``variants:``."""
    exact_ppl: float | None
    """Exact test perplexity, left to right (``likelihood.json``'s ``exact_ppl``)."""
    nelbo_ppl: float | None
    """NELBO test perplexity on the exact metrics' tokens (``nelbo_ppl``)."""
    experiment: str = ""
    """The DVC experiment the numbers come from (its name)."""
    commit: str = ""
    """The experiment's git commit (``git show COMMIT:reports/metrics/<variant>/likelihood.json``)."""


@dataclass
class Spread:
    """What ``reports/seeds.json`` holds."""

    rows: list[SeedRow]
    """Every (seed, variant) measured."""
    command: str = ""
    """The command that measured them."""
    revision: str = ""
    """The git commit the experiments were based on."""
    params_hash: str = ""
    """``store.params_hash`` of params.yaml at that revision with ``train.seed`` left out."""
    finished: str = ""
    """When the last experiment finished (UTC, ISO 8601)."""
    machine: str = ""
    """Cores, platform and torch version of the machine that ran them."""
    wall_s: float = 0.0
    """Seconds the whole measurement took (experiments restored from the cache count little)."""
    notes: list[str] = field(default_factory=list)
    """Anything a reader of the numbers should know (e.g. a seed that failed)."""

    def to_json(self) -> dict:
        out = asdict(self)
        out["rows"] = [asdict(r) for r in self.rows]
        return out

    @classmethod
    def from_json(cls, values: dict, where: str = str(SPREAD_FILE)) -> Spread:
        if not isinstance(values, dict) or not isinstance(values.get("rows"), list):
            raise ValueError(f"{where} holds no `rows` list: rerun `esolm spread` to write it again")  # noqa: TRY004  (a damaged file, one line)
        known = set(cls.__dataclass_fields__) - {"rows"}
        try:
            rows = [SeedRow(**r) for r in values["rows"]]
        except TypeError as err:
            raise ValueError(f"{where}: a row does not have the fields of a seed row ({err}): "
                             "rerun `esolm spread` to write it again") from None
        return cls(rows=rows, **{k: v for k, v in values.items() if k in known})

    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.rows})

    def summary(self, metric: str = "exact_ppl") -> dict[str, dict]:
        """Per variant: ``n``, ``mean``, ``sd`` (sample standard deviation; None for one seed),
        ``min``, ``max`` and ``values`` by seed of ``metric``."""
        out: dict[str, dict] = {}
        for variant in dict.fromkeys(r.variant for r in self.rows):
            by_seed = {r.seed: getattr(r, metric) for r in self.rows if r.variant == variant
                       and getattr(r, metric) is not None}
            if by_seed:
                out[variant] = {**describe(list(by_seed.values())), "values": by_seed}
        return out


def describe(values: list[float]) -> dict:
    """``n``, ``mean``, ``sd`` (the sample standard deviation; None for one value), ``min``, ``max``."""
    return {"n": len(values), "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else None, "min": min(values), "max": max(values)}


def write_spread(spread: Spread, path: Path = SPREAD_FILE) -> None:
    write_text_atomic(path, json.dumps(spread.to_json(), indent=2) + "\n")


def read_spread(path: Path = SPREAD_FILE) -> Spread | None:
    """The spread file, or None when there is none; a damaged one is one line naming it."""
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not JSON ({err}): rerun `esolm spread` to write it again") from None
    return Spread.from_json(values, str(path))


# -- measuring -----------------------------------------------------------------------------------

def seed_free_hash(params: dict) -> str:
    """The params hash a spread is keyed on: every setting but ``train.seed``."""
    trimmed = {**params, "train": {k: v for k, v in (params.get("train") or {}).items() if k != "seed"}}
    return params_hash(trimmed)


def _run(args: list[str], cwd: Path, capture: bool = True) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=capture, text=True, check=False)
    if proc.returncode:
        said = [line for line in ((proc.stderr or "") + (proc.stdout or "")).splitlines() if line.strip()]
        raise RuntimeError(f"{' '.join(args[:4])} ... failed ({proc.returncode}): "
                           f"{said[-1] if said else 'no message'}")
    return proc.stdout or ""


def _dvc() -> list[str]:
    local = Path(sys.executable).parent / "dvc"
    return [str(local) if local.exists() else "dvc", "--wait-for-lock"]


def experiment_name(seed: int, revision: str, phash: str) -> str:
    return f"seed-{seed}-{revision[:7]}-{phash[:6]}"


def experiment_commits(repo: Path, revision: str) -> dict[str, str]:
    """Name -> commit of the DVC experiments based on ``revision`` (their git refs)."""
    refs = _run(["git", "for-each-ref", "--format=%(refname) %(objectname)",
                 f"refs/exps/{revision[:2]}/{revision[2:]}/"], repo)
    return {ref.rsplit("/", 1)[-1]: sha for ref, sha in (line.split() for line in refs.splitlines())}


def _dirty_inputs(repo: Path) -> list[str]:
    changed = _run(["git", "status", "--porcelain", "--untracked-files=no"], repo).splitlines()
    return [line[3:] for line in changed if not line[3:].startswith(("reports/", "dvc.lock"))]


def _metrics_at(repo: Path, commit: str, variant: str) -> dict:
    proc = subprocess.run(["git", "show", f"{commit}:reports/metrics/{variant}/likelihood.json"], cwd=repo,
                          capture_output=True, text=True, check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else {}


def _machine() -> str:
    try:
        import torch

        version = f", torch {torch.__version__}"
    except ImportError:
        version = ""
    return f"{os.cpu_count()} CPU cores, {platform.system()} {platform.machine()}{version}"


def measure(params: dict, seeds: list[int], repo: Path = Path("."), progress: bool = True,
            command: str = "") -> Spread:
    """Run (or reuse) one experiment per seed and collect every variant's likelihood numbers."""
    if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ValueError(f"seeds={seeds!r}: give distinct seeds >= 0, e.g. --seeds 0 1 2")
    if not (repo / "dvc.yaml").is_file():
        raise ValueError(f"{repo.resolve()} holds no dvc.yaml: run esolm spread in an esolm checkout")
    if dirty := _dirty_inputs(repo):
        raise ValueError(f"uncommitted changes to {', '.join(dirty[:5])}: the spread is recorded against "
                         "a commit; commit them (or stash them) and run esolm spread again")
    revision = _run(["git", "rev-parse", "HEAD"], repo).strip()
    phash = seed_free_hash(params)
    variants = list(params.get("variants") or {})
    start = time.monotonic()
    rows: list[SeedRow] = []
    notes: list[str] = []
    for i, seed in enumerate(seeds):
        name = experiment_name(seed, revision, phash)
        commit = experiment_commits(repo, revision).get(name)
        if progress:
            print(f"[{i + 1}/{len(seeds)}] seed {seed}: " + (f"experiment {name} exists, reused" if commit else
                  f"dvc exp run --temp -S train.seed={seed} {TARGET} (trains every variant)"), flush=True)
        if commit is None:
            t0 = time.monotonic()
            _run([*_dvc(), "exp", "run", "--temp", "--name", name, "-S", f"train.seed={seed}", TARGET],
                 repo, capture=not progress)
            commit = experiment_commits(repo, revision).get(name)
            if commit is None:
                raise RuntimeError(f"dvc exp run made no experiment named {name}: see `dvc exp show`")
            if progress:
                print(f"    seed {seed} done in {time.monotonic() - t0:.0f} s", flush=True)
        for variant in variants:
            numbers = _metrics_at(repo, commit, variant)
            if not numbers:
                notes.append(f"seed {seed}: no likelihood.json for {variant} in experiment {name}")
            rows.append(SeedRow(seed, variant, numbers.get("exact_ppl"), numbers.get("nelbo_ppl"), name, commit))
    return Spread(rows=rows, command=command or f"esolm spread --seeds {' '.join(map(str, seeds))}",
                  revision=revision, params_hash=phash,
                  finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), machine=_machine(),
                  wall_s=round(time.monotonic() - start, 1), notes=notes)


def summary_lines(spread: Spread, metric: str = "exact_ppl") -> list[str]:
    """One line per variant: mean ± sd [min, max] over n seeds."""
    lines = []
    for variant, s in spread.summary(metric).items():
        sd = f" ± {s['sd']:.3g}" if s["sd"] is not None else ""
        by_seed = ", ".join(f"{k}: {v:.3g}" for k, v in s["values"].items())
        lines.append(f"{variant}: {s['mean']:.3g}{sd} [{s['min']:.3g}, {s['max']:.3g}] over {s['n']} seeds ({by_seed})")
    return lines
