"""The CSKD loss's share of one whole training step, on a GPU (issue 6's target: under 5%).

    python -m benchmarks.step_fraction [--device cuda] [--batch 8] [--height 512 --width 1024]
                                       [--precision fp32|bf16] [--matmul-precision highest|high] [--graphs]
                                       [--out results.json]

One step: the DeepLabV3-R101 teacher's forward (no grad), the DeepLabV3-R18 student's forward,
CE + 0.4 aux CE + 3 CWD (+ CSKDLoss), backward and an SGD step, as python/cskd_train runs it.
The step is timed with and without the CSKD term (same models, same batch); the loss alone
(forward + backward on the step's feature shapes) is timed for the fused CSKDLoss and for the
released formulation. Medians of CUDA-event timings after a warm-up; the printed table is last.
Inside the step with CSKD the loss's own forward and backward are also timed as cskd-train times
them for its metrics.jsonl (cskd_train/throughput.py: events around the loss's call and its
backward; the sum over the timed steps over theirs): "loss_share_in_step", no second run needed.
--precision bf16 runs the models' forwards and the losses under torch.autocast(bfloat16), as
cskd-train --precision bf16 does (python/cskd_train/precision.py); the loss alone then gets bfloat16
features, as autocast hands them to it in the step.
--matmul-precision sets torch.set_float32_matmul_precision for the whole run (models, released
loss and fused kernels alike): "highest" (PyTorch's default) or "high" (TF32 products).
--graphs also times the fused loss under torch.compile(mode="reduce-overhead"), alone and inside
the step: on CUDA the whole loss replayed as CUDA graphs, without the eager loss's host launches
(on the CPU it is only compiled: that runs the script's every path without a GPU).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

# The demo's timing pieces: one training step, the loss alone, both losses with the same non-zero gammas.
from cskd_train.demo import (  # noqa: E402
    ReleasedCSKDLoss,
    fused_cskd_loss,
    loss_step,
    training_step,
    with_timing_gammas,
)
from cskd_train.datasets import NUM_CLASSES as CLASSES_OF  # noqa: E402
from cskd_train.objective import compile_loss_module  # noqa: E402

NUM_CLASSES = CLASSES_OF["cityscapes"]


def median_ms(fn, warmup, repeats, device, after_warmup=None):
    """Median milliseconds of fn() over `repeats` calls after `warmup`, timed with device events."""
    for _ in range(warmup):
        fn()
    if after_warmup is not None:
        after_warmup()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - started))
    return sorted(times)[len(times) // 2]


def new_step_each_call(step):
    """step, each call marked as a new training step for the CUDA graphs (as cskd-train --compile-loss does)."""

    def run():
        torch.compiler.cudagraph_mark_step_begin()
        step()

    return run


def objective_step(distill, args, device, graphs=False):
    """(A callable running one training step with objective `distill` ("cwd" or "cskd"), the loss compiled if asked;
    the StepTiming that times the CSKD loss inside each call, or None without it)."""
    from cskd_train.models import build_model, feature_channels
    from cskd_train.objective import Objective, ObjectiveConfig
    from cskd_train.throughput import StepTiming

    torch.manual_seed(0)
    student = build_model("deeplabv3_resnet18", NUM_CLASSES).to(device).train()
    teacher = build_model("deeplabv3_resnet101", NUM_CLASSES).to(device).eval()
    objective = Objective(ObjectiveConfig(distill=distill), feature_channels(student),
                          feature_channels(teacher)).to(device)
    if objective.cskd is not None:
        with_timing_gammas(objective.cskd)
        if graphs:
            objective.compile_cskd(device)  # reduce-overhead on CUDA, as cskd-train --compile-loss
    optimizer = torch.optim.SGD(list(student.parameters()) + list(objective.parameters()), lr=1e-3, momentum=0.9)
    images = torch.randn(args.batch, 3, args.height, args.width, device=device)
    labels = torch.randint(0, NUM_CLASSES, (args.batch, args.height, args.width), device=device)
    step = training_step(student, teacher, objective, optimizer, images, labels, args.precision)
    step = new_step_each_call(step) if graphs else step
    if objective.cskd is None:
        return step, None
    timing = objective.cskd_timing = StepTiming(device, args.batch)

    def timed():
        timing.begin_step()
        step()
        timing.end_step(0.0)  # the wall time is not used: the step is not synchronized here

    return timed, timing


def step_ms_and_share(distill, args, device, graphs=False):
    """Median ms of a training step, and (with CSKD) the loss's share of it measured inside the timed steps."""
    step, timing = objective_step(distill, args, device, graphs)
    ms = median_ms(step, args.warmup, args.repeats, device, after_warmup=timing.read if timing else None)
    return ms, (timing.read().get("cskd_share") if timing else None)


def loss_alone(kind, args, device):
    """A callable running the CSKD loss alone (forward + backward) on the step's feature shapes.

    kind: "fused", "fused_graphs" (under CUDA graphs) or "released".
    """
    size = (args.height // 8, args.width // 8)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32  # as autocast hands them to the loss
    feat_s = torch.randn(args.batch, 128, *size, device=device, dtype=dtype)
    feat_t = torch.randn(args.batch, 256, *size, device=device, dtype=dtype)
    loss = (ReleasedCSKDLoss() if kind == "released" else fused_cskd_loss(128, 256)).to(device)
    if kind != "fused_graphs":
        return loss_step(loss, feat_s, feat_t, args.precision)
    compile_loss_module(loss, device)  # as cskd-train --compile-loss compiles it
    return new_step_each_call(loss_step(loss, feat_s, feat_t, args.precision))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: the forwards and the losses under torch.autocast(bfloat16), as cskd-train runs them")
    parser.add_argument("--matmul-precision", choices=("highest", "high"), default="highest")
    parser.add_argument("--graphs", action="store_true",
                        help="also the fused loss under torch.compile(mode='reduce-overhead'): CUDA graphs on CUDA, "
                             "only compiled on the CPU")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_float32_matmul_precision(args.matmul_precision)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    from cskd_train.precision import PrecisionError, check_precision

    try:
        check_precision(args.precision, device)
    except PrecisionError as error:
        parser.error(str(error))

    ms, shares, graphs_error = {}, {}, None

    def measured(name):
        """Print a timing as it comes and write what is measured so far (a run stopped by a timeout keeps it)."""
        print(f"measured {name}: {ms[name]:.2f} ms", flush=True)
        if args.out:
            args.out.write_text(json.dumps({"partial": True, "batch": args.batch, "image": [args.height, args.width],
                                            "precision": args.precision, "matmul_precision": args.matmul_precision,
                                            "ms": ms, **shares}, indent=2))

    for kind in ("fused", "released"):
        ms[f"loss_{kind}"] = median_ms(loss_alone(kind, args, device), args.warmup, args.repeats, device)
        measured(f"loss_{kind}")
    for distill in ("cwd", "cskd"):
        ms[f"step_{distill}"], share = step_ms_and_share(distill, args, device)
        if share is not None:
            shares["loss_share_in_step"] = share
        measured(f"step_{distill}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.graphs:  # last, and a failure to compile costs only these two numbers
        try:
            ms["loss_fused_graphs"] = median_ms(loss_alone("fused_graphs", args, device), args.warmup, args.repeats,
                                                device)
            measured("loss_fused_graphs")
            ms["step_cskd_graphs"], shares["loss_share_in_step_graphs"] = step_ms_and_share(
                "cskd", args, device, graphs=True)
            measured("step_cskd_graphs")
        except Exception as error:  # noqa: BLE001 - reported in the results, the eager numbers stand
            graphs_error = f"{type(error).__name__}: {error}"
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch": args.batch, "image": [args.height, args.width], "precision": args.precision,
        "matmul_precision": args.matmul_precision, "ms": ms,
        "loss_share_of_step": ms["loss_fused"] / ms["step_cskd"],
        **shares,
        "step_difference_share": (ms["step_cskd"] - ms["step_cwd"]) / ms["step_cskd"],
        "fused_vs_released": ms["loss_released"] / ms["loss_fused"],
    }
    if "step_cskd_graphs" in ms:
        result["loss_share_of_step_graphs"] = ms["loss_fused_graphs"] / ms["step_cskd_graphs"]
        result["graphs_vs_released"] = ms["loss_released"] / ms["loss_fused_graphs"]
    if graphs_error:
        result["graphs_error"] = graphs_error
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(f"device {result['device']}, batch {args.batch}, {args.height}x{args.width}, precision {args.precision}, "
          f"float32 matmul precision {args.matmul_precision}, medians of {args.repeats}:")
    for name, value in ms.items():
        print(f"  {name:17s} {value:9.2f} ms")
    print(f"  CSKD loss alone / step with it: {100 * result['loss_share_of_step']:.2f}%  "
          f"(step with minus step without: {100 * result['step_difference_share']:.2f}%)")
    if "loss_share_in_step" in result:
        print(f"  CSKD loss's forward + backward timed inside the step: {100 * result['loss_share_in_step']:.2f}%")
    print(f"  fused vs released loss: {result['fused_vs_released']:.1f}x")
    if "loss_share_of_step_graphs" in result:
        print(f"  under CUDA graphs: loss alone / step with it {100 * result['loss_share_of_step_graphs']:.2f}%, "
              f"timed inside the step {100 * result['loss_share_in_step_graphs']:.2f}%, "
              f"{result['graphs_vs_released']:.1f}x the released loss")
    if graphs_error:
        print(f"  under CUDA graphs: FAILED ({graphs_error[:300]})")
    return 1 if graphs_error else 0

if __name__ == "__main__":
    sys.exit(main())
