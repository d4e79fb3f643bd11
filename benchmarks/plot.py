"""Perplexity against size from a table written by ``benchmarks.llm --out``.

    python -m benchmarks.plot TABLE.md docs/img/smollm2-ppl-vs-size.png
"""
from __future__ import annotations

import argparse
from pathlib import Path


def read_rows(table: Path) -> list[tuple[str, float, float]]:
    rows = []
    for line in table.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or cells[0] in ("pipeline", "") or cells[0].startswith("---"):
            continue
        try:
            rows.append((cells[0], float(cells[1]), float(cells[2])))
        except ValueError:
            continue  # a failed peer: no size or perplexity
    return rows


def plot(rows: list[tuple[str, float, float]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for label, mb, ppl in rows:
        ours = label.startswith("presso")
        ax.scatter(mb, ppl, marker="o" if ours else "s", color="tab:blue" if ours else "tab:gray", s=40)
        ax.annotate(label, (mb, ppl), fontsize=6, xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("size (MB, log scale)")
    ax.set_ylabel("WikiText-2 perplexity (lower is better)")
    ax.set_title("SmolLM2-135M: perplexity vs size (presso: circles, peers: squares)")
    ax.grid(alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    plot(read_rows(args.table), args.out)


if __name__ == "__main__":
    main()
