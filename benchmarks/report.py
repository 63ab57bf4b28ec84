"""Turn a results folder into a markdown table and a PNG plot.

    python benchmarks/report.py benchmarks/results/nvidia-h100-80gb-hbm3 --peak-gbps 3000 --peak-tflops 800

Reads every JSON file of the folder written by `write_records` (one file = one run) and writes
`report.md` (a table per file: time, GB/s and TFLOP/s with the % of the given peaks, and the speedup
against each baseline provider measured in the same run) and `report.png` (speedup per case against
the case's first baseline) next to them. The plot needs matplotlib (`pip install dla_fast[bench]`);
without it the table is still written.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import BenchRecord, markdown_table, read_records  # noqa: E402

MARKDOWN_NAME = "report.md"
PLOT_NAME = "report.png"


def load_runs(folder: str) -> List[Tuple[str, List[BenchRecord]]]:
    """(file name without .json, its records) for every benchmark JSON file in `folder`, sorted by name.

    Other JSON files are skipped with a warning on stderr.
    """
    runs = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        try:
            records = read_records(path)
        except (ValueError, KeyError, TypeError) as e:
            print(f"report.py: skipped {path}: {e}", file=sys.stderr)
            continue
        if records:
            runs.append((os.path.splitext(os.path.basename(path))[0], records))
    return runs


def shape_label(shape: Any) -> str:
    """[32, 3, 224, 224] -> '32x3x224x224'; named shapes as compact JSON."""
    if isinstance(shape, (list, tuple)) and all(isinstance(s, int) for s in shape):
        return "x".join(str(s) for s in shape)
    return json.dumps(shape, separators=(",", ":"))


def case_key(record: BenchRecord) -> Tuple[str, str, str, str]:
    """What must be equal for two records to compare providers: op, mode, dtype, shape."""
    return record.op, record.mode, record.dtype, shape_label(record.shape)


def baselines_by_case(records: List[BenchRecord]) -> Dict[Tuple[str, str, str, str], Dict[str, BenchRecord]]:
    """case -> {baseline provider -> its record}, in the order the run measured them."""
    table: Dict[Tuple[str, str, str, str], Dict[str, BenchRecord]] = {}
    for r in records:
        if r.baseline:
            table.setdefault(case_key(r), {})[r.provider] = r
    return table


def _percent(value: Optional[float], peak: Optional[float]) -> str:
    return "" if value is None or not peak else f"{100 * value / peak:.1f}%"


def _number(value: Optional[float], spec: str) -> str:
    return "" if value is None else format(value, spec)


def run_table(records: List[BenchRecord], peak_gbps: Optional[float], peak_tflops: Optional[float]) -> str:
    """The markdown table of one run; columns without any value in this run are left out."""
    baselines = baselines_by_case(records)
    baseline_names = list(dict.fromkeys(name for case in baselines.values() for name in case))
    columns: List[Tuple[str, bool, Any]] = [
        ("op", False, lambda r: r.op),
        ("mode", False, lambda r: r.mode),
        ("dtype", False, lambda r: r.dtype),
        ("shape", False, lambda r: shape_label(r.shape)),
        ("provider", False, lambda r: r.provider + (" (baseline)" if r.baseline else "")),
        ("ms p50", True, lambda r: f"{r.ms_p50:.3f}"),
        ("ms p20-p80", True, lambda r: f"{r.ms_p20:.3f}-{r.ms_p80:.3f}"),
    ]
    if any(r.gbps is not None for r in records):
        columns.append(("GB/s", True, lambda r: _number(r.gbps, ".0f")))
        if peak_gbps:
            columns.append(("% peak BW", True, lambda r: _percent(r.gbps, peak_gbps)))
    if any(r.tflops is not None for r in records):
        columns.append(("TFLOP/s", True, lambda r: _number(r.tflops, ".3g")))
        if peak_tflops:
            columns.append(("% peak FLOP/s", True, lambda r: _percent(r.tflops, peak_tflops)))
    if any("images_per_s" in r.extra for r in records):
        columns.append(("images/s", True, lambda r: _number(r.extra.get("images_per_s"), ".1f")))
    for name in baseline_names:
        def speedup(r: BenchRecord, name: str = name) -> str:
            reference = baselines.get(case_key(r), {}).get(name)
            return "" if reference is None else f"{reference.ms_p50 / r.ms_p50:.2f}x"
        columns.append((f"vs {name}", True, speedup))
    rows = [[cell(r) for _, _, cell in columns] for r in records]
    return markdown_table([c[0] for c in columns], rows, right_align=[c[1] for c in columns])


def _describe_run(records: List[BenchRecord]) -> str:
    first = records[0]
    dates = sorted({r.date for r in records})
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    return (f"{first.device}; torch {first.torch}, triton {first.triton or 'n/a'}; "
            f"commit {first.git_commit or 'unknown'}; {when}; timing: {first.timing}")


def write_markdown(runs: List[Tuple[str, List[BenchRecord]]], path: str, peak_gbps: Optional[float],
                   peak_tflops: Optional[float], plot_name: Optional[str]) -> None:
    """One section per run, with its table; speedups compare providers within that run only."""
    peaks = [f"{peak_gbps:g} GB/s" if peak_gbps else "", f"{peak_tflops:g} TFLOP/s" if peak_tflops else ""]
    peak_text = " and ".join(p for p in peaks if p)
    lines = ["# Benchmark results", "",
             "Generated by `benchmarks/report.py` from the JSON files in this folder; do not edit by hand.",
             "Times are per call (median, with the 20th-80th percentiles); `vs X` is X's median time over the "
             "row's, for the same op, mode, dtype and shape in the same run.", ""]
    if peak_text:
        lines += [f"Roofline peaks used for the % columns: {peak_text}.", ""]
    if plot_name:
        lines += [f"![speedups]({plot_name})", ""]
    for name, records in runs:
        lines += [f"## {name}", "", _describe_run(records), "", run_table(records, peak_gbps, peak_tflops), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip("\n") + "\n")


def write_plot(runs: List[Tuple[str, List[BenchRecord]]], path: str) -> bool:
    """Grouped bars per run: speedup of every provider over the case's first baseline (1.0 = that baseline).

    Returns False, with a message, when matplotlib is missing or no case has a baseline.
    """
    try:
        import matplotlib
    except ImportError:
        print("report.py: matplotlib is not installed (pip install matplotlib, or dla_fast[bench]); "
              "skipped the plot", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for name, records in runs:
        baselines = baselines_by_case(records)
        cases = [case for case in dict.fromkeys(case_key(r) for r in records) if case in baselines]
        providers = list(dict.fromkeys(r.provider for r in records if case_key(r) in baselines))
        if cases:
            panels.append((name, records, baselines, cases, providers))
    if not panels:
        print("report.py: no case has a baseline provider to compare with; skipped the plot", file=sys.stderr)
        return False

    figure, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 1.6 * max(len(p[3]) for p in panels)),
                                                         3.6 * len(panels)), squeeze=False)
    for ax, (name, records, baselines, cases, providers) in zip(axes[:, 0], panels):
        references = {case: next(iter(baselines[case].values())) for case in cases}
        reference_names = sorted({r.provider for r in references.values()})
        width = 0.8 / len(providers)
        for i, provider in enumerate(providers):
            heights = []
            for case in cases:
                mine = next((r for r in records if case_key(r) == case and r.provider == provider), None)
                heights.append(0.0 if mine is None else references[case].ms_p50 / mine.ms_p50)
            bars = ax.bar([c + (i - (len(providers) - 1) / 2) * width for c in range(len(cases))], heights, width,
                          label=provider)
            ax.bar_label(bars, fmt="%.2f", fontsize=6)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(["\n".join(case) for case in cases], fontsize=7)
        ax.set_ylabel(f"speedup vs {reference_names[0]}" if len(reference_names) == 1 else "speedup vs first baseline")
        ax.set_title(f"{name} ({records[0].device})", fontsize=9)
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a results folder, e.g. benchmarks/results/nvidia-h100-80gb-hbm3")
    parser.add_argument("--peak-gbps", type=float, help="memory bandwidth peak for the '%% peak BW' column")
    parser.add_argument("--peak-tflops", type=float, help="compute peak (in the rows' dtype) for '%% peak FLOP/s'")
    parser.add_argument("--out-md", help=f"markdown output (default FOLDER/{MARKDOWN_NAME})")
    parser.add_argument("--out-png", help=f"plot output (default FOLDER/{PLOT_NAME})")
    args = parser.parse_args(argv)

    runs = load_runs(args.folder)
    if not runs:
        print(f"report.py: error: no benchmark JSON files with records in {args.folder}", file=sys.stderr)
        return 2
    out_md = args.out_md or os.path.join(args.folder, MARKDOWN_NAME)
    out_png = args.out_png or os.path.join(args.folder, PLOT_NAME)
    plotted = write_plot(runs, out_png)
    plot_link = os.path.relpath(out_png, os.path.dirname(os.path.abspath(out_md))) if plotted else None
    write_markdown(runs, out_md, args.peak_gbps, args.peak_tflops, plot_link)
    print(f"wrote {out_md}" + (f" and {out_png}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
