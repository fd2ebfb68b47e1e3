"""`specdec demo | generate | certify | bench | report`."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specdec.sampling import Sampling


@dataclass(frozen=True)
class Method:
    """One decoding configuration: a drafter (None = plain AR) and a rule, by registry name."""

    label: str
    drafter: str | None = None
    drafter_params: dict = field(default_factory=dict)
    rule: str = "exact"
    rule_params: dict = field(default_factory=dict)


DEMO_METHODS = (
    Method("AR"),
    Method("exact + model k=4", "model", {"k": 4}),
    Method("lantern d=0.1 + model k=4", "model", {"k": 4}, "lantern", {"k": 100, "delta": 0.1}),
    Method("bounded_lantern d=0.1 + model k=4", "model", {"k": 4}, "bounded_lantern", {"k": 100, "delta": 0.1}),
    Method("exact + jacobi w=16", "jacobi", {"window": 16, "init": "random"}),
    Method("exact + lookup k=4", "lookup", {"k": 4}),
)
QUICK_METHODS = DEMO_METHODS[:3]


def build(method: Method, bundle):
    """(drafter, rule) for a method on a zoo bundle."""
    from specdec.registry import make_drafter, make_rule

    drafter = None
    if method.drafter is not None:
        drafter = make_drafter(method.drafter, bundle.drafter_model, **method.drafter_params)
    return drafter, make_rule(method.rule, bundle.target, **method.rule_params)


def available(methods, bundle) -> list[Method]:
    """Keep the methods whose rule and drafter exist in this install (optional pieces may be absent)."""
    keep = []
    for m in methods:
        try:
            build(m, bundle)
            keep.append(m)
        except (ImportError, AttributeError):
            continue
    return keep


def run_method(bundle, method: Method, cond, sampling, seed, repeats):
    """Median wall-clock over repeats; the result of the last repeat (all repeats are identical for a seed)."""
    import specdec

    times, res = [], None
    for _ in range(repeats):
        drafter, rule = build(method, bundle)
        t0 = time.perf_counter()
        res = specdec.generate(bundle.target, cond, drafter=drafter, rule=rule, sampling=sampling, seed=seed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), res


def check_out_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"specdec: cannot create output folder {out}: {e.strerror}; pass --out with a writable path")
    if not os.access(out, os.W_OK):
        raise SystemExit(f"specdec: output folder {out} is not writable; pass --out with a writable path")
    return out


def demo(args) -> int:
    import specdec
    from specdec import metrics
    from specdec.plots import acceptance_heatmaps, image_grid

    torch.set_grad_enabled(False)
    out = check_out_dir(args.out)
    bundle = specdec.zoo.load()
    names = args.classes.split(",") if args.classes else list(bundle.classes[: (3 if args.quick else 6)])
    try:
        class_ids = [bundle.class_id(n) for n in names]
    except ValueError as e:
        raise SystemExit(f"specdec: {e}")
    per_class = args.per_class or (2 if args.quick else 4)
    cond = torch.tensor([c for c in class_ids for _ in range(per_class)])
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, cfg_scale=args.cfg)
    repeats = args.repeats or (1 if args.quick else 3)
    methods = available(QUICK_METHODS if args.quick else DEMO_METHODS, bundle)
    print(f"specdec demo: {len(methods)} methods x {len(cond)} images ({', '.join(names)}), {sampling}, "
          f"seed {args.seed}, median of {repeats}", flush=True)

    # warm-up outside the timings, then every method through the same generate() in this process
    specdec.generate(bundle.target, cond[:2], sampling=sampling, seed=args.seed)
    # held-out crops of the same classes, in the same proportions as the samples
    real = bundle.heldout_images(args.fd_real, seed=0, classes=cond[torch.arange(args.fd_real) % len(cond)])
    real_feats = metrics.extract_features(real, bundle.features)
    rows, images, maps = [], [], []
    from tqdm.auto import tqdm

    for method in tqdm(methods, desc="methods", disable=not sys.stderr.isatty()):
        wall, res = run_method(bundle, method, cond, sampling, args.seed, repeats)
        fd = metrics.frechet_distance(metrics.extract_features(res.images, bundle.features), real_feats)
        nll = float(metrics.token_nll(bundle.target_gpt, res.tokens, cond).mean())
        st = res.stats
        rows.append({"method": method.label, "drafter": method.drafter or "-", "rule": method.rule,
                     "k": method.drafter_params.get("k", method.drafter_params.get("window", 0)),
                     "mean_accepted_length": st.mean_accepted_length, "acceptance_rate": st.acceptance_rate,
                     "target_forwards_per_image": st.target_forwards_per_image, "wall_s": wall,
                     "feature_fd": fd, "nll": nll, "images": len(cond), "repeats": repeats})
        images.append(res.images)
        maps.append(st.acceptance_map.float().mean(0).reshape(bundle.target.grid))
    ar_wall = rows[0]["wall_s"]
    for r in rows:
        r["speedup"] = ar_wall / r["wall_s"]
    meta = {"sampling": vars(sampling) if hasattr(sampling, "__dict__") else str(sampling), "seed": args.seed,
            "classes": names, "device": "cpu", "dtype": "float32", "threads": torch.get_num_threads(),
            "fd_real_images": args.fd_real, "fd_metric": "Frechet distance in the zoo feature net's space"}
    (out / "table.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    image_grid(images, [r["method"] for r in rows], out / "samples.png")
    acceptance_heatmaps(maps[1:], [r["method"] for r in rows[1:]], out / "acceptance.png")
    print(format_table(rows))
    print(f"\nwrote {out / 'samples.png'}, {out / 'acceptance.png'}, {out / 'table.json'}")
    return 0


def format_table(rows) -> str:
    head = f"{'method':36s} {'rule':16s} {'k':>3s} {'MAL':>5s} {'fwd/img':>8s} {'speedup':>8s} {'FD':>7s} {'NLL':>6s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:36s} {r['rule']:16s} {r['k']:3d} {r['mean_accepted_length']:5.2f} "
                     f"{r['target_forwards_per_image']:8.1f} {r['speedup']:7.2f}x {r['feature_fd']:7.2f} "
                     f"{r['nll']:6.3f}")
    return "\n".join(lines)


def zoo_pairs(bundle, n_positions: int, sampling: Sampling, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Real (p, q) pairs [n_positions, V]: target and drafter distributions at positions of AR samples."""
    import specdec
    from specdec.sampling import to_probs

    g = torch.Generator().manual_seed(seed)
    cond = torch.arange(len(bundle.classes))
    tokens = specdec.generate(bundle.target, cond, sampling=sampling, seed=seed, decode=False).tokens
    null = torch.full_like(cond, len(bundle.classes))

    def probs(model):
        uncond = model.forward_train(tokens, null) if sampling.uses_cfg else None
        return to_probs(model.forward_train(tokens, cond), uncond, sampling)

    p, q = probs(bundle.target_gpt), probs(bundle.drafter_gpt)
    pick = torch.randperm(p.shape[0] * p.shape[1], generator=g)[:n_positions]
    return p.reshape(-1, p.shape[-1])[pick], q.reshape(-1, q.shape[-1])[pick]


def certify_cmd(args) -> int:
    from specdec import certify
    from specdec.registry import GEOMETRY_RULES, make_rule, resolve

    params = json.loads(args.params) if args.params else {}
    torch.set_grad_enabled(False)
    try:
        if args.zoo:
            import specdec

            bundle = specdec.zoo.load()
            rule = make_rule(args.rule, bundle.target, **params)
            p, q = zoo_pairs(bundle, args.zoo, Sampling(cfg_scale=args.cfg))
            print(certify.certify_on(rule, p, q, n_samples=args.samples, name=f"zoo cfg={args.cfg}"))
            if hasattr(rule, "single_step_law"):
                (point,) = certify.tv_sweep({args.rule: rule}, p, q)
                print(f"  exact single-step law (no sampling noise): acc={point.acceptance:.4f} "
                      f"TVD mean={point.mean_tvd:.4f} max={point.max_tvd:.4f} "
                      f"(frontier sum min(p,q)+TVD = {point.frontier:.4f})")
            return 0
        if args.rule in GEOMETRY_RULES:
            rule = resolve("rule", args.rule)(certify.default_geometry(args.vocab), **params)
        else:
            rule = make_rule(args.rule, **params)
    except ValueError as e:
        raise SystemExit(f"specdec: {e}")
    print(certify.certify(rule, V=args.vocab, n_samples=args.samples))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="specdec", description="speculative decoding for AR image generators")
    sub = ap.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="plain AR vs speculative decoding on the embedded default model")
    d.add_argument("--quick", action="store_true", help="small settings, under a minute on 2 CPU cores")
    d.add_argument("--out", default="specdec-demo", help="output folder (default: ./specdec-demo)")
    d.add_argument("--classes", default="", help="comma-separated class names (default: the first few)")
    d.add_argument("--per-class", type=int, default=0)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--temperature", type=float, default=1.0)
    d.add_argument("--top-k", type=int, default=0)
    d.add_argument("--cfg", type=float, default=3.0)
    d.add_argument("--repeats", type=int, default=0, help="timing repeats (default 1 quick, 3 full)")
    d.add_argument("--fd-real", type=int, default=256, help="held-out real crops for the Frechet distance")
    d.set_defaults(func=demo)

    c = sub.add_parser("certify", help="estimate what a rule does to the output distribution")
    c.add_argument("rule")
    c.add_argument("--params", default="", help='JSON, e.g. \'{"delta": 0.1}\'')
    c.add_argument("--vocab", type=int, default=8, help="vocabulary of the random (p, q) pairs")
    c.add_argument("--samples", type=int, default=40_000, help="Monte Carlo samples per pair")
    c.add_argument("--zoo", type=int, default=0, metavar="N",
                   help="certify on N real (p, q) pairs from the zoo's target and drafter instead")
    c.add_argument("--cfg", type=float, default=3.0, help="CFG scale of the zoo pairs")
    c.set_defaults(func=certify_cmd)

    from specdec.bench import add_subcommands

    add_subcommands(sub)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
