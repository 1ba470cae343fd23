"""Throughput and the CSKD loss's share of a training step, for cskd-train's metrics.jsonl.

Each logged training row gets, over the steps since the previous logged row (its "interval"):

- ``images_per_s``: this process's images over the wall-clock time of those steps, each step timed
  from fetching its batch to the end of the step (the step ends on a host sync that reads the loss
  parts, so on a GPU its device work is included); validation and checkpoint writes between steps
  are not counted. Under torchrun the row holds the mean over processes, and ``images_per_s_total``
  the sum over processes (the run's throughput); in one process the two are equal.
- ``cskd_share`` (only with ``--distill cskd``): the CSKD loss's forward and backward time over the
  step's time, summed over the interval's steps. ``cskd_ms`` and ``step_ms`` are the two per-step
  means. On CUDA both are read from CUDA events on the step's stream (at the start and end of the
  step, around the CSKD module's call, and at the start and end of its backward): stream time
  between the marks, so launch gaps inside the loss count as the loss's. On the CPU the marks are
  ``time.perf_counter()`` readings. The events are read at logged steps only (the step's own sync
  has completed them by then): no host sync is added to any step.

The backward marks are identity autograd nodes: one on the loss the CSKD module returns (its
gradient arriving: the CSKD backward starts) and one on the student features it is given (their
gradient leaving: it ends). Between them autograd runs the CSKD backward and nothing else: its ready
queue runs the node created last first, and every node of the loss was created after the rest of
the student's graph, so the loss's backward nodes run one after another, the marker on its input
last (tests/test_train_throughput.py checks this with slow stand-ins). A step whose loss was not
finite has no backward and is left out of the share (its wall time still counts for images/s).
"""

import time

import torch

MARKS = ("step_start", "cskd_forward_start", "cskd_forward_end", "cskd_backward_start", "cskd_backward_end",
         "step_end")
PENDING_LIMIT = 64  # steps whose marks are kept before they are read (their events are long complete by then)


class _Mark(torch.autograd.Function):
    """Identity; its backward calls ``callback`` when the gradient passes this point of the graph."""

    @staticmethod
    def forward(ctx, tensor, callback):
        ctx.callback = callback
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        ctx.callback()
        return grad, None


class StepTiming:
    """Times the steps of one interval and the CSKD call inside each; ``read()`` at a logged step.

    Per step: ``begin_step()``, the step (the objective calls ``timing(cskd_module, feat_s, feat_t)``
    in place of ``cskd_module(feat_s, feat_t)``), then ``end_step(wall_seconds)``.
    """

    def __init__(self, device, batch_size):
        self.cuda = torch.device(device).type == "cuda"
        self.batch_size = batch_size
        self.current = None  # the marks of the step in progress
        self.pending = []  # marks of finished steps, not yet read
        self.reset()

    def reset(self):
        self.steps = 0
        self.wall_seconds = 0.0
        self.timed_steps = 0  # steps with every mark (the CSKD term ran forward and backward)
        self.step_ms = 0.0
        self.cskd_ms = 0.0

    def _mark(self, record, name):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            record[name] = event
        else:
            record[name] = time.perf_counter()

    def begin_step(self):
        self.current = {}
        self._mark(self.current, "step_start")

    def end_step(self, wall_seconds):
        record, self.current = self.current, None
        if record is None:
            return
        self._mark(record, "step_end")
        self.pending.append(record)
        self.steps += 1
        self.wall_seconds += wall_seconds
        if len(self.pending) >= PENDING_LIMIT:
            self._resolve()

    def __call__(self, module, feat_s, feat_t):
        """module(feat_s, feat_t) (a CSKDLoss, returning a CSKDOutput) with its forward and backward marked."""
        record = self.current
        if record is None:  # outside a timed step (e.g. a direct call of the objective)
            return module(feat_s, feat_t)
        self._mark(record, "cskd_forward_start")
        if feat_s.requires_grad:
            feat_s = _Mark.apply(feat_s, lambda: self._mark(record, "cskd_backward_end"))
        out = module(feat_s, feat_t)
        loss = out.loss
        if loss.requires_grad:
            loss = _Mark.apply(loss, lambda: self._mark(record, "cskd_backward_start"))
        self._mark(record, "cskd_forward_end")
        return out._replace(loss=loss)

    def _elapsed_ms(self, record, start, end):
        if self.cuda:
            record[end].synchronize()  # complete already (the step synced); never waits in practice
            return record[start].elapsed_time(record[end])
        return 1000.0 * (record[end] - record[start])

    def _resolve(self):
        for record in self.pending:
            if not all(name in record for name in MARKS):
                continue
            self.timed_steps += 1
            self.step_ms += self._elapsed_ms(record, "step_start", "step_end")
            self.cskd_ms += (self._elapsed_ms(record, "cskd_forward_start", "cskd_forward_end")
                             + self._elapsed_ms(record, "cskd_backward_start", "cskd_backward_end"))
        self.pending = []

    def read(self):
        """The interval's fields (see the module's docstring) as floats; starts a new interval."""
        self._resolve()
        fields = {}
        if self.steps and self.wall_seconds > 0:
            fields["images_per_s"] = self.steps * self.batch_size / self.wall_seconds
        if self.timed_steps and self.step_ms > 0:
            fields["cskd_share"] = self.cskd_ms / self.step_ms
            fields["cskd_ms"] = self.cskd_ms / self.timed_steps
            fields["step_ms"] = self.step_ms / self.timed_steps
        self.reset()
        return fields


def with_totals(row, world_size):
    """A row averaged over ranks, with images_per_s_total (the sum over ranks) added."""
    if "images_per_s" in row:
        row["images_per_s_total"] = row["images_per_s"] * world_size
    return row
