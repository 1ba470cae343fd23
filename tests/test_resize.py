"""The resize option: student and teacher maps of different spatial sizes (cwd_loss, CWDLoss, CSKDLoss)."""

import collections

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from cskd_kernels import CWDLoss, cwd_loss


class CountResizes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "upsample" in str(func):
            self.calls[str(func).split(".")[1]] += 1
        return func(*args, **(kwargs or {}))


def bilinear(x, like):
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


@pytest.mark.parametrize("resize", ["student", "teacher"])
def test_cwd_loss_resizes_one_side(resize):
    s = torch.randn(2, 5, 8, 10, dtype=torch.float64, requires_grad=True)  # stride 16 ...
    t = torch.randn(2, 5, 16, 20, dtype=torch.float64)                     # ... and stride 8
    s_expected = s.detach().clone().requires_grad_(True)
    if resize == "student":
        expected = cwd_loss(bilinear(s_expected, t), t, temperature=2.0)
    else:
        expected = cwd_loss(s_expected, bilinear(t, s_expected), temperature=2.0)
    loss = cwd_loss(s, t, temperature=2.0, resize=resize)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(s.grad, s_expected.grad)
    torch.testing.assert_close(CWDLoss(2.0, resize=resize)(s, t), expected)


@pytest.mark.parametrize("resize, forward_resizes, backward_resizes", [("student", 1, 1), ("teacher", 1, 0)])
def test_one_resize_of_one_side(resize, forward_resizes, backward_resizes):
    s = torch.randn(2, 5, 8, 10, requires_grad=True)
    t = torch.randn(2, 5, 16, 20)
    with CountResizes() as forward:
        loss = cwd_loss(s, t, resize=resize)
    with CountResizes() as backward:
        loss.backward()
    assert sum(forward.calls.values()) == forward_resizes, forward.calls
    assert sum(backward.calls.values()) == backward_resizes, backward.calls
    with CountResizes() as same_size:  # maps of one size: the option costs nothing
        cwd_loss(s, torch.randn(2, 5, 8, 10), resize=resize).backward()
    assert not same_size.calls


def test_a_mismatch_without_resize_is_an_error_naming_both_shapes():
    with pytest.raises(ValueError, match=r"s \(2, 5, 8, 10\) and t \(2, 5, 16, 20\) differ in spatial size; "
                                         r"pass resize='student'"):
        cwd_loss(torch.randn(2, 5, 8, 10), torch.randn(2, 5, 16, 20))


@pytest.mark.parametrize("s_shape, t_shape", [((2, 5, 8, 8), (3, 5, 8, 8)), ((2, 5, 8, 8), (2, 6, 8, 8))])
def test_batch_or_class_mismatch_is_refused_even_with_resize(s_shape, t_shape):
    with pytest.raises(ValueError, match="one batch and class count"):
        cwd_loss(torch.randn(*s_shape), torch.randn(*t_shape), resize="student")


def test_bad_resize_value():
    with pytest.raises(ValueError, match=r"resize='both' is not one of"):
        CWDLoss(resize="both")


# ---- CSKDLoss --------------------------------------------------------------


@pytest.mark.parametrize("resize", ["student", "teacher"])
def test_cskd_loss_resizes_one_side(resize):
    from cskd_kernels import CSKDLoss

    loss = CSKDLoss(8, 16, grid=(2, 2), projection="fixed", resize=resize).double()
    plain = CSKDLoss(8, 16, grid=(2, 2), projection="fixed").double()
    plain.load_state_dict(loss.state_dict())
    with torch.no_grad():
        for module in (loss, plain):
            module.gamma_cam.fill_(0.3)
            module.gamma_pam.fill_(0.6)
    feat_s = torch.randn(3, 8, 5, 6, dtype=torch.float64, requires_grad=True)  # stride 16
    feat_t = torch.randn(3, 16, 10, 12, dtype=torch.float64)                  # stride 8
    s_expected = feat_s.detach().clone().requires_grad_(True)
    if resize == "student":
        expected = plain(bilinear(s_expected, feat_t), feat_t)
    else:
        expected = plain(s_expected, bilinear(feat_t, s_expected))
    out = loss(feat_s, feat_t)
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want)
    out.loss.backward()
    expected.loss.backward()
    torch.testing.assert_close(feat_s.grad, s_expected.grad)
    with CountResizes() as forward:
        again = loss(feat_s, feat_t)
    with CountResizes() as backward:
        again.loss.backward()
    assert sum(forward.calls.values()) == 1 and sum(backward.calls.values()) == (resize == "student")


def test_cskd_loss_mismatch_without_resize_names_both_shapes():
    from cskd_kernels import CSKDLoss

    with pytest.raises(ValueError, match=r"CSKDLoss: feat_s \(3, 8, 5, 6\) and feat_t \(3, 16, 10, 12\) differ in "
                                         r"spatial size; pass resize="):
        CSKDLoss(8, 16, grid=(2, 2))(torch.randn(3, 8, 5, 6), torch.randn(3, 16, 10, 12))
    with pytest.raises(ValueError, match=r"differ in batch size"):
        CSKDLoss(8, 16, grid=(2, 2), resize="student")(torch.randn(3, 8, 5, 6), torch.randn(4, 16, 10, 12))
