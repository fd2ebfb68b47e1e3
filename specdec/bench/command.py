"""`specdec bench` as a function: a config (file or preset) with the command line's overrides -> a sweep, then the
summary table of its rows. The argument parsing itself lives in `specdec.cli`."""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import sys
from pathlib import Path

from specdec.bench.config import BenchConfigError, parse_config, read_config
from specdec.bench.results import check_results_path, format_table, read_rows, summary_rows
from specdec.bench.runner import Abort, processes, run_bench
from specdec.bench.stale import installed_weights, stale_note
from specdec.bench.timing import set_threads


def bench_command(config: str | None = None, preset: str | None = None, out: str = "", repeats: int = 0,
                  max_rows: int = 0, dry_run: bool = False, progress: bool = True, threads: int = 0,
                  dtype: str | None = None, compile: str | None = None, device: str | None = None,
                  redo: str = "") -> int:
    """`specdec bench`: list (dry_run) or run a config's configurations, then print the summary table of its rows.

    out: results JSONL (default specdec-bench/<config name>.jsonl); repeats / max_rows: 0 = the config's / no limit;
    threads: torch threads, 0 = the physical cores (recorded in every row); dtype: what the generative models
    compute in for every run, replacing the config's [sweep] dtype (None = the config's); compile: the same for
    how the target's step runs (specdec.compiled.TARGET_COMPILE); device: the same for where it runs
    (specdec.devices); redo: a label pattern (fnmatch, e.g. "*eagle*"): the configurations it matches are measured
    again and their old rows kept in `<out stem>.replaced.jsonl` (an interrupted redo continues without it).
    Raises BenchConfigError for a bad config; an Abort (max_rows) is reported and ends the command normally."""
    raw = read_config(config, preset)
    for name, value in (("dtype", dtype), ("compile", compile), ("device", device)):
        if value:
            raw["sweep"] = {**raw.get("sweep", {}), name: [value]}
    cfg = parse_config(raw)
    try:
        set_threads(threads)
    except ValueError as e:
        raise BenchConfigError(str(e)) from e
    if repeats:
        cfg = dataclasses.replace(cfg, repeats=repeats)
    path = Path(out) if out else Path("specdec-bench") / f"{cfg.name}.jsonl"
    if not dry_run:
        try:
            check_results_path(path)
        except ValueError as e:
            raise BenchConfigError(str(e)) from e
    again = {r["key"] for r in cfg.runs if fnmatch.fnmatchcase(r["label"], redo)} if redo else set()
    if redo and not again:
        labels = ", ".join(sorted({r["label"] for r in cfg.runs}))
        raise BenchConfigError(f"--redo {redo!r} matches no configuration's label; labels: {labels}")
    if dry_run:
        for r in cfg.runs:
            print(r["key"], r["generator"], r["label"], json.dumps(r["sampling"]), f"batch={r['batch']}",
                  f"seed={r['seed']}", *(["(redo)"] if r["key"] in again else []))
        print(f"{len(cfg.runs)} configurations")
        return 0
    try:
        run_bench(cfg, path, max_rows=max_rows or None, progress=progress, redo=again)
    except Abort as e:
        print(f"specdec bench: {e}; rerun{' without --redo' if redo else ''} to continue", file=sys.stderr)
        return 0
    if processes().is_main:
        keys = {x["key"] for x in cfg.runs}
        rows = [r for r in read_rows(path) if r.get("key") in keys]
        print(format_table(summary_rows(rows)))
        print(f"\n{len(rows)} rows in {path}")
        if any(r.get("weights") for r in rows):
            note = stale_note(rows, installed_weights())
            if note:
                print(note)
    return 0
