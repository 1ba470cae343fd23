"""A cskd-train step (--distill cskd) in fp32 and in bf16, timed in alternation on one device.

    python -m benchmarks.precision_step [--device cpu] [--batch 3] [--size 256] [--warmup 1] [--repeats 5]
                                        [--out results.json]

The step of benchmarks/step_fraction.py (DeepLabV3-R101 teacher forward, R18 student forward, CE + 0.4 aux
CE + 3 CWD + CSKDLoss, backward, SGD), built once per precision from the same seed; bf16 runs the forwards
and the losses under torch.autocast(bfloat16) as cskd-train --precision bf16 does. The two steps are timed
in alternation (fp32, bf16, fp32, ...) so that a change in the machine's load touches both; medians, their
ratio, and the CSKD loss's forward + backward inside each step (cskd-train's StepTiming). It also prints the
backend the CSKD loss resolves for each precision's features (cskd_kernels.resolve_backend): on the CPU the
C++ kernels take float32 / float64 only, so bfloat16 features run the reference (plain PyTorch) ops.
"""

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks.step_fraction import objective_step

import cskd_kernels  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=3, help="CSKDLoss needs at least 3 images")
    parser.add_argument("--size", type=int, default=256, help="square image side")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    steps, timings, times = {}, {}, {}
    for precision in ("fp32", "bf16"):
        config = SimpleNamespace(batch=args.batch, height=args.size, width=args.size, precision=precision)
        steps[precision], timings[precision] = objective_step("cskd", config, device)
        times[precision] = []

    def run(precision):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        steps[precision]()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - started)

    for precision in steps:
        for _ in range(args.warmup):
            run(precision)
        timings[precision].read()  # the warm-up is not counted
    for _ in range(args.repeats):
        for precision in steps:
            times[precision].append(run(precision))
    feature = {"fp32": torch.float32, "bf16": torch.bfloat16}
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "batch": args.batch, "image": [args.size, args.size],
              "repeats": args.repeats, "ms": {}, "cskd_share": {}, "cskd_ms": {}, "cskd_backend": {}}
    for precision in steps:
        result["ms"][precision] = sorted(times[precision])[len(times[precision]) // 2]
        fields = timings[precision].read()
        result["cskd_share"][precision] = fields["cskd_share"]
        result["cskd_ms"][precision] = fields["cskd_ms"]
        probe = torch.empty(1, 1, 1, 1, device=device, dtype=feature[precision])
        result["cskd_backend"][precision] = cskd_kernels.resolve_backend(None, probe)
    result["bf16_over_fp32"] = result["ms"]["bf16"] / result["ms"]["fp32"]
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(f"{result['device']}, {result['threads']} threads, batch {args.batch}, {args.size}x{args.size}, "
          f"medians of {args.repeats} alternated steps:")
    for precision in steps:
        print(f"  {precision}: step {result['ms'][precision]:9.1f} ms, CSKD loss in it "
              f"{result['cskd_ms'][precision]:8.1f} ms ({100 * result['cskd_share'][precision]:.1f}%), "
              f"CSKD backend {result['cskd_backend'][precision]}")
    print(f"  bf16 / fp32: {result['bf16_over_fp32']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
