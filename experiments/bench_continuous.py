"""Continuous speculative decoding on MAR (arXiv 2406.11838): speed against quality of CSpD (arXiv 2411.11925) at
T = 1 (the paper's test) and T = 42 (the released code's relaxed test), and of the exact rule over Gaussian
transitions (arXiv 2501.05370), against target-only MAR at the same K AR steps AND at fewer steps (K/2, K/4).

Every method runs through `specdec.continuous_loop.generate_continuous` on the continuous zoo (or, --generator
tiny, a pair of tiny random MARs: only a smoke test of the pipeline, its numbers mean nothing).

Phases (one JSON line per finished configuration in rows.jsonl, key = phase, batch, method; a rerun skips what is
there, so the bench resumes; a batch with any row missing is re-timed whole, since timings are interleaved):
  speed    per batch (--batches, default 1 / 8 / 64): all methods in interleaved rounds after a warm-up,
           generation only (decoding excluded); latency per image min / median / max, speedup vs target-only at K
           and vs target-only at K/2, K/4; counters (target backbone passes and head calls per image, mean
           accepted length, token and transition acceptance, fallbacks) and the seconds spent in the target's and
           the drafter's backbones and heads
  acceptance  (untimed, batch 8) CSpD's token acceptance vs gamma, the exact rule's transition acceptance vs head
           window with the zoo drafter and the frozen drafter
  quality  per method, --quality-images images (independent seeds): feature-space Frechet distance against
           held-out crops (from 200 images on), and the energy distance of whole-image token latents against
           target-only at K (another seed) with its label-permutation null (p-value; target-only vs itself gives
           the null pair's value), plus the histogram of first-rejected transitions
Plot (speed_quality.png, from rows.jsonl alone): quality vs batch-1 speedup (target-only at fewer steps drawn as a
curve), acceptance vs gamma, speedup vs batch, and head vs backbone seconds per image at batch 1.

    OMP_NUM_THREADS=1 python experiments/bench_continuous.py --out runs/bench_continuous            # full
    OMP_NUM_THREADS=1 python experiments/bench_continuous.py --smoke --out runs/bench_continuous_smoke
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specdec import metrics  # noqa: E402
from specdec.adapters.mar import MARAdapter  # noqa: E402
from specdec.bench.results import append_row, read_rows  # noqa: E402
from specdec.bench.timing import set_threads  # noqa: E402
from specdec.continuous import energy_test  # noqa: E402
from specdec.continuous_demo import (ContinuousMethod, build, frozen_method, run_methods,  # noqa: E402
                                     stats_fields)
from specdec.continuous_loop import LoopConfig, generate_continuous  # noqa: E402
from specdec.devices import use_device  # noqa: E402
from specdec.models.mar import MAR, MARConfig  # noqa: E402
from specdec.models.mar.diffloss import DiffLoss, SimpleMLPAdaLN  # noqa: E402

CSPD = dict(prefill_ratio=0.15)


def methods(gammas: list[int], exact_gammas: list[int], fewer: list[float],
            frozen_windows: list[int] = ()) -> list[ContinuousMethod]:
    out = [ContinuousMethod("MAR K")]
    out += [ContinuousMethod(f"MAR K*{r:g}", steps_ratio=r) for r in fewer]
    for T in (1.0, 42.0):
        out += [ContinuousMethod(f"CSpD T={T:g} g={g}", "cspd", dict(CSPD, inner_temperature=T, gamma=g))
                for g in gammas]
    out += [ContinuousMethod(f"exact g={g}", "gaussian_chain", loop=dict(gamma=g)) for g in exact_gammas]
    out += [frozen_method(w) for w in frozen_windows]
    return out


# ---- generators -------------------------------------------------------------------------------------------------
class _ResidualEps(SimpleMLPAdaLN):
    """eps = x_t + 0.002 * MLP: keeps a random head's chains at unit scale (smoke models only)."""

    def forward_embedded(self, x, y):
        out = super().forward_embedded(x, y)
        return torch.cat([x + 0.002 * out[:, :self.in_channels], out[:, self.in_channels:]], 1)


class _ShiftedHead(DiffLoss):
    def predict(self, x, t, c, cfg_k=1.0, times=None):
        eps, v = super().predict(x, t, c, cfg_k, times)
        low = (t <= 4).float()[:, None] if isinstance(t, torch.Tensor) else float(t <= 4)
        return eps + 0.1 * low, v


class TinyBundle:
    """A tiny random MAR target and a drafter that differs in its low-noise head steps; no pixels, no features."""

    classes, num_iter, cfg_scale, features = tuple("abc"), 4, 2.0, None

    def __init__(self):
        torch.manual_seed(0)
        model = MAR(MARConfig.named("mar_tiny")).eval()
        net = model.diffloss.net
        for layer in [b.adaLN_modulation[-1] for b in net.res_blocks] + [net.final_layer.linear]:
            torch.nn.init.normal_(layer.weight, std=0.05)
        head = _ResidualEps(net.in_channels, net.cond_embed.out_features, net.cond_embed.in_features,
                            len(net.res_blocks))
        head.load_state_dict(net.state_dict())
        model.diffloss.net = head
        other = copy.deepcopy(model)
        other.diffloss.__class__ = _ShiftedHead
        self.target, self.drafter = MARAdapter(model, variance="large"), MARAdapter(other, variance="large")


def load_generator(name: str, dtype: str = "float32", device: str = "cpu"):
    if name == "tiny":
        if dtype != "float32" or device != "cpu":
            sys.exit("--generator tiny runs in float32 on the CPU only (a smoke test); drop --dtype and --device")
        return TinyBundle()
    from specdec.zoo import continuous
    if not continuous.available():
        sys.exit("the continuous zoo is not installed: train it (experiments/train_continuous_zoo.py) or pass "
                 "--generator tiny for a smoke run")
    try:
        where = use_device(device)
    except (RuntimeError, ValueError) as e:
        sys.exit(f"--device: {e}")
    return continuous.load(where, dtype=dtype)


# ---- phases -----------------------------------------------------------------------------------------------------
def speed(bundle, ms, batch: int, base: LoopConfig, rounds: int, common: dict) -> list[dict]:
    cond = torch.arange(batch) % len(bundle.classes)
    built = [build(m, bundle, base) for m in ms]
    timings, results = run_methods(bundle, built, cond, rounds)
    ref = {m.label: t.median for m, t in zip(ms, timings) if m.rule is None}
    rows = []
    for m, (_, rule, config), t, res in zip(ms, built, timings, results):
        rows.append({**common, "phase": "speed", "batch": batch, "method": m.label, "drafter": m.drafter_label,
                     "rule": "target-only" if rule is None else getattr(rule, "label", rule.name),
                     "num_iter": config.num_iter, "lossless": res.lossless, "latency_s": t.as_dict(per=batch),
                     "speedup": ref["MAR K"] / t.median,
                     "speedup_vs": {k: v / t.median for k, v in ref.items()}, **stats_fields(res), "rounds": rounds})
    return rows


def generate_many(bundle, built, n: int, seed: int, chunk: int) -> tuple[torch.Tensor, object]:
    """n images (classes cycling) in chunks, chunk c with seed + c; -> (tokens [n, L, D], the last result)."""
    drafter, rule, config = built
    out, res = [], None
    for c, start in enumerate(range(0, n, chunk)):
        cond = torch.arange(start, min(n, start + chunk)) % len(bundle.classes)
        res = generate_continuous(bundle.target, cond, drafter, rule, replace(config, seed=seed + c), decode=False)
        out.append(res.tokens)
    return torch.cat(out), res


def quality(bundle, ms, base: LoopConfig, n: int, chunk: int, common: dict, done: set, out: Path) -> None:
    if all(("quality", 0, m.label) in done for m in ms):
        print("quality: done", flush=True)
        return
    ref, _ = generate_many(bundle, build(ms[0], bundle, base), n, 50_000, chunk)
    real = None
    if n >= metrics.FD_MIN_IMAGES and bundle.features is not None:
        held = bundle.heldout_images(n, seed=0, classes=torch.arange(n) % len(bundle.classes))
        real = metrics.extract_features(held, bundle.features)
    for m in ms:
        if ("quality", 0, m.label) in done:
            continue
        built = build(m, bundle, base)
        t0 = time.perf_counter()
        tokens, last = generate_many(bundle, built, n, 1000, chunk)
        stat, null = energy_test(tokens.reshape(n, -1), ref.reshape(n, -1), torch.Generator().manual_seed(0), 32, 100)
        fd = None
        if real is not None:
            pics = torch.cat([bundle.target.decode(tokens[i:i + chunk]) for i in range(0, n, chunk)])
            fd = metrics.frechet_distance(metrics.extract_features(pics, bundle.features), real)
        fr = last.stats.first_rejected
        row = {**common, "phase": "quality", "batch": 0, "method": m.label, "drafter": m.drafter_label, "images": n,
               "feature_fd": fd,
               "lossless": last.lossless, "token_energy": stat, "token_energy_null99": float(null.quantile(0.99)),
               "token_energy_p": float((null >= stat).float().mean()),
               "first_rejected_hist": torch.bincount(fr[fr >= 0], minlength=last.stats.window + 1).tolist(),
               "seconds": time.perf_counter() - t0}
        append_row(out, row)
        print(f"  quality {m.label:22s} energy {stat:.4f} (null 99% {row['token_energy_null99']:.4f}, "
              f"p {row['token_energy_p']:.2f})  FD {fd if fd is None else round(fd, 2)}", flush=True)


def acceptance(bundle, base: LoopConfig, gammas: list[int], windows: list[int], batch: int, common: dict,
               done: set, out: Path) -> None:
    """Untimed: CSpD's token acceptance vs gamma (T = 1, 42) and the exact rule's transition acceptance vs head
    window (zoo drafter, frozen drafter), one generation of `batch` images each."""
    ms = [ContinuousMethod(f"CSpD T={T:g} g={g}", "cspd", dict(CSPD, inner_temperature=T, gamma=g))
          for T in (1.0, 42.0) for g in gammas]
    ms += [ContinuousMethod(f"exact g=1 w={w}", "gaussian_chain", loop=dict(gamma=1, head_window=w)) for w in windows]
    ms += [frozen_method(w) for w in windows]
    cond = torch.arange(batch) % len(bundle.classes)
    for m in ms:
        if ("acceptance", batch, m.label) in done:
            continue
        drafter, rule, config = build(m, bundle, base)
        res = generate_continuous(bundle.target, cond, drafter, rule, replace(config, seed=2000), decode=False)
        row = {**common, "phase": "acceptance", "batch": batch, "method": m.label, "drafter": m.drafter_label,
               "head_window": config.head_window, **stats_fields(res)}
        append_row(out, row)
        print(f"  acceptance {m.label:22s} token {row['acceptance_rate']:.3f}  transition "
              f"{row['transition_acceptance']:.3f}  head calls/img {row['target_head_calls_per_image']:.0f}",
              flush=True)


# ---- plot ---------------------------------------------------------------------------------------------------------
def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed_rows = [r for r in rows if r["phase"] == "speed"]
    qual = {r["method"]: r for r in rows if r["phase"] == "quality"}
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    b1 = {r["method"]: r for r in speed_rows if r["batch"] == 1}
    key = "feature_fd" if any(q.get("feature_fd") is not None for q in qual.values()) else "token_energy"
    pts = [(b1[m]["speedup"], qual[m][key], m) for m in b1 if m in qual and qual[m].get(key) is not None]
    ar = sorted((x, y) for x, y, m in pts if m.startswith("MAR"))
    if ar:
        ax[0][0].plot(*zip(*ar), "k--", label="target-only, fewer AR steps")
    for x, y, m in pts:
        ax[0][0].scatter(x, y, marker="o" if qual[m]["lossless"] else "x")
        ax[0][0].annotate(m, (x, y), fontsize=7)
    ax[0][0].set(xlabel="speedup vs target-only at K (batch 1)", ylabel=key, title="speed vs quality")
    ax[0][0].legend(fontsize=7)
    acc = [r for r in rows if r["phase"] == "acceptance"]
    for prefix, field, x in (("CSpD T=1 ", "acceptance_rate", "gamma"), ("CSpD T=42", "acceptance_rate", "gamma"),
                             ("exact g=1 w", "transition_acceptance", "head_window"),
                             ("exact frozen", "transition_acceptance", "head_window")):
        sel = sorted((r[x], r[field]) for r in acc if r["method"].startswith(prefix))
        if sel:
            ax[0][1].plot(*zip(*sel), "o-", label=f"{prefix.strip()} ({field.replace('_', ' ')} vs {x})")
    ax[0][1].set(xscale="log", xlabel="gamma (CSpD) / head window (exact)", ylabel="acceptance",
                 title="acceptance vs gamma and head window (batch 8)")
    ax[0][1].legend(fontsize=7)
    for m in dict.fromkeys(r["method"] for r in speed_rows):
        sel = sorted((r["batch"], r["speedup"]) for r in speed_rows if r["method"] == m)
        ax[1][0].plot(*zip(*sel), "o-", label=m)
    ax[1][0].set(xscale="log", xlabel="batch", ylabel="speedup vs target-only at K", title="speedup vs batch")
    ax[1][0].legend(fontsize=6)
    names, bottom = list(b1), torch.zeros(len(b1))
    for part in ("target_backbone_s", "target_head_s", "drafter_backbone_s", "drafter_head_s"):
        vals = torch.tensor([b1[m][part] for m in names])
        ax[1][1].bar(range(len(names)), vals, bottom=bottom, label=part)
        bottom += vals
    ax[1][1].set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=6)
    ax[1][1].set(ylabel="seconds per image", title="where the time goes (batch 1)")
    ax[1][1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_continuous")
    p.add_argument("--generator", choices=("zoo", "tiny"), default="zoo")
    p.add_argument("--smoke", action="store_true", help="batches 1 and 2, 1 round, 5 methods, 4 quality images")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--gammas", default="2,4,8", help="CSpD gammas")
    p.add_argument("--exact-gammas", default="1,2,4", help="the exact rule with the zoo drafter")
    p.add_argument("--frozen-windows", default="2,4", help="the exact rule with the frozen drafter: head windows")
    p.add_argument("--acceptance-gammas", default="2,4,8", help="untimed acceptance phase: CSpD gammas")
    p.add_argument("--acceptance-windows", default="1,2,4,8", help="untimed acceptance phase: exact head windows")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quality-images", type=int, default=256)
    p.add_argument("--chunk", type=int, default=64, help="images per call in the quality phase")
    p.add_argument("--cfg", type=float, default=0.0, help="guidance (0: the generator's default)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="what the MAR networks compute in (chains and densities stay float32)")
    p.add_argument("--device", default="cpu", help="where the MAR networks run: cpu, cuda, cuda:1")
    args = p.parse_args(argv)
    threads = set_threads(args.threads)
    torch.set_grad_enabled(False)
    bundle = load_generator(args.generator, args.dtype, args.device)
    base = LoopConfig(num_iter=bundle.num_iter, cfg=args.cfg or bundle.cfg_scale)
    if args.smoke:
        ms = methods([4], [1], [0.5], [4])
        batches, rounds, n_quality = [1, 2], 1, 4
    else:
        ints = lambda text: [int(v) for v in text.split(",") if v]
        ms = methods(ints(args.gammas), ints(args.exact_gammas), [0.5, 0.25], ints(args.frozen_windows))
        batches, rounds, n_quality = [int(b) for b in args.batches.split(",")], args.rounds, args.quality_images
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "rows.jsonl"
    common = {"generator": args.generator, "device": str(bundle.target.device), "threads": threads,
              "dtype": args.dtype,
              "cfg": base.cfg, "temperature": base.temperature, "K": base.num_iter,
              "head_steps": bundle.target.num_steps, "tokens_per_image": bundle.target.num_tokens}
    done = {(r["phase"], r["batch"], r["method"]) for r in read_rows(out)} if out.exists() else set()
    for batch in batches:
        if all(("speed", batch, m.label) in done for m in ms):
            print(f"speed, batch {batch}: done", flush=True)
            continue
        t0 = time.perf_counter()
        for row in speed(bundle, ms, batch, base, rounds, common):
            if ("speed", batch, row["method"]) not in done:
                append_row(out, row)
            print(f"  batch {batch:3d} {row['method']:22s} {row['latency_s']['median_s'] * 1e3:8.1f} ms/img  "
                  f"speedup {row['speedup']:.2f}x  MAL {row['mean_accepted_length']:.2f}  "
                  f"acc {row['acceptance_rate']:.2f} / trans {row['transition_acceptance']:.2f}", flush=True)
        print(f"speed, batch {batch}: {time.perf_counter() - t0:.0f} s", flush=True)
    if not args.smoke:
        ints = lambda text: [int(v) for v in text.split(",") if v]
        acceptance(bundle, base, ints(args.acceptance_gammas), ints(args.acceptance_windows), 8, common, done, out)
    quality(bundle, ms, base, n_quality, min(args.chunk, n_quality), common, done, out)
    plot(read_rows(out), args.out / "speed_quality.png")
    print(f"wrote {out} and {args.out / 'speed_quality.png'}")


if __name__ == "__main__":
    main()
