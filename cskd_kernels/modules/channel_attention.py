"""ChannelAttention: the CAM block with its learnable gamma (SPEC section 2)."""

import torch
from torch import nn

from cskd_kernels._validation import check_temperature
from cskd_kernels.ops.channel_attention import channel_attention


class ChannelAttention(nn.Module):
    """gamma * softmax_rows((rowmax(E) - E) / T) X + X per image, gamma learnable and initially 0.

    With gamma = 0 the block starts as the identity, as in DANet and CSKD;
    gamma still receives a gradient, so it moves away from 0 when trained.
    """

    def __init__(self, temperature=1.0, backend=None):
        super().__init__()
        self.temperature = check_temperature(temperature, "ChannelAttention")
        self.backend = backend
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return channel_attention(x, self.gamma, temperature=self.temperature, backend=self.backend)

    def extra_repr(self):
        return f"temperature={self.temperature}, backend={self.backend!r}"
