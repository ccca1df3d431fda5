"""Figures drawn from plain rows, with matplotlib alone (no model code): shared by the verbs that
have the rows in hand (``esolm bench``) and the report, which reads them from DuckDB."""

from __future__ import annotations

from pathlib import Path

SPEEDUP_OF = "eso_b"  # the bench variant whose speedup over every other variant is drawn


def speedup(rows: list[dict], path: str | Path) -> bool:
    """Speedup of Eso-LM (B) over each bench variant against sequence length, from plain rows
    (``BenchRow.to_json()``, or the throughput table's columns) with variant, length, nfe_budget,
    median_s, batch_size and (optionally) device, d_model, n_layers, vocab_size: the NFE = L rows
    of the smallest batch size. False when there is none."""
    rows = [r for r in rows if r.get("nfe_budget", "L") == "L"]
    if rows:  # one batch size per figure: the smallest timed
        rows = [r for r in rows if r.get("batch_size", 1) == min(q.get("batch_size", 1) for q in rows)]
    eso = {r["length"]: r["median_s"] for r in rows if r["variant"] == SPEEDUP_OF}
    if not eso:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name in sorted({r["variant"] for r in rows} - {SPEEDUP_OF}):
        pts = sorted((r["length"], r["median_s"] / eso[r["length"]]) for r in rows
                     if r["variant"] == name and r["length"] in eso)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"over {name}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length L (NFE = L)")
    ax.set_ylabel("Eso-LM (B) speedup (x)")
    ax.legend(fontsize=7)
    first = rows[0]
    size = (f"{first['d_model']}d/{first['n_layers']}L/V={first['vocab_size']}, "
            if first.get("d_model") else "")
    ax.set_title(f"{size}batch {first.get('batch_size', '?')}, {first.get('device') or ''}", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
