"""Export round trip: the exported state dict gives identical features in the stock timm model; detectron2 keys."""

from __future__ import annotations

import pickle

import pytest
import torch

from helpers import TINY_RESNET, TINY_VIT, tiny_config
from mokd.eval.export import detectron2_name, export_backbone, stock_timm_model
from mokd.method.backbones import Backbone


def trained_looking_backbone(model_config, image_size: int) -> Backbone:
    """A backbone whose weights and BatchNorm statistics differ from a fresh one's (so a silent non-load shows)."""
    torch.manual_seed(1)
    backbone = Backbone(model_config, 1, image_size, 0.0)
    with torch.no_grad():
        for parameter in backbone.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        backbone.train()(torch.randn(8, 1, image_size, image_size) * 3 + 1)  # moves BN running stats
    return backbone.eval()


@pytest.mark.parametrize("spec,image_size", [(TINY_RESNET, 16), (["backbone=resnet18", "width=8"], 64),
                                             (TINY_VIT, 16)],
                         ids=["resnet-small-image", "resnet-stock-stem", "vit"])
def test_timm_export_round_trip_gives_identical_features(tmp_path, spec, image_size):
    config = tiny_config(tmp_path, model1=spec, extra=[f"data.global_crop_size={image_size}"])
    backbone = trained_looking_backbone(config.model1, image_size)
    out = export_backbone(backbone.net, config.model1, tmp_path / "backbone.pth", "timm")
    stock = stock_timm_model(config.model1, 1, image_size)
    stock.load_state_dict(torch.load(out), strict=True)
    images = torch.randn(4, 1, image_size, image_size)
    with torch.no_grad():
        expected = backbone(images).pooled
        assert torch.equal(stock.eval()(images), expected)  # num_classes=0: forward returns the pooled features
    assert not any(key.startswith(("fc.", "head.")) for key in torch.load(out))


def test_detectron2_checkpoint_has_detectron2_resnet_names_and_shapes(tmp_path):
    config = tiny_config(tmp_path, model1=["backbone=resnet18", "width=8"])
    backbone = trained_looking_backbone(config.model1, 32)
    out = export_backbone(backbone.net, config.model1, tmp_path / "r18.pkl", "detectron2")
    with open(out, "rb") as handle:
        checkpoint = pickle.load(handle)
    assert checkpoint["__author__"] == "mokd" and checkpoint["matching_heuristics"] is True
    model = checkpoint["model"]
    state = backbone.net.state_dict()
    assert model["stem.conv1.weight"].shape == tuple(state["conv1.weight"].shape)
    assert (model["stem.conv1.norm.running_mean"] == state["bn1.running_mean"].numpy()).all()
    assert model["res2.0.conv1.weight"].shape == tuple(state["layer1.0.conv1.weight"].shape)
    assert (model["res3.0.conv2.norm.weight"] == state["layer2.0.bn2.weight"].numpy()).all()
    assert model["res3.0.shortcut.weight"].shape == tuple(state["layer2.0.downsample.0.weight"].shape)
    assert "res5.1.conv2.norm.running_var" in model and "res3.0.shortcut.norm.bias" in model
    assert not any("num_batches_tracked" in key or key.startswith(("layer", "bn1", "conv1")) for key in model)
    assert len(model) == sum(1 for key in state if not key.endswith("num_batches_tracked"))
    assert detectron2_name("layer4.1.downsample.1.running_mean") == "res5.1.shortcut.norm.running_mean"


def test_detectron2_export_refuses_a_vit(tmp_path):
    config = tiny_config(tmp_path)
    backbone = Backbone(config.model2, 1, 16, 0.0)
    with pytest.raises(ValueError, match="detectron2 export is for ResNets"):
        export_backbone(backbone.net, config.model2, tmp_path / "vit.pkl", "detectron2")
