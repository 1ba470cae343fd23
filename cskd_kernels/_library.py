"""How a fused kernel becomes a PyTorch op: one function, registered once per kind of backend.

Every kernel entry point of the package takes a ``backend`` string ("cpu" or
"triton") and is registered as

- ``cskd::<name>``, a torch.library custom op: opaque to torch.compile (one
  node, its fake implementation gives the shapes). It runs the C++ kernels,
  and the Triton ones where torch has no triton_op;
- ``cskd::<name>_triton``, the same function through torch.library.triton_op
  (torch 2.6 and later; registered on the first Triton call): its body
  launches every Triton kernel through torch.library.wrap_triton
  (cskd_kernels.triton.common.traceable), so torch.compile traces into it
  and Inductor sees the Triton kernels themselves: it launches them from its
  generated code, without the custom op's Python round trip, and orders them
  with the ops around them. Its fake implementation is its own body, traced
  with fake tensors.

``KernelOp`` holds both and picks by the call's ``backend`` argument, so the
call sites read like one op. Both share the autograd formula.

Which one the Triton backend calls (TRITON_OPS, set at import):
CSKD_TRITON_OP=1 the triton_op, =0 the opaque op (a fallback should a torch
release trace the kernels wrongly); unset: the triton_op, except under
TRITON_INTERPRET=1. There Inductor cannot compile Triton for the CPU and
torch's analysis of which tensors a kernel writes (it compiles the kernel for
a GPU) fails, so every input would count as written; the opaque op keeps
interpreted runs of torch.compile as they are, and the tests switch
TRITON_OPS on to trace the triton_op bodies (backend="aot_eager").
"""

import inspect
import os

import torch

from cskd_kernels.backend import constant_under_compile, triton_interpreting

NAMESPACE = "cskd"


def _triton_ops_setting():
    setting = os.environ.get("CSKD_TRITON_OP", "")
    if setting not in ("", "0", "1"):
        raise ValueError(f"CSKD_TRITON_OP must be 0 or 1 (or unset), got {setting!r}")
    if not hasattr(torch.library, "triton_op"):  # torch before 2.6
        return False
    return setting == "1" if setting else not triton_interpreting()


TRITON_OPS = _triton_ops_setting()


class KernelOp:
    """``cskd::<name>`` (opaque custom op) and ``cskd::<name>_triton`` (triton_op, made on first use) of one function."""

    def __init__(self, name, fn):
        self.name, self.fn = name, fn
        self.opaque = torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=())
        self.traceable = None
        self._autograd = None
        self._backend_index = list(inspect.signature(fn).parameters).index("backend")
        self.__doc__ = fn.__doc__
        _KERNEL_OPS.append(self)
        if _triton_ops_registered:
            self._register_traceable()

    def _register_traceable(self):
        self.traceable = torch.library.triton_op(f"{NAMESPACE}::{self.name}_triton", self.fn, mutates_args=())
        if self._autograd is not None:
            backward, setup_context = self._autograd
            self.traceable.register_autograd(backward, setup_context=setup_context)

    def for_backend(self, backend):
        """The registered op that runs ``backend``."""
        if backend == "triton" and TRITON_OPS and register_triton_ops():
            return self.traceable
        return self.opaque

    def register_fake(self, fake):
        """The opaque op's fake implementation (decorator); the triton_op traces its own body instead."""
        self.opaque.register_fake(fake)
        return fake

    def register_autograd(self, backward, *, setup_context):
        self._autograd = (backward, setup_context)  # for a triton_op registered later
        for op in (self.opaque, self.traceable):
            if op is not None:
                op.register_autograd(backward, setup_context=setup_context)

    def __call__(self, *args):
        return self.for_backend(args[self._backend_index])(*args)


_KERNEL_OPS = []
_triton_ops_registered = False


@constant_under_compile
def register_triton_ops():
    """Register every KernelOp's triton_op, once; returns True.

    On the first Triton call, not at import: triton_op imports triton and
    torch._inductor (about a second) that a CPU-only process never needs.
    torch.compile runs this eagerly (it is marked constant), so the first
    Triton call may come inside a traced function.
    """
    global _triton_ops_registered
    if not _triton_ops_registered:
        _triton_ops_registered = True
        for op in _KERNEL_OPS:
            op._register_traceable()
    return True


def kernel_op(name):
    """Decorator: register ``fn`` (which takes a ``backend`` argument) as a KernelOp named ``name``."""
    return lambda fn: KernelOp(name, fn)
