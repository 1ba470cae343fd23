"""pytest-benchmark setup for ``pytest benchmarks/``: timing, peak memory, floors, the results CSV.

Each op's file ``benchmarks/test_bench_<op>.py`` declares its cases with
``benchmarks.harness.declare_cases`` and hands each to the ``bench`` fixture:

    @pytest.mark.parametrize("case", CASES)
    def test_bench_<op>(benchmark, bench, case):
        bench.run(benchmark, case)

Options: --bench-device {all,cpu,cuda}, --bench-budget SECONDS (timed time per
case), --bench-results-dir DIR, --bench-no-memory.
"""

import math
import os
import statistics
import time

import pytest
import torch

from benchmarks import harness
from benchmarks.machine import device_name, measure_rates, versions
from benchmarks.memory import MIB, CpuMemoryWorker, cuda_peak_bytes
from benchmarks.results import add_speedups, now, summary_lines, write_results

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MIN_ROUNDS = 3
MAX_ROUNDS = 50


def pytest_addoption(parser):
    group = parser.getgroup("cskd benchmarks")
    group.addoption("--bench-device", choices=("all", "cpu", "cuda"), default="all",
                    help="which devices' cases to run (default: every device present)")
    group.addoption("--bench-budget", type=float, default=1.0,
                    help="seconds of timed rounds per case (rounds are clamped to 3..50; default 1.0)")
    group.addoption("--bench-results-dir", default=RESULTS_DIR,
                    help="where the per-device results CSVs are merged (default benchmarks/results)")
    group.addoption("--bench-no-memory", action="store_true", help="skip the peak-memory measurement")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    option = config.option
    # A short pytest-benchmark table (ours, with memory and speedups, follows it).
    if hasattr(option, "benchmark_columns"):
        option.benchmark_columns = ["median", "iqr", "rounds"]
    config._cskd_bench = BenchSession(config)


def pytest_collection_modifyitems(config, items):
    wanted = config.getoption("--bench-device", default="all")
    if wanted == "all":
        return
    keep, drop = [], []
    for item in items:
        case = getattr(item, "callspec", None) and item.callspec.params.get("case")
        (drop if isinstance(case, harness.BenchCase) and case.device != wanted else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)


@pytest.fixture
def bench(request):
    return request.config._cskd_bench


class BenchSession:
    """Session state: options, the memory worker, the rows measured in this run."""

    def __init__(self, config):
        self.config = config
        self.rows = []
        self.paths = []
        self.memory_worker = CpuMemoryWorker()
        self._memory_cache = {}

    def option(self, name):
        return self.config.getoption(name)

    def run(self, benchmark, case):
        """Time ``case`` with pytest-benchmark, measure its peak memory and floor, and record a row."""
        reason = harness.skip_reason(case)
        if reason:
            pytest.skip(reason)
        load = os.getloadavg()[0]  # other work on the machine while this case ran (recorded: it skews the times)
        rates = measure_rates(case.device)  # once per session and device, before the first case there
        fn, workload = harness.build_callable(case)

        start = time.perf_counter()
        fn()  # first call: lazy initialization and, for "compile", the compilation (reported, not timed)
        first_call_s = time.perf_counter() - start
        start = time.perf_counter()
        fn()  # second call: the warm-up round, and the time per round that sets the number of rounds
        estimate_s = time.perf_counter() - start
        rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(self.option("--bench-budget") / max(estimate_s, 1e-6)))))
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=0, iterations=1)
        if benchmark.disabled:
            return

        times_ms = [1e3 * t for t in benchmark.stats.stats.data]
        q20, median, q80 = _quantiles(times_ms)
        peak_bytes = self._peak_bytes(case, fn, workload)
        del fn, workload
        floor_s = case.floor_seconds(rates)
        row = {
            "op": case.op, "case": case.case, "provider": case.provider, "mode": case.mode,
            "x_name": case.x_name, "x": case.x,
            "median_ms": median, "q20_ms": q20, "q80_ms": q80, "rounds": len(times_ms),
            "first_call_ms": 1e3 * first_call_s,
            "peak_mem_mib": None if peak_bytes is None else peak_bytes / MIB,
            "floor_ms": None if floor_s is None else 1e3 * floor_s,
            "floor_fraction": None if floor_s is None else 1e3 * floor_s / median,
            "speedup_vs_released": None,
            "copy_gbps": rates.copy_bytes_per_s / 1e9, "matmul_gflops": rates.matmul_flops_per_s / 1e9,
            "load_avg_1min": load,
            "device": device_name(case.device), **versions(), "date": now(),
        }
        self.rows.append(row)
        # Written after every case, so a run cut short (a timeout) still leaves its results.
        self.save()
        benchmark.extra_info.update({k: v for k, v in row.items() if k in ("peak_mem_mib", "floor_ms", "first_call_ms", "device")})

    def _peak_bytes(self, case, fn, workload):
        if self.option("--bench-no-memory"):
            return None
        if case.device == "cuda":
            return cuda_peak_bytes(fn, workload, case.device)
        if case.id not in self._memory_cache:
            if not self.memory_worker.available():
                return None
            try:
                self._memory_cache[case.id] = self.memory_worker.peak_bytes(case)
            except RuntimeError as error:
                print(f"\n{case.id}: no memory measurement ({error})")
                self._memory_cache[case.id] = None
        return self._memory_cache[case.id]

    def save(self):
        add_speedups(self.rows)
        self.paths = write_results(self.rows, self.option("--bench-results-dir"))

    def finish(self):
        self.memory_worker.close()
        if self.rows:
            self.save()


def _quantiles(values):
    """20th, 50th and 80th percentiles (linear interpolation)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    cuts = statistics.quantiles(values, n=10, method="inclusive")
    return cuts[1], statistics.median(values), cuts[7]


def pytest_sessionfinish(session):
    bench_session = getattr(session.config, "_cskd_bench", None)
    if bench_session is not None:
        bench_session.finish()


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    bench_session = getattr(config, "_cskd_bench", None)
    if bench_session is None or not bench_session.rows:
        return
    terminalreporter.section("cskd benchmarks (speedup = released median / provider median, same run)")
    for line in summary_lines(bench_session.rows):
        terminalreporter.write_line(line)
    for path in bench_session.paths:
        terminalreporter.write_line(f"results merged into {os.path.relpath(path)}")
