"""Peak memory of one run of a case, beyond what its inputs already hold.

CUDA: the allocator's peak (``max_memory_allocated``) during one run, minus the
memory allocated just before it (inputs, and for "backward" the saved forward).

CPU: the process's peak resident set (VmHWM) during one run, minus its resident
set just before it. This is measured in a separate worker process (spawned once
per session and reused, so torch is imported once) so the pytest process's own
history does not count. In the worker, glibc is told to serve every allocation
over 128 KiB with its own mapping (MALLOC_MMAP_THRESHOLD_), so freed buffers go
back to the system and cannot hide a later case's allocations; before each
measurement the worker runs the case once (warm-up: lazy initialization,
torch.compile), frees everything but the inputs, trims the heap and resets
VmHWM by writing "5" to /proc/self/clear_refs.

Small peaks move from run to run (the heap's own pages, touched again after
the trim): ``python -m benchmarks.memory demo_6x6 --repeats 6`` measures
every CPU case whose id contains "demo_6x6" six times, each in a fresh build.
"""

import argparse
import ctypes
import gc
import importlib
import multiprocessing
import os
import re
import sys

import torch

from benchmarks.harness import build_callable, clear_grads, registered_case
from benchmarks.machine import synchronize

MIB = 2**20


def cuda_peak_bytes(fn, workload, device):
    """Peak allocated CUDA memory during one call of an already warmed-up ``fn``, net of what was held before."""
    clear_grads(workload)  # gradients left by earlier rounds would be freed inside the run and hide its allocations
    gc.collect()
    synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - baseline


def _status_kib(field):
    with open("/proc/self/status", encoding="utf-8") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    return int(match.group(1))


def _trim_heap():
    # Buffers our extension keeps for reuse (its output pool) would otherwise sit in
    # the baseline RSS and hide the outputs and gradients from the measured peak.
    from cskd_kernels.backend import extension

    ext = extension()
    if ext is not None and hasattr(ext, "empty_cache"):
        ext.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _measure_in_worker(case_id, module):
    importlib.import_module(module)  # declares (registers) the module's cases
    case = registered_case(case_id)
    fn, workload = build_callable(case)
    fn()  # warm-up
    clear_grads(workload)  # else the run frees the warm-up's gradients first and reuses their memory
    gc.collect()
    _trim_heap()
    baseline_kib = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as clear_refs:
        clear_refs.write("5")  # VmHWM := VmRSS
    fn()
    peak_kib = _status_kib("VmHWM")
    del fn, workload
    return (peak_kib - baseline_kib) * 1024


def _worker_main(connection, num_threads):
    torch.set_num_threads(num_threads)
    while True:
        request = connection.recv()
        if request is None:
            return
        case_id, module = request
        try:
            connection.send(("ok", _measure_in_worker(case_id, module)))
        except Exception as error:  # reported to the parent, which records no value
            connection.send(("error", f"{type(error).__name__}: {error}"))
        gc.collect()
        _trim_heap()


class CpuMemoryWorker:
    """A spawned process that measures CPU peak memory of cases on request, one case at a time."""

    def __init__(self):
        self._process = None
        self._connection = None

    def available(self):
        return os.path.exists("/proc/self/clear_refs")

    def _start(self):
        context = multiprocessing.get_context("spawn")
        parent_end, child_end = context.Pipe()
        saved = {name: os.environ.get(name) for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
        os.environ["MALLOC_TRIM_THRESHOLD_"] = str(128 * 1024)
        try:
            self._process = context.Process(
                target=_worker_main, args=(child_end, torch.get_num_threads()), daemon=False, name="bench-memory"
            )
            self._process.start()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        child_end.close()
        self._connection = parent_end

    def peak_bytes(self, case):
        """Peak bytes of one run of ``case`` in the worker; raises RuntimeError when the worker failed."""
        if self._process is None or not self._process.is_alive():
            self._start()
        try:
            self._connection.send((case.id, case.module))
            status, value = self._connection.recv()
        except (EOFError, OSError) as error:  # the worker died (e.g. out of memory): start afresh next time
            self._process = None
            raise RuntimeError(f"memory worker died: {error}") from error
        if status != "ok":
            raise RuntimeError(value)
        return value

    def close(self):
        if self._process is not None and self._process.is_alive():
            try:
                self._connection.send(None)
            except OSError:
                pass
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.terminate()
        self._process = None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory",
                                     description="Peak CPU memory of benchmark cases, measured repeatedly.")
    parser.add_argument("case", help="a part of the case ids, e.g. demo_6x6 (CPU cases that contain it)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per case (default 3)")
    parser.add_argument("--module", default="benchmarks.test_bench_cskd_loss", help="the module declaring the cases")
    parser.add_argument("--providers", default="cpu,released", help="comma-separated providers (default cpu,released)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    worker = CpuMemoryWorker()
    if not worker.available():
        parser.error("needs /proc/self/clear_refs (Linux) to reset the peak resident set")
    from benchmarks.harness import _REGISTRY

    importlib.import_module(args.module)
    providers = set(args.providers.split(","))
    cases = [case for case_id, case in _REGISTRY.items()
             if args.case in case_id and case.device == "cpu" and case.provider in providers]
    if not cases:
        parser.error(f"no CPU case of {args.module} with providers {args.providers} has {args.case!r} in its id")
    try:
        for case in cases:
            peaks = [worker.peak_bytes(case) / MIB for _ in range(args.repeats)]
            print(f"{case.id}: " + " ".join(f"{peak:.2f}" for peak in peaks) + " MiB", flush=True)
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
