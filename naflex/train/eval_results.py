"""validate.py's results: the rows as a CSV or JSON file, and top-1 against sequence length as a PNG."""
from __future__ import annotations

import csv
import json
from pathlib import Path


def write_results(rows: list[dict], path: str, fmt: str | None = None) -> Path:
    """Write result rows to CSV or JSON (format from ``fmt`` or the file extension)."""
    out = Path(path)
    fmt = fmt or ("json" if out.suffix.lower() == ".json" else "csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        out.write_text(json.dumps(rows, indent=2) + "\n")
    else:
        with open(out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)
    return out


def plot_results(rows: list[dict], path) -> Path:
    """PNG of top-1 against sequence length (the NaFlex picture: one model, any sequence length)."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["seq_len"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["seq_len"] for r in rows], [r["top1"] for r in rows], marker="o")
    ax.set_xlabel("sequence length (patches)")
    ax.set_ylabel("top-1 (%)")
    ckpt = Path(rows[0]["checkpoint"]).name if rows[0].get("checkpoint") else "random init"
    ax.set_title(f"{rows[0]['model']} ({ckpt}{', EMA' if rows[0].get('ema') else ''})", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
