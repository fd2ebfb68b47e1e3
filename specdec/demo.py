"""`specdec demo`: plain AR against speculative decoding on the embedded zoo, in one process, one table, two figures.

Every method goes through the same `specdec.generate` after one untimed warm-up, timed as the median of `repeats`
generations. Quality: feature-space Frechet distance against held-out crops of the same classes (in the same
proportions as the samples) and the samples' NLL under the target. Writes into the output folder:
  table.json      the rows (MAL, acceptance, target forwards per image, wall-clock, speedup, FD, NLL) and the setup
  samples.png     the images of every method, one row each (same seeds)
  acceptance.png  per-position share of tokens committed from drafts, one panel per speculative method
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from specdec import metrics
from specdec.bench.methods import DEMO_METHODS, QUICK_METHODS, available, run_method
from specdec.bench.results import format_table
from specdec.plots import acceptance_heatmaps, image_grid
from specdec.sampling import Sampling


class DemoError(Exception):
    """A bad demo input (unknown class, unusable output folder): what is wrong and what to do."""


def check_out_dir(path: str | Path) -> Path:
    """The output folder, created if needed; DemoError when it cannot be created or written to."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DemoError(f"cannot create output folder {out}: {e.strerror}; pass --out with a writable path") from e
    try:        # a real write: permission bits say nothing to root, and read-only or virtual file systems exist
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise DemoError(f"output folder {out} is not writable ({e.strerror}); pass --out with a writable "
                        f"path") from e
    return out


def run_demo(out: str | Path = "specdec-demo", quick: bool = False, classes: list[str] | None = None,
             per_class: int = 0, seed: int = 0, temperature: float = 1.0, top_k: int = 0, cfg: float = 3.0,
             repeats: int = 0, fd_real: int = 256) -> int:
    """Run the demo and print its table. classes: zoo class names (None: the first 3 quick / 6 full); per_class,
    repeats: 0 = 2 / 1 quick, 4 / 3 full. Raises DemoError for bad inputs."""
    import specdec.zoo
    from tqdm.auto import tqdm

    torch.set_grad_enabled(False)
    out = check_out_dir(out)
    bundle = specdec.zoo.load()
    names = classes or list(bundle.classes[: (3 if quick else 6)])
    try:
        class_ids = [bundle.class_id(n) for n in names]
    except ValueError as e:
        raise DemoError(str(e)) from e
    per_class = per_class or (2 if quick else 4)
    cond = torch.tensor([c for c in class_ids for _ in range(per_class)])
    sampling = Sampling(temperature=temperature, top_k=top_k, cfg_scale=cfg)
    repeats = repeats or (1 if quick else 3)
    methods = available(QUICK_METHODS if quick else DEMO_METHODS, bundle)
    print(f"specdec demo: {len(methods)} methods x {len(cond)} images ({', '.join(names)}), {sampling}, "
          f"seed {seed}, median of {repeats}", flush=True)

    # warm-up outside the timings, then every method through the same generate() in this process
    specdec.generate(bundle.target, cond[:2], sampling=sampling, seed=seed)
    # held-out crops of the same classes, in the same proportions as the samples
    real = bundle.heldout_images(fd_real, seed=0, classes=cond[torch.arange(fd_real) % len(cond)])
    real_feats = metrics.extract_features(real, bundle.features)
    rows, images, maps = [], [], []
    geometries: dict = {}            # rules over the codebook share one geometry and its k-NN tables
    for method in tqdm(methods, desc="methods", disable=not sys.stderr.isatty()):
        wall, res = run_method(bundle, method, cond, sampling, seed, repeats, geometries)
        fd = metrics.frechet_distance(metrics.extract_features(res.images, bundle.features), real_feats)
        nll = float(metrics.token_nll(bundle.target_gpt, res.tokens, cond).mean())
        st = res.stats
        rows.append({"method": method.label, "drafter": method.drafter or "-", "rule": method.rule,
                     "k": method.drafter_params.get("k", method.drafter_params.get("window", 0)),
                     "mean_accepted_length": st.mean_accepted_length, "acceptance_rate": st.acceptance_rate,
                     "target_forwards_per_image": st.target_forwards_per_image, "wall_s": wall,
                     "feature_fd": fd, "nll": nll, "images": len(cond), "repeats": repeats})
        images.append(res.images)
        maps.append(st.acceptance_map.float().mean(0).reshape(bundle.target.grid))     # [H, W]
    ar_wall = rows[0]["wall_s"]
    for r in rows:
        r["speedup"] = ar_wall / r["wall_s"]
    meta = {"sampling": vars(sampling), "seed": seed, "classes": names, "device": "cpu", "dtype": "float32",
            "threads": torch.get_num_threads(), "fd_real_images": fd_real,
            "fd_metric": "Frechet distance in the zoo feature net's space"}
    (out / "table.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    image_grid(images, [r["method"] for r in rows], out / "samples.png")
    acceptance_heatmaps(maps[1:], [r["method"] for r in rows[1:]], out / "acceptance.png")
    print(format_table(rows))
    print(f"\nwrote {out / 'samples.png'}, {out / 'acceptance.png'}, {out / 'table.json'}")
    return 0
