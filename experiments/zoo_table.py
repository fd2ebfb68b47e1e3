"""The README's zoo table: speed from the zoo-full run, quality from the zoo-quality run, matched by method label.

    specdec bench --preset zoo-full --out docs/results/zoo-full.jsonl          # 16 images, medians of 3 (speed)
    specdec bench --preset zoo-quality --out docs/results/zoo-quality.jsonl    # 512 images per seed (quality)
    python experiments/zoo_table.py docs/results/zoo-full.jsonl docs/results/zoo-quality.jsonl
    python experiments/zoo_table.py docs/results/zoo-full.jsonl                 # speed and NLL only

Quality columns: feature FD against 2048 held-out crops of the same classes and NLL under the target, each the
mean over the quality seeds present, and the FD change against AR's mean over the same seeds ("ok" when within 10%).
The FD noise is measured, not assumed: lossless configurations sample exactly AR's distribution, so the spread of
their single-run FDs is the single-run noise sd; a change beyond 10% is called "beyond noise" only when it also
exceeds 2 sd * sqrt(1/n + 1/n_AR) (n = runs averaged).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def guarantee(r: dict) -> str:
    if r["lossless"]:
        return "lossless"
    bound = r.get("distortion_bound")
    return f"TV <= {bound:g}" if isinstance(bound, (int, float)) else "no bound"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("speed", type=Path)
    ap.add_argument("quality", type=Path, nargs="?", default=None,
                    help="a run with FD (>= 200 images); without it: speed and the speed run's NLL only")
    ap.add_argument("--tolerance", type=float, default=0.10, help="relative FD change counted as 'ok'")
    args = ap.parse_args(argv)

    speed = {r["label"]: r for r in rows(args.speed)}
    if args.quality is None:
        print("| method | guarantee | MAL | target fwd / image | speedup vs AR | NLL |")
        print("|---|---|---|---|---|---|")
        for label, s in speed.items():
            print(f"| {label} | {guarantee(s)} | {s['mean_accepted_length']:.2f} | "
                  f"{s['target_forwards_per_image']:.1f} | {s['speedup']:.2f}x | {s['nll']:.3f} |")
        return 0
    quality: dict[str, list[dict]] = {}
    for r in rows(args.quality):
        quality.setdefault(r["label"], []).append(r)
    ar_fd = statistics.mean(r["feature_fd"] for r in quality["AR"])
    seeds = sorted({r["seed"] for r in quality["AR"]})
    print(f"AR feature FD over seeds {seeds}: " + ", ".join(f"{r['feature_fd']:.2f}" for r in quality["AR"]))
    lossless = [r["feature_fd"] for rs in quality.values() for r in rs if r["lossless"]]
    sd = statistics.stdev(lossless)
    print(f"single-run FD noise: sd {sd:.2f} ({sd / ar_fd:.1%} of AR) over {len(lossless)} lossless runs")
    print("| method | guarantee | MAL | target fwd / image | speedup vs AR | NLL | feature FD | FD vs AR |")
    print("|---|---|---|---|---|---|---|---|")
    for label, s in speed.items():
        q = quality.get(label, [])
        if q:
            fd = statistics.mean(r["feature_fd"] for r in q)
            nll = statistics.mean(r["nll"] for r in q)
            change = fd / ar_fd - 1
            noise = 2 * sd * (1 / len(q) + 1 / len(quality["AR"])) ** 0.5
            verdict = "ok" if abs(change) <= args.tolerance else "worse" if change > 0 else "better"
            if verdict != "ok":
                verdict += " (beyond noise)" if abs(fd - ar_fd) > noise else " (within noise)"
            qual = f"{nll:.3f} | {fd:.1f} | {change:+.0%} {verdict}" + ("" if len(q) == len(seeds) else
                                                                          f" ({len(q)} of {len(seeds)} seeds)")
        else:
            qual = "- | - | -"
        print(f"| {label} | {guarantee(s)} | {s['mean_accepted_length']:.2f} | {s['target_forwards_per_image']:.1f} "
              f"| {s['speedup']:.2f}x | {qual} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
