"""``esolm <verb>``: the command line; every verb reads params.yaml plus --set overrides."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from esolm.params import build, check_variant, load_params, section


def cmd_prepare(args: argparse.Namespace, params: dict) -> None:
    from esolm.data import DataConfig, prepare

    prepare(DataConfig.from_dict(section(params, "data")), progress=not args.quiet)


def cmd_bench(args: argparse.Namespace, params: dict) -> None:
    from esolm.bench import BenchConfig, format_rows, run_bench, settings_line
    from esolm.device import pick_device
    from esolm.plots import speedup
    from esolm.throughput import write_bench

    values = dict(section(params, "bench"))
    out = Path(values.pop("out", "reports/bench.json"))
    device = pick_device(args.device or values.pop("device", "auto"))
    values.pop("device", None)
    bc = build(BenchConfig, values, "bench")
    if args.profile:
        return _profile(bc, device)
    # every finished cell is written at once: a run cut short keeps what it timed
    rows = run_bench(bc, device, progress=not args.quiet, on_cell=lambda done: write_bench(out, done))
    png = out.with_suffix(".png")
    drawn = _bench_figure(speedup, [r.to_json() for r in rows], png)  # plain rows: the report's too
    print(settings_line(bc, device))
    print(format_rows(rows))
    for r in rows:
        if r.variant == "eso_b":
            ratios = ", ".join(f"{k} {v:.2f}x" for k, v in r.speedup_vs.items())
            cpu = ", ".join(f"{k} {v:.2f}x" for k, v in r.cpu_speedup_vs.items())
            print(f"L={r.length} NFE={r.nfe} batch={r.batch_size}: eso_b {r.median_s:.3f}s; "
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
        print(json.dumps({k: v for k, v in summary.items() if k != "settings"}, indent=2))  # train.json has all


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

    if args.layout == "authors":
        from esolm.published_io import export_authors as export  # type: ignore[assignment]
    out = export(Path("runs") / args.variant / "model.ckpt", Path(args.out or f"exports/{args.variant}"),
                 force=args.force)
    print(f"wrote {out}/ (config.json, model.safetensors, tokenizer.json, README.md; {args.layout} layout); "
          f"load it with esolm.load({str(out)!r})")


def cmd_import(args: argparse.Namespace, params: dict) -> None:
    from esolm.published_io import import_model

    out = import_model(args.source, Path("runs") / args.variant / "model.ckpt", family=args.family,
                       alpha_0=args.alpha_0, batch_split=args.batch_split, raw=args.raw,
                       tokenizer=args.tokenizer)
    print(f"wrote {out} from {args.source}; evaluate and sample it with --variant {args.variant}")


def cmd_sample(args: argparse.Namespace, params: dict) -> None:
    from esolm.stages import prompted_samples, sample_stage
    from esolm.text import check_infill

    if args.infill is not None:
        check_infill(args.infill)  # before any model loads
    searched = _searched_variant(params, args.variant)
    if args.prompt is not None or args.infill is not None:  # text in, text out; no stage files
        texts, ran = prompted_samples(params, args.variant, args.prompt, args.infill)
        for i, text in enumerate(texts):
            print(f"--- sample {i}\n{text}")
        note = " (generated tokens between ⟦ ⟧)" if args.infill is not None else ""
        n = f"{len(texts)} sample{'' if len(texts) == 1 else 's'}"
        print(f"{args.variant}: {n}{note}; {_schedule_line(ran, searched)}")
        return
    s = sample_stage(params, args.variant, not args.quiet, out=None if args.out is None else Path(args.out))
    for i, text in enumerate(s["texts"]):
        print(f"--- sample {i}\n{text}")
    print(f"{args.variant}: {s['num_samples']} samples, NFE {s['nfe']}, {s['seconds']:.2f}s, "
          f"gen ppl {s['gen_ppl']:.2f}, entropy {s['entropy']:.2f}; {_schedule_line(s['schedule'], searched)}")


def _searched_variant(params: dict, variant: str) -> str | None:
    """With ``sample.schedule: best``, the variant the search searched (None otherwise); one line
    of warning when that is not ``variant``, whose own best schedule was never searched."""
    if section(params, "sample").get("schedule") != "best":
        return None
    from esolm.search.results import read_best

    out_dir = Path(section(params, "search")["out_dir"])
    searched = read_best(out_dir).variant
    if searched is not None and searched != variant:
        print(f"esolm sample: warning: sample.schedule=best is the schedule searched on {searched} "
              f"(the search's choice in {out_dir}/), applied here to {variant}", file=sys.stderr)
    return searched


def _schedule_line(settings: dict | None, searched: str | None = None) -> str:
    """The sampling schedule that ran, in one phrase (settings that do not apply left out)."""
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in (settings or {}).items() if v is not None)
    return f"schedule: {shown}" + (f" (sample.schedule=best: searched on {searched})" if searched else "")


def cmd_report(args: argparse.Namespace, params: dict) -> None:
    from esolm.report import write_report
    from esolm.store import ingest, run_id

    rid = args.run_id or run_id(params)
    counts = ingest(params, db=Path(args.db), label=args.label, rid=rid)
    print(f"ingested run {rid} into {args.db}: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
    out = write_report(Path(args.db), rid, Path("reports"))
    print(f"wrote reports/report.md and reports/index.html ({len(out['figures'])} figures)")


def cmd_metrics(args: argparse.Namespace, params: dict) -> None:
    from esolm.headline import read_headline

    result = read_headline(list(section(params, "variants")))
    for name, numbers in result.items():
        print(f"{name}: " + ", ".join(f"{k} {'-' if v is None else f'{v:.4g}'}" for k, v in numbers.items()))
    print("from reports/metrics/<variant>/ (each file written by the stage that computed it; - : not run yet)")


def cmd_query(args: argparse.Namespace, params: dict) -> None:
    from esolm import store

    db = Path(args.db)
    if [args.sql is not None, args.tables, args.schema is not None].count(True) != 1:
        raise ValueError('give one of: SQL (e.g. "SELECT * FROM sampling"), --tables, or --schema TABLE')
    if args.tables:
        cols, rows = ["table", "rows", "columns"], store.tables(db)
    elif args.schema is not None:
        cols, rows = ["column", "type", "nullable", "primary_key"], store.schema(args.schema, db)
    else:
        cols, rows = store.query(args.sql, db)
    if args.format == "json":
        print(json.dumps([dict(zip(cols, r)) for r in rows], indent=2, default=str))
    elif args.format == "csv":
        import csv

        w = csv.writer(sys.stdout)
        w.writerow(cols)
        w.writerows(rows)
    else:
        from esolm.tabular import format_table

        print(format_table(cols, rows, full=args.full))


def cmd_params(args: argparse.Namespace, params: dict) -> None:
    from esolm.paramdoc import entries, format_entries, select
    from esolm.tabular import terminal_width

    items = select(entries(params, Path(args.params).read_text()), args.section)
    print(format_entries(items, width=min(terminal_width(), 120) - 4))


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


def cmd_spread(args: argparse.Namespace, params: dict) -> None:
    from esolm.spread import SPREAD_FILE, measure, summary_lines, write_spread

    if args.seeds is None:
        base = int((params.get("train") or {}).get("seed", 0))
        args.seeds = [base, base + 1, base + 2]
    spread = measure(params, args.seeds, progress=not args.quiet,
                     command=f"esolm spread --seeds {' '.join(map(str, args.seeds))}")
    write_spread(spread)
    print(f"exact PPL, left to right, across seeds {', '.join(map(str, spread.seeds()))} "
          f"(revision {spread.revision[:10]}, {spread.wall_s:.0f} s):")
    print("\n".join("  " + line for line in summary_lines(spread)))
    print(f"wrote {SPREAD_FILE} (commit it; the report stage shows it beside each run)")
    for note in spread.notes:
        print(f"note: {note}", file=sys.stderr)


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
    "import": (cmd_import, ("write runs/<variant>/model.ckpt from a published checkpoint in the authors' "
                            "layout: a Hugging Face folder, hf:<owner/name>, or an authors' Lightning "
                            ".ckpt (read safely: EMA weights, --raw for the trained ones), e.g. esolm "
                            "import hf:sahoo-diffusion/Eso-LM-B-alpha-0_25 --variant eso_b_owt "
                            "(docs/released-models.md)")),
    "metrics": (cmd_metrics, ("print each variant's headline numbers, as its stages wrote them "
                              "(reports/metrics/<variant>/likelihood.json and sampling.json)")),
    "spread": (cmd_spread, ("retrain and evaluate every variant under other training seeds (one DVC "
                            "experiment per seed, in a temporary copy: the workspace is untouched) and "
                            "write reports/seeds.json, which the report shows as each number's spread")),
    "report": (cmd_report, "ingest every stage's files into the results database and write the report"),
    "preset": (cmd_preset, ("choose a preset study in params.yaml for DVC (sets `preset:` and copies "
                            "the preset's variants into the top-level block that dvc.yaml expands)")),
    "query": (cmd_query, ("run one read-only SQL statement on the results database and print the rows, "
                          "one line each (--tables: the tables; --schema TABLE: its columns)")),
    "params": (cmd_params, ("list every settable key of the params file (after the preset and --set) "
                            "with its value and its doc")),
    "doctor": (cmd_doctor, ("check what this machine can run, one line per check, in under a minute "
                            "(CPU or GPU): device, dtypes, every attention backend on every mask against "
                            "math (values and gradients), torch.compile, CUDA graphs; exit code 1 if a "
                            "check that should work here fails. --full: the complete device check "
                            "(minutes, within --budget), one process per part, files under --out as each "
                            "part finishes; reads no params file")),
}
NEEDS_VARIANT = ("train", "evaluate", "sample", "curve", "export")
# the options a verb has only where they act: no params file / no --set / no progress bars to hide
NO_PARAMS = ("query", "doctor")
NO_SET = ("preset", "query", "doctor", "import", "spread")
NO_QUIET = ("export", "import", "metrics", "report", "preset", "query", "doctor", "params")
EXAMPLES: dict[str, tuple[str, ...]] = {
    "prepare": ("esolm prepare", "esolm prepare --set data.length=32 --set data.tokenizer=bpe:1024"),
    "train": ("esolm train --variant eso_b_a025", "esolm train --variant mdlm --set train.steps=100 --fresh",
              "esolm train --variant eso_b_a025 --set train.devices=8 --set train.strategy=ddp   # 8 GPUs, one node",
              "torchrun --nnodes=2 --nproc-per-node=8 ... $(which esolm) train --variant eso_b_a025 "
              "--set train.devices=8 --set train.num_nodes=2 --set train.strategy=ddp",
              "srun esolm train --variant eso_b_a025 --set train.devices=8 --set train.num_nodes=2   "
              "# SLURM; every node uses the same runs/ folder (docs/scaling.md)"),
    "judge": ("esolm judge", "esolm judge --set judge.train.steps=100 --fresh"),
    "evaluate": ("esolm evaluate --variant eso_b_a025",
                 "esolm evaluate --variant mdlm --set 'evaluate.splits=[valid, test]'"),
    "sample": ("esolm sample --variant eso_b_a025 --num-samples 4 --steps 8 --seed 1",
               "esolm sample --variant eso_b_a025 --prompt 'Fellow citizens'",
               "esolm sample --variant mdlm --infill 'The [MASK] [MASK] of the Union is'",
               "esolm sample --variant eso_b_a025 --set sample.schedule=best"),
    "curve": ("esolm curve --variant mdlm", "esolm curve --variant eso_b_a025 --set 'curve.steps=[2, 8, 32]'"),
    "bench": ("esolm bench", "esolm bench --set 'bench.lengths=[256]' --set bench.repeats=1 --device cpu",
              "esolm bench --profile"),
    "search": ("esolm search", "esolm search --set search.n_trials=24 --workers 4", "esolm search --only outputs"),
    "export": ("esolm export --variant eso_b_a025", "esolm export --variant mdlm --out /tmp/mdlm"),
    "import": ("esolm import hf:sahoo-diffusion/Eso-LM-B-alpha-0_25 --variant eso_b_owt",),
    "metrics": ("esolm metrics",),
    "spread": ("esolm spread", "esolm spread --seeds 0 1 2 3 4",
               "esolm spread --quiet && git add reports/seeds.json"),
    "report": ("esolm report", "esolm report --label baseline --db /tmp/results.duckdb"),
    "preset": ("esolm preset cpu-study", "esolm preset tiny-cpu"),
    "query": ("esolm query --tables", "esolm query --schema sampling",
              'esolm query "SELECT variant, nfe, gen_ppl, seconds_per_sample FROM sampling ORDER BY gen_ppl"',
              'esolm query --full "SELECT variant, schedule FROM sampling"',
              'esolm query --format csv "SELECT * FROM curves" > curves.csv'),
    "params": ("esolm params", "esolm params train", "esolm params sample.steps",
               "esolm params --set preset=cpu-study train"),
    "doctor": ("esolm doctor", "esolm doctor --device cpu --json /tmp/doctor.json", "esolm doctor --full --budget 300"),
}


def version() -> str:
    """The installed package's version (the package's ``__version__`` when not installed)."""
    from importlib import metadata

    try:
        return metadata.version("esolm")
    except metadata.PackageNotFoundError:
        import esolm

        return getattr(esolm, "__version__", "unknown (not installed: pip install -e .)")


def _variant_help(path: str = "params.yaml") -> str:
    """--variant's help: the names under ``variants:`` of the params file in this folder."""
    try:
        names = list(load_params(path).get("variants") or {})
    except (OSError, ValueError):
        names = []
    where = f"; in {path}: {', '.join(names)}" if names else ""
    return f"a name under `variants:` in the params file{where}"


def parser() -> argparse.ArgumentParser:
    import textwrap

    p = argparse.ArgumentParser(prog="esolm", description="Esoteric Language Models: data, training, "
                                "likelihood, KV-cached sampling, benchmarks.",
                                epilog="example: esolm train --variant eso_b_a025; esolm VERB --help shows "
                                       "examples of each verb; esolm params lists every setting")
    p.add_argument("--version", action="version", version=f"esolm {version()}")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    variant_help = _variant_help()
    for name, (_, help_text) in VERBS.items():
        examples = "".join(f"\n  {line}" for line in EXAMPLES.get(name, ()))
        s = sub.add_parser(name, help=help_text, description=textwrap.fill(help_text, 88),
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=f"examples:{examples}" if examples else None)
        if name not in NO_PARAMS:
            s.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
        if name not in NO_SET:
            s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="override a parameter, e.g. --set data.length=128 (repeatable; "
                                "same keys as params.yaml and `dvc exp run -S`; esolm params lists them)")
        if name not in NO_QUIET:
            s.add_argument("--quiet", action="store_true", help="no progress bars")
        if name in NEEDS_VARIANT:
            s.add_argument("--variant", required=True, help=variant_help)
        if name in ("train", "judge"):
            s.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
        if name == "export":
            s.add_argument("--out", default=None, help="output folder (default: exports/<variant>)")
            s.add_argument("--layout", choices=("esolm", "authors"), default="esolm",
                           help="esolm: our names (default); authors: the published DiT names and "
                                "config keys, which the authors' loaders read")
            s.add_argument("--force", action="store_true",
                           help="write into a non-empty folder that is not an esolm export")
        if name == "import":
            s.add_argument("source", help="hf:<owner/name>, a Hugging Face folder, or a Lightning .ckpt")
            s.add_argument("--variant", required=True, help="the run folder to write: runs/<variant>/model.ckpt")
            s.add_argument("--family", default=None, help="ar, mdlm, bd3lm, eso_a or eso_b (default: "
                           "from the config's model_type / the Lightning config)")
            s.add_argument("--alpha-0", type=float, default=None, help="alpha_0 of an Eso-LM (default: "
                           "the Lightning config's algo.alpha_0, or the hub name's alpha-<x>)")
            s.add_argument("--batch-split", type=float, default=None, help="the Eso-LM batch split "
                           "(default: the Lightning config's algo.batch_split)")
            s.add_argument("--raw", action="store_true", help="a Lightning file's trained weights, "
                           "not its EMA weights")
            s.add_argument("--tokenizer", default=None, help="tokenizer to embed: gpt2, "
                           "file:<tokenizer.json>, chars (a placeholder for toy models); default: "
                           "the folder's tokenizer.json, else gpt2 for a 50257-token vocabulary, else chars")
        if name == "sample":
            s.add_argument("--prompt", default=None, help="continue this text (prints the samples; "
                           "writes no stage files)")
            s.add_argument("--infill", default=None, help="fill the [MASK] marks (one token each) "
                           "of this text and everything after it (not for AR); the generated tokens "
                           "print between ⟦ ⟧")
            s.add_argument("--num-samples", type=int, default=None, metavar="N", help="samples to draw "
                           "(sets sample.num_samples)")
            s.add_argument("--steps", type=int, default=None, metavar="T", help="diffusion steps T "
                           "(sets sample.steps)")
            s.add_argument("--seed", type=int, default=None, metavar="S", help="seed of the sampling "
                           "streams (sets sample.seed)")
            s.add_argument("--out", default=None, metavar="DIR", help="write samples.jsonl and "
                           "generation.json there (the DVC stage: --out runs/<variant>, which also writes "
                           "reports/metrics/<variant>/sampling.json); default: print only, write nothing")
        if name in ("report", "query"):
            s.add_argument("--db", default="reports/results.duckdb", help="the results database")
        if name == "report":
            s.add_argument("--label", default="pipeline", help="a label stored with the run")
            s.add_argument("--run-id", default=None, help="run id (default: git revision + params hash)")
        if name == "spread":
            s.add_argument("--seeds", type=int, nargs="+", default=None, metavar="N",
                           help="train.seed values (default: params.yaml's train.seed and the next two; "
                                "seeds already run at this commit and params are reused)")
        if name == "preset":
            s.add_argument("name", help="a name under `presets:` in the params file, e.g. cpu-study")
        if name == "query":
            s.add_argument("sql", nargs="?", default=None, help="one read-only statement: SELECT (WITH, FROM "
                           "t, VALUES), SHOW TABLES, DESCRIBE t, SUMMARIZE t or EXPLAIN")
            s.add_argument("--tables", action="store_true", help="list the tables with their row counts")
            s.add_argument("--schema", default=None, metavar="TABLE", help="list a table's columns and types")
            s.add_argument("--full", action="store_true", help="show every cell whole (no cut to the "
                           "terminal's width)")
            s.add_argument("--format", choices=("table", "csv", "json"), default="table",
                           help="table (default: one line per row), csv or json (always whole)")
        if name == "params":
            s.add_argument("section", nargs="?", default=None, help="a section (train), or a dotted prefix "
                           "(search.space, train.lr); default: all")
        if name == "search":
            s.add_argument("--workers", type=int, default=1,
                           help="worker processes that run trials of the one study (default 1)")
            s.add_argument("--only", choices=("queue", "join", "outputs"), default=None,
                           help="queue: fail and re-queue dead workers' trials (no heartbeat for "
                                "search.grace_period; live ones are never touched), then queue the missing "
                                "trials up to search.n_trials; join: run trials until the study holds "
                                "search.n_trials and none is queued (a worker, on any machine sharing "
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
          "sqlalchemy": "pipeline", "lm_eval": "lmeval", "transformers": "hf", "psycopg": "postgres",
          "flash_attn": "flash"}


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


# verb options that are short for a --set: (option, key)
FLAG_SETS = {"sample": (("num_samples", "sample.num_samples"), ("steps", "sample.steps"), ("seed", "sample.seed"))}


def _flag_sets(args: argparse.Namespace) -> list[str]:
    """``--num-samples 4`` as ``sample.num_samples=4`` (after the --set items: the option wins)."""
    return [f"{key}={getattr(args, opt)}" for opt, key in FLAG_SETS.get(args.verb, ())
            if getattr(args, opt, None) is not None]


# what to do about a file system error that names no fix of its own
OS_FIXES = {"ENOSPC": "free space and run again", "EACCES": "check its permissions",
            "EPERM": "check its permissions", "EISDIR": "a folder is where a file belongs: move it away",
            "ENOTDIR": "a file is where a folder belongs: move it away",
            "ENAMETOOLONG": "use a shorter name", "EROFS": "the file system is read-only"}


def error_line(err: BaseException) -> str:
    """An error as the one line ``esolm <verb>`` prints: an OSError as its file, what happened
    and what to do (``io.atomic_path`` words a full disk itself); any message on one line."""
    import errno

    text = str(err)
    if isinstance(err, OSError) and err.strerror:
        fix = OS_FIXES.get(errno.errorcode.get(err.errno or 0, ""), "")
        text = err.strerror + (f": {err.filename}" if err.filename else "")
        if fix and fix not in text:
            text += f"; {fix}"
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        sets = [*getattr(args, "set", []), *_flag_sets(args)]
        params = load_params(args.params, sets) if getattr(args, "params", None) else {}
        if getattr(args, "variant", None) is not None and args.verb != "import":  # import makes a new one
            # a verb that reads a model file also takes a run folder that has one (the judge, an import)
            runs = () if args.verb == "train" else tuple(p.parent.name for p in
                                                         sorted(Path("runs").glob("*/model.ckpt")))
            check_variant(params, args.variant, runs)
        VERBS[args.verb][0](args, params)
    except (ValueError, OSError, RuntimeError, duckdb_error()) as err:  # OSError: a full disk, ...
        print(f"esolm {args.verb}: error: {error_line(err)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:  # a feature of an extra on a lean install
        if (hint := missing_extra(err)) is None:
            raise
        print(f"esolm {args.verb}: error: {hint}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
