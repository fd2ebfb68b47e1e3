"""`specdec demo | certify | bench | report`: argument parsing and dispatch only.

The commands' bodies live with their concern: `specdec.demo.run_demo`, `specdec.certify.certify_command`,
`specdec.bench.command.bench_command`, `specdec.report.report_command`. Here numeric options are checked before
anything runs, and every error becomes one line saying what is wrong and what to do (exit status 2); Ctrl-C says how
to continue (exit status 130).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from specdec.bench.config import BenchConfigError, preset_names
from specdec.bench.command import bench_command
from specdec.certify import certify_command
from specdec.compiled import TARGET_COMPILE
from specdec.demo import DemoError, run_demo
from specdec.precision import DTYPES
from specdec.report import report_command


class UsageError(SystemExit):
    """A bad command line: `str(error)` is the one-line message; the console script exits with status 2."""


def check_range(name: str, value, lo=None, hi=None, what: str = "") -> None:
    """UsageError unless lo <= value <= hi (either bound may be None); `what` says what the option means."""
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
        raise UsageError(f"specdec: {name} must be {span}{what}, got {value}")


def _json_params(text: str) -> dict:
    """--params: a JSON object of parameter names -> dict ({} when empty); UsageError otherwise."""
    try:
        params = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise UsageError(f"specdec: --params is not JSON ({e.msg}); write e.g. --params '{{\"delta\": 0.1}}'")
    if not isinstance(params, dict):
        raise UsageError(f"specdec: --params must be a JSON object of parameter names, e.g. '{{\"delta\": 0.1}}'; "
                         f"got {text}")
    return params


def demo_cmd(args) -> int:
    check_range("--per-class", args.per_class, 0, what=" (0 = the default)")
    check_range("--repeats", args.repeats, 0, what=" (0 = the default)")
    check_range("--threads", args.threads, 0, what=" (0 = the physical cores)")
    check_range("--fd-real", args.fd_real, 2)
    try:
        classes = [int(c) if c.isdigit() else c for c in (c.strip() for c in args.classes.split(",")) if c]
        if args.video and args.continuous:
            raise UsageError("specdec: --video and --continuous are two different demos; pass one of them")
        if args.continuous and args.dtype not in (None, "float32"):
            raise UsageError("specdec: the continuous demo computes in float32 only; drop --dtype (or use it with "
                             "the image or --video demo)")
        if args.compile not in (None, "off") and (args.video or args.continuous):
            raise UsageError("specdec: --compile applies to the image demo only; drop it for --video or "
                             "--continuous")
        if args.continuous:
            from specdec.continuous_demo import run_continuous_demo
            return run_continuous_demo(args.out if args.out != "specdec-demo" else "specdec-demo-continuous",
                                       quick=args.quick, classes=classes or None, per_class=args.per_class,
                                       seed=args.seed, temperature=args.temperature, cfg=args.cfg,
                                       repeats=args.repeats, fd_real=args.fd_real, threads=args.threads,
                                       device=args.device)
        if args.video:
            from specdec.video_demo import run_video_demo
            return run_video_demo(args.out if args.out != "specdec-demo" else "specdec-demo-video",
                                  quick=args.quick, classes=classes or None, per_class=args.per_class,
                                  seed=args.seed, temperature=args.temperature, top_k=args.top_k, cfg=args.cfg,
                                  repeats=args.repeats, fd_real=args.fd_real, threads=args.threads,
                                  dtype=args.dtype, device=args.device)
        return run_demo(args.out, quick=args.quick, classes=classes or None,
                        per_class=args.per_class, seed=args.seed, temperature=args.temperature, top_k=args.top_k,
                        cfg=args.cfg, repeats=args.repeats, fd_real=args.fd_real, threads=args.threads,
                        rule=args.rule or None, rule_params=_json_params(args.params), dtype=args.dtype,
                        device=args.device, compile=args.compile)
    except DemoError as e:
        raise UsageError(f"specdec: {e}")


def certify_cmd(args) -> int:
    check_range("--vocab", args.vocab, 2, what=" (tokens of the random pairs)")
    check_range("--samples", args.samples, 100, what=" (Monte Carlo samples per pair)")
    check_range("--zoo", args.zoo, 0, 4096, " (real pairs; 0 = random pairs instead)")
    params = _json_params(args.params)
    try:
        text = certify_command(args.rule, params, vocab=args.vocab, n_samples=args.samples, zoo=args.zoo,
                               cfg=args.cfg)
    except ValueError as e:
        raise UsageError(f"specdec: {e}")
    print(text)
    return 0


def bench_cmd(args) -> int:
    check_range("--repeats", args.repeats, 0, what=" (0 = the config's)")
    check_range("--max-rows", args.max_rows, 0, what=" (0 = no limit)")
    check_range("--threads", args.threads, 0, what=" (0 = the physical cores)")
    try:
        return bench_command(args.config, args.preset, out=args.out, repeats=args.repeats, max_rows=args.max_rows,
                             dry_run=args.dry_run, progress=not args.no_progress, threads=args.threads,
                             dtype=args.dtype, compile=args.compile, device=args.device, redo=args.redo)
    except BenchConfigError as e:
        raise UsageError(f"specdec bench: {e}")


def report_cmd(args) -> int:
    try:
        return report_command(args.results, args.out, heatmaps=args.heatmaps.split(",") if args.heatmaps else None)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"specdec report: {e}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="specdec", description="speculative decoding for AR image generators")
    sub = ap.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="plain AR vs speculative decoding on the embedded default model")
    d.add_argument("--quick", action="store_true", help="small settings, under a minute on 2 CPU cores")
    d.add_argument("--video", action="store_true", help="the video zoo: clips.gif, per-frame acceptance, table.json "
                                                        "(default folder ./specdec-demo-video)")
    d.add_argument("--continuous", action="store_true", help="the continuous-token (MAR) zoo: target-only MAR, CSpD "
                   "and the exact rule; samples.png, table.json (default folder ./specdec-demo-continuous)")
    d.add_argument("--out", default="specdec-demo", help="output folder (default: ./specdec-demo)")
    d.add_argument("--classes", default="", help="comma-separated class names or ids (default: the first few)")
    d.add_argument("--per-class", type=int, default=0)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--temperature", type=float, default=1.0)
    d.add_argument("--top-k", type=int, default=0)
    d.add_argument("--cfg", type=float, default=3.0)
    d.add_argument("--repeats", type=int, default=0, help="latency rounds (default 3 quick, 5 full)")
    d.add_argument("--threads", type=int, default=0, help="torch threads (default 0: the physical cores)")
    d.add_argument("--rule", default="", help="add a row with this rule over the model drafter: a name, "
                                              "module:Class or path/to/file.py:Class")
    d.add_argument("--params", default="", help='JSON parameters of --rule, e.g. \'{"delta": 0.1}\'')
    d.add_argument("--fd-real", type=int, default=256, help="held-out real crops for the Frechet distance")
    d.add_argument("--dtype", default=None, choices=tuple(DTYPES),
                   help="what the zoo's generators compute in (default float32; bfloat16: how generators run on "
                        "accelerators, and fast on CPUs with AVX512-BF16)")
    d.add_argument("--device", default=None, help="where the generators run: cpu (default), cuda, cuda:1, mps")
    d.add_argument("--compile", default=None, choices=tuple(TARGET_COMPILE),
                   help="how the target's steps run (default off), as in specdec bench; drafters then compile their "
                        "own steps. freeze+step (with --dtype bfloat16) is the fastest on a CPU; the first run "
                        "compiles for a few minutes")
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
    b.add_argument("--dtype", default=None, choices=tuple(DTYPES),
                   help="what the generative models compute in, for every run (default: the config's [sweep] dtype, "
                        "float32 when it has none); bfloat16 is how generators run on accelerators")
    b.add_argument("--compile", default=None, choices=tuple(TARGET_COMPILE),
                   help="how the target's decode step runs, for every run (default: the config's [sweep] compile, "
                        "off when it has none): on = torch.compile, freeze = with weights pre-packed (CPU), "
                        "cuda-graphs = mode reduce-overhead (GPU), freeze+step = freeze and the engine's chain step "
                        "compiled too")
    b.add_argument("--device", default=None,
                   help="where the generators run, for every run: cpu, cuda, cuda:1, mps (default: the config's "
                        "[sweep] device, cpu when it has none); under torchrun every process takes its own GPU")
    b.add_argument("--redo", default="", metavar="PATTERN",
                   help="measure again the configurations whose label matches this pattern (e.g. '*eagle*', after "
                        "retraining a drafter); their old rows move to <out stem>.replaced.jsonl and the new rows take "
                        "their places")
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


def entry(argv=None) -> int:
    """The console script: main() with one-line errors (exit 2) and Ctrl-C (exit 130) instead of tracebacks."""
    try:
        return main(argv)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("specdec: interrupted — rerun the same command to continue (finished results are kept)",
              file=sys.stderr)
        return 130
    except BrokenPipeError:          # the reader went away (`specdec ... | head`): not an error of ours
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(entry())
