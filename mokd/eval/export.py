"""A teacher backbone written for use outside mokd: a plain timm state dict, or a detectron2 ResNet checkpoint.

timm: the state dict of the backbone's timm model (created with num_classes=0, so no classifier), loading with
strict=True into `stock_timm_model`, i.e. timm.create_model(name, num_classes=0, in_chans=..., and the width /
depth / patch arguments of the config). For the ImageNet presets these are the stock architectures. The
small-image ResNet variant (CIFAR stem) needs the stock model's stem changed the same way before loading:
model.conv1 = nn.Conv2d(in_chans, stem_width, 3, stride=1, padding=1, bias=False); model.maxpool = nn.Identity().

detectron2: the renaming detectron2's tools/convert-torchvision-to-d2.py applies to a torchvision/timm ResNet
(conv1/bn1 -> stem.conv1(.norm), layerN -> res(N+1), bnK -> convK.norm, downsample.0/1 -> shortcut(.norm)),
pickled as {"model": {name: numpy array}, "__author__": "mokd", "matching_heuristics": True}. BatchNorm's
num_batches_tracked counters are dropped (detectron2's FrozenBatchNorm2d has none).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from torch import nn

from mokd.errors import ConfigError
from mokd.method.backbones import create_timm_model, is_vit

FORMATS = ("timm", "detectron2")


def stock_timm_model(model_config, in_chans: int, image_size: int) -> nn.Module:
    """The timm model an exported state dict loads into with strict=True (see the module docstring)."""
    return create_timm_model(model_config, in_chans, image_size)


def timm_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's timm state dict, detached and on CPU."""
    return {name: tensor.detach().cpu().clone() for name, tensor in net.state_dict().items()}


_D2_RULES = (
    (r"^conv1\.", "stem.conv1."),
    (r"^bn1\.", "stem.conv1.norm."),
    (r"^layer(\d)\.", lambda match: f"res{int(match.group(1)) + 1}."),
    (r"\.bn(\d)\.", r".conv\1.norm."),
    (r"\.downsample\.0\.", ".shortcut."),
    (r"\.downsample\.1\.", ".shortcut.norm."),
)


def detectron2_name(timm_name: str) -> str:
    """detectron2 ResNet parameter name of a timm/torchvision ResNet one."""
    name = timm_name
    for pattern, replacement in _D2_RULES:
        name = re.sub(pattern, replacement, name)
    return name


def detectron2_checkpoint(state: dict[str, torch.Tensor]) -> dict:
    """The detectron2-style checkpoint dict of a ResNet timm state dict."""
    model = {}
    for name, tensor in state.items():
        if name.endswith("num_batches_tracked"):
            continue
        if name.startswith("fc."):
            raise ValueError(f"state dict key {name!r}: a classifier has no place in a detectron2 backbone")
        model[detectron2_name(name)] = tensor.numpy()
    return {"model": model, "__author__": "mokd", "matching_heuristics": True}


def export_backbone(net: nn.Module, model_config, out: Path, fmt: str) -> Path:
    """Write the backbone `net` (a timm model) to `out` in format `fmt` (one of FORMATS)."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r} is not one of {', '.join(FORMATS)}")
    state = timm_state_dict(net)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "timm":
        torch.save(state, out)
        return out
    if is_vit(model_config.backbone):
        raise ConfigError(f"detectron2 export is for ResNets; {model_config.backbone} is a ViT (use --format timm)")
    with open(out, "wb") as handle:
        pickle.dump(detectron2_checkpoint(state), handle)
    return out
