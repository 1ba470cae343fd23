"""Where the time of one CSKDLoss forward + backward goes (torch.profiler's table of the top ops).

    python -m benchmarks.profile_loss [--device cuda] [--grid 5x5 | --grid none] [--rows 15]

Released configuration: B=8, student 128 / teacher 256 channels, 64x128 features, gammas 0.1.
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import cskd_kernels


def parse_grid(text):
    return None if text == "none" else tuple(int(part) for part in text.split("x"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--grid", type=parse_grid, default=(5, 5), help="RxC, or none for global")
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    feat_s = torch.randn(8, 128, 64, 128, device=device)
    feat_t = torch.randn(8, 256, 64, 128, device=device)
    loss = cskd_kernels.CSKDLoss(128, 256, grid=args.grid).to(device)
    with torch.no_grad():
        loss.gamma_cam.fill_(0.1)
        loss.gamma_pam.fill_(0.1)

    def step():
        loss(feat_s.clone().requires_grad_(True), feat_t).loss.backward()

    for _ in range(2):  # compile the kernels, fill the caches
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"CSKDLoss forward + backward, grid {args.grid}, {device}:")
    print(prof.key_averages().table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
