"""Input checks shared by the public ops: clear errors at the boundary, kernels assume valid input."""

import numbers

import torch

# The temperatures every op accepts (cwd_loss, channel_attention, position_attention, their modules and
# CSKDLoss): within them the float32 kernels match a float64 reference on every backend (README, Limits;
# tests/test_temperature.py). Outside, float32 cannot: CWD's loss is T^2 times a KL that cancels to
# ~1/T^2 (relative error ~2e-7 (T/spread)^2: 1e-3 at T = 100 for unit logits; 7.06 for 8.27 at T = 1e4),
# and a tiny T overflows x/T (NaN at T = 1e-30).
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 1e2
_TEMPERATURE_RANGE = f"[{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]"  # formatted once: dynamo cannot trace ":g"


def check_temperature(temperature, op):
    """A Python number in [MIN_TEMPERATURE, MAX_TEMPERATURE] as a float, else a TypeError/ValueError.

    ``op`` names the function or module in the message. Tensors are refused (a hyperparameter, not
    data: reading one would sync the device). A chained comparison, not math.isfinite: dynamo
    (torch.compile, dynamic=True) cannot trace isfinite on a float; NaN and inf fail the comparison.
    """
    if isinstance(temperature, torch.Tensor) or isinstance(temperature, bool) or not isinstance(
            temperature, numbers.Real):
        raise TypeError(f"{op}: temperature must be a number in {_TEMPERATURE_RANGE}, "
                        f"got {type(temperature).__name__} {temperature!r}")
    # Literal bounds, MIN_TEMPERATURE and MAX_TEMPERATURE (tests/test_temperature.py checks they agree): dynamo
    # (dynamic=True) traces a float read from a global or a closure as a symbolic input and compiles twice.
    if not 1e-2 <= temperature <= 1e2:
        raise ValueError(f"{op}: temperature must be a number in {_TEMPERATURE_RANGE}, got {temperature!r}")
    return float(temperature)


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


def accumulation_dtype(*dtypes):
    """float64 if any input is float64, else float32: kernels never accumulate in 16 bits."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
