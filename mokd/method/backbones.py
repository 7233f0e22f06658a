"""timm backbones behind one interface: a pooled vector z and feature tokens Z per image.

ResNet: z = global average pool of the last stage, Z = the last-stage map flattened to H*W tokens.
ViT:    z = the CLS token after the final norm, Z = the patch tokens after the final norm.
"""

from __future__ import annotations

from typing import NamedTuple

import timm
import torch
from torch import nn

from mokd.config import MOKDConfig, component_check
from mokd.errors import ConfigError

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
VIT_HEADS = {"vit_tiny_patch16_224": 3, "vit_small_patch16_224": 6, "vit_base_patch16_224": 12}
VIT_WIDTHS = {"vit_tiny_patch16_224": 192, "vit_small_patch16_224": 384, "vit_base_patch16_224": 768}
VITS = tuple(VIT_HEADS)
SMALL_IMAGE_PATCH = 4


class BackboneOutput(NamedTuple):
    pooled: torch.Tensor  # [B, C]
    tokens: torch.Tensor  # [B, N, C]
    grid: tuple[int, int]  # token grid (h, w), N = h * w


@component_check
def check_backbones(config: MOKDConfig) -> None:
    """Refuse a backbone the engine cannot build, naming its model section."""
    for number, model in enumerate(config.models, start=1):
        check_backbone(f"model{number}", model)


def check_backbone(name: str, model_config) -> None:
    """Refuse a backbone the engine cannot build; `name` is the config section (model1 ... modelN)."""
    if model_config.backbone not in RESNETS + VITS:
        raise ConfigError(f"{name}.backbone={model_config.backbone!r} is not supported; "
                          f"choose one of {', '.join(RESNETS + VITS)}")
    is_vit = model_config.backbone in VITS
    for key in ("depth", "num_heads"):
        if getattr(model_config, key) is not None and not is_vit:
            raise ConfigError(f"{name}.{key} applies to ViT backbones only, not {model_config.backbone}")
    if is_vit and model_config.zero_init_last_bn:
        raise ConfigError(f"{name}.zero_init_last_bn applies to ResNet backbones only, not {model_config.backbone}")
    if is_vit and model_config.width is not None:
        heads = model_config.num_heads or VIT_HEADS[model_config.backbone]
        if model_config.width % heads:
            raise ConfigError(f"{name}.width={model_config.width} is not divisible by its {heads} attention heads")


def is_vit(backbone_name: str) -> bool:
    return backbone_name in VITS


def patch_size(model_config) -> int:
    """Pixels per token side: the ViT patch, or the ResNet's total stride."""
    if is_vit(model_config.backbone):
        return SMALL_IMAGE_PATCH if model_config.small_image else 16
    return 8 if model_config.small_image else 32


def create_timm_model(model_config, in_chans: int, image_size: int, drop_path: float = 0.0) -> nn.Module:
    """The timm model of a model config, headless (num_classes=0); an exported backbone loads into it strictly."""
    kwargs: dict = dict(pretrained=False, num_classes=0, in_chans=in_chans, drop_path_rate=drop_path)
    if is_vit(model_config.backbone):
        kwargs.update(img_size=image_size, dynamic_img_size=True)
        if model_config.small_image:
            kwargs["patch_size"] = SMALL_IMAGE_PATCH
        for key, timm_key in (("width", "embed_dim"), ("depth", "depth"), ("num_heads", "num_heads")):
            if getattr(model_config, key) is not None:
                kwargs[timm_key] = getattr(model_config, key)
        return timm.create_model(model_config.backbone, **kwargs)
    if model_config.width is not None:
        width = model_config.width
        kwargs.update(stem_width=width, channels=(width, 2 * width, 4 * width, 8 * width))
    # timm zero-initialises the last BatchNorm of every residual block by default; the official code's
    # torchvision ResNets do not (zero_init_residual=False), so neither do we unless asked.
    kwargs["zero_init_last"] = model_config.zero_init_last_bn
    model = timm.create_model(model_config.backbone, **kwargs)
    if model_config.small_image:
        # CIFAR-style stem: a 3x3 stride-1 convolution and no max-pool, so 28-32 px images keep a 4x4 map.
        model.conv1 = nn.Conv2d(in_chans, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


class Backbone(nn.Module):
    """A timm ResNet or ViT returning (pooled, tokens, grid) for a batch of same-size crops."""

    def __init__(self, model_config, in_chans: int, image_size: int, drop_path: float) -> None:
        super().__init__()
        self.is_vit = is_vit(model_config.backbone)
        self.in_chans = in_chans
        self.net = create_timm_model(model_config, in_chans, image_size, drop_path)
        self.num_features: int = self.net.num_features
        self.channels_last = False

    @staticmethod
    def width_of(model_config) -> int:
        """A ViT's embedding width (its configured width, else timm's for the architecture)."""
        return model_config.width or VIT_WIDTHS[model_config.backbone]

    def sharding_units(self) -> list[nn.Module]:
        """The modules a sharded strategy gathers one at a time: a ResNet's residual blocks, a ViT's blocks."""
        if self.is_vit:
            return list(self.net.blocks)
        return [block for stage in (self.net.layer1, self.net.layer2, self.net.layer3, self.net.layer4)
                for block in stage]

    def use_channels_last(self, enabled: bool) -> None:
        """ResNets: weights and inputs in NHWC, the layout tensor-core convolutions read directly. ViTs: no-op."""
        if self.is_vit:
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
        features = self.net.forward_features(images)
        if self.is_vit:
            prefix = self.net.num_prefix_tokens
            height, width = images.shape[-2:]
            patch = self.net.patch_embed.patch_size
            grid = (height // patch[0], width // patch[1])
            return BackboneOutput(features[:, 0], features[:, prefix:], grid)
        grid = (features.shape[-2], features.shape[-1])
        tokens = features.flatten(2).transpose(1, 2)
        return BackboneOutput(tokens.mean(dim=1), tokens, grid)
