"""CSKD in torchdistill: CSKDLoss registered as a torchdistill loss, modules named by forward hooks in YAML.

The configuration (torchdistill_cskd.yaml next to this file) names the
student's and the teacher's modules through torchdistill's forward hooks and
combines three registered mid-level losses in a WeightedSumLoss: CE on the
student's logits, CWD on the logits and the CSKD term on the hooked maps.
torchdistill's optimiser covers the student's parameters only; CSKDLoss's
own (two gammas) live in the criterion, so they are added as a parameter
group. torchvision models, random data, nothing downloaded:

    python examples/torchdistill_cskd.py --steps 20
"""

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from torchdistill.common import yaml_util
from torchdistill.core.distillation import get_distillation_box
from torchdistill.losses.registry import register_mid_level_loss
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large, deeplabv3_resnet50

from cskd_kernels import CSKDLoss, cwd_loss

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchdistill_cskd.yaml")


def logits(io_dict):
    """The model's logits from torchdistill's I/O dict ('.' is the whole model; torchvision returns a dict)."""
    output = io_dict["."]["output"]
    return output["out"] if isinstance(output, dict) else output


@register_mid_level_loss(key="CSKDTerm")
class CSKDTerm(nn.Module):
    """CSKDLoss between the hooked outputs of a student module and a teacher module (names as in the YAML)."""

    def __init__(self, student_module_path, teacher_module_path, student_channels, teacher_channels, **cskd_kwargs):
        super().__init__()
        self.student_module_path, self.teacher_module_path = student_module_path, teacher_module_path
        if "grid" in cskd_kwargs and cskd_kwargs["grid"] is not None:
            cskd_kwargs["grid"] = tuple(cskd_kwargs["grid"])
        self.cskd = CSKDLoss(student_channels, teacher_channels, **cskd_kwargs)
        self.last = None

    def forward(self, student_io_dict, teacher_io_dict, targets, *args, **kwargs):
        self.last = self.cskd(student_io_dict[self.student_module_path]["output"],
                              teacher_io_dict[self.teacher_module_path]["output"])
        return self.last.loss


@register_mid_level_loss(key="CWDTerm")
class CWDTerm(nn.Module):
    def __init__(self, temperature=2.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student_io_dict, teacher_io_dict, targets, *args, **kwargs):
        return cwd_loss(logits(student_io_dict), logits(teacher_io_dict), temperature=self.temperature)


@register_mid_level_loss(key="SegmentationCE")
class SegmentationCE(nn.Module):
    def forward(self, student_io_dict, teacher_io_dict, targets, *args, **kwargs):
        return F.cross_entropy(logits(student_io_dict), targets)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--classes", type=int, default=6)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    teacher = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=args.classes).eval()
    student = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=args.classes)
    images = args.batch * args.steps
    dataset = TensorDataset(torch.randn(images, 3, args.size, args.size),
                            torch.randint(0, args.classes, (images, args.size, args.size)))
    train_config = yaml_util.load_yaml_file(CONFIG)["train"]
    train_config["train_data_loader"]["kwargs"]["batch_size"] = args.batch
    box = get_distillation_box(teacher, student, {"train": dataset}, train_config, torch.device("cpu"),
                               device_ids=None, distributed=False, lr_factor=1)
    cskd_term = box.criterion.term_dict["cskd"][0]
    box.optimizer.add_param_group({"params": list(cskd_term.parameters())})  # the gammas train with the student
    box.pre_epoch_process(epoch=0)
    losses = []
    for step, (sample_batch, targets, supp_dict) in enumerate(box.train_data_loader):
        loss = box.forward_process(sample_batch, targets, supp_dict)
        box.post_forward_process(loss=loss)
        parts = cskd_term.last
        losses.append({"loss": loss.item(), "cam": parts.cam.item(), "pam": parts.pam.item()})
        print(f"step {step + 1}: loss {loss.item():.4f} (CSKD cam {parts.cam.item():.4f}, pam {parts.pam.item():.4f})")
    box.post_epoch_process()
    return losses, cskd_term


if __name__ == "__main__":
    main()
