"""Figures of the analyses, written as PNG files and into TensorBoard as images.

matplotlib's object API (Figure + Agg canvas) is used instead of pyplot: no global figure state, no GUI backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

DPI = 120


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def consistency_figure(pairs: Sequence[tuple[str, float]], dataset: str) -> Figure:
    """Horizontal bars: percentage of test images on which each pair of models predicts the same class."""
    figure = _figure(7.5, 0.6 * len(pairs) + 1.6)
    axes = figure.add_subplot()
    labels = [label for label, _ in pairs]
    values = [value for _, value in pairs]
    bars = axes.barh(range(len(pairs)), values, color=["tab:blue", "tab:orange", "tab:green", "tab:red",
                                                       "tab:purple"][:len(pairs)])
    axes.bar_label(bars, labels=[f"{value:.1f} %" for value in values], padding=3)
    axes.set_yticks(range(len(pairs)), labels)
    axes.invert_yaxis()
    axes.set_xlim(0, 110)
    axes.set_xlabel("test images with the same k-NN prediction (%)")
    axes.set_title(f"Prediction consistency on the {dataset} test set")
    return figure


def attention_distance_figure(models: Sequence[tuple[str, bool, torch.Tensor]]) -> Figure:
    """One panel per model: mean attention distance (pixels) per block (ViT, one dot per head) or per stage
    (ResNet, self-similarity attention), with the mean over heads as a line."""
    figure = _figure(5.0 * len(models), 4.0)
    for index, (title, is_vit, distances) in enumerate(models):
        axes = figure.add_subplot(1, len(models), index + 1)
        layers = np.arange(1, distances.shape[0] + 1)
        if is_vit:
            for head in range(distances.shape[1]):
                axes.scatter(layers, distances[:, head].numpy(), s=18, alpha=0.6,
                             label="single head" if head == 0 else None)
        axes.plot(layers, distances.mean(dim=1).numpy(), "k-o", label="mean over heads" if is_vit else "stage")
        axes.set_xticks(layers)
        axes.set_xlabel("block" if is_vit else "ResNet stage (layer1..layer4)")
        axes.set_ylabel("mean attention distance (input pixels)")
        axes.set_ylim(bottom=0)
        axes.set_title(title + ("" if is_vit else "\n(self-similarity softmax of the stage's map)"), fontsize=10)
        axes.legend(loc="lower right", fontsize=8)
    figure.suptitle("Mean attention distance per layer")
    return figure


def embedding_figure(panels: Sequence[tuple[str, np.ndarray]], labels: np.ndarray,
                     class_names: Sequence[str]) -> Figure:
    """One t-SNE scatter per model, points coloured by class, one shared legend."""
    figure = _figure(5.0 * len(panels) + 1.8, 5.0)
    colours = [f"C{k % 10}" for k in range(len(class_names))]
    for index, (title, points) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), index + 1)
        for label, name in enumerate(class_names):
            chosen = labels == label
            axes.scatter(points[chosen, 0], points[chosen, 1], s=5, c=colours[label], label=name)
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("t-SNE 1")
        axes.set_ylabel("t-SNE 2")
    handles, names = figure.axes[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside right center", markerscale=3, title="class", fontsize=8)
    figure.suptitle(f"Feature distribution of the test set (t-SNE, {labels.shape[0]} images)")
    return figure


def save_figure(figure: Figure, path: Path, writer: Optional[SummaryWriter], tag: str, step: int) -> Path:
    """Write `figure` to `path` (PNG) and, with a writer, to TensorBoard under `tag` at `step`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    if writer is not None:
        with Image.open(path) as image:
            writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
    return path
