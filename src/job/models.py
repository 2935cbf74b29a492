"""Which detector to build, with how many classes and which names: presets, checkpoints, plug-ins.

`resolve` runs where `build` makes the real model, in each actor as it starts (the driver never imports
torch), so a checkpoint that does not fit, or a class list of the wrong length, is one clear line before
anything is written. It stays cheap: checkpoints are read with `weights_only`, and architectures are
checked on PyTorch's meta device (shapes only: no memory, no compute).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pickle
import re
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torchvision.models import get_model, get_model_weights

from job.config import ModelConfig, given_classes, is_weights_path
from job.errors import ConfigError, WeightsError, first_line

log = logging.getLogger(__name__)

# Every torchvision detection builder that returns boxes; each has a preset in configs/model/.
PRESETS = (
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "retinanet_resnet50_fpn",
    "retinanet_resnet50_fpn_v2",
    "fcos_resnet50_fpn",
    "ssd300_vgg16",
    "ssdlite320_mobilenet_v3_large",
    "maskrcnn_resnet50_fpn",  # boxes only: the mask branch is switched off
    "maskrcnn_resnet50_fpn_v2",
    "keypointrcnn_resnet50_fpn",  # boxes only: the keypoint branch is switched off
)
_BACKGROUND = {"__background__", "background", "_background_", "bg", "__bg__"}
# Where checkpoints that are not a bare state_dict keep it: torchvision's reference scripts use
# "model"; Lightning and many training loops "state_dict" or "model_state_dict".
_STATE_KEYS = ("model", "state_dict", "model_state_dict")


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    classes: list[str] | None  # names the checkpoint carries, if any


def read_checkpoint(path: str) -> Checkpoint:
    """Load a checkpoint safely: tensors, plain containers and argparse.Namespace only, never arbitrary code."""
    if not os.path.isfile(path):
        raise WeightsError(f"model.weights={path}: no such file")
    with open(path, "rb") as handle:
        head = handle.read(2)
    # torch.save writes a zip archive; its legacy format starts with a pickle protocol marker.
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":
        raise WeightsError(f"model.weights={path} is not a PyTorch checkpoint (neither torch.save's zip nor pickle)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f"a {found.group(1)} object" if found else "objects beyond tensors and plain containers"
        raise WeightsError(
            f"model.weights={path} holds {what}, which loading it safely (weights_only) refuses; save the "
            f"model's state_dict instead: torch.save(model.state_dict(), path)"
        ) from None
    except Exception as exc:  # a damaged archive, EOF: not a readable checkpoint
        raise WeightsError(
            f"model.weights={path} is not a PyTorch checkpoint ({type(exc).__name__}: {first_line(exc)})"
        ) from None
    classes = None
    if isinstance(loaded, dict):
        classes = loaded.get("classes")
        for key in _STATE_KEYS:
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise WeightsError(
            f"model.weights={path} holds no state_dict (expected a dict of tensors, or one under "
            f"{' / '.join(repr(k) for k in _STATE_KEYS)})"
        )
    state = dict(loaded)
    if all(key.startswith("module.") for key in state):  # saved from DistributedDataParallel
        state = {key.removeprefix("module."): value for key, value in state.items()}
    if classes is not None and not (isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes)):
        raise WeightsError(f"model.weights={path}: its 'classes' entry is not a list of names")
    return Checkpoint(state, list(classes) if classes is not None else None)


def _build(name: str, num_classes: int, builder_args: dict, device: str | None = None) -> torch.nn.Module:
    """The architecture with random weights (no download); on the meta device: shapes only."""
    try:
        with torch.device(device) if device else nullcontext():
            return get_model(name, weights=None, weights_backbone=None, num_classes=num_classes, **builder_args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.builder_args={builder_args} do not fit model={name}: {first_line(exc)}") from None


def infer_num_classes(name: str, state: dict[str, torch.Tensor], builder_args: dict, label: str) -> int:
    """The class count a checkpoint's head was trained with, for any architecture.

    Every class-dependent tensor's first dimension is linear in the class count (classes, or
    anchors x classes): two meta builds give the line, the checkpoint's shape gives the count.
    """
    shapes = [{k: tuple(v.shape) for k, v in _build(name, n, builder_args, "meta").state_dict().items()}
              for n in (2, 3)]
    counts = set()
    for key, two in shapes[0].items():
        three = shapes[1][key]
        if two == three:
            continue
        if key not in state:
            counts.add(-1)
            break
        slope, offset = three[0] - two[0], two[0] - 2 * (three[0] - two[0])
        classes, remainder = divmod(state[key].shape[0] - offset, slope) if slope else (0, 1)
        counts.add(classes if remainder == 0 and classes >= 1 else -1)
    if len(counts) != 1 or -1 in counts:
        raise WeightsError(
            f"{label} does not fit model={name}: its head does not match {name}'s (is it a checkpoint for "
            f"another architecture? pick its preset with model=NAME, or set model.num_classes)"
        )
    return counts.pop()


def check_fits(name: str, num_classes: int, state: dict[str, torch.Tensor], builder_args: dict, label: str) -> None:
    """Same keys and shapes as the architecture (a FrozenBatchNorm checkpoint lacks num_batches_tracked)."""
    expected = {k: tuple(v.shape) for k, v in _build(name, num_classes, builder_args, "meta").state_dict().items()}
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        problems = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if v]
        raise WeightsError(
            f"{label} does not fit model={name} with num_classes={num_classes}: {', '.join(problems)}; "
            f"is it a checkpoint for another architecture? pick its preset with model=NAME"
        )


def label_names(given: list[str], num_classes: int, source: str) -> list[str]:
    """Names of labels 1..N (N = num_classes - 1) from N names, or N+1 starting with the background."""
    labels = num_classes - 1
    if len(given) == labels:
        return list(given)
    if len(given) == num_classes and given[0].strip().lower() in _BACKGROUND:
        return list(given[1:])
    hint = f"give {labels} names (labels 1..{labels}), or {num_classes} starting with __background__"
    if len(given) == num_classes:
        hint = f"{num_classes} names must start with the background (e.g. __background__); or give {labels}"
    raise ConfigError(
        f"{source} has {len(given)} class names but the model's head has {labels} classes "
        f"(num_classes={num_classes} with background): {hint}"
    )


def default_names(num_classes: int) -> list[str]:
    """COCO's names for a 91-class head (the torchvision convention), else class_<id>."""
    if num_classes == 91:
        return list(get_model_weights("fasterrcnn_resnet50_fpn").DEFAULT.meta["categories"][1:])
    log.warning("no class names given for a %d-class head: naming them class_1..class_%d; pass model.classes",
                num_classes - 1, num_classes - 1)
    return [f"class_{i}" for i in range(1, num_classes)]


def resolve(model: ModelConfig) -> ModelConfig:
    """The model settings with `num_classes` and `classes` (names of labels 1..N) filled in and checked."""
    if model._target_:
        plugin_callable(model._target_)  # importable here; its names are checked when the actors build it
        return model
    if model.name not in PRESETS:
        raise ConfigError(f"model={model.name} is not a supported detector; use one of: {', '.join(PRESETS)}")
    given = given_classes(model)
    if is_weights_path(model.weights):
        checkpoint = read_checkpoint(model.weights)
        label = f"model.weights={model.weights}"
        num_classes = model.num_classes or infer_num_classes(model.name, checkpoint.state_dict,
                                                             model.builder_args, label)
        check_fits(model.name, num_classes, checkpoint.state_dict, model.builder_args, label)
        if given is not None:
            names = label_names(given, num_classes, "model.classes")
        elif checkpoint.classes is not None:
            names = label_names(checkpoint.classes, num_classes, f"{label}'s 'classes' entry")
        else:
            names = default_names(num_classes)
    else:
        categories = list(weights_enum(model.name, model.weights).meta["categories"])
        num_classes = len(categories)
        names = label_names(given, num_classes, "model.classes") if given is not None else categories[1:]
    return dataclasses.replace(model, num_classes=num_classes, classes=names)


def build(model: ModelConfig) -> tuple[torch.nn.Module, list[str]]:
    """The model in eval mode with its weights, and the names of labels 1..N."""
    if model._target_:
        return _build_plugin(model)
    if not isinstance(model.classes, list) or model.num_classes is None:
        model = resolve(model)
    if is_weights_path(model.weights):
        net = _build(model.name, model.num_classes, model.builder_args)
        state = read_checkpoint(model.weights).state_dict
        try:
            missing, unexpected = net.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise WeightsError(f"model.weights={model.weights} does not fit model={model.name}: "
                               f"{first_line(exc)}") from None
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise WeightsError(f"model.weights={model.weights} does not fit model={model.name}: "
                               f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    else:
        enum = weights_enum(model.name, model.weights)
        try:
            net = get_model(model.name, weights=enum, **model.builder_args)
        except Exception as exc:  # URLError, HTTPError, hash mismatch, ...
            raise WeightsError(
                f"could not load torchvision's {enum} weights for model={model.name} ({type(exc).__name__}: "
                f"{exc}); they are downloaded from the internet once into the torch hub cache. "
                f"On a machine without internet pass model.weights=/path/to/checkpoint.pth"
            ) from exc
    _boxes_only(net)
    return net.eval(), list(model.classes)


def _boxes_only(net: torch.nn.Module) -> None:
    """Mask and keypoint R-CNN: skip the branches whose outputs the job does not write (boxes unchanged)."""
    heads = getattr(net, "roi_heads", None)
    if heads is not None:
        heads.mask_roi_pool = None
        heads.keypoint_roi_pool = None


def plugin_callable(target: str):
    from hydra.utils import get_method

    try:
        return get_method(target)
    except Exception as exc:
        raise ConfigError(
            f"model._target_={target} cannot be imported ({first_line(exc)}); install the package that "
            f"defines it on every node (pip install ...), or fix the dotted path"
        ) from None


def _build_plugin(model: ModelConfig) -> tuple[torch.nn.Module, list[str]]:
    """A plug-in's `build(weights, **builder_args) -> (module, class_names)`, checked against the contract."""
    built = plugin_callable(model._target_)(weights=model.weights, **model.builder_args)
    if not (isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], torch.nn.Module)):
        raise ConfigError(f"model._target_={model._target_} must return (torch.nn.Module, class_names), "
                          f"got {type(built).__name__}")
    net, names = built[0], [str(n) for n in built[1]]
    if names and names[0].strip().lower() in _BACKGROUND:
        names = names[1:]
    given = given_classes(model)
    if given is not None:
        names = label_names(given, len(names) + 1, "model.classes") if names else given
    return net.eval(), names


def weights_enum(name: str, weights: str):
    try:
        enum_cls = get_model_weights(name)
    except (ValueError, KeyError):
        raise ConfigError(f"model={name} is not a supported detector; use one of: {', '.join(PRESETS)}") from None
    if weights == "DEFAULT":
        return enum_cls.DEFAULT
    try:
        return enum_cls[weights]
    except KeyError:
        members = ", ".join(m.name for m in enum_cls)
        raise WeightsError(
            f"model.weights={weights} is neither an existing file nor one of {name}'s torchvision "
            f"weights (DEFAULT, {members}); pass model.weights=/path/to/checkpoint.pth"
        ) from None
