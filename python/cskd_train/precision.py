"""--precision and --device auto: mixed precision and the device, chosen once for a run.

fp32 runs everything in float32. bf16 and fp16 run the student's and the
teacher's forward (and the objective) under ``torch.autocast`` of that dtype on
the run's device: the distillation losses receive the 16-bit features and
logits as autocast makes them and run their own kernels (float32
accumulation). fp16 also scales the loss with ``torch.amp.GradScaler`` (a
step whose gradients overflow is skipped and the scale lowered), whose state
is part of a checkpoint.
"""

import contextlib
import os

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(ValueError):
    """A precision or device this machine cannot run (one-line message)."""


def resolve_device(device_arg):
    """--device: "auto" is the local rank's CUDA device when CUDA is available, else the CPU."""
    if device_arg != "auto":
        return device_arg
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def check_precision(precision, device):
    """Refuse, before any work, a precision the device's autocast or gradient scaler does not support."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return
    device = torch.device(device)
    if not torch.amp.is_autocast_available(device.type):
        raise PrecisionError(f"--precision {precision}: torch has no autocast for {device.type} devices")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PrecisionError(f"--precision bf16: the GPU {torch.cuda.get_device_name(device)} has no bfloat16 support")
    if precision == "fp16":
        try:
            torch.amp.GradScaler(device.type)
        except Exception as error:  # noqa: BLE001 - any refusal of the scaler means fp16 cannot train here
            raise PrecisionError(f"--precision fp16 needs a gradient scaler on {device.type}: {error}") from None


def autocast(precision, device):
    """The autocast context of a precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])


def grad_scaler(precision, device):
    """A GradScaler for fp16, else None (bf16 has float32's range and needs none)."""
    return torch.amp.GradScaler(torch.device(device).type) if precision == "fp16" else None
