"""The bench's typed rows: ``BenchRow``, a variant timed at one length, NFE budget and batch size
(``esolm bench``, ``esolm doctor --full`` part e), and ``reports/bench.json``'s one writer
(``write_bench``) and one reader (``read_bench``), which the results database's ``throughput``
table ingests through. The JSON is what ``to_json`` gives, the same flat rows as before this class
existed (``speedup_vs_<variant>``, ``cpu_speedup_vs_<variant>``); older files load.

No model code here (no torch): the report's ingestion reads these rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from esolm.families import FAMILIES
from esolm.io import write_json

SPEEDUP, CPU_SPEEDUP = "speedup_vs_", "cpu_speedup_vs_"  # JSON key prefixes of the two ratio fields
RATIOS = ("speedup_vs", "cpu_speedup_vs")
BENCH_CORE = ("variant", "family", "length", "nfe", "nfe_budget", "batch_size", "median_s", "tokens_per_s",
              "device")
"""The keys every bench row ever written has (the oldest lack ``variant``: see ``BenchRow.from_json``);
every other field is None in a row written before it was recorded."""


@dataclass(frozen=True)
class BenchRow:
    """One bench variant timed at one length, NFE budget and batch size (``esolm bench``): a row of
    ``reports/bench.json`` (``bench.out``) and of the ``throughput`` table."""

    variant: str
    """The bench variant (``esolm.bench.VARIANTS``: eso_b, mdlm, bd3lm_l4, ...)."""
    family: str | None
    """Its family (None in the oldest rows, whose entry alone was recorded, when it is no family)."""
    length: int
    """Sequence length L."""
    nfe: int
    """Forward passes of one run (scaled to the requested NFE when ``extrapolated_from_nfe``)."""
    nfe_budget: str
    """The NFE budget asked for: "L" or an integer, as text."""
    batch_size: int
    """Sequences sampled together."""
    median_s: float
    """Median wall time of one run over the repeats (seconds)."""
    median_cpu_s: float | None
    """Median process CPU time of one run (seconds)."""
    tokens_per_s: float
    """batch_size x length / median_s."""
    repeats: int | None
    """Timed runs per variant."""
    warmup: int | None
    """Warm-up runs (the first forward passes of the timed configuration) before them."""
    device: str
    """The device, in words ("cpu (2 threads)", the GPU's name)."""
    d_model: int | None
    """Backbone width."""
    n_layers: int | None
    """Backbone depth."""
    n_heads: int | None
    """Attention heads."""
    vocab_size: int | None
    """Vocabulary size V."""
    dtype: str | None
    """Weights' and activations' dtype (float32, bfloat16, float16)."""
    step_mode: str | None
    """How the cached decode steps ran (dynamic, static, compile, cuda_graphs)."""
    schedule: str | None
    """The sampling schedule of every run ("power": even counts)."""
    params: int | None
    """Parameters of the backbone."""
    kv_cache_bytes: int | None
    """Bytes of the KV cache the sampler allocates (0: no cache)."""
    peak_mem_bytes: int | None
    """Peak memory over the runs (None where it cannot be measured); see ``peak_mem_kind``."""
    peak_mem_kind: str | None
    """What ``peak_mem_bytes`` measures (CUDA max_memory_allocated or the growth of the CPU peak RSS)."""
    torch: str | None
    """torch's version."""
    extrapolated_from_nfe: int | None
    """The forward passes actually timed when MDLM's time was scaled linearly to ``nfe`` (else None)."""
    speedup_vs: dict[str, float] = field(default_factory=dict)
    """Other variant of the cell -> its median wall time over this one's (``speedup_vs_<variant>`` in JSON)."""
    cpu_speedup_vs: dict[str, float] = field(default_factory=dict)
    """The same from process CPU time (``cpu_speedup_vs_<variant>``)."""

    def to_json(self) -> dict:
        """The flat row of bench.json: the fields in order, then ``speedup_vs_<variant>`` and
        ``cpu_speedup_vs_<variant>`` per other variant."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in RATIOS}
        for v in {**self.speedup_vs, **self.cpu_speedup_vs}:
            if v in self.speedup_vs:
                out[SPEEDUP + v] = self.speedup_vs[v]
            if v in self.cpu_speedup_vs:
                out[CPU_SPEEDUP + v] = self.cpu_speedup_vs[v]
        return out

    @classmethod
    def from_json(cls, values: dict, where: str = "bench row") -> BenchRow:
        """The inverse of ``to_json``; rows of older files load: a key recorded later is None, and
        the names of rows written before the rename (``family``: the bench entry, ``variant``: the
        family; the oldest have the entry alone) are put right. An unknown key is an error."""
        names = [f.name for f in fields(cls) if f.name not in RATIOS]
        flat = {k: v for k, v in values.items() if not k.startswith((SPEEDUP, CPU_SPEEDUP))}
        unknown = sorted(set(flat) - set(names))
        missing = [k for k in BENCH_CORE[1:] if k not in flat]
        if unknown or missing:
            raise ValueError(f"{where}: unknown keys {unknown}, missing keys {missing}; write it with esolm bench")
        flat.update(_bench_names(flat))
        speed = {k[len(SPEEDUP):]: v for k, v in values.items() if k.startswith(SPEEDUP)}
        cpu = {k[len(CPU_SPEEDUP):]: v for k, v in values.items() if k.startswith(CPU_SPEEDUP)}
        return cls(**{n: flat.get(n) for n in names}, speedup_vs=speed, cpu_speedup_vs=cpu)


def _bench_names(row: dict) -> dict:
    """The variant (bench entry) and family of a bench row. Rows written before the rename had
    them the other way round (``family``: the entry, ``variant``: the family); the oldest have
    the entry alone."""
    if "variant" not in row:
        return {"variant": row["family"], "family": row["family"] if row["family"] in FAMILIES else None}
    if row["family"] is None or row["family"] in FAMILIES:  # None: an oldest row, already put right
        return {"variant": row["variant"], "family": row["family"]}
    return {"variant": row["family"], "family": row["variant"]}


def write_bench(path: str | Path, rows: list[BenchRow]) -> None:
    """bench.json's one writer (atomic): ``rows`` as a JSON list of flat rows."""
    write_json(path, [r.to_json() for r in rows])


def read_bench(path: str | Path) -> list[BenchRow]:
    """bench.json's one reader: its rows, older files included."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run esolm bench first (dvc repro bench)")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rerun esolm bench") from None
    if not isinstance(values, list):
        raise TypeError(f"{path} holds a {type(values).__name__}, not a list of bench rows; rerun esolm bench")
    return [BenchRow.from_json(r, f"{path} row {i}") for i, r in enumerate(values)]
