"""Sweep the Triton position attention's launch configurations at CSKDLoss's shapes (for a lent GPU).

    python -m benchmarks.tune_position_attention [--out tuning.json] [--quick]

Cases (B=8, 64x128 maps, grid 5x5, temperature 2): the student's attention
forward + backward (d 16, Cv 128) and the teacher's forward alone (d 32, Cv
256): the two position-attention calls of one CSKDLoss step. For every
configuration (tile sizes, num_warps, num_stages) the results are checked
against the default configuration's (a configuration that disagrees is
reported, never ranked), then timed (median of triton.testing.do_bench on a
GPU, of wall-clock repeats elsewhere). The table is printed fastest first,
with the default's time for comparison; --out writes it as JSON. A
configuration sets the forward's and _dv_kernel's launches; on a GPU the
dK/dQ kernel keeps its own tiles (position_attention._dkdq_config). Before
timing a new default, check it fits: python -m benchmarks.gpu_compile.
--quick: tiny shapes and two configurations (how the tests run it, on the CPU
through TRITON_INTERPRET=1).
"""

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from cskd_kernels.ops.position_attention import cell_table, largest_cell

GRID = (5, 5)
TEMPERATURE = 2.0


def _cases(quick):
    """(name, B, d, Cv, H, W, with_backward)."""
    if quick:
        return [("student", 2, 4, 8, 7, 9, True), ("teacher", 2, 8, 16, 7, 9, False)]
    return [("student", 8, 16, 128, 64, 128, True), ("teacher", 8, 32, 256, 64, 128, False)]


def _configs(kernels, quick, cv):
    """Tile sizes (BLOCK_M, BLOCK_N), value tile, warps: 20 or 30 configurations a case (2 with --quick).

    Every configuration compiles its kernels (about a second each on a GPU), so the sweep is kept to
    what a lease can afford; Triton's default num_stages throughout.
    """
    import triton

    if quick:
        return [kernels.LaunchConfig(16, 16, 16), kernels.LaunchConfig(16, 32, 16)]
    value_tiles = sorted({min(tile, triton.next_power_of_2(cv)) for tile in (64, 128, 256)})
    configs = []
    for (block_m, block_n), block_cv, warps in itertools.product(
            ((32, 32), (64, 32), (64, 64), (128, 32), (128, 64)), value_tiles, (4, 8)):
        configs.append(kernels.LaunchConfig(block_m, block_n, block_cv, warps))
    return configs


def _inputs(b, d, cv, h, w, device):
    generator = torch.Generator(device="cpu").manual_seed(0)
    q, k = (torch.randn(b, d, h, w, generator=generator).to(device) for _ in range(2))
    v, grad = (torch.randn(b, cv, h, w, generator=generator).to(device) for _ in range(2))
    return q, k, v, grad


def _run(kernels, inputs, cells, largest, with_backward, config):
    q, k, v, grad = inputs
    out, lse = kernels.position_attention_forward(q, k, v, cells, largest, 1.0 / TEMPERATURE, config)
    if not with_backward:
        return (out,)
    return (out, *kernels.position_attention_backward(q, k, v, out, lse, grad, cells, largest, 1.0 / TEMPERATURE,
                                                     config))


def _median_ms(fn, device):
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def _agrees(got, want):
    """Outputs within float32 noise of the default configuration's (the kernels differ only in summation order)."""
    return all(torch.allclose(g, w, rtol=1e-3, atol=1e-4 * max(1.0, w.abs().max().item())) for g, w in zip(got, want))


def tune(quick=False, device=None, report=None):
    """Rows (case, config, ms or None, agrees) for every case and configuration, fastest first per case.

    ``report(row)``, if given, is called as each row is measured (a timeout then keeps what was measured).
    """
    from cskd_kernels.triton import position_attention as kernels

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for name, b, d, cv, h, w, with_backward in _cases(quick):
        inputs = _inputs(b, d, cv, h, w, device)
        cells, largest = cell_table(h, w, GRID, device), largest_cell(h, w, GRID)
        default = kernels.default_config(inputs[0], inputs[2])
        want = _run(kernels, inputs, cells, largest, with_backward, default)
        case_rows = []
        for config in [default] + [c for c in _configs(kernels, quick, cv) if c != default]:
            try:
                agrees = _agrees(_run(kernels, inputs, cells, largest, with_backward, config), want)
                ms = _median_ms(lambda: _run(kernels, inputs, cells, largest, with_backward, config), device)
            except Exception as error:  # a configuration the compiler rejects (e.g. out of shared memory)
                agrees, ms = False, None
                print(f"{name} {config}: {type(error).__name__}: {str(error)[:120]}")
            case_rows.append({"case": name, "config": config._asdict(), "default": config == default,
                              "ms": ms, "agrees": agrees})
            if report:
                report(case_rows[-1])
        case_rows.sort(key=lambda row: (not row["agrees"], row["ms"] if row["ms"] is not None else float("inf")))
        rows += case_rows
    return rows


def _line(row):
    config = " ".join(f"{key}={value}" for key, value in row["config"].items())
    time_ms = f"{row['ms']:.3f} ms" if row["ms"] is not None else "failed"
    flags = ("  (default)" if row["default"] else "") + ("" if row["agrees"] else "  DISAGREES / FAILED")
    return f"{row['case']:8s} {time_ms:>11s}  {config}{flags}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rows = tune(quick=args.quick, report=lambda row: print("measured", _line(row), flush=True))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    print("fastest first:")
    for row in rows:
        print(_line(row))


if __name__ == "__main__":
    main()
