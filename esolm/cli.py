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
    from esolm.bench import BenchConfig, format_rows, run_bench, settings_line
    from esolm.device import pick_device
    from esolm.plots import speedup

    values = dict(section(params, "bench"))
    out = Path(values.pop("out", "reports/bench.json"))
    device = pick_device(args.device or values.pop("device", "auto"))
    values.pop("device", None)
    bc = build(BenchConfig, values, "bench")
    if args.profile:
        return _profile(bc, device)
    # every finished cell is written at once: a run cut short keeps what it timed
    rows = run_bench(bc, device, progress=not args.quiet, on_cell=lambda done: write_json(out, done))
    png = out.with_suffix(".png")
    drawn = _bench_figure(speedup, rows, png)
    print(settings_line(bc, device))
    print(format_rows(rows))
    for r in rows:
        if r["variant"] == "eso_b":
            ratios = ", ".join(f"{k[11:]} {v:.2f}x" for k, v in r.items() if k.startswith("speedup_vs_"))
            cpu = ", ".join(f"{k[15:]} {v:.2f}x" for k, v in r.items() if k.startswith("cpu_speedup_vs_"))
            print(f"L={r['length']} NFE={r['nfe']} batch={r['batch_size']}: eso_b {r['median_s']:.3f}s; "
                  f"speedup over {ratios} (wall); over {cpu} (process CPU time)")
    print(f"wrote {out}" + (f" and {png}" if drawn else ""))


def _bench_figure(draw: Callable[[list[dict], str], bool], rows: list[dict], png: Path) -> bool:
    """Draw the bench figure; without matplotlib (a lean install) say how to get it instead."""
    try:
        return draw(rows, str(png))
    except ModuleNotFoundError as err:
        if (hint := missing_extra(err)) is None:
            raise
        print(f"esolm bench: no figure {png}: {hint}", file=sys.stderr)
        return False


def _profile(bc, device) -> None:
    """One cached decode step of Eso-LM (B) and of AR at the bench's size, dtype and device."""
    import torch

    from esolm.bench import DTYPES
    from esolm.profiling import profile_step

    bc = bc.resolved()
    if bc.threads:
        torch.set_num_threads(bc.threads)
    for family in ("eso_b", "ar"):
        r = profile_step(family, bc.d_model, bc.n_layers, bc.n_heads, bc.vocab_size,
                         length=max(bc.lengths), fill=max(bc.lengths) // 2, device=device,
                         dtype=DTYPES[bc.dtype])
        print(f"{family}: {r['ops_per_step']} operators per step ({r['ops_per_layer']} per layer, "
              f"{r['ops_per_step_all']} counting nested ones), {r['ms_per_step']:.3f} ms per step, "
              f"{r['ms_per_layer']:.3f} ms per layer (CPU time {r['cpu_ms_per_step']:.3f} and "
              f"{r['cpu_ms_per_layer']:.3f}) (d={r['d_model']}, {r['n_layers']} layers, "
              f"V={r['vocab_size']}, cache {r['fill']} of {r['length']}, {r['dtype']} on {r['device']}, "
              f"{r['threads']} CPU threads)")


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


def cmd_judge(args: argparse.Namespace, params: dict) -> None:
    from esolm.stages import judge_stage

    s = judge_stage(params, args.fresh, not args.quiet)
    print(f"judge {s['name']}: {s['train']['steps']} steps, test perplexity {s['test_ppl']:.2f} "
          f"(runs/{s['name']}/)")


def cmd_curve(args: argparse.Namespace, params: dict) -> None:
    from esolm.stages import curve_stage

    c = curve_stage(params, args.variant, not args.quiet)
    for p in c["points"]:
        print(f"{args.variant} T={p['steps']}: NFE {p['nfe']:.0f}, {p['seconds_per_sample']:.4f} s/sample, "
              f"gen ppl {p['gen_ppl']:.1f}, entropy {p['entropy']:.2f}")


def cmd_export(args: argparse.Namespace, params: dict) -> None:
    from esolm.checkpoint import export

    out = export(Path("runs") / args.variant / "model.ckpt", Path(args.out or f"exports/{args.variant}"))
    print(f"wrote {out}/ (config.json, model.safetensors, tokenizer.json, README.md); "
          f"load it with esolm.load({str(out)!r})")


def cmd_sample(args: argparse.Namespace, params: dict) -> None:
    from esolm.stages import prompted_samples, sample_stage

    if args.prompt is not None or args.infill is not None:  # text in, text out; no stage files
        for i, text in enumerate(prompted_samples(params, args.variant, args.prompt, args.infill)):
            print(f"--- sample {i}\n{text}")
        return
    s = sample_stage(params, args.variant, not args.quiet)
    for i, text in enumerate(s["texts"]):
        print(f"--- sample {i}\n{text}")
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
        from rich.markup import escape
        from rich.table import Table
        from rich.text import Text

        table = Table(*(escape(c) for c in cols))
        for r in rows:  # Text cells: sample text such as "[/Applause]" is data, not Rich markup
            table.add_row(*(Text("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
                            for v in r))
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


def cmd_preset(args: argparse.Namespace, params: dict) -> None:
    from esolm.io import write_text_atomic
    from esolm.params import choose_preset

    path = Path(args.params)
    write_text_atomic(path, choose_preset(path.read_text(), args.name))
    print(f"{path}: preset {args.name} chosen (its variants copied into the top-level block); "
          "`dvc repro` now runs that study")


def cmd_doctor(args: argparse.Namespace, params: dict) -> None:
    from esolm.doctor import run

    if run(args):  # a check that should work on this machine failed
        raise SystemExit(1)


VERBS: dict[str, tuple[Callable[[argparse.Namespace, dict], None], str]] = {
    "prepare": (cmd_prepare, "fetch, verify and tokenize the corpus into token shards (params: data)"),
    "train": (cmd_train, ("train one variant, resuming from its last checkpoint (params: model, "
                          "variants, train)")),
    "judge": (cmd_judge, ("train the dedicated AR judge of generative perplexity (never a contestant) "
                          "and measure its test perplexity (params: judge, model, train, evaluate)")),
    "evaluate": (cmd_evaluate, ("NELBO, exact and importance-weighted likelihood of one variant "
                                "(params: evaluate)")),
    "sample": (cmd_sample, "sample from one variant with KV caching and judge the samples (params: sample)"),
    "curve": (cmd_curve, ("sample one variant over a grid of T for the speed-quality figure "
                          "(params: curve, sample)")),
    "bench": (cmd_bench, "time sampling of every family side by side (params: bench)"),
    "search": (cmd_search, "Optuna search of the sampling schedule for the speed-quality front (params: search)"),
    "export": (cmd_export, ("write a variant's model as a Hugging Face style folder (config.json, "
                            "model.safetensors, tokenizer.json, model card)")),
    "metrics": (cmd_metrics, ("copy each variant's headline numbers and training curve into small "
                              "git-tracked files (reports/metrics, reports/curves)")),
    "report": (cmd_report, "ingest every stage's files into the results database and write the report"),
    "preset": (cmd_preset, ("choose a preset study in params.yaml for DVC (sets `preset:` and copies "
                            "the preset's variants into the top-level block that dvc.yaml expands)")),
    "query": (cmd_query, "run SQL on the results database, e.g. esolm query \"SELECT * FROM sampling\""),
    "doctor": (cmd_doctor, ("check what this machine can run, one line per check, in under a minute "
                            "(CPU or GPU): device, dtypes, every attention backend on every mask against "
                            "math (values and gradients), torch.compile, CUDA graphs; exit code 1 if a "
                            "check that should work here fails. --full: the complete device check "
                            "(minutes, within --budget), one process per part, files under --out as each "
                            "part finishes; reads no params file")),
}
NEEDS_VARIANT = ("train", "evaluate", "sample", "curve", "export")


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
        if name in ("train", "judge"):
            s.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
        if name == "export":
            s.add_argument("--out", default=None, help="output folder (default: exports/<variant>)")
        if name == "sample":
            s.add_argument("--prompt", default=None, help="continue this text (prints the samples; "
                           "writes no stage files)")
            s.add_argument("--infill", default=None, help="fill the [MASK] marks (one token each) "
                           "of this text and everything after it (not for AR)")
        if name in ("report", "query"):
            s.add_argument("--db", default="reports/results.duckdb", help="the results database")
        if name == "report":
            s.add_argument("--label", default="pipeline", help="a label stored with the run")
            s.add_argument("--run-id", default=None, help="run id (default: git revision + params hash)")
        if name == "preset":
            s.add_argument("name", help="a name under `presets:` in the params file, e.g. cpu-study")
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
        if name == "doctor":
            from esolm.doctor import add_arguments

            add_arguments(s)
        if name in ("bench",):
            s.add_argument("--device", default=None, help="auto (default), cpu, or a CUDA device")
            s.add_argument("--profile", action="store_true",
                           help="profile one cached decode step (Eso-LM (B) and AR) instead")
    return p


# optional packages -> the extra of pyproject.toml that installs them: a plain `pip install esolm`
# trains, evaluates, samples and benchmarks without any of them (tests/test_lean_install.py)
EXTRAS = {"dvc": "pipeline", "prefect": "pipeline", "duckdb": "pipeline", "optuna": "pipeline",
          "pandas": "pipeline", "pyarrow": "pipeline", "matplotlib": "pipeline", "datasets": "pipeline",
          "sqlalchemy": "pipeline", "transformers": "hf", "psycopg": "postgres", "flash_attn": "flash"}


def missing_extra(err: ImportError) -> str | None:
    """What to install when ``err`` is a missing package of an extra (None for any other error)."""
    top = (err.name or "").partition(".")[0]
    if top not in EXTRAS:
        return None
    return f"this needs the {top} package, which is not installed: pip install 'esolm[{EXTRAS[top]}]'"


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
    except ModuleNotFoundError as err:  # a feature of an extra on a lean install
        if (hint := missing_extra(err)) is None:
            raise
        print(f"esolm {args.verb}: error: {hint}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
