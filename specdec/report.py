"""`specdec report RESULTS.jsonl --out DIR`: figures and a Markdown table from bench JSON lines alone.

Writes into DIR:
  pareto_fd.png        speedup vs feature-space Frechet distance, one curve (Pareto front) per method family
                       (only when rows have an FD: from 200 images on)
  pareto_nll.png       speedup vs NLL under the target, same layout
  mal_vs_k.png         mean accepted length vs draft tokens per step k, one line per family
  acceptance.png       per-position acceptance heatmaps over the token grid for chosen configurations
  samples.png          the saved first images of every configuration (same seeds), one row each
  table.md             every row: counters, speedup, quality, the rule's bound, and what each metric is
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from specdec.bench.results import execution_tag, read_rows
from specdec.plots import _plt, acceptance_heatmaps

MAX_IMAGE_ROWS = 60


def _group(r: dict) -> str:
    s = r.get("sampling", {})
    tag = execution_tag(r)
    return (f"{r.get('generator')} T={s.get('temperature')} top-k={s.get('top_k')} cfg={s.get('cfg_scale')} "
            f"B={r.get('batch')}" + (f" {tag}" if tag else ""))


def _curve_key(r: dict, multi: bool) -> str:
    """A plotted family: the row's family, with deterministic (argmax) drafts apart from sampled ones (a rule's
    guarantee and behaviour differ between them)."""
    fam = r["family"] + (" (argmax drafts)" if (r.get("drafter_params") or {}).get("drafts") == "argmax" else "")
    return f"{fam} | {_group(r)}" if multi else fam


def _point_label(r: dict) -> str:
    """The parameters that tell a family's points apart (the label without the family's own words)."""
    short = {"neighbours": "n", "k": "n", "delta": "d", "window": "w"}     # rule params; a drafter's k stays k
    rule = [f"{short.get(k, k)}={v}" for k, v in sorted((r.get("rule_params") or {}).items())]
    drafter = [f"{'w' if k == 'window' else k}={v}" for k, v in sorted((r.get("drafter_params") or {}).items())
               if k != "drafts"]
    return " ".join(rule + drafter)


def _fmt(v, spec: str = ".3f") -> str:
    if v is None:
        return "none"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def pareto_plot(rows: list[dict], metric: str, xlabel: str, path: Path) -> Path | None:
    """Speedup (y) vs a quality cost (x, lower is better); per family its points and its Pareto front. None (no
    file) when no row has the metric (e.g. FD, reported only from metrics.FD_MIN_IMAGES images on)."""
    if not any(r.get(metric) is not None for r in rows):
        return None
    plt = _plt()
    multi = len({_group(r) for r in rows}) > 1
    curves = defaultdict(list)
    for r in rows:
        if r.get(metric) is not None and r.get("speedup") is not None:
            curves[_curve_key(r, multi)].append((r[metric], r["speedup"], r))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in sorted(curves.items()):
        is_ar = all(p[2].get("is_baseline") for p in pts)
        if is_ar:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="*", s=180, color="black", zorder=5,
                       label=f"{name} (baseline)")
            continue
        pts.sort(key=lambda p: (p[0], -p[1]))
        front, best = [], -float("inf")
        for x, y, _ in pts:
            if y > best:
                front.append((x, y))
                best = y
        sc = ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=22, alpha=0.6)
        ax.plot([p[0] for p in front], [p[1] for p in front], "-o", ms=4, color=sc.get_facecolor()[0], label=name)
        for x, y, r in pts:
            ax.annotate(_point_label(r), (x, y), fontsize=5, alpha=0.8, xytext=(3, 2), textcoords="offset points")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("speedup vs AR (wall-clock, median)")
    ax.legend(fontsize=6, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def mal_vs_k_plot(rows: list[dict], path: Path) -> Path:
    plt = _plt()
    multi = len({_group(r) for r in rows}) > 1
    curves = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if not r.get("is_baseline") and r.get("k"):
            curves[_curve_key(r, multi)][r["k"]].append(r["mean_accepted_length"])
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, by_k in sorted(curves.items()):
        ks = sorted(by_k)
        ax.plot(ks, [sum(by_k[k]) / len(by_k[k]) for k in ks], "-o", ms=4, label=name)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="AR")
    ax.set_xlabel("draft tokens per step k")
    ax.set_ylabel("mean accepted length (tokens / target forward)")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def choose_heatmaps(rows: list[dict], wanted: list[str] | None) -> list[dict]:
    """Rows named by label or key; default: the fastest configuration of each non-baseline family (at most 6)."""
    if wanted:
        chosen = [r for r in rows if r["label"] in wanted or r["key"] in wanted]
        missing = [w for w in wanted if not any(w in (r["label"], r["key"]) for r in rows)]
        if missing:
            raise ValueError(f"no rows labelled {missing}; labels: {sorted({r['label'] for r in rows})}")
        return chosen
    best: dict[str, dict] = {}
    for r in rows:
        if r.get("is_baseline"):
            continue
        f = r["family"]
        if f not in best or (r.get("speedup") or 0) > (best[f].get("speedup") or 0):
            best[f] = r
    return list(best.values())[:6]


def heatmap_plot(rows: list[dict], path: Path) -> Path:
    maps = [torch.tensor(r["acceptance_map"]).reshape(r["grid"][-2:] if len(r["grid"]) >= 2 else (1, -1))
            for r in rows]
    return acceptance_heatmaps(maps, [r["label"] for r in rows], path)


def samples_plot(rows: list[dict], results_dir: Path, path: Path) -> Path:
    plt = _plt()
    with_images = [r for r in rows if r.get("image_path") and (results_dir / r["image_path"]).is_file()]
    with_images = with_images[:MAX_IMAGE_ROWS]
    multi = len({_group(r) for r in with_images}) > 1
    n = max(1, len(with_images))
    fig, axes = plt.subplots(n, 1, figsize=(7, 0.9 * n + 0.3), squeeze=False)
    for ax, r in zip(axes[:, 0], with_images):
        ax.imshow(plt.imread(results_dir / r["image_path"]), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(r["label"] + (f"\n{_group(r)}" if multi else ""), rotation=0, ha="right", va="center", fontsize=6)
    if not with_images:
        axes[0, 0].text(0.5, 0.5, "no saved images", ha="center", va="center")
        axes[0, 0].axis("off")
    fig.subplots_adjust(left=0.35, hspace=0.1)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def markdown_table(rows: list[dict]) -> str:
    score_names = sorted({k for r in rows for k in (r.get("scores") or {})})
    head = ["method", "generator / sampling", "seed", "k", "MAL", "accept", "fwd/img", "ms/img", "speedup",
            "step compr.", "draft share", "FD", "NLL", "TVD vs AR", "bound"] + score_names
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], _group(r), str(r.get("seed")), str(r.get("k", 0)),
                 _fmt(r.get("mean_accepted_length"), ".2f"), _fmt(r.get("acceptance_rate"), ".2f"),
                 _fmt(r.get("target_forwards_per_image"), ".1f"),
                 _fmt(None if r.get("wall_per_image_s") is None else 1000 * r["wall_per_image_s"], ".1f"),
                 _fmt(r.get("speedup"), ".2f") + "x", _fmt(r.get("step_compression"), ".2f") + "x",
                 _fmt(r.get("draft_share"), ".2f"), _fmt(r.get("feature_fd"), ".3f"), _fmt(r.get("nll"), ".3f"),
                 _fmt(r.get("tvd_vs_baseline"), ".3f"), _fmt(r.get("distortion_bound"), ".3g")]
        cells += [_fmt((r.get("scores") or {}).get(s), ".4g") for s in score_names]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    r0 = rows[0]
    metrics = {}
    for r in rows:
        metrics.update(r.get("metric") or {})
    legend = [f"- **{k}**: {v}" for k, v in sorted(metrics.items())]
    setup = (f"device {r0.get('device')}, dtype {r0.get('dtype')}, {r0.get('threads')} threads, "
             f"median of {r0.get('repeats')} repeats, {r0.get('images')} images per configuration, "
             f"{r0.get('num_processes', 1)} process(es). Speedup and step compression are against the AR row of "
             f"the same generator, sampling, batch and seed, timed in the same process.")
    return "\n".join(["# specdec bench report", "", setup, "", *lines, "", "## Metrics", "", *legend,
                      "- **bound**: `none` means the rule certifies no bound (lossy without a guarantee)", ""])


def make_report(results: str | Path, out: str | Path, heatmaps: list[str] | None = None) -> list[Path]:
    results = Path(results)
    if not results.is_file():
        raise FileNotFoundError(f"results file {str(results)!r} not found; run `specdec bench` first")
    rows = read_rows(results)
    if not rows:
        raise ValueError(f"{results} holds no result rows")
    needed = ("key", "label", "family", "mean_accepted_length", "speedup", "acceptance_map", "grid")
    bad = [i for i, r in enumerate(rows) if not isinstance(r, dict) or any(k not in r for k in needed)]
    if bad:
        first = rows[bad[0]] if isinstance(rows[bad[0]], dict) else {}
        raise ValueError(f"{results} line {bad[0] + 1} (and {len(bad) - 1} more) is not a `specdec bench` row (it "
                         f"lacks {', '.join(k for k in needed if k not in first)}); pass a results file written by "
                         f"`specdec bench`")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = [
        pareto_plot(rows, "feature_fd", "feature-space Frechet distance vs held-out images (lower is better)",
                    out / "pareto_fd.png"),
        pareto_plot(rows, "nll", "NLL under the target, nats/token (lower is better)", out / "pareto_nll.png"),
        mal_vs_k_plot(rows, out / "mal_vs_k.png"),
        heatmap_plot(choose_heatmaps(rows, heatmaps), out / "acceptance.png"),
        samples_plot(rows, results.parent, out / "samples.png"),
    ]
    files = [f for f in plots if f is not None]
    (out / "table.md").write_text(markdown_table(rows))
    (out / "rows.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "acceptance_map"}
                                               for r in rows], indent=1))
    return files + [out / "table.md", out / "rows.json"]


def report_command(results: str | Path, out: str | Path = "specdec-report", heatmaps: list[str] | None = None) -> int:
    """`specdec report`: write the report files and name them. FileNotFoundError / ValueError as `make_report`."""
    for f in make_report(results, out, heatmaps=heatmaps):
        print(f"wrote {f}")
    return 0
