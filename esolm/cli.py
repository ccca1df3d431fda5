"""``esolm <verb>``: the command line; every verb reads params.yaml plus --set overrides."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from esolm.params import build, load_params, section


def _write_json(path: Path, obj: object) -> None:
    """Atomic write: a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


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
    _write_json(out, rows)
    plot_bench(rows, str(out.with_suffix(".png")))
    for r in rows:
        if r["family"] == "eso_b":
            ratios = ", ".join(f"{k[11:]} {v:.1f}x" for k, v in r.items() if k.startswith("speedup_vs_"))
            print(f"L={r['length']} NFE={r['nfe']} batch={r['batch_size']}: eso_b {r['median_s']:.3f}s; "
                  f"speedup over {ratios}")
    print(f"wrote {out} and {out.with_suffix('.png')}")


VERBS: dict[str, tuple[Callable[[argparse.Namespace, dict], None], str]] = {
    "prepare": (cmd_prepare, "fetch, verify and tokenize the corpus into token shards (params: data)"),
    "bench": (cmd_bench, "time sampling of every family side by side (params: bench)"),
}


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
        if name in ("bench",):
            s.add_argument("--device", default=None, help="auto (default), cpu, or a CUDA device")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        params = load_params(args.params, args.set)
        VERBS[args.verb][0](args, params)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"esolm {args.verb}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
