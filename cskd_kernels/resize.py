"""The resize option of CSKDLoss and cwd_loss: student and teacher maps of different spatial sizes.

A student and a teacher from different families often give maps at different
strides (1/16 and 1/8, say). ``resize="student"`` resizes the student's map
to the teacher's height and width, ``resize="teacher"`` the teacher's to the
student's (bilinear, ``align_corners=False``): one resize of one side,
forward and backward, and none at all when the sizes already agree. The
default, ``None``, keeps a mismatch an error that names both shapes.
"""

import torch.nn.functional as F

RESIZE_CHOICES = (None, "student", "teacher")


def check_resize(resize, op):
    if resize not in RESIZE_CHOICES:
        raise ValueError(f"{op}: resize={resize!r} is not one of {RESIZE_CHOICES}")
    return resize


def match_spatial_size(s, t, resize, op, names=("s", "t")):
    """(s, t) at one spatial size: unchanged when they agree, else one side resized as ``resize`` says."""
    if s.shape[-2:] == t.shape[-2:]:
        return s, t
    if resize is None:
        raise ValueError(
            f"{op}: {names[0]} {tuple(s.shape)} and {names[1]} {tuple(t.shape)} differ in spatial size; pass "
            "resize='student' (the student's map to the teacher's size) or resize='teacher' to resize one side"
        )
    if resize == "student":
        return F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False), t
    return s, F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
