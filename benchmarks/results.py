"""Benchmark results: one row per case, long format, one CSV per device in benchmarks/results/.

A run replaces the rows of the cases it measured (same op, case, provider,
mode, x on the same device) and keeps every other row, so a partial run (``-k``)
updates a file without losing the rest. Speedups are computed within one run:
the released code's median over the provider's, same op, case, mode, x, device.
"""

import csv
import datetime
import math
import os

from benchmarks.machine import slug

COLUMNS = (
    "op", "case", "provider", "mode", "x_name", "x",
    "median_ms", "q20_ms", "q80_ms", "rounds", "first_call_ms",
    "peak_mem_mib", "floor_ms", "floor_fraction", "speedup_vs_released",
    "copy_gbps", "matmul_gflops", "load_avg_1min", "device", "torch", "triton", "date",
)
KEY = ("op", "case", "provider", "mode", "x", "device")
BASELINE = "released"


def key_of(row):
    return tuple(str(row[name]) for name in KEY)


def add_speedups(rows):
    """Fill speedup_vs_released for rows whose released counterpart is in the same list."""
    released = {
        key_of({**row, "provider": BASELINE}): row["median_ms"] for row in rows if row["provider"] == BASELINE
    }
    for row in rows:
        baseline = released.get(key_of({**row, "provider": BASELINE}))
        row["speedup_vs_released"] = baseline / row["median_ms"] if baseline and row["median_ms"] else None
    return rows


def _format(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def read_csv(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _sort_key(row):
    try:
        x = float(row["x"])
    except ValueError:
        x = math.inf
    return (row["op"], row["case"], row["mode"], x, row["provider"])


def now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write_results(rows, directory):
    """Merge ``rows`` into ``directory/<device-slug>.csv`` (one file per device); return the paths written."""
    os.makedirs(directory, exist_ok=True)
    date = now()
    by_device = {}
    for row in rows:
        by_device.setdefault(row["device"], []).append({**row, "date": row.get("date") or date})
    paths = []
    for device, new_rows in sorted(by_device.items()):
        path = os.path.join(directory, f"{slug(device)}.csv")
        fresh = [{name: _format(row.get(name)) for name in COLUMNS} for row in new_rows]
        replaced = {key_of(row) for row in fresh}
        kept = [row for row in read_csv(path) if key_of(row) not in replaced]
        merged = sorted(kept + fresh, key=_sort_key)
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore", restval="")
            writer.writeheader()
            writer.writerows(merged)
        paths.append(path)
    return paths


def _cell(value, spec, suffix=""):
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value):{spec}}{suffix}"


def summary_lines(rows):
    """A plain-text table of one run's rows, for the terminal."""
    header = ("op", "case", "mode", "x", "provider", "device", "median ms", "q20-q80 ms", "peak MiB", "floor %", "vs released", "1st call ms")
    table = [header]
    for row in sorted(rows, key=lambda r: (r["device"],) + _sort_key({**r, "x": str(r["x"])})):
        table.append((
            row["op"], row["case"], row["mode"], f"{row['x_name']}={row['x']}", row["provider"], row["device"],
            _cell(row["median_ms"], ".3f"),
            f"{_cell(row['q20_ms'], '.3f')}-{_cell(row['q80_ms'], '.3f')}",
            _cell(row["peak_mem_mib"], ".1f"),
            _cell(None if row["floor_fraction"] is None else 100 * row["floor_fraction"], ".1f"),
            _cell(row["speedup_vs_released"], ".2f", "x"),
            _cell(row["first_call_ms"], ".0f"),
        ))
    widths = [max(len(str(line[i])) for line in table) for i in range(len(header))]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table]
