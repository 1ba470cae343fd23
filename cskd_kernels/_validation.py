"""Input checks shared by the public ops: clear errors at the boundary, kernels assume valid input."""

import torch


def check_float_tensor(name, tensor):
    """A non-empty floating-point tensor, or a TypeError/ValueError naming ``name`` and its shape."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype} (shape {tuple(tensor.shape)})")
    if tensor.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(tensor.shape)})")


def check_same_device(**tensors):
    """All tensors on one device, or a ValueError naming each tensor's device and shape."""
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} {tuple(t.shape)} on {t.device}" for name, t in tensors.items())
        raise ValueError(f"inputs must be on one device: {where}")


def check_positive(name, value):
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def accumulation_dtype(*dtypes):
    """float64 if any input is float64, else float32: kernels never accumulate in 16 bits."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
