"""k-NN vote, prediction consistency and mean attention distance against literal float64 re-computations written
here from their definitions (DINO's weighted k-NN; Dosovitskiy et al.'s mean attention distance)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import TINY_RESNET, TINY_VIT, tiny_config
from literal_eval import literal_knn
from mokd.eval.analysis import cnn_attention_distance, prediction_consistency, vit_attention_distance
from mokd.eval.knn import knn_predict, knn_top1
from mokd.method.backbones import Backbone


def random_features(samples: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random features (not normalised) and labels; four classes on overlapping clusters, so votes are mixed."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, 16, generator=torch.Generator().manual_seed(99))
    labels = torch.randint(0, classes, (samples,), generator=gen)
    return centres[labels] + 1.5 * torch.randn(samples, 16, generator=gen), labels


@pytest.mark.parametrize("bank_size, k", [(300, 20), (12, 20), (50, 1)], ids=["k20", "k-above-bank", "k1"])
def test_knn_predict_equals_a_literal_weighted_vote(bank_size, k):
    bank, bank_labels = random_features(bank_size, 4, seed=bank_size)
    queries, _ = random_features(90, 4, seed=1000 + bank_size)
    expected = literal_knn(bank, bank_labels, queries, 4, k)
    # float64 in, so that the comparison is exact; chunk 32 splits the queries into uneven chunks.
    predicted = knn_predict(F.normalize(bank.double(), dim=1), bank_labels, F.normalize(queries.double(), dim=1),
                            4, k=k, temperature=0.07, chunk=32)
    assert torch.equal(predicted, expected)
    assert len(set(expected.tolist())) > 1  # the vote is not one constant class


def test_knn_weights_decide_against_the_majority():
    """Two near neighbours of class 1 outvote three farther ones of class 0 only through exp(sim / T)."""
    angles = torch.tensor([0.05, 0.06, 0.5, 0.55, 0.6])
    bank = torch.stack([angles.cos(), angles.sin()], dim=1).double()
    labels = torch.tensor([1, 1, 0, 0, 0])
    query = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert literal_knn(bank, labels, query, 2, k=5).item() == 1
    assert knn_predict(bank, labels, query, 2, k=5).item() == 1
    # At a high temperature the weights are nearly equal and the majority (class 0) wins.
    assert literal_knn(bank, labels, query, 2, k=5, temperature=100.0).item() == 0
    assert knn_predict(bank, labels, query, 2, k=5, temperature=100.0).item() == 0


def test_knn_top1_on_features_with_a_known_accuracy():
    """Each class a tight cluster around its own axis: every query's neighbours share its class, except the queries
    deliberately given the wrong label (the first 13 of 40), so top-1 is exactly 27 / 40."""
    gen = torch.Generator().manual_seed(5)
    bank_labels = torch.arange(60) % 3
    test_labels = torch.arange(40) % 3
    axes = torch.eye(3, 8)
    bank = F.normalize(axes[bank_labels] + 0.01 * torch.randn(60, 8, generator=gen), dim=1)
    test = F.normalize(axes[test_labels] + 0.01 * torch.randn(40, 8, generator=gen), dim=1)
    wrong = test_labels.clone()
    wrong[:13] = (wrong[:13] + 1) % 3
    assert knn_top1(bank, bank_labels, test, wrong, 3) == pytest.approx(100.0 * 27 / 40)


def test_prediction_consistency_of_two_prediction_sets_with_a_known_agreement():
    gen = torch.Generator().manual_seed(6)
    first = torch.randint(0, 10, (200,), generator=gen)
    second = first.clone()
    changed = torch.randperm(200, generator=gen)[:46]
    second[changed] = (second[changed] + torch.randint(1, 10, (46,), generator=gen)) % 10  # always a different class
    assert prediction_consistency(first, second) == pytest.approx(100.0 * (200 - 46) / 200)
    with pytest.raises(ValueError, match="differ in shape"):
        prediction_consistency(first, second[:-1])


# ------------------------------------------------------------------------------------- mean attention distance


def patch_centres(grid: tuple[int, int], stride: tuple[float, float]) -> torch.Tensor:
    """[N, 2] (row, column) pixel centres of the cells of a grid, row-major like the token order."""
    return torch.tensor([[(r + 0.5) * stride[0], (c + 0.5) * stride[1]]
                         for r in range(grid[0]) for c in range(grid[1])], dtype=torch.float64)


def literal_mean_distance(weights: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """weights [B, H, N, N] (rows sum to 1) -> [H]: for every image, head and query q, sum over keys k of
    w_qk * |centre_q - centre_k|, averaged over queries and images."""
    distance = ((centres[:, None, :] - centres[None, :, :]) ** 2).sum(dim=-1).sqrt()  # [N, N], pixels
    per_query = (weights.double() * distance).sum(dim=-1)  # [B, H, N]
    return per_query.mean(dim=(0, 2))


def vit_attention_maps(backbone: Backbone, images: torch.Tensor) -> list[torch.Tensor]:
    """Every block's softmax attention [B, heads, 1 + N, 1 + N] as timm's explicit attention path computes it (the
    input of its attention dropout), captured during a normal forward."""
    backbone.use_fused_attention(False)
    maps: list[torch.Tensor] = []
    hooks = [block.attn.attn_drop.register_forward_hook(lambda module, args, output: maps.append(args[0].double()))
             for block in backbone.net.blocks]
    with torch.no_grad():
        backbone.eval()(images)
    for hook in hooks:
        hook.remove()
    return maps


def tiny_vit(tmp_path, seed: int) -> Backbone:
    torch.manual_seed(seed)
    config = tiny_config(tmp_path, model2=[*TINY_VIT, "num_heads=4"])
    return Backbone(config.model2, 1, 16, 0.0)


def test_vit_attention_distance_of_uniform_attention_is_the_mean_patch_distance(tmp_path):
    """Zero query and key weights: every token attends uniformly, and without the CLS token every patch query
    spreads over all 16 patches of a 4 x 4 grid of 4 px patches: the mean pairwise centre distance, in closed form."""
    backbone = tiny_vit(tmp_path, seed=0)
    assert backbone.net.patch_embed.patch_size == (4, 4)
    width = backbone.num_features
    with torch.no_grad():
        for block in backbone.net.blocks:
            block.attn.qkv.weight[:2 * width].zero_()
            block.attn.qkv.bias[:2 * width].zero_()
    pairs = [(r1, c1, r2, c2) for r1 in range(4) for c1 in range(4) for r2 in range(4) for c2 in range(4)]
    expected = sum(4 * math.hypot(r1 - r2, c1 - c2) for r1, c1, r2, c2 in pairs) / 16**2
    distance = vit_attention_distance(backbone, torch.randn(3, 1, 16, 16))
    assert distance.shape == (2, 4)  # two blocks, four heads
    torch.testing.assert_close(distance.double(), torch.full((2, 4), expected, dtype=torch.float64),
                               rtol=1e-6, atol=1e-5)


def test_vit_attention_distance_equals_the_literal_one_on_random_attention(tmp_path):
    backbone = tiny_vit(tmp_path, seed=1)
    with torch.no_grad():
        for block in backbone.net.blocks:  # sharper, uneven attention than at initialisation
            block.attn.qkv.weight[:2 * backbone.num_features].mul_(25.0)
    images = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    centres = patch_centres((4, 4), (4.0, 4.0))
    expected = []
    for attention in vit_attention_maps(backbone, images):
        patches = attention[..., 1:, 1:]  # the CLS token neither as query nor as key, rows renormalised
        expected.append(literal_mean_distance(patches / patches.sum(dim=-1, keepdim=True), centres))
    expected = torch.stack(expected)
    assert expected.std() > 0.3  # heads and blocks differ, so a mix-up of heads or blocks shows
    backbone.use_fused_attention(True)
    torch.testing.assert_close(vit_attention_distance(backbone, images).double(), expected, rtol=1e-5, atol=1e-5)


def test_cnn_attention_distance_equals_the_literal_self_similarity_one(tmp_path):
    """Per stage: softmax over the other positions of cosine similarity / 0.1 between the stage's feature vectors,
    weighted pixel distance between cell centres (stride = input side / map side)."""
    torch.manual_seed(3)
    config = tiny_config(tmp_path, model1=TINY_RESNET)
    backbone = Backbone(config.model1, 1, 32, 0.0).eval()
    images = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    maps = {}
    hooks = [getattr(backbone.net, name).register_forward_hook(
        lambda module, args, output, name=name: maps.__setitem__(name, output.double()))
        for name in ("layer1", "layer2", "layer3", "layer4")]
    with torch.no_grad():
        backbone(images)
    for hook in hooks:
        hook.remove()
    expected = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        feature_map = maps[name]
        side = feature_map.shape[-1]
        vectors = feature_map.flatten(2).transpose(1, 2)
        vectors = vectors / vectors.norm(dim=-1, keepdim=True)
        logits = vectors @ vectors.transpose(1, 2) / 0.1
        logits = logits - torch.diag(torch.full((side * side,), math.inf, dtype=torch.float64))
        weights = logits.softmax(dim=-1).unsqueeze(1)  # one "head"
        expected.append(literal_mean_distance(weights, patch_centres((side, side), (32 / side, 32 / side)))[0])
    torch.testing.assert_close(cnn_attention_distance(backbone, images).double(), torch.stack(expected),
                               rtol=1e-5, atol=1e-5)
