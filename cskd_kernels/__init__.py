"""cskd_kernels: fused kernels for Channel-Spatial Knowledge Distillation.

Public ops (each takes ``backend=``, see cskd_kernels.backend):
    linear_cka, cka_loss, position_attention
The plain PyTorch definitions of every op live in cskd_kernels.reference.
"""

from cskd_kernels.backend import BACKENDS, BackendError, resolve_backend
from cskd_kernels.ops.cka import cka_loss, linear_cka
from cskd_kernels.ops.position_attention import position_attention

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendError", "cka_loss", "linear_cka", "position_attention", "resolve_backend"]
