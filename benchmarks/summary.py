"""The final table of a GPU session (benchmarks/gpu_session.sh): every ratio measured, and the GPU test results.

    python benchmarks/summary.py merge OUT.json IN.json ...      # one stage's runs -> one records file
    python benchmarks/summary.py table FOLDER [--junit FILE] [--md FILE]

`merge` joins the records of several runs of one stage (e.g. the bench runs of each training path) into one
file of the dla_fast-bench format; missing or unreadable inputs are named on stderr and skipped, and nothing is
written when no input has records. `table` reads every records file in FOLDER and prints, per file and per case
(op, mode, dtype, shape), each row's ratio against each baseline measured in the case (eager, torch.compile,
torchvision, ...): the baseline's median time / the row's (above 1: the row is faster), in brackets the range
over both p20-p80 ranges, and "within noise" where those ranges overlap (dla_fast.cli.timing.Ratio). Rows that
an issue set a target for say whether it is met. With --junit (pytest's --junitxml file) it first prints the
GPU tests' counts and the failed tests.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import xml.etree.ElementTree as ElementTree
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if TYPE_CHECKING:
    from common import BenchRecord

# `merge` reads and writes the JSON as it is, without importing torch (it runs after every stage of a GPU session,
# where an import of torch would cost seconds each time); the records format is dla_fast.cli.records'.
FORMAT_PREFIX = "dla_fast-bench/"

# Speed targets of the issues (issue 18, "Done when"): (op, mode, batch or None, baseline) -> least ratio of a
# dla_fast row against that baseline.
TARGETS: Dict[Tuple[str, str, Optional[int], str], float] = {
    ("dla34", "train_step", 256, "eager"): 1.4,
    ("dla34", "train_step", 256, "compile"): 1.1,
    ("centernet_dla34", "inference", 16, "eager"): 2.0,
    ("centernet_dla34", "train_step", 16, "eager"): 1.5,
    ("deform_conv2d", "inference", 16, "torchvision_autocast"): 4.0,
    ("deform_conv2d", "training", 16, "torchvision_autocast"): 3.0,
}


def plain_provider(name: str) -> str:
    """'dla_fast[triton]_channels_last' -> 'dla_fast[triton]': the provider without its layout suffix."""
    return name[: -len("_channels_last")] if name.endswith("_channels_last") else name


def _batch(record: "BenchRecord") -> Optional[int]:
    batch = record.extra.get("batch")
    if batch is None and isinstance(record.shape, dict):
        batch = record.shape.get("batch")
    if batch is None and isinstance(record.shape, (list, tuple)) and record.shape:
        batch = record.shape[0]
    return batch


def target_of(record: "BenchRecord", baseline: "BenchRecord") -> Optional[float]:
    """The issue's target ratio for a dla_fast row against `baseline`, or None."""
    if not plain_provider(record.provider).startswith("dla_fast"):
        return None
    return TARGETS.get((record.op, record.mode, _batch(record), plain_provider(baseline.provider)))


def merge(out: str, inputs: Sequence[str]) -> int:
    """Write the records of `inputs` (files of one format version) to `out`; returns how many were written."""
    records: List[dict] = []
    formats = set()
    for path in inputs:
        try:
            with open(path) as f:
                data = json.load(f)
            if not isinstance(data, dict) or not str(data.get("format", "")).startswith(FORMAT_PREFIX):
                raise ValueError("not a dla_fast benchmark file")
        except (OSError, ValueError) as e:
            print(f"summary.py: skipped {path}: {e}", file=sys.stderr)
            continue
        formats.add(data["format"])
        records += data.get("records", [])
    if len(formats) > 1:
        raise ValueError(f"the inputs have different formats: {', '.join(sorted(formats))}")
    if records:
        with open(out, "w") as f:
            json.dump({"format": formats.pop(), "records": records}, f, indent=1)
            f.write("\n")
    return len(records)


def ratio_rows(file_name: str, records: Sequence["BenchRecord"]) -> List[List[str]]:
    """One row per (record, baseline of its case), in the order the records were written; a baseline row is
    compared with the baselines written before it."""
    from dla_fast.cli.timing import Ratio
    from report import case_key, shape_label

    baselines: Dict[tuple, List["BenchRecord"]] = {}
    for r in records:
        if r.baseline:
            baselines.setdefault(case_key(r), []).append(r)
    rows = []
    for r in records:
        references = baselines.get(case_key(r), [])
        if r.baseline:  # a baseline against those measured before it only (compile vs eager, not eager vs compile)
            references = references[:next(i for i, b in enumerate(references) if b is r)]
        for reference in references:
            counts = [x.extra.get("iters") for x in (r, reference)]
            ratio = Ratio.of(r, reference, samples=None if None in counts else min(counts))
            target = target_of(r, reference)
            verdict = "" if target is None else f"{'met' if ratio.median >= target else 'NOT met'} (>= {target:g}x)"
            case = r.extra.get("case") or shape_label(r.shape)
            rows.append([file_name, r.op, r.mode.replace("_", " "), r.dtype, case, plain_provider(r.provider),
                         plain_provider(reference.provider), f"{ratio.median:.2f}x",
                         f"{ratio.low:.2f}-{ratio.high:.2f}", ratio.verdict, verdict])
    return rows


def load_folder(folder: str) -> List[Tuple[str, List["BenchRecord"]]]:
    """(file name without .json, records) of every records file in `folder`; other JSON files are skipped."""
    from common import read_records

    runs = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        try:
            records = read_records(path)
        except (ValueError, KeyError, TypeError, OSError) as e:
            print(f"summary.py: skipped {path}: {e}", file=sys.stderr)
            continue
        if records:
            runs.append((os.path.splitext(os.path.basename(path))[0], records))
    return runs


def test_report(junit_path: str) -> List[str]:
    """Lines saying how many GPU tests passed, failed, errored and were skipped, and which failed."""
    try:
        root = ElementTree.parse(junit_path).getroot()
    except (OSError, ElementTree.ParseError) as e:
        return [f"GPU tests: no result file ({junit_path}: {e})"]
    counts = dict(passed=0, failed=0, errors=0, skipped=0)
    failed = []
    for case in root.iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), None)
        key = {"failure": "failed", "error": "errors", "skipped": "skipped"}.get(outcome, "passed")
        counts[key] += 1
        if outcome in ("failure", "error"):
            failed.append(f"  {outcome}: {case.get('classname', '')}::{case.get('name', '')}")
    total = sum(counts.values())
    return [f"GPU tests: {total} run: " + ", ".join(f"{v} {k}" for k, v in counts.items())] + failed


def table(folder: str, junit: Optional[str]) -> str:
    from common import markdown_table

    lines = ["# GPU session summary", ""]
    if junit:
        lines += test_report(junit) + [""]
    runs = load_folder(folder)
    rows = [row for name, records in runs for row in ratio_rows(name, records)]
    if rows:
        first = runs[0][1][0]
        lines += [f"{first.device}; torch {first.torch}, triton {first.triton or 'n/a'}; commit "
                  f"{first.git_commit or 'unknown'}", "",
                  "ratio: the baseline's median time / the row's (above 1: the row is faster); range: over both "
                  "p20-p80 ranges; 'within noise' where those ranges overlap", "",
                  markdown_table(["file", "op", "mode", "dtype", "case", "provider", "vs", "ratio", "range",
                                  "verdict", "target"], rows, right_align=[False] * 7 + [True, True]),
                  ""]
    else:
        lines += [f"no ratio: no records file in {folder} has a baseline and another row of the same case", ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    merging = commands.add_parser("merge", help="join records files into one")
    merging.add_argument("out")
    merging.add_argument("inputs", nargs="*")
    show = commands.add_parser("table", help="the ratio table of a folder of records files")
    show.add_argument("folder")
    show.add_argument("--junit", help="pytest's --junitxml file of the GPU tests")
    show.add_argument("--md", help="also write the table to this markdown file")
    args = parser.parse_args(argv)

    if args.command == "merge":
        count = merge(args.out, args.inputs)
        if count:
            print(f"summary.py: {count} record(s) from {len(args.inputs)} run(s) -> {args.out}")
        else:
            print(f"summary.py: no records to write to {args.out}", file=sys.stderr)
        return 0

    text = table(args.folder, args.junit)
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
