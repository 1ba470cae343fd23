"""Feature capture: the output of a named submodule, taken during a model's ordinary forward.

CSKD compares feature maps inside the networks (DeepLabV3's map after the
head's 3x3 conv block, for instance), which models from torchvision, timm or
segmentation_models_pytorch do not return. ``capture_features`` attaches a
forward hook to the submodule named as ``named_modules()`` names it and keeps
its latest output:

    with capture_features(student, "classifier.3") as feat_s, capture_features(teacher, "classifier.3") as feat_t:
        logits_s = student(images)["out"]
        with torch.no_grad():
            logits_t = teacher(images)["out"]
        loss = distill(feat_s.output, feat_t.output).loss

- Names are those of the model as written: a ``DistributedDataParallel``
  (``module.``) or ``torch.compile`` (``_orig_mod.``) wrapper is looked
  through.
- ``select`` picks one element of a module that returns a tuple, list or
  dict (an index or a key).
- Each forward of the model starts with an empty capture, so ``output`` is
  always from the latest forward; a module that did not run in it is an
  error that names it, never a stale map.
- ``remove()`` (or leaving the ``with`` block) removes both hooks and drops
  the output: nothing of the capture stays attached to the model.
"""

import difflib
import weakref

import torch
from torch import nn

# Wrappers whose submodule names carry a prefix the user did not write.
_WRAPPER_ATTRIBUTES = ("module", "_orig_mod")


class CaptureError(LookupError):
    """A capture that cannot give what was asked for (one-line message naming the module)."""


def unwrap(model):
    """The model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        inner = None
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            inner = model._orig_mod
        if inner is None:
            return model
        model = inner


def find_module(model, name):
    """The submodule ``name`` of the unwrapped model; an unknown name lists the nearest existing ones."""
    modules = dict(unwrap(model).named_modules())
    if name in modules and name != "":
        return modules[name]
    names = [n for n in modules if n]
    near = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    if not near:  # a prefix typo: offer the names that share the first component
        near = [n for n in names if n.split(".")[0] == name.split(".")[0]][:5]
    hint = f"; nearest: {', '.join(near)}" if near else f"; the model has {len(names)} submodules, e.g. {', '.join(names[:5])}"
    raise CaptureError(f"no submodule named {name!r} in {type(unwrap(model)).__name__}{hint}")


def _select(output, select, name):
    if select is None:
        return output
    try:
        return output[select]
    except (IndexError, KeyError, TypeError):
        if isinstance(output, dict):
            what = f"a dict with keys {list(output)}"
        elif isinstance(output, (tuple, list)):
            what = f"a {type(output).__name__} of {len(output)}"
        else:
            what = f"a {type(output).__name__}"
        raise CaptureError(f"module {name!r} returned {what}: select={select!r} does not pick an element of it") from None


class FeatureCapture:
    """The latest output of one submodule of a model (see the module docstring); use ``capture_features``."""

    def __init__(self, model, name, select=None):
        self.name, self.select = name, select
        target = find_module(model, name)
        root = unwrap(model)
        self._output = None
        self._ran = False
        # The hooks hold the capture weakly: a capture that is dropped without remove() frees its output.
        this = weakref.ref(self)

        def reset(module, args):
            capture = this()
            if capture is not None:
                capture._output, capture._ran = None, False

        def keep(module, args, output):
            capture = this()
            if capture is not None:
                capture._output, capture._ran = _select(output, capture.select, capture.name), True

        self._handles = [root.register_forward_pre_hook(reset), target.register_forward_hook(keep)]
        self._model_type = type(root).__name__

    @property
    def output(self):
        """The module's output in the model's latest forward (a tensor with its autograd graph)."""
        if self._handles is None:
            raise CaptureError(f"the capture of {self.name!r} was removed")
        if not self._ran:
            raise CaptureError(f"module {self.name!r} of the {self._model_type} did not run in its latest forward "
                               "(or the model has not run since the capture was attached)")
        if not isinstance(self._output, torch.Tensor):
            raise CaptureError(f"module {self.name!r} returned a {type(self._output).__name__}, not a tensor: "
                               "pass select= (an index or key) to pick one")
        return self._output

    def remove(self):
        """Detach both hooks and drop the output; idempotent."""
        for handle in self._handles or ():
            handle.remove()
        self._handles, self._output, self._ran = None, None, False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def __repr__(self):
        state = "removed" if self._handles is None else ("captured" if self._ran else "waiting")
        return f"FeatureCapture({self.name!r}, select={self.select!r}, {state})"


def capture_features(model, name, *, select=None):
    """Capture the output of ``model``'s submodule ``name`` in every forward; a context manager too."""
    return FeatureCapture(model, name, select)
