"""Markdown tables of the benchmark results, for the README.

    python -m benchmarks.report [RESULTS_DIR_OR_CSV ...]   (default: benchmarks/results)

One table per device, op, case and mode: a row per x value, a column per
provider with the median time, the speedup over the released code measured in
the same run, and the peak memory beyond the inputs; the last column is the
floor (time of the op's unavoidable memory traffic or arithmetic at the
machine's measured copy bandwidth / matmul rate).
"""

import glob
import math
import os
import sys

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.results import read_csv  # noqa: E402

DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
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


def main(argv=None):
    paths = (sys.argv[1:] if argv is None else argv) or [DEFAULT_DIR]
    rows = load(paths)
    if not rows:
        print(f"no benchmark results in {', '.join(paths)}; run `pytest benchmarks/` first", file=sys.stderr)
        return 1
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
