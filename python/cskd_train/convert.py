"""Weights from the released code (CIRKD code base) and from ImageNet backbone files, in our names.

The released models name the backbone ``pretrained.*`` with a deep stem of
separate modules (conv1/bn1, conv2/bn2, conv3/bn3) and the auxiliary head
``auxlayer.*``; our models hold a timm ResNet as ``backbone.*`` whose deep stem
is one Sequential (conv1.0/1, conv1.3/4, conv1.6 and bn1) and the auxiliary
head as ``aux_head.*``. Heads have the same names on both sides.
"""

from cskd_train.checkpoint import CheckpointError

# Released deep stem -> timm deep stem.
STEM_NAMES = {
    "conv1.": "conv1.0.",
    "bn1.": "conv1.1.",
    "conv2.": "conv1.3.",
    "bn2.": "conv1.4.",
    "conv3.": "conv1.6.",
    "bn3.": "bn1.",
}


def strip_prefix(state_dict, prefix):
    if state_dict and all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix) :]: value for key, value in state_dict.items()}
    return state_dict


def released_backbone_key(key):
    """A key of the released ResNet (resnetv1b, deep stem) in timm's naming."""
    for old, new in STEM_NAMES.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def looks_released(state_dict):
    return any(key.startswith(("pretrained.", "auxlayer.")) for key in state_dict)


def convert_released_state_dict(state_dict):
    """A DeepLabV3/PSPNet state dict of the released code -> our model's names."""
    state_dict = strip_prefix(dict(state_dict), "module.")  # saved from a DistributedDataParallel wrapper
    converted = {}
    for key, value in state_dict.items():
        if key.startswith("pretrained."):
            inner = key[len("pretrained.") :]
            if inner.startswith("fc."):
                continue  # an ImageNet classifier that segmentation does not use
            converted["backbone." + released_backbone_key(inner)] = value
        elif key.startswith("auxlayer."):
            converted["aux_head." + key[len("auxlayer.") :]] = value
        else:
            converted[key] = value
    return converted


def teacher_state_dict(obj, source):
    """Model weights from a cskd-train checkpoint, a released state dict, or our own plain state dict."""
    from cskd_train.checkpoint import is_training_checkpoint

    if is_training_checkpoint(obj):
        return obj["model"]
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{source} holds no state dict (found {type(obj).__name__})")
    obj = strip_prefix(dict(obj), "module.")
    return convert_released_state_dict(obj) if looks_released(obj) else obj


def backbone_state_dict(obj, backbone_keys, source):
    """ImageNet backbone weights (released resnetv1b names or timm names) -> the backbone's names.

    Classifier weights (fc.*, classifier.*, conv_head.*) and the final
    MobileNetV2 norm are dropped: the segmentation backbone has none of them.
    """
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{source} holds no state dict (found {type(obj).__name__})")
    obj = strip_prefix(dict(obj), "module.")
    released_stem = "conv2.weight" in obj and "conv1.0.weight" not in obj
    converted = {}
    for key, value in obj.items():
        key = released_backbone_key(key) if released_stem else key
        if key in backbone_keys:
            converted[key] = value
        elif not key.startswith(("fc.", "classifier.", "conv_head.", "bn2.")):
            converted[key] = value  # kept so that the strict load names it as unexpected
    return converted
