"""``esolm <verb>``: the command line; every verb reads params.yaml plus --set overrides."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from esolm.io import write_json
from esolm.params import build, load_params, section


def cmd_prepare(args: argparse.Namespace, params: dict) -> None:
    from esolm.data import DataConfig, prepare

    prepare(DataConfig.from_dict(section(params, "data")), progress=not args.quiet)


def cmd_bench(args: argparse.Namespace, params: dict) -> None:
    from esolm.bench import BenchConfig, plot_bench, run_bench
    from esolm.device import pick_device

    values = dict(section(params, "bench"))
    out = Path(values.pop("out", "reports/bench.json"))
    device = pick_device(args.device or values.pop("device", "auto"))
    values.pop("device", None)
    bc = build(BenchConfig, values, "bench")
    rows = run_bench(bc, device, progress=not args.quiet)
    write_json(out, rows)
    plot_bench(rows, str(out.with_suffix(".png")))
    for r in rows:
        if r["family"] == "eso_b":
            ratios = ", ".join(f"{k[11:]} {v:.1f}x" for k, v in r.items() if k.startswith("speedup_vs_"))
            print(f"L={r['length']} NFE={r['nfe']} batch={r['batch_size']}: eso_b {r['median_s']:.3f}s; "
                  f"speedup over {ratios}")
    print(f"wrote {out} and {out.with_suffix('.png')}")


def cmd_train(args: argparse.Namespace, params: dict) -> None:
    from lightning.pytorch.utilities import rank_zero_only

    from esolm.stages import train_stage

    summary = train_stage(params, args.variant, args.fresh, not args.quiet)
    if rank_zero_only.rank == 0:  # under DDP every process runs this verb; one prints
        print(json.dumps(summary, indent=2))


def cmd_evaluate(args: argparse.Namespace, params: dict) -> None:
    from esolm.stages import evaluate_stage

    result = evaluate_stage(params, args.variant, not args.quiet)
    for split in [k for k, v in result.items() if isinstance(v, dict)]:
        r = result[split]
        print(f"{args.variant} {split}: exact l2r ppl {r['exact_l2r_ppl']:.2f}, NELBO ppl "
              f"{r['nelbo_ppl']:.2f} (+- {r['nelbo_stderr']:.3f} nats), {r['bits_per_byte']:.3f} bits/byte")


def cmd_sample(args: argparse.Namespace, params: dict) -> None:
    from esolm.stages import sample_stage

    s = sample_stage(params, args.variant, not args.quiet)
    print(f"{args.variant}: {s['num_samples']} samples, NFE {s['nfe']}, {s['seconds']:.2f}s, "
          f"gen ppl {s['gen_ppl']:.2f}, entropy {s['entropy']:.2f}")


def cmd_report(args: argparse.Namespace, params: dict) -> None:
    from esolm.report import write_report
    from esolm.store import ingest, run_id

    rid = args.run_id or run_id(params)
    counts = ingest(params, db=Path(args.db), label=args.label, rid=rid)
    print(f"ingested run {rid} into {args.db}: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
    out = write_report(Path(args.db), rid, Path("reports"))
    print(f"wrote reports/report.md and reports/index.html ({len(out['figures'])} figures)")


def cmd_metrics(args: argparse.Namespace, params: dict) -> None:
    from esolm.headline import write_headline

    result = write_headline(list(section(params, "variants")))
    for name, numbers in result.items():
        print(f"{name}: " + ", ".join(f"{k} {'-' if v is None else f'{v:.4g}'}" for k, v in numbers.items()))
    print(f"wrote reports/metrics/ and reports/curves/ ({len(result)} variants)")


def cmd_query(args: argparse.Namespace, params: dict) -> None:
    from esolm.store import query

    cols, rows = query(args.sql, Path(args.db))
    if args.format == "json":
        print(json.dumps([dict(zip(cols, r)) for r in rows], indent=2, default=str))
    elif args.format == "csv":
        import csv

        w = csv.writer(sys.stdout)
        w.writerow(cols)
        w.writerows(rows)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(*cols)
        for r in rows:
            table.add_row(*("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in r))
        Console().print(table)


def cmd_search(args: argparse.Namespace, params: dict) -> None:
    from esolm.stages import queue_search, search_outputs, search_trials

    if args.only == "queue":
        print(f"queued {queue_search(params)} trials")
        return
    if args.only == "join":
        ran = search_trials(params, progress=not args.quiet, workers=args.workers, join=True)
        print(f"ran {ran} queued trials")
        return
    ran = 0 if args.only == "outputs" else search_trials(params, progress=not args.quiet, workers=args.workers)
    out = search_outputs(params)
    best = out["best"]
    print(f"{out['study']}: {out['trials']} trials ({ran} new), {len(out['front'])} on the Pareto front; chosen: "
          + (f"{best['params']} gen ppl {best['gen_ppl']:.2f}, {best['seconds']:.4f}s/sample" if best
             else "none feasible"))


VERBS: dict[str, tuple[Callable[[argparse.Namespace, dict], None], str]] = {
    "prepare": (cmd_prepare, "fetch, verify and tokenize the corpus into token shards (params: data)"),
    "train": (cmd_train, ("train one variant, resuming from its last checkpoint (params: model, "
                          "variants, train)")),
    "evaluate": (cmd_evaluate, ("NELBO, exact and importance-weighted likelihood of one variant "
                                "(params: evaluate)")),
    "sample": (cmd_sample, "sample from one variant with KV caching and judge the samples (params: sample)"),
    "bench": (cmd_bench, "time sampling of every family side by side (params: bench)"),
    "search": (cmd_search, "Optuna search of the sampling schedule for the speed-quality front (params: search)"),
    "metrics": (cmd_metrics, ("copy each variant's headline numbers and training curve into small "
                              "git-tracked files (reports/metrics, reports/curves)")),
    "report": (cmd_report, "ingest every stage's files into the results database and write the report"),
    "query": (cmd_query, "run SQL on the results database, e.g. esolm query \"SELECT * FROM sampling\""),
}
NEEDS_VARIANT = ("train", "evaluate", "sample")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="esolm", description="Esoteric Language Models: data, training, "
                                "likelihood, KV-cached sampling, benchmarks.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (_, help_text) in VERBS.items():
        s = sub.add_parser(name, help=help_text, description=help_text)
        s.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a parameter, e.g. --set data.length=128 (repeatable; "
                            "same keys as params.yaml and `dvc exp run -S`)")
        s.add_argument("--quiet", action="store_true", help="no progress bars")
        if name in NEEDS_VARIANT:
            s.add_argument("--variant", required=True, help="a name under `variants` in params.yaml")
        if name == "train":
            s.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
        if name in ("report", "query"):
            s.add_argument("--db", default="reports/results.duckdb", help="the results database")
        if name == "report":
            s.add_argument("--label", default="pipeline", help="a label stored with the run")
            s.add_argument("--run-id", default=None, help="run id (default: git revision + params hash)")
        if name == "query":
            s.add_argument("sql", help="the SQL to run (read-only)")
            s.add_argument("--format", choices=("table", "csv", "json"), default="table")
        if name == "search":
            s.add_argument("--workers", type=int, default=1,
                           help="worker processes that run trials of the one study (default 1)")
            s.add_argument("--only", choices=("queue", "join", "outputs"), default=None,
                           help="queue: queue the missing trials up to search.n_trials; join: run queued "
                                "trials until none is left (a worker, on any machine sharing "
                                "search.storage); outputs: write the outputs from the study")
        if name in ("bench",):
            s.add_argument("--device", default=None, help="auto (default), cpu, or a CUDA device")
    return p


def duckdb_error() -> type[Exception]:
    try:
        import duckdb
    except ImportError:
        return ValueError
    return duckdb.Error


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        params = load_params(args.params, args.set)
        VERBS[args.verb][0](args, params)
    except (ValueError, FileNotFoundError, RuntimeError, duckdb_error()) as err:
        print(f"esolm {args.verb}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
