"""Weights from the released code (CIRKD code base) and from ImageNet backbone files, in our names.

The released ResNet models name the backbone ``pretrained.*`` with a deep stem
of separate modules (conv1/bn1, conv2/bn2, conv3/bn3) and the auxiliary head
``auxlayer.*``; our models hold a timm ResNet as ``backbone.*`` whose deep stem
is one Sequential (conv1.0/1, conv1.3/4, conv1.6 and bn1) and the auxiliary
head as ``aux_head.*``. The released MobileNetV2 models name their backbone
``pretrained.net.features.K.conv.I`` (the ImageNet file ``features.K.conv.I``);
ours is timm's ``mobilenetv2_100`` (``conv_stem``, ``bn1``,
``blocks.S.J.conv_pw/bn1/conv_dw/bn2/conv_pwl/bn3``). Heads have the same
names on both sides.

Converted state dicts remember the name each entry had in the user's file
(``Converted.origin``), so that errors name keys the user can find.
"""

import torch

from cskd_train.checkpoint import CheckpointError


class Converted(dict):
    """A state dict in our names; ``origin[our_key]`` is the key as it was in the file."""

    def __init__(self, items=(), origin=None):
        super().__init__(items)
        self.origin = dict(origin or {})

    def source_name(self, key):
        return self.origin.get(key, key)

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


# The released MobileNetV2: features.0 is the stem, then one feature per inverted-residual block,
# stage after stage (blocks per stage below); timm numbers them blocks.<stage>.<block>.
MOBILENETV2_STAGE_BLOCKS = (1, 2, 3, 4, 3, 3, 1)
MOBILENETV2_FEATURE_BLOCKS = {
    feature: (stage, block)
    for feature, (stage, block) in enumerate(
        ((stage, block) for stage, count in enumerate(MOBILENETV2_STAGE_BLOCKS) for block in range(count)), 1
    )
}
# Layers of the released block's ``conv`` Sequential (ReLU6 at the gaps) -> timm's layer names.
MOBILENETV2_NO_EXPANSION = {"0": "conv_dw", "1": "bn1", "3": "conv_pw", "4": "bn2"}  # the first block
MOBILENETV2_EXPANSION = {"0": "conv_pw", "1": "bn1", "3": "conv_dw", "4": "bn2", "6": "conv_pwl", "7": "bn3"}
MOBILENETV2_STEM = {"0": "conv_stem", "1": "bn1"}


def released_mobilenetv2_key(key):
    """``features.K...`` of the released MobileNetV2 in timm's naming, or None if it is not one of its keys."""
    parts = key.split(".")
    if len(parts) < 4 or parts[0] != "features" or not parts[1].isdigit():
        return None
    feature = int(parts[1])
    if feature == 0:
        layer = MOBILENETV2_STEM.get(parts[2])
        return None if layer is None else ".".join([layer, *parts[3:]])
    if feature not in MOBILENETV2_FEATURE_BLOCKS or parts[2] != "conv" or len(parts) < 5:
        return None
    stage, block = MOBILENETV2_FEATURE_BLOCKS[feature]
    layer = (MOBILENETV2_NO_EXPANSION if feature == 1 else MOBILENETV2_EXPANSION).get(parts[3])
    return None if layer is None else ".".join([f"blocks.{stage}.{block}", layer, *parts[4:]])


def looks_released(state_dict):
    return any(key.startswith(("pretrained.", "auxlayer.")) for key in state_dict)


def released_network_key(key):
    """A key of a released segmentation network in our names (unchanged when it has no counterpart)."""
    if key.startswith("pretrained.net."):  # the MobileNetV2 backbone
        inner = released_mobilenetv2_key(key[len("pretrained.net.") :])
        return key if inner is None else "backbone." + inner
    if key.startswith("pretrained."):
        return "backbone." + released_backbone_key(key[len("pretrained.") :])
    if key.startswith("auxlayer."):
        return "aux_head." + key[len("auxlayer.") :]
    return key


def convert_released_state_dict(state_dict):
    """A DeepLabV3/PSPNet state dict of the released code (ResNet or MobileNetV2) -> our model's names."""
    state_dict = strip_prefix(dict(state_dict), "module.")  # saved from a DistributedDataParallel wrapper
    converted = Converted()
    for key, value in state_dict.items():
        if key.startswith("pretrained.fc."):
            continue  # an ImageNet classifier that segmentation does not use
        ours = released_network_key(key)
        converted[ours] = value
        converted.origin[ours] = key
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
    return convert_released_state_dict(obj) if looks_released(obj) else Converted(obj)


def backbone_state_dict(obj, backbone_keys, source):
    """ImageNet backbone weights (released resnetv1b or MobileNetV2 names, or timm names) -> the backbone's names.

    Classifier weights (fc.*, classifier.*, conv_head.*, the released
    MobileNetV2's last 1x1 block features.18) and the final MobileNetV2 norm
    are dropped: the segmentation backbone has none of them.
    """
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{source} holds no state dict (found {type(obj).__name__})")
    obj = strip_prefix(dict(obj), "module.")
    released_stem = "conv2.weight" in obj and "conv1.0.weight" not in obj
    released_mobilenet = any(key.startswith("features.") for key in obj)
    converted = Converted()
    for key, value in obj.items():
        ours = key
        if released_stem:
            ours = released_backbone_key(key)
        elif released_mobilenet:
            ours = released_mobilenetv2_key(key) or key
        if ours in backbone_keys:
            converted[ours] = value
            converted.origin[ours] = key
        elif not key.startswith(("fc.", "classifier.", "conv_head.", "bn2.", "features.18.")):
            converted[ours] = value  # kept so that the strict load names it as unexpected
            converted.origin[ours] = key
    return converted


# ---- loading, with errors in the file's own names --------------------------


def _model_keys(name, num_classes):
    """{key: shape} of one of our models, built on the meta device (no memory, no initialisation)."""
    from cskd_train.models import build_model

    with torch.device("meta"):
        model = build_model(name, num_classes)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _class_count(state_dict):
    """The class count a segmentation state dict was trained for (its classifier's output rows), or None."""
    for key in ("head.block.4.weight", "head.classifier.weight"):
        value = state_dict.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value.shape[0]
    return None


def matching_networks(state_dict):
    """Our network names whose keys and shapes the (converted) state dict has exactly."""
    from cskd_train.models import MODEL_NAMES

    classes = _class_count(state_dict)
    if classes is None:
        return []
    shapes = {key: tuple(value.shape) for key, value in state_dict.items() if isinstance(value, torch.Tensor)}
    return [name for name in MODEL_NAMES if _model_keys(name, classes) == shapes]


def mismatch(model, state_dict):
    """The first difference between a model and a converted state dict, in the file's names, or None."""
    own = model.state_dict()
    name = state_dict.source_name if isinstance(state_dict, Converted) else (lambda key: key)
    unexpected = [key for key in state_dict if key not in own]
    missing = [key for key in own if key not in state_dict]
    if unexpected:
        return (f"{len(unexpected)} of its entries are not in the model (first: {name(unexpected[0])})"
                + (f" and {len(missing)} of the model's are not in it" if missing else ""))
    if missing:
        return f"{len(missing)} of the model's entries are not in it (first, in the model's names: {missing[0]})"
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.shape != own[key].shape:
            return (f"its {name(key)} has shape {tuple(value.shape)}, "
                    f"the model expects {tuple(own[key].shape)}")
    return None


def load_network_weights(model, model_name, state_dict, source):
    """Load converted weights into one of our networks; a file that does not fit is refused in one line
    naming a key as it is in the file and, when the file fits another of our networks, which one."""
    from cskd_train.checkpoint import load_state_dict_checked

    problem = mismatch(model, state_dict)
    if problem is None:
        load_state_dict_checked(model, state_dict, source)
        return
    others = [name for name in matching_networks(state_dict) if name != model_name]
    classes = _class_count(state_dict)
    hint = f"; it holds a {others[0]} with {classes} classes" if others else ""
    raise CheckpointError(f"{source} does not fit a {model_name}: {problem}{hint}")


def load_network_file(model, model_name, path, flag):
    """Weights for one of our networks from a file: our last.pt/best.pt or a released (or plain) state dict.

    ``flag`` names the option the file came from, for the error of a training checkpoint of another model.
    """
    from cskd_train.checkpoint import is_training_checkpoint, load_file

    obj = load_file(path)
    if is_training_checkpoint(obj) and obj.get("model_name") != model_name:
        raise CheckpointError(f"{path} holds a {obj.get('model_name')}, not the {flag} {model_name}")
    load_network_weights(model, model_name, teacher_state_dict(obj, path), path)


def load_backbone_file(backbone, path):
    """ImageNet weights for a backbone from a file (released or timm names); one line when it does not fit."""
    from cskd_train.checkpoint import load_file, load_state_dict_checked

    state = backbone_state_dict(load_file(path), set(backbone.state_dict()), path)
    problem = mismatch(backbone, state)
    if problem is not None:
        raise CheckpointError(f"{path} does not fit the backbone: {problem}")
    load_state_dict_checked(backbone, state, path)
