"""Evaluation of a run's two teacher backbones: loading a run, extracting features once, k-NN, linear probe,
fine-tuning and analyses.

Features of the training split (capped at eval.max_train_samples) and of the test split are extracted once per
model; the k-NN, the linear probe and the analyses all reuse them.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from mokd.config import MOKDConfig, load_config, model_sections
from mokd.data import EvalTransform, build_eval_loader, data_statistics, dataset_for, limit_size, num_classes
from mokd.engine.checkpoint import CheckpointManager, load_teachers_file
from mokd.engine.runtime import resolve_device
from mokd.errors import DataError
from mokd.eval.analysis import attention_distance, prediction_consistency, tsne_embedding
from mokd.eval.finetune import classifier_top1, finetune, label_subset
from mokd.eval.knn import knn_predict
from mokd.eval.linear import EvalFeatures, extract_eval_features, probe_top1, train_linear_probe
from mokd.eval.plots import attention_distance_figure, consistency_figure, embedding_figure, save_figure
from mokd.eval.results_file import merge_results
from mokd.method.network import Network
from mokd.method.models import build_models


def eval_dataset(config: MOKDConfig, split: str):
    """The "train" split (the memory bank / probe training set) or the held-out split (`split="test"`) of a run's
    data; the held-out one is eval.split's: the test split, or the validation images carved from train."""
    return dataset_for(config.data, config.eval.split if split == "test" else split, config.train.seed)


class ModelFeatures(NamedTuple):
    bank: EvalFeatures  # training split (k-NN memory bank, linear-probe training set)
    test: EvalFeatures  # held-out split


def eval_loaders(config: MOKDConfig) -> tuple[DataLoader, DataLoader, int]:
    """(memory-bank loader, test loader, number of classes) with the deterministic evaluation transform."""
    train_set, test_set = eval_dataset(config, "train"), eval_dataset(config, "test")
    mean, std = data_statistics(config.data, train_set.channels)
    image_size = min(config.eval.image_size, config.data.global_crop_size)
    transform = EvalTransform(image_size, mean, std, train_set.channels)
    bank = limit_size(train_set, config.eval.max_train_samples, config.train.seed)
    bank_loader = build_eval_loader(bank, transform, config.eval.batch_size, config.data.num_workers)
    test_loader = build_eval_loader(test_set, transform, config.eval.batch_size, config.data.num_workers)
    return bank_loader, test_loader, num_classes(train_set)


def extract_run_features(config: MOKDConfig, teachers: Sequence[Network],
                         device: torch.device) -> tuple[list[ModelFeatures], int]:
    """Both teachers' k-NN and probe features of bank and test split (one pass each), and the class count."""
    bank_loader, test_loader, classes = eval_loaders(config)
    features = []
    for teacher in teachers:
        extract = partial(extract_eval_features, teacher.backbone, device=device,
                          n_last_blocks=config.eval.linear_n_last_blocks,
                          avgpool_patch_tokens=config.eval.linear_avgpool_patch_tokens)
        features.append(ModelFeatures(extract(bank_loader), extract(test_loader)))
    return features, classes


def knn_predictions(config: MOKDConfig, features: ModelFeatures, classes: int) -> torch.Tensor:
    """k-NN class of every test image (train split as memory bank)."""
    normalise = partial(F.normalize, dim=1)
    return knn_predict(normalise(features.bank.pooled), features.bank.labels, normalise(features.test.pooled),
                       classes, config.eval.knn_k, config.eval.knn_temperature)


def knn_top1_of(config: MOKDConfig, features: ModelFeatures, classes: int) -> float:
    predicted = knn_predictions(config, features, classes)
    return 100.0 * (predicted == features.test.labels).float().mean().item()


def linear_top1_of(config: MOKDConfig, features: ModelFeatures, classes: int) -> float:
    """Linear probe trained on the bank features, scored on the test features (top-1, percent)."""
    probe = train_linear_probe(features.bank.probe, features.bank.labels, classes, config.eval.linear_epochs,
                               config.eval.linear_batch_size, config.eval.linear_lr, config.train.seed)
    return probe_top1(probe, features.test.probe, features.test.labels)


def knn_scores(config: MOKDConfig, teachers: Sequence[Network], device: torch.device) -> list[float]:
    """k-NN top-1 (percent) of each teacher backbone: train split as memory bank, test split as queries."""
    features, classes = extract_run_features(config, teachers, device)
    return [knn_top1_of(config, model_features, classes) for model_features in features]


def untrained_networks(config: MOKDConfig, in_chans: int, device: torch.device) -> tuple[Network, ...]:
    """The networks as they were at step 0 (initialisation depends only on the seed)."""
    _, teachers = build_models(config, in_chans)
    return tuple(teacher.to(device) for teacher in teachers)


def evaluate_run(config: MOKDConfig, teachers: Sequence[Network], device: torch.device, steps: int,
                 features: Optional[list[ModelFeatures]] = None, linear: Optional[bool] = None) -> dict:
    """k-NN (and the linear probe when `linear`, default eval.linear_at_end) of every trained teacher, and k-NN
    of the untrained networks if asked, written to RUN/results.json. `features`: already extracted ones."""
    linear = config.eval.linear_at_end if linear is None else linear
    classes = None
    if features is None:
        features, classes = extract_run_features(config, teachers, device)
    classes = classes or num_classes(eval_dataset(config, "train"))
    untrained: list[Optional[float]] = [None] * len(config.models)
    if config.eval.knn_untrained:
        untrained = knn_scores(config, untrained_networks(config, teachers[0].backbone.in_chans, device), device)
    results = {"run_dir": str(Path(config.run_dir).resolve()), "steps": steps, "dataset": config.data.source,
               "split": config.eval.split,
               "knn": {"k": config.eval.knn_k, "temperature": config.eval.knn_temperature}}
    if linear:
        results["linear"] = linear_settings(config)
    for which, model in enumerate(config.models):
        row = {"backbone": model.backbone, "knn_top1": knn_top1_of(config, features[which], classes),
               "knn_top1_untrained": untrained[which]}
        if linear:
            row["linear_top1"] = linear_top1_of(config, features[which], classes)
        results[f"model{which + 1}"] = row
    return merge_results(Path(config.run_dir), results)


def linear_settings(config: MOKDConfig) -> dict:
    return {"epochs": config.eval.linear_epochs, "batch_size": config.eval.linear_batch_size,
            "base_lr": config.eval.linear_lr, "train_samples": config.eval.max_train_samples or "all",
            "vit_n_last_blocks": config.eval.linear_n_last_blocks,
            "vit_avgpool_patch_tokens": config.eval.linear_avgpool_patch_tokens,
            "augmentation": "none (features cached once)"}


def evaluate_linear(config: MOKDConfig, teachers: Sequence[Network], device: torch.device, steps: int) -> dict:
    """Linear probe of every teacher, merged into RUN/results.json."""
    features, classes = extract_run_features(config, teachers, device)
    updates: dict = {"steps": steps, "dataset": config.data.source, "linear": linear_settings(config)}
    for which, model in enumerate(config.models):
        updates[f"model{which + 1}"] = {"backbone": model.backbone,
                                        "linear_top1": linear_top1_of(config, features[which], classes)}
    return merge_results(Path(config.run_dir), updates)


def evaluate_finetune(config: MOKDConfig, teachers: Sequence[Network], device: torch.device, steps: int,
                      fraction: float) -> dict:
    """Both teacher backbones fine-tuned on the class-balanced `fraction` of the training labels (seeded by
    eval.subset_seed), scored on the test split, merged into RUN/results.json as model*/finetune_<pct>_top1."""
    train_set = eval_dataset(config, "train")
    _, test_loader, classes = eval_loaders(config)
    subset = label_subset(train_set, fraction, config.eval.subset_seed)
    # The evaluation loader's dataset applies the deterministic transform; fine-tuning needs it shuffled.
    transformed = build_eval_loader(subset, test_loader.dataset.transform, 1, 0).dataset
    shuffle = torch.Generator().manual_seed(config.train.seed)
    batch_size = min(config.eval.finetune_batch_size, len(subset))
    train_loader = DataLoader(transformed, batch_size=batch_size, shuffle=True, generator=shuffle,
                              drop_last=len(subset) > batch_size, num_workers=config.data.num_workers)
    key = f"finetune_{fraction * 100:g}pct_top1"
    updates: dict = {"steps": steps, "dataset": config.data.source,
                     key.replace("_top1", ""): {"fraction": fraction, "labels": len(subset),
                                                "epochs": config.eval.finetune_epochs,
                                                "batch_size": batch_size, "base_lr": config.eval.finetune_lr,
                                                "subset_seed": config.eval.subset_seed}}
    for which, (model, teacher) in enumerate(zip(config.models, teachers)):
        tuned = finetune(teacher.backbone, train_loader, classes, device, config.eval.finetune_epochs,
                         config.eval.finetune_lr, config.train.seed)
        updates[f"model{which + 1}"] = {"backbone": model.backbone, key: classifier_top1(tuned, test_loader, device)}
    return merge_results(Path(config.run_dir), updates)


def model_label(config: MOKDConfig, which: int) -> str:
    """"model1: resnet18 (width 16)" and the like, for figure titles."""
    model = config.models[which]
    width = "" if model.width is None else f" (width {model.width})"
    return f"model{which + 1}: {model.backbone}{width}"


def _analysis_images(loader: DataLoader, count: int) -> torch.Tensor:
    """The first `count` test images (deterministic order)."""
    images, collected = [], 0
    for batch, _ in loader:
        images.append(batch)
        collected += batch.shape[0]
        if collected >= count:
            break
    return torch.cat(images)[:count]


def analyse_run(config: MOKDConfig, teachers: Sequence[Network], device: torch.device, steps: int,
                features: Optional[list[ModelFeatures]] = None,
                reference: Optional[tuple[MOKDConfig, Sequence[Network]]] = None) -> dict:
    """Prediction consistency (of every pair of models), mean attention distance and t-SNE plots of every teacher,
    as PNGs in RUN/analysis/ and images in RUN/tensorboard; the numbers go to RUN/results.json under "analysis"
    (with "prediction_consistency_matrix": the percentage agreement of model i and model j, row i column j).

    `reference`: (config, teachers) of another run on the same data (e.g. two independently trained models of
    similar accuracy), whose k-NN predictions are compared with this run's as in the paper's Table 9.
    """
    run_dir = Path(config.run_dir)
    _, test_loader, classes = eval_loaders(config)
    if features is None:
        features, classes = extract_run_features(config, teachers, device)
    n_models = len(config.models)
    labels = [model_label(config, which) for which in range(n_models)]
    predictions = [knn_predictions(config, model_features, classes) for model_features in features]
    matrix = [[100.0 if i == j else prediction_consistency(predictions[i], predictions[j]) for j in range(n_models)]
              for i in range(n_models)]
    pairs = [(f"{labels[i]}\nvs {labels[j]}", matrix[i][j]) for i in range(n_models) for j in range(i + 1, n_models)]
    if reference is not None:
        reference_config, reference_teachers = reference
        if reference_config.data.source != config.data.source:
            raise DataError(f"reference run {reference_config.run_dir} was trained on "
                             f"{reference_config.data.source}, this run on {config.data.source}")
        reference_features, _ = extract_run_features(config, reference_teachers, device)
        reference_predictions = [knn_predictions(config, model_features, classes)
                                 for model_features in reference_features]
        if len(reference_config.models) != n_models:
            raise DataError(f"reference run {reference_config.run_dir} has {len(reference_config.models)} models, "
                            f"this run {n_models}: prediction consistency compares them model for model")
        reference_labels = [f"reference {model_label(reference_config, which)}" for which in range(n_models)]
        pairs += [(f"{reference_labels[i]}\nvs {reference_labels[j]}",
                   prediction_consistency(reference_predictions[i], reference_predictions[j]))
                  for i in range(n_models) for j in range(i + 1, n_models)]
        for which in range(n_models):
            pairs.append((f"{labels[which]}\nvs {reference_labels[which]}",
                          prediction_consistency(predictions[which], reference_predictions[which])))

    images = _analysis_images(test_loader, config.eval.analysis_attention_images).to(device)
    distances = [attention_distance(teacher.backbone.eval(), images) for teacher in teachers]

    generator = torch.Generator().manual_seed(config.train.seed)
    test_labels = features[0].test.labels
    chosen = torch.randperm(test_labels.shape[0], generator=generator)[:config.eval.analysis_points]
    embeddings = [tsne_embedding(model_features.test.pooled[chosen], config.train.seed)
                  for model_features in features]
    train_set = eval_dataset(config, "train")
    class_names = list(getattr(train_set, "classes", None) or [str(k) for k in range(classes)])

    out = run_dir / "analysis"
    writer = SummaryWriter(str(run_dir / "tensorboard"))
    try:
        files = [
            save_figure(consistency_figure(pairs, config.data.source), out / "prediction_consistency.png",
                        writer, "analysis/prediction_consistency", steps),
            save_figure(attention_distance_figure([(labels[which], teachers[which].backbone.is_vit,
                                                    distances[which]) for which in range(n_models)]),
                        out / "attention_distance.png", writer, "analysis/attention_distance", steps),
            save_figure(embedding_figure(list(zip(labels, embeddings)), test_labels[chosen].numpy(), class_names),
                        out / "feature_tsne.png", writer, "analysis/feature_tsne", steps),
        ]
    finally:
        writer.close()
    analysis = {"steps": steps, "prediction_consistency": {label.replace("\n", " "): value
                                                           for label, value in pairs},
                "prediction_consistency_matrix": matrix,
                "attention_distance_px": {labels[which]: distances[which].mean(dim=1).tolist()
                                          for which in range(n_models)},
                "figures": [str(path) for path in files]}
    merge_results(run_dir, {"analysis": analysis})
    return analysis


def format_analysis(analysis: dict) -> str:
    lines = ["prediction consistency (same k-NN class, % of test images):"]
    lines += [f"  {label}: {value:.2f}" for label, value in analysis["prediction_consistency"].items()]
    lines.append("mean attention distance per layer (input pixels):")
    lines += [f"  {label}: {', '.join(f'{value:.1f}' for value in values)}"
              for label, values in analysis["attention_distance_px"].items()]
    lines.append("figures: " + ", ".join(analysis["figures"]))
    return "\n".join(lines)


def format_table(results: dict) -> str:
    """Every model's scores as a text table: k-NN (untrained, trained, gain), then whichever of the linear
    probe and the fine-tuning results the run has."""
    models = model_sections(results)
    extra = sorted({key for model in models for key in results[model]
                    if key == "linear_top1" or key.startswith("finetune_")})
    lines = []
    if "knn" in results:
        lines.append(f"k-NN top-1 on the {results['dataset']} test set (k={results['knn']['k']}, "
                     f"T={results['knn']['temperature']}), teacher backbones after {results['steps']} steps")
    if extra:
        lines.append(f"further columns: {', '.join(key.replace('_top1', '') for key in extra)} top-1 (percent)")
    header = f"{'model':<8} {'backbone':<24} {'untrained':>10} {'k-NN':>10} {'gain':>8}"
    lines.append(header + "".join(f" {key.replace('_top1', ''):>14}" for key in extra))
    for model in models:
        row = results[model]
        knn, untrained = row.get("knn_top1"), row.get("knn_top1_untrained")
        gain = "" if untrained is None or knn is None else f"{knn - untrained:+.2f}"
        cells = [f"{'' if value is None else f'{value:.2f}':>{width}}"
                 for value, width in ((untrained, 10), (knn, 10))]
        line = f"{model:<8} {row['backbone']:<24} {cells[0]} {cells[1]} {gain:>8}"
        for key in extra:
            value = row.get(key)
            line += f" {'' if value is None else f'{value:.2f}':>14}"
        lines.append(line)
    return "\n".join(lines)


def load_run(run_dir: Path, overrides: Optional[list[str]] = None,
             checkpoint: Optional[str] = None) -> tuple[MOKDConfig, tuple[Network, ...], int]:
    """A run's resolved config and the teachers of its newest checkpoint that verifies (older ones after a
    warning, as a resume does) or of `checkpoint` ("step_N"), on CPU."""
    config_file = Path(run_dir) / "config.yaml"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: is {run_dir} a mokd run directory?")
    config = load_config(str(config_file), [f"run_dir={run_dir}", *(overrides or [])])
    read = {}

    def load(directory: Path) -> None:
        read.update(meta=CheckpointManager.load_meta(directory), teachers=load_teachers_file(directory))

    manager = CheckpointManager(Path(run_dir), config.checkpoint.keep_last)
    if manager.resume(load, fallback=True, is_main=True, choice=checkpoint) is None:
        raise FileNotFoundError(f"no complete checkpoint under {Path(run_dir) / 'checkpoints'}")
    train_set = eval_dataset(config, "train")
    _, teachers = build_models(config, train_set.channels)
    for teacher, teacher_state in zip(teachers, read["teachers"]):
        teacher.load_state_dict(teacher_state)
    return config, teachers, read["meta"]["step"]


def evaluate_knn_command(run_dir: Path, overrides: Optional[list[str]] = None,
                         checkpoint: Optional[str] = None) -> dict:
    config, teachers, step = load_run(run_dir, overrides, checkpoint)
    device = resolve_device(config.train.device)
    return evaluate_run(config, tuple(t.to(device) for t in teachers), device, step)


def evaluate_linear_command(run_dir: Path, overrides: Optional[list[str]] = None,
                            checkpoint: Optional[str] = None) -> dict:
    config, teachers, step = load_run(run_dir, overrides, checkpoint)
    device = resolve_device(config.train.device)
    return evaluate_linear(config, tuple(t.to(device) for t in teachers), device, step)


def evaluate_finetune_command(run_dir: Path, fraction: float, overrides: Optional[list[str]] = None,
                              checkpoint: Optional[str] = None) -> dict:
    config, teachers, step = load_run(run_dir, overrides, checkpoint)
    device = resolve_device(config.train.device)
    return evaluate_finetune(config, tuple(t.to(device) for t in teachers), device, step, fraction)


def analyse_command(run_dir: Path, reference_run: Optional[Path] = None,
                    overrides: Optional[list[str]] = None, checkpoint: Optional[str] = None) -> dict:
    config, teachers, step = load_run(run_dir, overrides, checkpoint)
    device = resolve_device(config.train.device)
    reference = None
    if reference_run is not None:
        reference_config, reference_teachers, _ = load_run(reference_run)
        reference = (reference_config, tuple(t.to(device) for t in reference_teachers))
    return analyse_run(config, tuple(t.to(device) for t in teachers), device, step, reference=reference)
