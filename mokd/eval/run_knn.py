"""k-NN evaluation of both teacher backbones of a run (and of the same networks untrained)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from mokd.config import MOKDConfig, load_config
from mokd.data import EvalTransform, build_dataset, build_eval_loader, dataset_statistics, limit_size, num_classes
from mokd.engine.checkpoint import CheckpointManager
from mokd.engine.runtime import resolve_device
from mokd.eval.knn import extract_features, knn_top1
from mokd.method.network import Network
from mokd.method.pair import build_pair

RESULTS_FILE = "results.json"


def eval_datasets(config: MOKDConfig):
    """(memory bank, test set) with the evaluation transform; the test split is the dataset's held-out one."""
    data = config.data
    splits = []
    for split in ("train", "test"):
        dataset = build_dataset(data.source, split, data.root, synthetic_size=data.synthetic_size,
                                synthetic_image_size=data.synthetic_image_size,
                                synthetic_classes=data.synthetic_classes, synthetic_channels=data.synthetic_channels,
                                seed=config.train.seed)
        splits.append(dataset)
    return splits


def knn_scores(config: MOKDConfig, teachers: tuple[Network, Network], device: torch.device) -> list[float]:
    """k-NN top-1 (percent) of each teacher backbone: train split as memory bank, test split as queries."""
    train_set, test_set = eval_datasets(config)
    mean, std = dataset_statistics(config.data.source, train_set.channels)
    image_size = min(config.eval.image_size, config.data.global_crop_size)
    transform = EvalTransform(image_size, mean, std, train_set.channels)
    classes = num_classes(train_set)
    bank = limit_size(train_set, config.eval.max_train_samples, config.train.seed)
    bank_loader = build_eval_loader(bank, transform, config.eval.batch_size, config.data.num_workers)
    test_loader = build_eval_loader(test_set, transform, config.eval.batch_size, config.data.num_workers)
    scores = []
    for teacher in teachers:
        bank_features, bank_labels = extract_features(teacher.backbone, bank_loader, device)
        test_features, test_labels = extract_features(teacher.backbone, test_loader, device)
        scores.append(knn_top1(bank_features, bank_labels, test_features, test_labels, classes,
                               config.eval.knn_k, config.eval.knn_temperature))
    return scores


def untrained_networks(config: MOKDConfig, in_chans: int, device: torch.device) -> tuple[Network, Network]:
    """The networks as they were at step 0 (initialisation depends only on the seed)."""
    _, teachers = build_pair(config, in_chans)
    return tuple(teacher.to(device) for teacher in teachers)


def evaluate_run(config: MOKDConfig, teachers: tuple[Network, Network], device: torch.device,
                 steps: int) -> dict:
    """k-NN of both trained teachers (and untrained networks if asked), written to RUN/results.json."""
    trained = knn_scores(config, teachers, device)
    untrained: list[Optional[float]] = [None, None]
    if config.eval.knn_untrained:
        untrained = knn_scores(config, untrained_networks(config, teachers[0].backbone.in_chans, device), device)
    results = {"run_dir": str(Path(config.run_dir).resolve()), "steps": steps, "dataset": config.data.source,
               "knn": {"k": config.eval.knn_k, "temperature": config.eval.knn_temperature}}
    for which, model in enumerate((config.model1, config.model2)):
        results[f"model{which + 1}"] = {"backbone": model.backbone, "knn_top1": trained[which],
                                        "knn_top1_untrained": untrained[which]}
    (Path(config.run_dir) / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    return results


def format_table(results: dict) -> str:
    lines = [f"k-NN top-1 on the {results['dataset']} test set (k={results['knn']['k']}, "
             f"T={results['knn']['temperature']}), teacher backbones after {results['steps']} steps",
             f"{'model':<8} {'backbone':<24} {'untrained':>10} {'trained':>10} {'gain':>8}"]
    for which in ("model1", "model2"):
        row = results[which]
        untrained = row["knn_top1_untrained"]
        gain = "" if untrained is None else f"{row['knn_top1'] - untrained:+.2f}"
        untrained_text = "" if untrained is None else f"{untrained:.2f}"
        lines.append(f"{which:<8} {row['backbone']:<24} {untrained_text:>10} {row['knn_top1']:>10.2f} {gain:>8}")
    return "\n".join(lines)


def load_run(run_dir: Path, overrides: Optional[list[str]] = None) -> tuple[MOKDConfig, tuple[Network, Network], int]:
    """A run's resolved config and its newest complete checkpoint's teachers, on CPU."""
    config_file = Path(run_dir) / "config.yaml"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: is {run_dir} a mokd run directory?")
    config = load_config(str(config_file), [f"run_dir={run_dir}", *(overrides or [])])
    latest = CheckpointManager(Path(run_dir), config.checkpoint.keep_last).latest()
    if latest is None:
        raise FileNotFoundError(f"no complete checkpoint under {Path(run_dir) / 'checkpoints'}")
    state = CheckpointManager.load(latest)
    train_set, _ = eval_datasets(config)
    _, teachers = build_pair(config, train_set.channels)
    for teacher, teacher_state in zip(teachers, state["teachers"]):
        teacher.load_state_dict(teacher_state)
    return config, teachers, state["step"]


def evaluate_knn_command(run_dir: Path, overrides: Optional[list[str]] = None) -> dict:
    config, teachers, step = load_run(run_dir, overrides)
    device = resolve_device(config.train.device)
    return evaluate_run(config, tuple(t.to(device) for t in teachers), device, step)
