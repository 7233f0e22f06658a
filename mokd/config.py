"""The one typed configuration schema of mokd, its YAML presets and dotted command-line overrides.

A run's configuration is built in three layers: the dataclass defaults below, a YAML preset from
`configs/` (named or given as a path), then `key=value` overrides such as `train.epochs=5`.
OmegaConf checks every layer against the schema, so an unknown key or a value of the wrong type is
refused before any work starts, with the offending key named. The resolved result is saved in the
run directory as `config.yaml`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration that cannot be trained: unknown key, wrong type, or an impossible combination."""


def option(default: Any, help: str) -> Any:
    """A schema field with its help text (shown by `mokd train --help`)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def section(factory: type, help: str) -> Any:
    return field(default_factory=factory, metadata={"help": help})


@dataclass
class TemperatureConfig:
    student: float = option(0.1, "student softmax temperature tau_s")
    teacher_start: float = option(0.04, "teacher temperature at step 0 (linear warm-up start)")
    teacher_end: float = option(0.07, "teacher temperature after the warm-up")
    warmup_epochs_self: float = option(30.0, "teacher-temperature warm-up of the self terms L_sm, L_st (official CNN: 50)")
    warmup_epochs_cross: float = option(30.0, "teacher-temperature warm-up of the cross terms L_cm, L_ct")
    warmup_unit: str = option("step", "the warm-up moves every step, or once per epoch (epoch: DINO's and the "
                              "official code's schedule, indexed by epoch)")


@dataclass
class OptimConfig:
    name: str = option("adamw", "optimiser: sgd | lars | adamw")
    base_lr: float = option(5e-4, "learning rate per 256 images (scaled by global batch / 256)")
    min_lr: float = option(1e-5, "final learning rate of the cosine schedule")
    warmup_epochs: float = option(10.0, "linear learning-rate warm-up, epochs")
    weight_decay: float = option(0.04, "weight decay at step 0 (cosine schedule; none on biases and norms)")
    weight_decay_end: float = option(0.4, "weight decay at the last step")
    momentum: float = option(0.9, "SGD / LARS momentum")
    clip_grad: float = option(3.0, "per-parameter gradient-norm clip; 0 disables")
    freeze_last_layer_epochs: float = option(1.0, "epochs during which both heads' last layers get no update")


@dataclass
class ModelConfig:
    backbone: str = option("resnet18", "timm backbone: resnet18|34|50|101, vit_tiny|small|base_patch16_224")
    small_image: bool = option(False, "28-32 px variant: CIFAR-style ResNet stem, or ViT with 4-pixel patches")
    width: Optional[int] = option(None, "ResNet first-stage channels or ViT embedding dimension (null: timm's)")
    depth: Optional[int] = option(None, "ViT depth (null: timm's)")
    num_heads: Optional[int] = option(None, "ViT attention heads (null: timm's)")
    drop_path: float = option(0.0, "stochastic depth rate of the student (teachers never drop)")
    trainable_last_layer_norm: bool = option(False, "train weight_g of the MLP-Head's weight-normalised last layer "
                                             "(official: false for the CNN, true for the ViT; the T-Head's is "
                                             "always trained)")
    zero_init_last_bn: bool = option(False, "ResNet: zero-initialise the last BatchNorm of each residual block "
                                     "(timm's default; the official torchvision ResNets do not)")
    thead_optim: str = option("auto", "schedules of this model's T-Head parameter group: own | other (the other "
                              "model's lr and weight-decay schedules, every T-Head parameter decayed) | auto "
                              "(other for a CNN paired with a ViT, as in the official code; else own)")
    cross_weight: float = option(1.0, "lambda_i, weight of this model's cross terms L_cm + L_ct")
    koleo_weight: float = option(0.0, "weight of the KoLeo regulariser on this student's pooled global-crop "
                                 "features (DINOv2; spreads features against dimensional collapse); 0: off")
    optim: OptimConfig = section(OptimConfig, "optimiser and schedules of this student")
    temperature: TemperatureConfig = section(TemperatureConfig, "temperatures of this model's loss terms")


@dataclass
class HeadConfig:
    out_dim: int = option(65536, "K, output dimension of both heads of both models")
    mlp_hidden_dim: int = option(2048, "MLP-Head hidden width")
    mlp_bottleneck_dim: int = option(256, "MLP-Head bottleneck before the weight-normalised last layer")
    mlp_batchnorm: bool = option(False, "BatchNorm after each hidden Linear of the MLP-Head (DINO's use_bn_in_head; "
                                 "keeps the teacher from going uniform on small data)")
    thead_dim: Optional[int] = option(None, "T-Head width D, shared (queries cross between the models); null: "
                                      "the widest ViT's width (official), 384 for two CNNs")
    thead_depth: int = option(3, "T-Head transformer blocks")
    thead_heads: int = option(6, "T-Head attention heads")
    thead_mlp_ratio: float = option(4.0, "T-Head MLP ratio")
    attention: str = option("sdpa", "T-Head attention: sdpa | flash (if installed) | math")


@dataclass
class LossConfig:
    self_mlp: bool = option(True, "L_sm: self-distillation of the MLP-Head")
    self_thead: bool = option(True, "L_st: self-distillation of the T-Head")
    cross_mlp: bool = option(True, "L_cm: MLP-Head against the other model's teacher")
    cross_search: bool = option(True, "L_ct: feature search with cross-attention in the other teacher's T-Head")
    search_pairing: str = option("local_to_global", "local_to_global (official) | global_to_global (paper)")
    centre_momentum: float = option(0.9, "momentum m_c of the six centres")
    teacher_momentum: float = option(0.996, "EMA momentum at step 0 (cosine schedule to 1)")
    kernel: str = option("auto", "DINO cross-entropy implementation: auto | triton | native | torch | reference "
                                 "(auto: triton on CUDA, native on CPU when built, else torch)")
    centring: str = option("centre", "teacher targets of L_sm, L_st, L_cm: centre (softmax((t - c) / tau_t), the "
                           "paper) | sinkhorn_knopp (DINOv2/v3: equipartition over the global batch)")
    sinkhorn_iterations: int = option(3, "Sinkhorn-Knopp normalisation rounds (loss.centring=sinkhorn_knopp)")


@dataclass
class DataConfig:
    source: str = option("fashion_mnist", "fashion_mnist | imagefolder | synthetic | webdataset (tar shards)")
    root: Optional[str] = option(None, "dataset root (imagefolder: ROOT/train, ROOT/val; fashion_mnist: IDX dir)")
    global_crop_size: int = option(224, "side of the two global crops, px")
    local_crop_size: int = option(96, "side of the local crops, px")
    n_local_crops: int = option(8, "local crops per image")
    global_crop_scale: list[float] = option([0.25, 1.0], "area range of global crops")
    local_crop_scale: list[float] = option([0.05, 0.25], "area range of local crops")
    blur_sigma: list[float] = option([0.1, 2.0], "Gaussian-blur radius range at 224 px; each crop scales it by "
                                     "its side / 224 (DINO's 0.1-2 px is meant for 224 px crops)")
    num_workers: int = option(2, "data-loading worker processes")
    train_samples: int = option(0, "train on a fixed random subset of this many images (0: the whole split)")
    validation_samples: int = option(0, "carve this many fixed images from the training split as the validation "
                                        "split (never trained on; eval.split=validation scores on it)")
    synthetic_size: int = option(256, "synthetic source: images per split")
    synthetic_image_size: int = option(32, "synthetic source: image side, px")
    synthetic_classes: int = option(10, "synthetic source: classes")
    synthetic_channels: int = option(3, "synthetic source: channels")
    shards: Optional[str] = option(None, "webdataset: training shard URLs, brace-expanded, '::' between patterns "
                                   "(/data/train-{000000..000146}.tar, or pipe:aws s3 cp s3://b/train-{...}.tar -)")
    eval_shards: Optional[str] = option(None, "webdataset: held-out (val/test) shard URLs for k-NN, linear probe "
                                        "and fine-tuning (read in order, not shuffled)")
    shard_manifest: Optional[str] = option(None, "webdataset: manifest.json of the training shards (per-shard "
                                           "sample counts; default: beside local shards; needed for pipe: URLs)")
    shard_channels: int = option(3, "webdataset: channels the images are decoded to (1 for Fashion-MNIST shards)")
    shard_statistics: str = option("imagefolder", "webdataset: normalisation statistics of this source "
                                   "(imagefolder = ImageNet | fashion_mnist | synthetic)")
    shuffle_buffer: int = option(1000, "webdataset: samples in each worker's shuffle buffer (kept encoded)")
    max_corrupt_fraction: float = option(0.01, "webdataset: stop when a data worker skips more than this fraction "
                                         "of its share of an epoch as corrupt or missing")


@dataclass
class TrainConfig:
    epochs: int = option(100, "training epochs (all schedules span them)")
    batch_size: int = option(64, "images per device per step")
    max_steps: int = option(0, "stop after this many steps in total (0: all epochs)")
    seed: int = option(0, "seed of model initialisation, data order and augmentation")
    precision: str = option("auto", "auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 (GradScaler per model)")
    device: str = option("auto", "auto | cpu | cuda")
    deterministic: bool = option(False, "deterministic algorithms (exact resume on CPU)")
    log_every: int = option(10, "steps between metric records")
    threads: int = option(0, "intra-op CPU threads per process (0: torch's default, one per core); set 1 when "
                          "other busy processes share the cores: descheduled threads spin")
    warn_feature_cosine: float = option(0.95, "warn when a teacher's pooled features reach this mean pairwise cosine "
                                        "(features collapsing onto one direction)")
    warn_feature_rank: float = option(1.5, "warn when a teacher's pooled features fall to this effective rank")
    warn_entropy_fraction: float = option(0.98, "warn when a teacher's entropy reaches this fraction of ln K "
                                          "(uniform collapse)")


@dataclass
class PerfConfig:
    """Speed switches. Each changes how a step runs, not what it computes (up to floating-point rounding;
    grouped_crops=false also changes BatchNorm's batch statistics, which then cover one crop)."""

    grouped_crops: bool = option(True, "one backbone pass per crop resolution (false: one pass per crop, as "
                                 "in the official code's per-crop loop)")
    fused_ema: bool = option(True, "teacher EMA through the fused ema_ kernel (false: DINO's per-tensor loop)")
    optimizer: str = option("foreach", "optimiser implementation for sgd/adamw: loop (one tensor at a time) | "
                            "foreach (multi-tensor) | fused (one kernel; CUDA, CPU); LARS always loops")
    channels_last: bool = option(False, "ResNet weights and inputs in channels_last (NHWC) memory format")
    fused_attention: bool = option(True, "ViT backbones attend through scaled_dot_product_attention "
                                   "(FlashAttention-2 on CUDA); false: explicit softmax(QK^T)V. The T-Head's "
                                   "attention is head.attention")
    compile: bool = option(False, "torch.compile the backbones and heads of students and teachers (the first "
                           "steps pay the compilation)")
    overlap_centre_reduce: bool = option(True, "start the centres' all-reduce right after the losses, finish it "
                                         "after the optimiser and EMA (distributed runs)")


@dataclass
class CheckpointConfig:
    enabled: bool = option(True, "write checkpoints (off only for throwaway runs such as smoke tests)")
    every_steps: int = option(0, "steps between checkpoints (0: at the end of every epoch)")
    keep_last: int = option(3, "complete checkpoints kept")
    resume: bool = option(True, "restart from the newest complete checkpoint in the run directory")


@dataclass
class ParallelConfig:
    strategy: str = option("single", "single | ddp | fsdp (FSDP2 fully_shard) | deepspeed (ZeRO, one engine per "
                           "student); multi-process strategies run under torchrun, the DeepSpeed launcher or srun")
    zero_stage: int = option(2, "deepspeed: ZeRO stage 1 (optimiser state), 2 (+ gradients) or 3 (+ parameters)")
    backend: str = option("auto", "process-group backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo")
    reshard_after_forward: bool = option(True, "fsdp: free the gathered parameters after each block's forward "
                                         "(less memory, one more all-gather in backward)")
    timeout_minutes: int = option(30, "collective timeout: a rank stuck longer than this aborts the job")


@dataclass
class EvalConfig:
    split: str = option("test", "held-out split that evaluation scores: test | validation (data.validation_samples "
                                "images carved from train, for tuning)")
    knn_k: int = option(20, "k-NN neighbours")
    knn_temperature: float = option(0.07, "k-NN vote temperature (votes weighted by exp(sim / T))")
    batch_size: int = option(256, "feature-extraction batch")
    knn_at_end: bool = option(True, "run k-NN on both teacher backbones when training ends")
    knn_untrained: bool = option(True, "also score the untrained networks, for comparison")
    image_size: int = option(224, "evaluation image side, px (small sources keep their size)")
    max_train_samples: int = option(0, "k-NN memory bank size (0: the whole training split)")
    linear_at_end: bool = option(True, "train a linear probe on both teacher backbones when training ends "
                                 "(on the features the k-NN extracted; needs knn_at_end)")
    linear_epochs: int = option(100, "linear-probe epochs over the cached (unaugmented) training features")
    linear_batch_size: int = option(256, "linear-probe batch")
    linear_lr: float = option(0.1, "linear-probe base lr, scaled by linear_batch_size / 256 (SGD, momentum 0.9, "
                              "cosine, no weight decay; features standardised)")
    linear_n_last_blocks: int = option(4, "ViT probe input: CLS tokens of the last n blocks, concatenated")
    linear_avgpool_patch_tokens: bool = option(False, "ViT probe input: also append the average patch token")
    finetune_epochs: int = option(30, "label-subset fine-tuning epochs (backbone + linear head)")
    finetune_batch_size: int = option(64, "label-subset fine-tuning batch")
    finetune_lr: float = option(0.01, "fine-tuning base lr, scaled by finetune_batch_size / 256 (SGD, momentum "
                                "0.9, cosine, no weight decay)")
    subset_seed: int = option(0, "seed of the class-balanced label subset (same seed, same subset)")
    analysis_at_end: bool = option(True, "write the analysis plots (consistency, attention distance, t-SNE) "
                                   "when training ends (needs knn_at_end)")
    analysis_points: int = option(2000, "test images per model in the t-SNE plot")
    analysis_attention_images: int = option(64, "test images for the mean attention distance")


@dataclass
class MOKDConfig:
    run_dir: str = option("runs/default", "run directory: config, checkpoints, metrics, results")
    model1: ModelConfig = section(ModelConfig, "the first model")
    model2: ModelConfig = section(ModelConfig, "the second model")
    head: HeadConfig = section(HeadConfig, "head shapes shared by both models")
    loss: LossConfig = section(LossConfig, "loss switches and momenta")
    data: DataConfig = section(DataConfig, "training data and multi-crop")
    train: TrainConfig = section(TrainConfig, "training loop")
    perf: PerfConfig = section(PerfConfig, "speed switches (see `mokd bench throughput`)")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "checkpointing and resume")
    parallel: ParallelConfig = section(ParallelConfig, "distribution over processes: strategy, ZeRO stage")
    eval: EvalConfig = section(EvalConfig, "evaluation")


CHOICES: dict[str, tuple[str, ...]] = {
    "model1.optim.name": ("sgd", "lars", "adamw"),
    "model2.optim.name": ("sgd", "lars", "adamw"),
    "model1.thead_optim": ("auto", "own", "other"),
    "model2.thead_optim": ("auto", "own", "other"),
    "model1.temperature.warmup_unit": ("step", "epoch"),
    "model2.temperature.warmup_unit": ("step", "epoch"),
    "loss.centring": ("centre", "sinkhorn_knopp"),
    "head.attention": ("sdpa", "flash", "math"),
    "loss.search_pairing": ("local_to_global", "global_to_global"),
    "loss.kernel": ("auto", "triton", "native", "torch", "reference"),
    "data.source": ("fashion_mnist", "imagefolder", "synthetic", "webdataset"),
    "data.shard_statistics": ("imagefolder", "fashion_mnist", "synthetic"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "parallel.strategy": ("single", "ddp", "fsdp", "deepspeed"),
    "parallel.backend": ("auto", "nccl", "gloo"),
    "perf.optimizer": ("loop", "foreach", "fused"),
    "eval.split": ("test", "validation"),
}


def describe_options(schema: type = MOKDConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf option of the schema."""
    rows = []
    instance = schema()
    for item in fields(schema):
        key = f"{prefix}{item.name}"
        value = getattr(instance, item.name)
        if is_dataclass(value):
            rows.extend(describe_options(type(value), key + "."))
        else:
            rows.append((key, repr(value), item.metadata.get("help", "")))
    return rows


def list_presets() -> list[str]:
    """Presets that name a whole run (bases meant only for `inherit:` end in `_base`)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.endswith("_base"))


def _preset_path(preset: str) -> Path:
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    named = PRESET_DIR / f"{preset}.yaml"
    if named.exists():
        return named
    raise ConfigError(f"unknown preset {preset!r}: not a YAML file, and not one of {', '.join(list_presets())}")


def _merge(base: DictConfig, layer: Any, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except ConfigKeyError as error:
        raise ConfigError(f"{origin}: unknown config key {error.full_key!r}") from None
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        raise ConfigError(f"{origin}: bad value for {key!r}: {error.msg}") from None


INHERIT_KEY = "inherit"


def _merge_preset(config: DictConfig, preset: str, chain: tuple[str, ...] = ()) -> DictConfig:
    """Merge a preset, after the preset it names with `inherit:` (shared settings of a family of presets)."""
    path = _preset_path(preset)
    if str(path) in chain:
        raise ConfigError(f"preset {path}: circular inherit through {' -> '.join(chain)}")
    layer = OmegaConf.load(path)
    parent = layer.pop(INHERIT_KEY, None)
    if parent is not None:
        config = _merge_preset(config, parent, chain + (str(path),))
    return _merge(config, layer, f"preset {path}")


def load_config(preset: Optional[str] = None, overrides: Optional[list[str]] = None) -> MOKDConfig:
    """Schema defaults, then the preset, then `key=value` overrides; validated; returned as a typed object."""
    config = OmegaConf.structured(MOKDConfig)
    if preset is not None:
        config = _merge_preset(config, preset)
    for override in overrides or []:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not of the form key=value")
        key, value = override.split("=", 1)
        config = _merge(config, OmegaConf.from_dotlist([f"{key}={value}"]), f"override {override!r}")
    typed: MOKDConfig = OmegaConf.to_object(config)
    validate(typed)
    return typed


def to_yaml(config: MOKDConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def save_config(config: MOKDConfig, path: Path) -> None:
    path.write_text(to_yaml(config))


def _get(config: MOKDConfig, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def validate(config: MOKDConfig) -> None:
    """Refuse combinations that cannot train, naming the key, before any model is built."""
    for key, allowed in CHOICES.items():
        if _get(config, key) not in allowed:
            raise ConfigError(f"{key}={_get(config, key)!r} is not one of {', '.join(allowed)}")
    if config.loss.kernel == "native":
        from mokd.kernels import native

        try:
            native.require("loss.kernel=native")
        except native.NativeKernelsUnavailable as error:
            raise ConfigError(str(error)) from None
    from mokd.method.backbones import check_backbone  # the method knows which backbones exist

    for name in ("model1", "model2"):
        model: ModelConfig = getattr(config, name)
        check_backbone(name, model)
        if not 0.0 <= model.cross_weight:
            raise ConfigError(f"{name}.cross_weight must be >= 0, got {model.cross_weight}")
        if not 0.0 <= model.koleo_weight:
            raise ConfigError(f"{name}.koleo_weight must be >= 0, got {model.koleo_weight}")
        for bound in ("global_crop_scale", "local_crop_scale"):
            scale = getattr(config.data, bound)
            if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
                raise ConfigError(f"data.{bound} must be [low, high] with 0 < low <= high <= 1, got {scale}")
    if config.parallel.zero_stage not in (1, 2, 3):
        raise ConfigError(f"parallel.zero_stage must be 1, 2 or 3, got {config.parallel.zero_stage}")
    for name in ("model1", "model2"):
        if config.parallel.strategy == "deepspeed" and getattr(config, name).optim.name == "lars":
            raise ConfigError(f"{name}.optim.name=lars with parallel.strategy=deepspeed: ZeRO hands the optimiser "
                              f"flat partitions, so LARS's per-parameter trust ratio cannot be computed; use sgd or "
                              f"adamw, or parallel.strategy=fsdp")
    if config.parallel.strategy == "deepspeed" and config.train.precision == "fp16":
        raise ConfigError("train.precision=fp16 with parallel.strategy=deepspeed is not supported (one GradScaler "
                          "per model lives outside DeepSpeed's engines): use bf16 or fp32")
    if config.head.thead_dim is not None and config.head.thead_dim % config.head.thead_heads:
        raise ConfigError(f"head.thead_dim={config.head.thead_dim} is not divisible by head.thead_heads")
    if config.loss.cross_search and config.loss.search_pairing == "local_to_global" and config.data.n_local_crops < 1:
        raise ConfigError("loss.search_pairing=local_to_global needs data.n_local_crops >= 1 "
                          "(or set loss.search_pairing=global_to_global)")
    validate_shard_options(config.data)
    if config.data.validation_samples < 0:
        raise ConfigError(f"data.validation_samples must be >= 0, got {config.data.validation_samples}")
    if config.eval.split == "validation" and config.data.validation_samples == 0:
        raise ConfigError("eval.split=validation needs data.validation_samples > 0 (the images carved from train)")
    if len(config.data.blur_sigma) != 2 or not 0 < config.data.blur_sigma[0] <= config.data.blur_sigma[1]:
        raise ConfigError(f"data.blur_sigma must be [low, high] with 0 < low <= high, got {config.data.blur_sigma}")
    if config.loss.sinkhorn_iterations < 1:
        raise ConfigError(f"loss.sinkhorn_iterations must be >= 1, got {config.loss.sinkhorn_iterations}")
    if config.train.threads < 0:
        raise ConfigError(f"train.threads must be >= 0, got {config.train.threads}")
    if config.train.batch_size < 1:
        raise ConfigError(f"train.batch_size must be >= 1, got {config.train.batch_size}")
    if config.train.epochs < 1:
        raise ConfigError(f"train.epochs must be >= 1, got {config.train.epochs}")


def validate_shard_options(data: DataConfig) -> None:
    """The webdataset options: shards named, values in range, no option that only map-style sources honour."""
    if data.source != "webdataset":
        return
    if not data.shards:
        raise ConfigError("data.source=webdataset needs data.shards (the training shard URLs, written by `mokd shards`)")
    if data.validation_samples:
        raise ConfigError("data.validation_samples carves a map-style dataset; with data.source=webdataset write the "
                          "validation images to their own shards and point data.eval_shards at them")
    if data.train_samples:
        raise ConfigError("data.train_samples picks a subset of a map-style dataset; with data.source=webdataset "
                          "write fewer samples instead (mokd shards --limit N)")
    if data.shard_channels not in (1, 3):
        raise ConfigError(f"data.shard_channels must be 1 or 3, got {data.shard_channels}")
    if data.shuffle_buffer < 1:
        raise ConfigError(f"data.shuffle_buffer must be >= 1, got {data.shuffle_buffer}")
    if not 0.0 <= data.max_corrupt_fraction <= 1.0:
        raise ConfigError(f"data.max_corrupt_fraction must be in [0, 1], got {data.max_corrupt_fraction}")
