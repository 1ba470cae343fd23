"""cskd_kernels: fused kernels for Channel-Spatial Knowledge Distillation.

Public ops (each takes ``backend=``, see cskd_kernels.backend):
    linear_cka, cka_loss, channel_attention, cwd_loss, position_attention
Modules: ChannelAttention, CWDLoss, PositionAttention, CSKDLoss (the whole distillation loss)
Every temperature lies in [MIN_TEMPERATURE, MAX_TEMPERATURE] (check_temperature refuses others).
The plain PyTorch definitions of every op live in cskd_kernels.reference.
"""

from cskd_kernels._validation import MAX_TEMPERATURE, MIN_TEMPERATURE, check_temperature
from cskd_kernels.backend import BACKENDS, BackendError, resolve_backend
from cskd_kernels.capture import CaptureError, FeatureCapture, capture_features
from cskd_kernels.modules.channel_attention import ChannelAttention
from cskd_kernels.modules.cskd_loss import CSKDLoss, CSKDOutput
from cskd_kernels.modules.cwd import CWDLoss
from cskd_kernels.modules.position_attention import PositionAttention
from cskd_kernels.ops.channel_attention import channel_attention
from cskd_kernels.ops.cka import cka_loss, linear_cka
from cskd_kernels.ops.cwd import cwd_loss
from cskd_kernels.ops.position_attention import position_attention

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendError",
    "CaptureError",
    "FeatureCapture",
    "CSKDLoss",
    "CSKDOutput",
    "CWDLoss",
    "ChannelAttention",
    "MAX_TEMPERATURE",
    "MIN_TEMPERATURE",
    "PositionAttention",
    "capture_features",
    "channel_attention",
    "check_temperature",
    "cka_loss",
    "cwd_loss",
    "linear_cka",
    "position_attention",
    "resolve_backend",
]
