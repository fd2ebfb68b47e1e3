"""`specdec demo | certify | bench | report`: argument parsing and dispatch only.

The commands' bodies live with their concern: `specdec.demo.run_demo`, `specdec.certify.certify_command`,
`specdec.bench.runner.bench_command`, `specdec.report.report_command`. Here their errors become one-line exits.
"""
from __future__ import annotations

import argparse
import json
import sys

from specdec.bench.config import BenchConfigError, preset_names
from specdec.bench.runner import bench_command
from specdec.certify import certify_command
from specdec.demo import DemoError, run_demo
from specdec.report import report_command


def demo_cmd(args) -> int:
    try:
        return run_demo(args.out, quick=args.quick, classes=args.classes.split(",") if args.classes else None,
                        per_class=args.per_class, seed=args.seed, temperature=args.temperature, top_k=args.top_k,
                        cfg=args.cfg, repeats=args.repeats, fd_real=args.fd_real, threads=args.threads)
    except DemoError as e:
        raise SystemExit(f"specdec: {e}")


def certify_cmd(args) -> int:
    params = json.loads(args.params) if args.params else {}
    try:
        text = certify_command(args.rule, params, vocab=args.vocab, n_samples=args.samples, zoo=args.zoo,
                               cfg=args.cfg)
    except ValueError as e:
        raise SystemExit(f"specdec: {e}")
    print(text)
    return 0


def bench_cmd(args) -> int:
    try:
        return bench_command(args.config, args.preset, out=args.out, repeats=args.repeats, max_rows=args.max_rows,
                             dry_run=args.dry_run, progress=not args.no_progress, threads=args.threads)
    except BenchConfigError as e:
        raise SystemExit(f"specdec bench: {e}")


def report_cmd(args) -> int:
    try:
        return report_command(args.results, args.out, heatmaps=args.heatmaps.split(",") if args.heatmaps else None)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"specdec report: {e}")


def parser() -> argparse.ArgumentParser:
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
    d.add_argument("--repeats", type=int, default=0, help="latency rounds (default 3 quick, 5 full)")
    d.add_argument("--threads", type=int, default=0, help="torch threads (default 0: the physical cores)")
    d.add_argument("--fd-real", type=int, default=256, help="held-out real crops for the Frechet distance")
    d.set_defaults(func=demo_cmd)

    c = sub.add_parser("certify", help="estimate what a rule does to the output distribution")
    c.add_argument("rule")
    c.add_argument("--params", default="", help='JSON, e.g. \'{"delta": 0.1}\'')
    c.add_argument("--vocab", type=int, default=8, help="vocabulary of the random (p, q) pairs")
    c.add_argument("--samples", type=int, default=40_000, help="Monte Carlo samples per pair")
    c.add_argument("--zoo", type=int, default=0, metavar="N",
                   help="certify on N real (p, q) pairs from the zoo's target and drafter instead")
    c.add_argument("--cfg", type=float, default=3.0, help="CFG scale of the zoo pairs")
    c.set_defaults(func=certify_cmd)

    b = sub.add_parser("bench", help="speedup-vs-quality sweep -> JSON lines (resumable, multi-process)")
    b.add_argument("config", nargs="?", default=None, help="TOML config (or use --preset)")
    b.add_argument("--preset", default=None, help="a built-in config: " + ", ".join(preset_names()))
    b.add_argument("--out", default="", help="results JSONL (default: specdec-bench/<config name>.jsonl)")
    b.add_argument("--repeats", type=int, default=0, help="override the config's timing repeats")
    b.add_argument("--max-rows", type=int, default=0, help="stop after this many new rows (resume later)")
    b.add_argument("--dry-run", action="store_true", help="list the configurations and exit")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--threads", type=int, default=0, help="torch threads (default 0: the physical cores)")
    b.set_defaults(func=bench_cmd)

    r = sub.add_parser("report", help="plots + Markdown table from bench JSON lines")
    r.add_argument("results", help="a results JSONL written by `specdec bench`")
    r.add_argument("--out", default="specdec-report", help="output folder")
    r.add_argument("--heatmaps", default="", help="comma-separated labels or keys for acceptance heatmaps "
                                                   "(default: the fastest configuration of each family)")
    r.set_defaults(func=report_cmd)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
