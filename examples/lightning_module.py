"""CSKD in PyTorch Lightning: a LightningModule that holds the student, the frozen teacher and CSKDLoss.

Holding CSKDLoss as a submodule makes its gammas part of ``self.parameters()``,
so the optimiser trains them and, under ``strategy="ddp"``, Lightning's DDP
wrapper averages their gradients with the student's. The teacher is frozen
and kept in eval mode. torchvision models, random data, nothing downloaded:

    python examples/lightning_module.py --steps 20
"""

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large, deeplabv3_resnet50

from cskd_kernels import CSKDLoss, capture_features, cwd_loss


class DistillationModule(L.LightningModule):
    def __init__(self, classes, lr=0.01):
        super().__init__()
        self.student = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=classes)
        self.teacher = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=classes)
        self.teacher.requires_grad_(False)
        self.distill = CSKDLoss(256, 256, grid=(5, 5), resize="student")
        self.lr = lr

    def setup(self, stage):
        # Attached here, in the process that trains (hooks do not travel with a pickled module).
        self.feat_s = capture_features(self.student, "classifier.3")
        self.feat_t = capture_features(self.teacher, "classifier.3")

    def teardown(self, stage):
        self.feat_s.remove()
        self.feat_t.remove()

    def train(self, mode=True):
        super().train(mode)
        self.teacher.eval()  # frozen BatchNorm statistics, whatever Lightning sets
        return self

    def training_step(self, batch, batch_index):
        images, labels = batch
        with torch.no_grad():
            logits_t = self.teacher(images)["out"]
        logits_s = self.student(images)["out"]
        parts = self.distill(self.feat_s.output, self.feat_t.output)
        loss = F.cross_entropy(logits_s, labels) + 3 * cwd_loss(logits_s, logits_t, temperature=2.0) + parts.loss
        self.log_dict({"loss": loss, "cam": parts.cam, "pam": parts.pam}, prog_bar=True)
        return loss

    def configure_optimizers(self):
        # self.parameters() includes the CSKD loss's gammas; the teacher's are frozen (requires_grad False).
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(trainable, lr=self.lr, momentum=0.9)


def random_loader(images, batch, size, classes):
    data = TensorDataset(torch.randn(images, 3, size, size), torch.randint(0, classes, (images, size, size)))
    return DataLoader(data, batch_size=batch, shuffle=True, drop_last=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--fast-dev-run", type=int, default=0, help="Lightning's fast_dev_run (0: off)")
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (2 with --strategy ddp: DDP on gloo)")
    parser.add_argument("--strategy", default="auto")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    L.seed_everything(0, verbose=False)
    module = DistillationModule(args.classes)
    trainer = L.Trainer(max_steps=args.steps, fast_dev_run=args.fast_dev_run or False, accelerator="cpu",
                        devices=args.devices, strategy=args.strategy, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False)
    torch.manual_seed(trainer.global_rank)  # each process its own images, as a sharded data set would give
    images = args.batch * max(args.steps, 1)
    trainer.fit(module, random_loader(images, args.batch, args.size, args.classes))
    gammas = [module.distill.gamma_cam.item(), module.distill.gamma_pam.item()]
    print(f"rank {trainer.global_rank}: gamma_cam {gammas[0]!r} gamma_pam {gammas[1]!r}", flush=True)
    return module, trainer


if __name__ == "__main__":
    main()
