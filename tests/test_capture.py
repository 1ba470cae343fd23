"""capture_features: a named submodule's output during the ordinary forward, for CSKDLoss and cwd_loss."""

import gc
import weakref

import pytest
import torch
import torch.distributed as dist
from torch import nn

from cskd_kernels import CSKDLoss, CaptureError, capture_features


class Net(nn.Module):
    """A small segmentation-like network: backbone -> head (returns a tuple) -> classifier, a skippable branch."""

    def __init__(self, width=8):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.head = Head(width)
        self.classifier = nn.Conv2d(width, 5, 1)
        self.extra = nn.Conv2d(width, width, 1)

    def forward(self, x, use_extra=True):
        x = self.backbone(x)
        if use_extra:
            x = self.extra(x)
        features, aux = self.head(x)
        return {"out": self.classifier(features), "aux": aux}


class Head(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y, {"map": y.mean(1, keepdim=True)}


def test_captures_the_named_output_with_its_graph():
    net = Net()
    with capture_features(net, "backbone.1") as feats:
        out = net(torch.randn(3, 3, 7, 9))
        assert feats.output.shape == (3, 8, 7, 9)
        assert feats.output.grad_fn is not None  # a student's map keeps its graph
    expected = net.backbone(torch.randn(1, 3, 4, 4))  # sanity: the module is the one named
    assert expected.shape[1] == 8 and out["out"].shape == (3, 5, 7, 9)


@pytest.mark.parametrize("select, shape", [(0, (2, 8, 6, 6)), (1, None)])
def test_select_an_element_of_a_tuple_output(select, shape):
    net = Net()
    capture = capture_features(net, "head", select=select)
    net(torch.randn(2, 3, 6, 6))
    if shape is None:  # element 1 is a dict, not a tensor: the error says to select further
        with pytest.raises(CaptureError, match="returned a dict, not a tensor"):
            capture.output
    else:
        assert capture.output.shape == shape
    capture.remove()


def test_select_out_of_range_names_the_module():
    net = Net()
    capture = capture_features(net, "head", select=2)
    with pytest.raises(CaptureError, match=r"module 'head' returned a tuple of 2: select=2"):
        net(torch.randn(2, 3, 6, 6))
    capture.remove()


def test_unknown_name_lists_the_nearest():
    with pytest.raises(CaptureError, match=r"no submodule named 'head.cnv' in Net; nearest: head.conv"):
        capture_features(Net(), "head.cnv")


def test_no_stale_capture_when_the_module_did_not_run():
    net = Net()
    with capture_features(net, "extra") as extra:
        net(torch.randn(2, 3, 6, 6))
        first = extra.output
        net(torch.randn(2, 3, 6, 6), use_extra=False)
        with pytest.raises(CaptureError, match="module 'extra' of the Net did not run in its latest forward"):
            extra.output
    assert first.shape == (2, 8, 6, 6)


def test_repeated_forwards_give_the_latest_output():
    net = Net()
    with capture_features(net, "backbone") as feats:
        a, b = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
        net(a)
        net(b)
        torch.testing.assert_close(feats.output, net.backbone(b))


def test_removal_leaves_no_hook_and_no_reference():
    net = Net()
    capture = capture_features(net, "head.conv")
    net(torch.randn(2, 3, 6, 6))
    output = weakref.ref(capture.output)
    capture.remove()
    assert not net._forward_pre_hooks and not net.head.conv._forward_hooks
    gc.collect()
    assert output() is None  # the captured map (and its graph) is released
    with pytest.raises(CaptureError, match="was removed"):
        capture.output
    # A capture dropped without remove() does not keep anything alive either, and the model can go.
    capture_features(net, "head.conv")
    model = weakref.ref(net)
    del net
    gc.collect()
    assert model() is None


def test_teacher_under_no_grad_and_cskd_loss_gradients():
    student, teacher = Net(8), Net(16)
    distill = CSKDLoss(8, 16, grid=(2, 2))
    images = torch.randn(3, 3, 8, 10)
    with capture_features(student, "head", select=0) as feat_s, capture_features(teacher, "head", select=0) as feat_t:
        student(images)
        with torch.no_grad():
            teacher(images)
        assert feat_t.output.grad_fn is None
        loss = distill(feat_s.output, feat_t.output).loss
    loss.backward()
    assert student.head.conv.weight.grad.abs().sum() > 0


def test_compiled_model_names_as_written():
    net = Net()
    compiled = torch.compile(net, backend="eager")
    with capture_features(compiled, "head.conv") as feats:  # not "_orig_mod.head.conv"
        out = compiled(torch.randn(2, 3, 6, 6))
        assert feats.output.shape == (2, 8, 6, 6) and out["out"].shape == (2, 5, 6, 6)


def test_ddp_model_names_as_written(tmp_path):
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(Net())
        with capture_features(ddp, "head.conv") as feats:  # not "module.head.conv"
            ddp(torch.randn(2, 3, 6, 6))["out"].sum().backward()
            assert feats.output.shape == (2, 8, 6, 6)
    finally:
        if started:
            dist.destroy_process_group()


def test_the_benchmarked_capture_point_is_the_returned_feature_map():
    """benchmarks/capture_overhead.py compares the two ways of getting the same map."""
    import train_support  # noqa: F401  (cskd_train on the path)
    from benchmarks.capture_overhead import FEATURES
    from cskd_train.models import build_model

    model = build_model("deeplabv3_resnet18", 5)
    with capture_features(model, FEATURES) as feats:
        out = model(torch.randn(2, 3, 40, 40))
        assert feats.output is out.features
