"""Where the time of one CSKDLoss forward + backward goes (torch.profiler's table of the top ops).

    python -m benchmarks.profile_loss [--device cuda] [--grid 5x5 | --grid none] [--rows 15]
                                      [--shape cityscapes | demo | camvid | voc | r101psp | B,CS,CT,H,W]
                                      [--threads N] [--steps N] [--median-of K]
                                      [--released] [--flush-denormal]

Default: the released Cityscapes configuration, B=8, student 128 / teacher 256
channels, 64x128 features, gammas 0.1; --shape names the other shapes the
released scripts train with (benchmarks/test_bench_cskd_loss.py) or gives one.
--steps profiles several steps (the table's call counts are then per this many steps).
--median-of K prints the median time of K steps instead (no profiler), to
compare two builds: run it alternately on each, in turn, at a quiet moment.
--released runs the released formulation (cskd_kernels.released.cskd_loss)
instead of CSKDLoss; --flush-denormal sets torch.set_flush_denormal(True)
first (what the released formulation gains on a CPU where subnormal floats
are slow; the C++ kernels flush inside their calls anyway).
"""

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import cskd_kernels
from cskd_kernels import released


def parse_grid(text):
    return None if text == "none" else tuple(int(part) for part in text.split("x"))


# The loss's inputs (B, CS, CT, H, W) at each released training shape, as the benchmark names them.
SHAPES = {"cityscapes": (8, 128, 256, 64, 128), "demo": (8, 128, 128, 6, 6), "camvid": (8, 128, 256, 45, 45),
          "voc": (8, 128, 256, 64, 64), "r101psp": (8, 128, 512, 64, 128)}


def parse_shape(text):
    if text in SHAPES:
        return SHAPES[text]
    parts = text.split(",")
    if len(parts) != 5 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"--shape {text!r}: one of {', '.join(SHAPES)} or five positive ints B,CS,CT,H,W")
    return tuple(int(part) for part in parts)


def positive_int(text):
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _step_seconds(step, device):
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--grid", type=parse_grid, default=(5, 5), help="RxC, or none for global")
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--shape", type=parse_shape, default=SHAPES["cityscapes"],
                        help=f"{', '.join(SHAPES)}, or B,CS,CT,H,W")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as set)")
    parser.add_argument("--steps", type=positive_int, default=1, help="steps profiled (default 1)")
    parser.add_argument("--median-of", type=positive_int, default=None, metavar="K",
                        help="print the median of K timed steps instead of the profile")
    parser.add_argument("--released", action="store_true",
                        help="the released formulation (cskd_kernels.released.cskd_loss) instead of CSKDLoss")
    parser.add_argument("--flush-denormal", action="store_true",
                        help="torch.set_flush_denormal(True) before the steps")
    args = parser.parse_args(argv)
    if args.flush_denormal and not torch.set_flush_denormal(True):
        parser.error("--flush-denormal: this CPU cannot flush subnormal floats (torch.set_flush_denormal)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    b, cs, ct, h, w = args.shape
    feat_s = torch.randn(b, cs, h, w, device=device)
    feat_t = torch.randn(b, ct, h, w, device=device)
    loss = cskd_kernels.CSKDLoss(cs, ct, grid=args.grid).to(device)
    with torch.no_grad():
        loss.gamma_cam.fill_(0.1)
        loss.gamma_pam.fill_(0.1)
    name = "released formulation" if args.released else "CSKDLoss"

    def step():
        features = feat_s.clone().requires_grad_(True)
        if args.released:
            released.cskd_loss(features, feat_t, loss.gamma_cam, loss.gamma_pam, grid=args.grid).backward()
        else:
            loss(features, feat_t).loss.backward()

    for _ in range(2):  # compile the kernels, fill the caches
        step()
    if args.median_of is not None:
        print(f"{statistics.median(_step_seconds(step, device) for _ in range(args.median_of)) * 1e3:.1f} ms: "
              f"median of {args.median_of} {name} forward + backward steps, shape (B, CS, CT, H, W) "
              f"{args.shape}, grid {args.grid}, {device}, {torch.get_num_threads()} thread(s)")
        return
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"{name} forward + backward, shape (B, CS, CT, H, W) {args.shape}, grid {args.grid}, {device}, "
          f"{torch.get_num_threads()} thread(s), {args.steps} step(s):")
    print(prof.key_averages().table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
