"""Files in the released code's formats, for the tests: built from tests/released_models/ (see its README)."""

import json
import os

import torch

import train_support
from cskd_train.convert import convert_released_state_dict
from cskd_train.models import build_model

LAYOUTS = os.path.join(train_support.REPO, "tests", "released_models")


def layout(name):
    with open(os.path.join(LAYOUTS, f"{name}.json"), encoding="utf-8") as handle:
        return json.load(handle)


def released_state(name, prefix=""):
    """A file of the released layout ``name`` with random, distinct values (a swapped mapping shows)."""
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    state = {}
    for key, shape, dtype in layout(name)["state_dict"]:
        if dtype == "int64":
            state[prefix + key] = torch.randint(0, 1000, shape, generator=generator)
        elif key.endswith("running_var"):
            state[prefix + key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[prefix + key] = torch.randn(shape, generator=generator) * 0.1
    return state


def save(directory, state, name="released.pth"):
    path = os.path.join(directory, name)
    torch.save(state, path)
    return str(path)


def released_network_file(directory, name, num_classes):
    """One of our networks, randomly initialised for ``num_classes``, saved under the released names.

    Returns (model, path). The released names come from the 19-class layout (the same keys for any count).
    """
    model = build_model(name, num_classes)
    ours_to_released = convert_released_state_dict(released_state(name)).origin
    state = {ours_to_released[key]: value for key, value in model.state_dict().items()}
    return model, save(directory, state, f"{name}_{num_classes}_released.pth")
