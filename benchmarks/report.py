"""Markdown tables of the benchmark results, for the docs; with --plot, PNG charts.

    python -m benchmarks.report [RESULTS_DIR_OR_CSV ...]   (default: benchmarks/results)
    python -m benchmarks.report --plot [--plot-dir DIR] [RESULTS_DIR_OR_CSV ...]   (default DIR: docs/)

One table per device, op, case and mode: a row per x value, a column per
provider with the median time, the speedup over the released code measured in
the same run, and the peak memory beyond the inputs; the last column is the
floor (time of the op's unavoidable memory traffic or arithmetic at the
machine's measured copy bandwidth / matmul rate).

--plot writes two PNGs per device (matplotlib, the `train` extra): speedup-<device>.png, the
speedup of every provider over the released formulation (forward + backward, one panel per op;
ops without a released formulation, position attention, over the reference instead, said in the
panel's title), and memory-<device>.png, the peak memory beyond the inputs of every provider.
"""

import argparse

import glob
import math
import os
import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.machine import slug  # noqa: E402
from benchmarks.results import read_csv  # noqa: E402

DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULT_PLOT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
PROVIDER_ORDER = ("released", "reference", "compile", "sdpa", "cpu", "triton", "triton-graphs")


def _float(value):
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _x_label(row):
    x = _float(row["x"])
    if x is not None and x == int(x) and int(x) > 0 and (int(x) & (int(x) - 1)) == 0 and x >= 1024:
        return f"{row['x_name']} = 2^{int(x).bit_length() - 1}"
    return f"{row['x_name']} = {row['x']}"


def _number(value):
    """Three significant digits without exponents: 0.0703, 4.02, 45.7, 1201."""
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}" if value >= 0.001 else "0"


def _cell(row):
    if row is None:
        return "-"
    parts = [f"{_number(_float(row['median_ms']))} ms"]
    speedup = _float(row["speedup_vs_released"])
    if speedup is not None and row["provider"] != "released":
        parts.append(f"**{speedup:.2f}x**")
    memory = _float(row["peak_mem_mib"])
    if memory is not None:
        parts.append(f"{_number(memory)} MiB")
    return " / ".join(parts)


def _providers(rows):
    present = {row["provider"] for row in rows}
    ordered = [p for p in PROVIDER_ORDER if p in present]
    return ordered + sorted(present - set(ordered))


def _sort_x(row):
    x = _float(row["x"])
    return (x is None, x if x is not None else 0.0, row["x"])


def table(rows):
    """Markdown lines for rows of one device, op, case and mode."""
    providers = _providers(rows)
    by_x = {}
    for row in sorted(rows, key=_sort_x):
        by_x.setdefault(row["x"], {})[row["provider"]] = row
    lines = [
        "| " + " | ".join(["x", *providers, "floor"]) + " |",
        "|" + "---|" * (len(providers) + 2),
    ]
    for cells in by_x.values():
        first = next(iter(cells.values()))
        floors = [_float(row["floor_ms"]) for row in cells.values() if _float(row["floor_ms"]) is not None]
        floor = f"{_number(min(floors))} ms" if floors else "-"
        lines.append("| " + " | ".join([_x_label(first), *(_cell(cells.get(p)) for p in providers), floor]) + " |")
    return lines


def _first_call_notes(rows):
    """torch.compile's first call compiles: say how long it took, since the medians exclude it."""
    first = [_float(row["first_call_ms"]) for row in rows if row["provider"] == "compile"]
    first = [value for value in first if value is not None]
    if not first:
        return []
    span = f"{min(first) / 1e3:.1f} s" if len(first) == 1 else f"{min(first) / 1e3:.1f} to {max(first) / 1e3:.1f} s"
    # The on-disk inductor cache of earlier runs shortens it: this is the first call of this run.
    return [f"compile: first call of the run (compilation; excluded from the medians) {span}.", ""]


def report(rows):
    lines = []
    groups = {}
    for row in rows:
        groups.setdefault(row["device"], {}).setdefault((row["op"], row["case"], row["mode"]), []).append(row)
    for device, by_case in sorted(groups.items()):
        any_row = next(iter(by_case.values()))[0]
        dates = sorted({row["date"] for rows_ in by_case.values() for row in rows_})
        lines.append(f"### {device}")
        lines.append("")
        lines.append(
            f"torch {any_row['torch']}, triton {any_row['triton'] or '-'}; measured {dates[0]}"
            + (f" to {dates[-1]}" if len(dates) > 1 else "")
            + f"; copy bandwidth {_float(any_row['copy_gbps']):.3g} GB/s, float32 matmul {_float(any_row['matmul_gflops']):.3g} GFLOP/s."
        )
        loads = [_float(row.get("load_avg_1min")) for rows_ in by_case.values() for row in rows_]
        loads = [value for value in loads if value is not None]
        if loads:
            lines.append(f"1-minute load average while the cases ran: {min(loads):.1f} to {max(loads):.1f}.")
        lines.append("Cells: median time / speedup over the released code in the same run / peak memory beyond the inputs.")
        lines.append("")
        for (op, case, mode), case_rows in sorted(by_case.items()):
            lines.append(f"**{op}**, {case}, {mode}")
            lines.append("")
            lines.extend(table(case_rows))
            lines.append("")
            lines.extend(_first_call_notes(case_rows))
    return "\n".join(lines)


def load(paths):
    files = []
    for path in paths:
        files.extend(sorted(glob.glob(os.path.join(path, "*.csv"))) if os.path.isdir(path) else [path])
    rows = []
    for path in files:
        rows.extend(read_csv(path))
    return rows


PLOT_MODE = "full"


def _plot_groups(rows):
    """{device: {op: [(label, {provider: row})]}} of the forward + backward rows, in a stable order."""
    groups = {}
    for row in rows:
        if row["mode"] != PLOT_MODE or _float(row["median_ms"]) is None:
            continue
        label = f"{row['case']}\n{_x_label(row)}"
        groups.setdefault(row["device"], {}).setdefault(row["op"], {}).setdefault(label, {})[row["provider"]] = row
    return {
        device: {op: sorted(by_label.items(), key=lambda item: (item[0].split("\n")[0], _sort_x(next(iter(item[1].values())))))
                 for op, by_label in sorted(by_op.items())}
        for device, by_op in sorted(groups.items())
    }


def _baseline(cases):
    """The provider speedups are taken over: released where the op has it, else reference."""
    present = {provider for _, by_provider in cases for provider in by_provider}
    return "released" if "released" in present else ("reference" if "reference" in present else None)


def _bars(axis, cases, providers, value):
    import numpy as np

    width = 0.8 / max(len(providers), 1)
    positions = np.arange(len(cases))
    for i, provider in enumerate(providers):
        heights = [value(by_provider.get(provider)) for _, by_provider in cases]
        heights = [h if h is not None else 0.0 for h in heights]
        bars = axis.bar(positions + (i - (len(providers) - 1) / 2) * width, heights, width, label=provider)
        for bar, height in zip(bars, heights):
            if height:
                axis.annotate(f"{height:.3g}", (bar.get_x() + bar.get_width() / 2, height), ha="center",
                              va="bottom", fontsize=6, rotation=90, xytext=(0, 2), textcoords="offset points")
    axis.set_xticks(positions)
    axis.set_xticklabels([label for label, _ in cases], fontsize=7, rotation=30, ha="right")
    axis.set_yscale("log")
    axis.yaxis.set_major_formatter(matplotlib_ticker().FuncFormatter(lambda v, _: f"{v:g}"))
    axis.yaxis.set_minor_formatter(matplotlib_ticker().NullFormatter())
    axis.margins(y=0.25)
    axis.legend(fontsize=7)


def matplotlib_ticker():
    import matplotlib.ticker

    return matplotlib.ticker


def _figure(by_op, title, draw):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(by_op)
    columns = 2 if len(ops) > 1 else 1
    rows = (len(ops) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(7 * columns, 3.6 * rows + 0.6), squeeze=False)
    for axis, op in zip(axes.flat, ops):
        draw(axis, op, by_op[op])
    for axis in list(axes.flat)[len(ops):]:
        axis.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (3.6 * rows + 0.6)))
    return fig, plt


def _dates(by_op):
    dates = sorted({row["date"][:10] for cases in by_op.values() for _, by in cases for row in by.values()})
    return dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"


def plot(rows, directory):
    """Write speedup-<device>.png and memory-<device>.png into directory; return the paths written."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for device, by_op in _plot_groups(rows).items():
        with_baseline = {op: cases for op, cases in by_op.items() if _baseline(cases)}

        def draw_speedup(axis, op, cases):
            baseline = _baseline(cases)
            providers = [p for p in _providers([r for _, by in cases for r in by.values()]) if p != baseline]

            def speedup(row, cases=cases, baseline=baseline):
                if row is None:
                    return None
                by = next(by for _, by in cases if row in by.values())
                base = by.get(baseline)
                return _float(base["median_ms"]) / _float(row["median_ms"]) if base else None

            _bars(axis, cases, providers, speedup)
            axis.axhline(1.0, color="black", linewidth=0.8)
            axis.set_ylabel(f"speedup over {baseline}")
            axis.set_title(f"{op}: {baseline}'s time / each provider's (higher is faster)", fontsize=9)

        def draw_memory(axis, op, cases):
            providers = _providers([r for _, by in cases for r in by.values()])
            _bars(axis, cases, providers, lambda row: _float(row["peak_mem_mib"]) if row is not None else None)
            axis.set_ylabel("peak memory (MiB)")
            axis.set_title(f"{op}: peak memory beyond the inputs (lower is better)", fontsize=9)

        for name, ops, draw, what in (("speedup", with_baseline, draw_speedup, "speedup over the released formulation"),
                                      ("memory", by_op, draw_memory, "peak memory")):
            if not ops:
                continue
            fig, plt = _figure(ops, f"{device}: {what}, forward + backward\n(measured {_dates(ops)}; "
                                    f"benchmarks/results, python -m benchmarks.report --plot)", draw)
            path = os.path.join(directory, f"{name}-{slug(device)}.png")
            fig.savefig(path, dpi=90)
            plt.close(fig)
            paths.append(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", help="result CSVs or directories of them (default: benchmarks/results)")
    parser.add_argument("--plot", action="store_true", help="write PNG charts instead of printing tables")
    parser.add_argument("--plot-dir", default=DEFAULT_PLOT_DIR, help="where --plot writes (default: docs/)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    paths = args.paths or [DEFAULT_DIR]
    rows = load(paths)
    if not rows:
        print(f"no benchmark results in {', '.join(paths)}; run `pytest benchmarks/` first", file=sys.stderr)
        return 1
    if args.plot:
        for path in plot(rows, args.plot_dir):
            print(path)
        return 0
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
