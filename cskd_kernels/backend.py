"""Which implementation runs an op: backend names, the "auto" rules, lazy loading.

Every public op takes ``backend=`` ("auto", "triton", "cpu", "reference");
``None`` means the environment variable ``CSKD_BACKEND`` (default "auto").

- "reference": plain PyTorch (cskd_kernels.reference), any device and dtype.
- "cpu": the compiled C++ extension ``cskd_kernels._C``, CPU tensors,
  float32 and float64.
- "triton": Triton kernels, CUDA tensors, float32/float16/bfloat16; with
  ``TRITON_INTERPRET=1`` the same kernels also accept CPU tensors.
- "auto": CUDA tensor -> triton; CPU tensor -> cpu if the extension is built,
  else reference (with one warning). A dtype the chosen backend does not
  support (float64 on CUDA, float16 on the CPU) runs on the reference.

Triton and the extension are imported on first use only, so the package
imports on a machine without either. ``kernels(op, backend)`` is the one place
the ops get their kernel functions from.
"""

import functools
import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "cpu", "reference")

_DTYPES = {
    "triton": (torch.float32, torch.float16, torch.bfloat16),
    "cpu": (torch.float32, torch.float64),
}


class BackendError(ValueError):
    """A backend was asked for that cannot run the given tensors."""


def default_backend():
    """The backend named by CSKD_BACKEND, "auto" when unset."""
    name = os.environ.get("CSKD_BACKEND", "auto") or "auto"
    if name not in BACKENDS:
        raise BackendError(f"CSKD_BACKEND={name!r} is not one of {BACKENDS}")
    return name


# A bad CSKD_BACKEND is refused when the package is imported, not at the first call of an op.
default_backend()


def triton_interpreting():
    """True when Triton kernels run on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _torch_mismatch():
    """The message for an extension built against another torch minor version than the one installed, or None."""
    try:
        from cskd_kernels._build_info import TORCH_VERSION as built
    except ImportError:  # no record of a build
        return None
    if built.split(".")[:2] == torch.__version__.split(".")[:2]:
        return None
    return f"it was built against torch {built}, but torch {torch.__version__} is installed"


@functools.lru_cache(maxsize=None)
def _load_extension():
    mismatch = _torch_mismatch()
    if mismatch is not None:
        return None, ImportError(mismatch)
    try:
        return importlib.import_module("cskd_kernels._C"), None
    except ImportError as error:  # not built (CSKD_SKIP_EXTENSION=1) or broken
        return None, error


def extension():
    """The compiled C++ extension module, or None when it is not built."""
    return _load_extension()[0]


def constant_under_compile(fn):
    """Mark ``fn`` as torch.compiler.assume_constant_result does: dynamo calls it once, bakes in the result.

    torch.compile cannot trace the imports behind the availability checks
    (importlib), and their answers never change within a process, so
    resolve_backend traces with no graph break. This sets the decorator's
    marker directly: importing torch.compiler's decorator imports
    torch._dynamo, and with it triton, at package import.
    tests/test_compile.py fails (fullgraph=True) if the marker stops working.
    """
    fn._dynamo_marked_constant = True
    return fn


def empty_output(shape, like):
    """An empty contiguous tensor of ``shape`` in like's dtype and device; on the CPU from the C++ output pool.

    The pool (csrc/output_pool.h) serves large buffers as transparent huge
    pages and keeps freed ones for reuse: a fresh 64 MiB map costs one page
    fault per 2 MiB rather than per 4 KiB (measured on an AVX2 EPYC VM: about
    10 ms of first touch instead of 40-50). Without the extension, on other
    devices and while torch.compile traces, it is like.new_empty(shape).
    """
    ext = extension() if like.device.type == "cpu" and not torch.compiler.is_compiling() else None
    if ext is None:
        return like.new_empty(shape)
    return ext.empty_output(list(shape), like)


@constant_under_compile
def extension_built():
    """True when the C++ extension imports."""
    return extension() is not None


def extension_error():
    """Why the extension could not be imported (None when it was)."""
    return _load_extension()[1]


@constant_under_compile
def triton_available():
    return _triton_importable()


@functools.lru_cache(maxsize=None)
def _triton_importable():
    try:
        importlib.import_module("triton")
        return True
    except ImportError:
        return False


def triton_kernels(op):
    """The module cskd_kernels.triton.<op>, imported on first use."""
    if not triton_available():
        raise BackendError("backend='triton' needs the triton package, which is not installed")
    return importlib.import_module(f"cskd_kernels.triton.{op}")


def _without_autocast(kernel):
    """``kernel`` run with autocast off on its tensors' device.

    The kernels choose their own precision (float32 accumulation at least).
    Under an active autocast the PyTorch calls inside them would be
    re-dispatched to bfloat16 (the C++ CAM kernel's at::bmm: a dtype error)
    or lose precision.
    """

    @functools.wraps(kernel)
    def run(*args):
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(device, enabled=False):
            return kernel(*args)

    return run


class _Kernels:
    """The kernel functions of one op on one fused backend, as attributes (resolved on first use)."""

    def __init__(self, op, backend):
        if backend == "cpu":
            ext = extension()
            if ext is None:
                raise BackendError(f"backend='cpu' needs the C++ extension, which is not built ({extension_error()})")
            self._source, self._names = ext, (f"{op}_{{}}",)
        elif backend == "triton":
            # Triton modules name their launchers with or without the op prefix.
            self._source, self._names = triton_kernels(op), (f"{op}_{{}}", "{}")
        else:
            raise BackendError(f"{op} has no kernels for backend={backend!r} (fused backends: 'cpu', 'triton')")
        self._op, self._backend = op, backend

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        for pattern in self._names:
            kernel = getattr(self._source, pattern.format(name), None)
            if kernel is not None:
                kernel = _without_autocast(kernel)
                setattr(self, name, kernel)  # later lookups skip __getattr__
                return kernel
        raise AttributeError(f"backend {self._backend!r} has no kernel {name!r} for op {self._op!r}")


@functools.lru_cache(maxsize=None)
def kernels(op, backend):
    """The kernels of ``op`` on ``backend`` ("cpu" or "triton"): ``kernels("cwd", "cpu").forward``.

    A kernel ``name`` is the extension's ``<op>_<name>`` on "cpu" and
    cskd_kernels.triton.<op>'s ``<op>_<name>`` (or ``<name>``) on "triton".
    Every kernel runs with autocast disabled (see _without_autocast).
    """
    return _Kernels(op, backend)


_warned_no_extension = False


def _warn_no_extension_once():
    global _warned_no_extension
    if not _warned_no_extension:
        _warned_no_extension = True
        warnings.warn(
            "cskd_kernels: the C++ extension is not built "
            f"({extension_error()}); CPU tensors run on the slower plain PyTorch "
            "reference. Reinstall with `pip install --no-build-isolation -e .` "
            "(without CSKD_SKIP_EXTENSION=1) to build it.",
            RuntimeWarning,
            stacklevel=4,
        )


def _auto(device, dtypes):
    if device.type == "cuda":
        if triton_available() and all(d in _DTYPES["triton"] for d in dtypes):
            return "triton"
        return "reference"
    if device.type == "cpu":
        if not extension_built():
            _warn_no_extension_once()
            return "reference"
        if all(d in _DTYPES["cpu"] for d in dtypes):
            return "cpu"
    return "reference"


def _check_runnable(name, device, dtypes):
    if name == "reference":
        return
    bad = sorted({str(d) for d in dtypes if d not in _DTYPES[name]})
    if bad:
        supported = ", ".join(str(d) for d in _DTYPES[name])
        raise BackendError(f"backend={name!r} does not support dtype {', '.join(bad)} (it runs {supported})")
    if name == "cpu":
        if device.type != "cpu":
            raise BackendError(f"backend='cpu' runs CPU tensors only, got a tensor on {device}")
        if not extension_built():
            raise BackendError(
                f"backend='cpu' needs the C++ extension, which is not built ({extension_error()}); "
                "install with `pip install --no-build-isolation -e .`"
            )
    if name == "triton":
        if not triton_available():
            raise BackendError("backend='triton' needs the triton package, which is not installed")
        if device.type == "cpu" and not triton_interpreting():
            raise BackendError(
                "backend='triton' runs CUDA tensors; got CPU tensors "
                "(set TRITON_INTERPRET=1 to run the Triton kernels on the CPU through its interpreter)"
            )
        if device.type not in ("cuda", "cpu"):
            raise BackendError(f"backend='triton' cannot run tensors on {device}")


def resolve_backend(requested, *tensors):
    """The backend that runs an op on ``tensors`` (all on one device, checked by the caller)."""
    name = default_backend() if requested is None else requested
    if name not in BACKENDS:
        raise BackendError(f"backend={name!r} is not one of {BACKENDS}")
    device = tensors[0].device
    dtypes = {t.dtype for t in tensors}
    if name == "auto":
        return _auto(device, dtypes)
    _check_runnable(name, device, dtypes)
    return name
