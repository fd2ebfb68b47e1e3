"""`specdec bench`: speedup-vs-quality sweeps over generators x methods x sampling x seeds, as JSON lines.

One concern per module:
  config.py      the TOML schema, its validation and expansion into configurations, their keys and labels, presets
  generators.py  generators by name (the zoo, a tiny random stand-in) and user scorers ("module:callable")
  methods.py     a drafter + rule by registry name (`Method`), built once per configuration
  timing.py      interleaved rounds, min / median / max and spread, the count bound and the unreliable flag
  runner.py      measuring a configuration into a row, running a sweep (resumable, split across processes)
  command.py     `specdec bench` as a function: overrides, dry run, redo, the printed summary
  stale.py       rows measured with other weights than the installed ones (which cards changed, for which rows)
  results.py     JSON-lines read / append / torn-tail repair / merge of part files / rows set aside for a redo,
                 the printed summary table

The command line lives in `specdec.cli` (`specdec bench ...`); figures and the Markdown table in `specdec.report`.
"""
from __future__ import annotations

from specdec.bench.config import (BenchConfig, BenchConfigError, config_key, family, load_config, parse_config,
                                  preset_names, read_config)
from specdec.bench.generators import GENERATORS, MeanBrightness, Scorer, load_generator, load_scorer
from specdec.bench.methods import DEMO_METHODS, QUICK_METHODS, Method, available, build_method
from specdec.bench.results import format_table, merge_parts, read_rows, summary_rows
from specdec.bench.timing import Timing, count_bound, interleaved_rounds, reliability, step_costs
from specdec.bench.runner import Abort, distortion_bound, measure_row, metric_names, run_bench
from specdec.bench.command import bench_command

__all__ = ["Abort", "BenchConfig", "BenchConfigError", "DEMO_METHODS", "GENERATORS", "MeanBrightness", "Method",
           "QUICK_METHODS", "Scorer", "available", "bench_command", "build_method", "config_key", "distortion_bound",
           "family", "format_table", "load_config", "load_generator", "load_scorer", "measure_row",
           "merge_parts", "metric_names", "parse_config", "preset_names", "read_config", "read_rows", "run_bench",
           "summary_rows", "Timing", "count_bound", "interleaved_rounds", "reliability", "step_costs"]

