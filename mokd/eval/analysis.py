"""The paper's analyses of a trained pair: prediction consistency, mean attention distance, feature embedding.

Definitions used here:
- prediction consistency: the percentage of test images on which two models' k-NN predictions agree (whether
  right or wrong), as in the paper's Table 9;
- ViT mean attention distance, per block and head: for every patch-token query, the attention-weighted mean
  pixel distance between its patch centre and the centres of the patches it attends to, averaged over queries
  and images (Dosovitskiy et al.). The CLS token is left out as a query and as a key, and the patch-to-patch
  weights are renormalised to sum to one, so the figure measures spatial spread only;
- CNN analogue, per stage: the same distance for a parameter-free "attention" built from the stage's output map,
  softmax over positions of cosine similarity / 0.1 between feature vectors, with each position's similarity to
  itself left out (otherwise it dominates every row). Positions are cell centres in input pixels (stride =
  input side / map side). It measures how far apart the locations a stage represents alike are;
- feature distribution: t-SNE (scikit-learn, PCA initialisation) of the L2-normalised pooled test features.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mokd.method.backbones import Backbone

CNN_SIMILARITY_TEMPERATURE = 0.1
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


def prediction_consistency(first: torch.Tensor, second: torch.Tensor) -> float:
    """Percentage of positions where two prediction vectors agree."""
    if first.shape != second.shape:
        raise ValueError(f"prediction vectors differ in shape: {tuple(first.shape)} vs {tuple(second.shape)}")
    return 100.0 * (first == second).float().mean().item()


def _pixel_distances(grid: tuple[int, int], stride: tuple[float, float]) -> torch.Tensor:
    """[N, N] Euclidean distances in input pixels between the centres of the cells of a (h, w) grid."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    centres = torch.stack([rows.flatten() * stride[0], cols.flatten() * stride[1]], dim=1).float()
    return torch.cdist(centres, centres)


def _weighted_distance(weights: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """Mean over images and queries of sum_k w_qk d_qk for weights [B, ..., N, N]; keeps the middle dims."""
    per_query = (weights * distances).sum(dim=-1)
    return per_query.mean(dim=-1).mean(dim=0)


@torch.no_grad()
def vit_attention_distance(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    """[blocks, heads] mean attention distance in pixels of a ViT backbone on `images`."""
    net = backbone.net
    inputs: list[torch.Tensor] = []
    # The attention module's input (after norm1) is all that is needed to recompute its softmax weights.
    hooks = [block.attn.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
             for block in net.blocks]
    try:
        net.forward_features(images)
    finally:
        for hook in hooks:
            hook.remove()
    patch = net.patch_embed.patch_size
    grid = (images.shape[-2] // patch[0], images.shape[-1] // patch[1])
    distances = _pixel_distances(grid, (float(patch[0]), float(patch[1]))).to(images.device)
    prefix = net.num_prefix_tokens
    per_block = []
    for block, tokens in zip(net.blocks, inputs):
        attn = block.attn
        batch, length, channels = tokens.shape
        qkv = attn.qkv(tokens).reshape(batch, length, 3, attn.num_heads, channels // attn.num_heads)
        query, key, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        query, key = attn.q_norm(query), attn.k_norm(key)
        weights = ((query * attn.scale) @ key.transpose(-2, -1)).softmax(dim=-1)
        patch_weights = weights[..., prefix:, prefix:]
        patch_weights = patch_weights / patch_weights.sum(dim=-1, keepdim=True)
        per_block.append(_weighted_distance(patch_weights, distances))
    return torch.stack(per_block).cpu()


@torch.no_grad()
def cnn_attention_distance(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    """[stages] self-similarity attention distance in pixels of each ResNet stage's output map."""
    net = backbone.net
    maps: dict[str, torch.Tensor] = {}
    hooks = [getattr(net, name).register_forward_hook(
        lambda module, args, output, name=name: maps.__setitem__(name, output)) for name in RESNET_STAGES]
    try:
        net.forward_features(images)
    finally:
        for hook in hooks:
            hook.remove()
    per_stage = []
    for name in RESNET_STAGES:
        feature_map = maps[name]
        height, width = feature_map.shape[-2:]
        if height * width < 2:
            raise ValueError(f"stage {name} of the ResNet has a 1x1 map at {tuple(images.shape[-2:])} px input: "
                             f"no spatial spread to measure; use larger analysis images")
        tokens = F.normalize(feature_map.flatten(2).transpose(1, 2).float(), dim=-1)  # [B, N, C]
        similarity = tokens @ tokens.transpose(1, 2) / CNN_SIMILARITY_TEMPERATURE
        eye = torch.eye(height * width, dtype=torch.bool, device=similarity.device)
        weights = similarity.masked_fill(eye, float("-inf")).softmax(dim=-1)
        stride = (images.shape[-2] / height, images.shape[-1] / width)
        per_stage.append(_weighted_distance(weights, _pixel_distances((height, width), stride).to(weights.device)))
    return torch.stack(per_stage).cpu()


def attention_distance(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    """ViT: [blocks, heads]; ResNet: [stages, 1] (one 'head'), both in input pixels."""
    if backbone.is_vit:
        return vit_attention_distance(backbone, images)
    return cnn_attention_distance(backbone, images).unsqueeze(1)


def tsne_embedding(features: torch.Tensor, seed: int) -> np.ndarray:
    """[N, 2] t-SNE of L2-normalised features (perplexity 30, or less for very few points)."""
    from sklearn.manifold import TSNE  # heavy imports, only needed here
    from threadpoolctl import threadpool_limits

    points = F.normalize(features.float(), dim=1).numpy()
    if points.shape[0] < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {points.shape[0]}")
    perplexity = min(30.0, (points.shape[0] - 1) / 3)
    # One OpenMP thread: scikit-learn's Barnes-Hut gradient spends its time spin-waiting with more (measured on
    # 2 cores: 32 points, 43 s with 2 threads and 0.15 s with 1; 2000 points, 19 s and 16 s).
    with threadpool_limits(limits=1, user_api="openmp"):
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)
