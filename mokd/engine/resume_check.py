"""Resume safety: the configuration a checkpoint was written with against the one a restart asks for, compared
before anything in the run directory is written or loaded.

Keys that change a tensor's shape (or which tensors exist) cannot be resumed at all; keys that change the
schedules or the data order are refused unless checkpoint.allow_config_change=true; everything else (max_steps,
logging, checkpoint cadence, speed switches, evaluation, the strategy and world size) may change freely.
What sets the schedules is the global batch, so a resume on another world size with the same global batch is
not a change.
"""

from __future__ import annotations

from fnmatch import fnmatch
from typing import Any

from omegaconf import OmegaConf

from mokd.config import MOKDConfig, model_sections, to_yaml
from mokd.errors import ConfigError

SHAPE_KEYS = (
    "model*.backbone", "model*.small_image", "model*.width", "model*.depth", "model*.num_heads",
    "model*.trainable_last_layer_norm", "model*.optim.name", "head.out_dim", "head.mlp_hidden_dim",
    "head.mlp_bottleneck_dim", "head.thead_*", "loss.self_thead", "loss.cross_search", "data.source",
    "data.synthetic_channels", "data.shard_channels",
)
SCHEDULE_KEYS = (
    "train.epochs", "train.seed", "model*.optim.base_lr", "model*.optim.min_lr", "model*.optim.warmup_epochs",
    "model*.optim.weight_decay", "model*.optim.weight_decay_end", "model*.optim.momentum",
    "model*.optim.freeze_last_layer_epochs", "model*.temperature.*", "loss.teacher_momentum",
    "loss.centre_momentum", "data.train_samples", "data.validation_samples", "data.synthetic_size", "data.shards",
)
GLOBAL_BATCH = "train.batch_size"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def _values(yaml_text: str) -> dict[str, Any]:
    return _flatten(OmegaConf.to_container(OmegaConf.create(yaml_text)))


def _model_sections(values: dict[str, Any]) -> list[str]:
    return model_sections(key.split(".")[0] for key in values)


def check_resume(saved_yaml: str, saved_world_size: int, config: MOKDConfig, world_size: int,
                 checkpoint: str) -> None:
    """Raise ConfigError naming every key whose change the resume of `checkpoint` cannot honour."""
    saved, requested = _values(saved_yaml), _values(to_yaml(config))
    saved_models, requested_models = _model_sections(saved), _model_sections(requested)
    if saved_models != requested_models:
        raise ConfigError(f"cannot resume {checkpoint}: it holds {len(saved_models)} models "
                          f"({', '.join(saved_models)}) and the configuration asks for {len(requested_models)} "
                          f"({', '.join(requested_models)}); the run directory is unchanged (train in a new run_dir)")
    changed = {key: (saved[key], requested[key]) for key in requested
               if key in saved and saved[key] != requested[key]}
    shape = [key for key in changed if any(fnmatch(key, pattern) for pattern in SHAPE_KEYS)]
    if shape:
        listed = ", ".join(f"{key}: {changed[key][0]!r} -> {changed[key][1]!r}" for key in shape)
        raise ConfigError(f"cannot resume {checkpoint}: {listed} changes the networks' shapes, so its weights do not "
                          f"fit; the run directory is unchanged (restore the value, or train in a new run_dir)")
    schedule = [f"{key}: {changed[key][0]!r} -> {changed[key][1]!r}" for key in changed
                if any(fnmatch(key, pattern) for pattern in SCHEDULE_KEYS)]
    saved_batch = saved.get(GLOBAL_BATCH, config.train.batch_size) * saved_world_size
    batch = config.train.batch_size * world_size
    if saved_batch != batch:
        schedule.append(f"global batch ({GLOBAL_BATCH} x {saved_world_size} processes): {saved_batch} -> {batch}")
    if schedule and not config.checkpoint.allow_config_change:
        raise ConfigError(f"refusing to resume {checkpoint}: {'; '.join(schedule)} would change the schedules or "
                          f"the data order of a run in progress; set checkpoint.allow_config_change=true to resume "
                          f"anyway, or train in a new run_dir")
