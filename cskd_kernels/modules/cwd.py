"""CWDLoss: the nn.Module form of cwd_loss (SPEC section 4)."""

from torch import nn

from cskd_kernels._validation import check_temperature
from cskd_kernels.ops.cwd import cwd_loss
from cskd_kernels.resize import check_resize


class CWDLoss(nn.Module):
    """Channel-wise distillation loss on logits: ``CWDLoss(temperature)(s, t)``.

    s and t are student and teacher logits (B, C, H, W); no gradient flows to
    t. ``backend`` is passed to cwd_loss (None: CSKD_BACKEND, default "auto"),
    and ``resize`` (None, "student", "teacher": logits of different spatial
    sizes, one side resized to the other's).
    """

    def __init__(self, temperature=1.0, backend=None, resize=None):
        super().__init__()
        self.temperature = check_temperature(temperature, "CWDLoss")
        self.backend = backend
        self.resize = check_resize(resize, "CWDLoss")

    def forward(self, s, t):
        return cwd_loss(s, t, temperature=self.temperature, backend=self.backend, resize=self.resize)

    def extra_repr(self):
        return f"temperature={self.temperature}"
