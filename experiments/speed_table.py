"""The README's speed table from `specdec bench --preset zoo-speed` (and, optionally, zoo-throughput) rows: per
method and CFG scale, MAL and target forwards per image at batch 1, the latency speedup over AR at batch 1 (median,
with the rounds' min-max), and the throughput speedup at batch 8 (and 64). --mal adds MAL at the larger batches
(over all their images, less noisy than one image's, with its standard error where the rows have one).

    python experiments/speed_table.py docs/results/zoo-speed.jsonl [docs/results/zoo-throughput.jsonl] [--mal]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def rows_of(paths: list[str]) -> list[dict]:
    rows = []
    for p in paths:
        rows += [json.loads(line) for line in Path(p).read_text().splitlines() if line.strip()]
    return rows


def guarantee(row: dict) -> str:
    bound = row["distortion_bound"]
    return "lossless" if row["lossless"] else ("no bound" if bound is None else f"TV <= {bound:g}")


def speedup_cell(row: dict | None, spread: bool) -> str:
    if row is None:
        return "-"
    s = f"{row['speedup']:.2f}x"
    if spread and row["wall_min_s"] and row["wall_max_s"]:
        ar = row["baseline_wall_per_image_s"] * row["images"]
        s += f" ({ar / row['wall_max_s']:.2f}-{ar / row['wall_min_s']:.2f})"
    if row.get("reliability"):
        s += " (!)"
    return s


def mal_cell(row: dict | None) -> str:
    """MAL, with its standard error over the batch's images where the row has one."""
    if row is None:
        return "-"
    se = row.get("mean_accepted_length_se")
    return f"{row['mean_accepted_length']:.2f}" + (f" +- {se:.2f}" if se else "")


def main(paths: list[str]) -> None:
    mal = "--mal" in paths
    rows = rows_of([p for p in paths if p != "--mal"])
    batches = sorted({r["batch"] for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    index = {(r["label"], r["sampling"]["cfg_scale"], r["batch"]): r for r in rows}
    head = ["method", "guarantee", "cfg", "MAL (b=1)", "target fwd / image", "latency b=1 vs AR (min-max)"]
    head += [f"MAL (b={b})" for b in batches if b != 1 and mal]
    head += [f"throughput b={b} vs AR" for b in batches if b != 1]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for cfg in sorted({r["sampling"]["cfg_scale"] for r in rows}):
        for label in labels:
            one = index.get((label, cfg, 1))
            if one is None:
                continue
            cells = [label, guarantee(one), f"{cfg:g}", f"{one['mean_accepted_length']:.2f}",
                     f"{one['target_forwards_per_image']:.1f}", speedup_cell(one, True)]
            cells += [mal_cell(index.get((label, cfg, b))) for b in batches if b != 1 and mal]
            cells += [speedup_cell(index.get((label, cfg, b)), False) for b in batches if b != 1]
            print("| " + " | ".join(cells) + " |")
    flagged = [r for r in rows if r.get("reliability")]
    if flagged:
        print(f"\n(!) flagged by the timing checks: {len(flagged)} rows; e.g. {flagged[0]['reliability']}")


if __name__ == "__main__":
    main(sys.argv[1:])
