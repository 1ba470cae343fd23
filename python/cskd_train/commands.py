"""The console commands: cskd-train, cskd-eval, cskd-demo.

Imported lazily, so that a missing dependency of the ``train`` extra (timm,
torchmetrics, tqdm, ...) is one line naming the extra to install, not a
traceback.
"""

import importlib
import sys

EXTRA = "pip install 'cskd-kernels[train]'"


def _run(command, module):
    try:
        main = importlib.import_module(module).main
    except ModuleNotFoundError as error:
        print(f"{command}: error: needs the train extra ({EXTRA}): no module named {error.name!r}", file=sys.stderr)
        return 2
    return main()


def train():
    return _run("cskd-train", "cskd_train.train")


def evaluate():
    return _run("cskd-eval", "cskd_train.evaluate")


def demo():
    return _run("cskd-demo", "cskd_train.demo")


def ablate():
    return _run("cskd-ablate", "cskd_train.ablation")
