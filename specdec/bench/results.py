"""Results as JSON lines, one per finished configuration, and the plain-text table the demo and the bench print.

Each row is appended with one write() on a file opened for appending and then fsynced, so two processes never
interleave parts of lines and a kill loses at most the line being written. `repair` moves every line that is not
a row (a torn write, a corrupt edit) into `<results>.rejected` before a run; its configuration then counts as not
done and is measured again. A multi-process run writes `<out stem>.part<rank>.jsonl` per process and
`merge_parts` folds them into the results file (rows whose key is already there are not repeated).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from specdec.compiled import DEFAULT_COMPILE
from specdec.devices import DEFAULT_DEVICE
from specdec.precision import DEFAULT_DTYPE


def read_rows(path: Path) -> list[dict]:
    """Rows of a JSONL file; a torn last line (a kill mid-write) is ignored."""
    rows = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def append_row(path: Path, row: dict) -> None:
    """Append one row as one line, atomically with respect to other appending processes."""
    data = (json.dumps(row) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_row(line: str) -> bool:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(row, dict) and "key" in row


def repair(path: Path) -> int:
    """Move the lines of `path` that are not rows into `<path>.rejected` (appended, kept for inspection) and
    rewrite `path` with the rest (atomically: a temporary file renamed over it). Returns the lines moved."""
    if not path.is_file() or not path.stat().st_size:
        return 0
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    bad = [ln for ln in lines if ln.strip() and not _is_row(ln)]
    if not bad and text.endswith("\n"):
        return 0
    with open(path.with_name(path.name + ".rejected"), "a") as f:
        f.write("".join(ln + "\n" for ln in bad))
    _replace_text(path, "".join(ln + "\n" for ln in lines if ln.strip() and _is_row(ln)))
    return len(bad)


def _replace_text(path: Path, text: str) -> None:
    """Rewrite `path` atomically: a kill leaves the old file or the new one, never half of either."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def replaced_path(out: Path) -> Path:
    return out.parent / f"{out.stem}.replaced.jsonl"


def set_aside(out: Path, keys: set) -> int:
    """Move the rows of `out` whose key is in `keys` to `replaced_path(out)` (appended, so nothing measured is ever
    lost) so that a sweep measures them again. Returns the rows moved."""
    rows = read_rows(out)
    moved = [r for r in rows if r.get("key") in keys]
    if moved:
        for row in moved:
            append_row(replaced_path(out), row)
        _replace_text(out, "".join(json.dumps(r) + "\n" for r in rows if r.get("key") not in keys))
    return len(moved)


def restore_order(out: Path, keys: list) -> None:
    """Rewrite `out` with its rows in the order of `keys` (re-measured rows back where their old rows were); rows
    whose key is not listed follow in their own order."""
    rows = read_rows(out)
    place = {k: i for i, k in enumerate(keys)}
    ordered = sorted(range(len(rows)), key=lambda i: (place.get(rows[i].get("key"), len(place)), i))
    _replace_text(out, "".join(json.dumps(rows[i]) + "\n" for i in ordered))


def part_path(out: Path, process_index: int) -> Path:
    return out.parent / f"{out.stem}.part{process_index}.jsonl"


def part_files(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{out.stem}.part*.jsonl"))


def finished_keys(out: Path) -> set:
    """Keys of the rows in `out` and in its part files (an interrupted multi-process run leaves parts)."""
    done = set()
    for path in [out, *part_files(out)]:
        done |= {r.get("key") for r in read_rows(path)}
    return done


def check_results_path(path: Path) -> None:
    """ValueError, before anything is measured, when results cannot be written at `path`."""
    if path.is_dir():
        raise ValueError(f"--out {path} is a folder; give a file such as {path / 'results.jsonl'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as e:
        raise ValueError(f"cannot write results to {path} ({e.strerror}); pass --out with a writable path") from e


def merge_parts(out: Path) -> int:
    """Append rows of the part files whose keys are not in `out` yet; delete the parts. Returns rows added."""
    repair(out)
    done = {r.get("key") for r in read_rows(out)}
    added = 0
    for part in part_files(out):
        for row in read_rows(part):
            if row.get("key") not in done:
                append_row(out, row)
                done.add(row.get("key"))
                added += 1
        part.unlink()
    return added


EXECUTION_KEYS = ("dtype", "compile", "device")
EXECUTION_DEFAULTS = (DEFAULT_DTYPE, DEFAULT_COMPILE, DEFAULT_DEVICE)


def execution(run: dict) -> tuple[str, str, str]:
    """How a run (or its row) executes: (compute dtype, target compile, device), in EXECUTION_KEYS order; the
    defaults for what was written before those existed."""
    return tuple(run.get(name) or default for name, default in zip(EXECUTION_KEYS, EXECUTION_DEFAULTS))


def execution_tag(row: dict) -> str:
    """How a row ran when not the default: "bfloat16", "compiled freeze", "bfloat16 compiled on cuda:0", or ""."""
    dtype, compiled, device = execution(row)
    return " ".join(([dtype] if dtype != DEFAULT_DTYPE else []) +
                    ([f"compiled {compiled}"] if compiled != DEFAULT_COMPILE else []) +
                    ([f"on {device}"] if device != DEFAULT_DEVICE else []))


def summary_rows(rows: list[dict]) -> list[dict]:
    """Bench rows in the shape `format_table` prints; when the rows ran in more than one way (dtype, compile,
    device), each method names how, e.g. "AR [bfloat16]" or "AR [on cuda:0]"."""
    tags = [execution_tag(r) for r in rows]
    mixed = len(set(tags)) > 1
    out = []
    for r, tag in zip(rows, tags):
        method = f"{r['label']} [{tag or 'float32'}]" if mixed else r["label"]
        out.append({"method": method[:36], "rule": r["rule"], "k": int(r.get("k") or 0),
                    "mean_accepted_length": r["mean_accepted_length"] or 0.0,
                    "mean_accepted_length_se": r.get("mean_accepted_length_se"),
                    "target_forwards_per_image": r["target_forwards_per_image"] or 0.0,
                    "speedup": r["speedup"] or 0.0, "reliability": r.get("reliability"),
                    "feature_fd": r["feature_fd"] if r["feature_fd"] is not None else float("nan"),
                    "nll": r["nll"] if r["nll"] is not None else float("nan")})
    return out


def format_table(rows: list[dict]) -> str:
    """One line per method: rule, k, mean accepted length and its standard error over the images ('-' where the row
    has none), target forwards per image, speedup (with its min-max range when the row has latency rounds against
    the first row, and '!' when it is flagged unreliable), FD, NLL. A row with its own "baseline" (timed against
    something else than the first row) shows no range; a row without a mean accepted length (block routing) shows
    '-'."""
    head = (f"{'method':36s} {'rule':16s} {'k':>3s} {'MAL':>5s} {'+-':>5s} {'fwd/img':>8s} {'speedup':>8s} "
            f"{'range':>11s} {'FD':>7s} {'NLL':>6s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        fd = r.get("feature_fd")
        fd = "-" if fd is None or fd != fd else f"{fd:.2f}"
        span = ""
        if isinstance(r.get("latency_s"), dict) and rows[0].get("latency_s") and "baseline" not in r:
            base = rows[0]["latency_s"]["median_s"]
            span = f"{base / r['latency_s']['max_s']:.2f}-{base / r['latency_s']['min_s']:.2f}"
        flag = "!" if r.get("reliability") else " "
        mal = "-" if r["mean_accepted_length"] is None else f"{r['mean_accepted_length']:.2f}"
        se = "-" if r.get("mean_accepted_length_se") is None else f"{r['mean_accepted_length_se']:.2f}"
        lines.append(f"{r['method']:36s} {r['rule']:16s} {r['k']:3d} {mal:>5s} {se:>5s} "
                     f"{r['target_forwards_per_image']:8.1f} {r['speedup']:6.2f}x{flag} {span:>11s} {fd:>7s} "
                     f"{r['nll']:6.3f}")
    return "\n".join(lines)
