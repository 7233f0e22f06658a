"""timm backbones behind one interface: a pooled vector z and feature tokens Z per image.

Backbones come in families (ResNet, ViT): a family names the timm models it builds, checks the options that apply
to it, and knows how its models are built, sharded and read out. Each name is registered (modelN.backbone) with
its family, so a new backbone is one name added to a family, and a new family one class (a BackboneFamily)
registered below.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import timm
import torch
from torch import nn

from mokd.config import MOKDConfig, component_check, register_choices
from mokd.errors import ConfigError
from mokd.registry import Registry

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
VIT_HEADS = {"vit_tiny_patch16_224": 3, "vit_small_patch16_224": 6, "vit_base_patch16_224": 12}
VIT_WIDTHS = {"vit_tiny_patch16_224": 192, "vit_small_patch16_224": 384, "vit_base_patch16_224": 768}
VITS = tuple(VIT_HEADS)
SMALL_IMAGE_PATCH = 4


class BackboneOutput(NamedTuple):
    pooled: torch.Tensor  # [B, C]
    tokens: torch.Tensor  # [B, N, C]
    grid: tuple[int, int]  # token grid (h, w), N = h * w


def _timm_kwargs(in_chans: int, drop_path: float) -> dict:
    """What every family's timm model is built with: headless, untrained."""
    return dict(pretrained=False, num_classes=0, in_chans=in_chans, drop_path_rate=drop_path)


class BackboneFamily(Protocol):
    """What differs between families of backbones."""

    names: tuple[str, ...]  # the timm models it builds (modelN.backbone)
    help: str
    is_vit: bool
    channels_last: bool  # whether NHWC weights and inputs help it (perf.channels_last)

    def check(self, section: str, model_config) -> None:
        """Refuse options of `section` (model1 ... modelN) that do not apply to this family."""

    def patch_size(self, model_config) -> int:
        """Pixels per token side."""

    def create(self, model_config, in_chans: int, image_size: int, drop_path: float) -> nn.Module:
        """The headless timm model."""

    def sharding_units(self, net: nn.Module) -> list[nn.Module]:
        """The blocks a sharded strategy gathers one at a time."""

    def output(self, net: nn.Module, features: torch.Tensor, images: torch.Tensor) -> BackboneOutput:
        """(z, Z, grid) from the model's forward_features of `images`."""


class ResNetFamily:
    """timm ResNets. z = global average pool of the last stage, Z = the last-stage map flattened to H*W tokens."""

    names = RESNETS
    help = "ResNet (timm): pooled last stage and its map as tokens; width sets the first stage's channels"
    is_vit = False
    channels_last = True  # NHWC weights and inputs, what tensor-core convolutions read directly

    def check(self, section: str, model_config) -> None:
        for key in ("depth", "num_heads"):
            if getattr(model_config, key) is not None:
                raise ConfigError(f"{section}.{key} applies to ViT backbones only, not {model_config.backbone}")

    def patch_size(self, model_config) -> int:
        """Pixels per token side: the total stride (the CIFAR-style stem keeps 4x more)."""
        return 8 if model_config.small_image else 32

    def create(self, model_config, in_chans: int, image_size: int, drop_path: float) -> nn.Module:
        kwargs = _timm_kwargs(in_chans, drop_path)
        if model_config.width is not None:
            width = model_config.width
            kwargs.update(stem_width=width, channels=(width, 2 * width, 4 * width, 8 * width))
        # timm zero-initialises the last BatchNorm of every residual block by default; the official code's
        # torchvision ResNets do not (zero_init_residual=False), so neither do we unless asked.
        kwargs["zero_init_last"] = model_config.zero_init_last_bn
        model = timm.create_model(model_config.backbone, **kwargs)
        if model_config.small_image:
            # CIFAR-style stem: a 3x3 stride-1 convolution and no max-pool, so 28-32 px images keep a 4x4 map.
            model.conv1 = nn.Conv2d(in_chans, model.conv1.out_channels, kernel_size=3, stride=1, padding=1,
                                    bias=False)
            model.maxpool = nn.Identity()
        return model

    def sharding_units(self, net: nn.Module) -> list[nn.Module]:
        return [block for stage in (net.layer1, net.layer2, net.layer3, net.layer4) for block in stage]

    def output(self, net: nn.Module, features: torch.Tensor, images: torch.Tensor) -> BackboneOutput:
        tokens = features.flatten(2).transpose(1, 2)
        return BackboneOutput(tokens.mean(dim=1), tokens, (features.shape[-2], features.shape[-1]))


class ViTFamily:
    """timm ViTs. z = the CLS token after the final norm, Z = the patch tokens after the final norm."""

    names = VITS
    help = ("ViT (timm): CLS token and patch tokens; width, depth and num_heads override timm's; any image side "
            "(dynamic position embeddings)")
    is_vit = True
    channels_last = False

    def check(self, section: str, model_config) -> None:
        if model_config.zero_init_last_bn:
            raise ConfigError(f"{section}.zero_init_last_bn applies to ResNet backbones only, not "
                              f"{model_config.backbone}")
        if model_config.width is not None:
            heads = model_config.num_heads or VIT_HEADS[model_config.backbone]
            if model_config.width % heads:
                raise ConfigError(f"{section}.width={model_config.width} is not divisible by its {heads} attention "
                                  f"heads")

    def patch_size(self, model_config) -> int:
        return SMALL_IMAGE_PATCH if model_config.small_image else 16

    def create(self, model_config, in_chans: int, image_size: int, drop_path: float) -> nn.Module:
        kwargs = dict(_timm_kwargs(in_chans, drop_path), img_size=image_size, dynamic_img_size=True)
        if model_config.small_image:
            kwargs["patch_size"] = SMALL_IMAGE_PATCH
        for key, timm_key in (("width", "embed_dim"), ("depth", "depth"), ("num_heads", "num_heads")):
            if getattr(model_config, key) is not None:
                kwargs[timm_key] = getattr(model_config, key)
        return timm.create_model(model_config.backbone, **kwargs)

    def sharding_units(self, net: nn.Module) -> list[nn.Module]:
        return list(net.blocks)

    def output(self, net: nn.Module, features: torch.Tensor, images: torch.Tensor) -> BackboneOutput:
        height, width = images.shape[-2:]
        patch = net.patch_embed.patch_size
        grid = (height // patch[0], width // patch[1])
        return BackboneOutput(features[:, 0], features[:, net.num_prefix_tokens:], grid)


# modelN.backbone: every name a family builds, each registered with its family.
BACKBONES: Registry[BackboneFamily] = Registry("modelN.backbone")
register_choices(BACKBONES.key, BACKBONES.helps)


def register_family(family: BackboneFamily) -> None:
    """Registers every name the family builds, with the family's help."""
    for name in family.names:
        BACKBONES.add(name, family, family.help)


register_family(ResNetFamily())
register_family(ViTFamily())


@component_check
def check_backbones(config: MOKDConfig) -> None:
    """Refuse options the backbone's family does not have, naming the model section (the names themselves are
    registered choices, refused before this check)."""
    for number, model in enumerate(config.models, start=1):
        BACKBONES.get(model.backbone).check(f"model{number}", model)


def is_vit(backbone_name: str) -> bool:
    return BACKBONES.get(backbone_name).is_vit


def create_timm_model(model_config, in_chans: int, image_size: int, drop_path: float = 0.0) -> nn.Module:
    """The timm model of a model config, headless (num_classes=0); an exported backbone loads into it strictly."""
    return BACKBONES.get(model_config.backbone).create(model_config, in_chans, image_size, drop_path)


class Backbone(nn.Module):
    """A timm backbone of a registered family returning (pooled, tokens, grid) for a batch of same-size crops."""

    def __init__(self, model_config, in_chans: int, image_size: int, drop_path: float) -> None:
        super().__init__()
        self.family = BACKBONES.get(model_config.backbone)
        self.is_vit = self.family.is_vit
        self.patch_size = self.family.patch_size(model_config)  # pixels per token side
        self.in_chans = in_chans
        self.net = self.family.create(model_config, in_chans, image_size, drop_path)
        self.num_features: int = self.net.num_features
        self.channels_last = False

    @staticmethod
    def width_of(model_config) -> int:
        """A ViT's embedding width (its configured width, else timm's for the architecture)."""
        return model_config.width or VIT_WIDTHS[model_config.backbone]

    def sharding_units(self) -> list[nn.Module]:
        """The modules a sharded strategy gathers one at a time: a ResNet's residual blocks, a ViT's blocks."""
        return self.family.sharding_units(self.net)

    def use_channels_last(self, enabled: bool) -> None:
        """Weights and inputs in NHWC where the family's convolutions read it directly (ResNets); else a no-op."""
        if not self.family.channels_last:
            return
        self.channels_last = enabled
        self.net.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    def use_fused_attention(self, enabled: bool) -> None:
        """ViTs: timm's attention through scaled_dot_product_attention, or the explicit softmax(QK^T)V."""
        for module in self.net.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = enabled

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.family.output(self.net, self.net.forward_features(images), images)
