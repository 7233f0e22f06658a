"""The one typed configuration schema of mokd, its YAML presets and dotted command-line overrides.

A run's configuration is built in three layers: the dataclass defaults below, a YAML preset (one of the
package's own in `mokd/configs/`, read as package data so a wheel has them too, or a path), then `key=value` overrides such as `train.epochs=5`.
OmegaConf checks every layer against the schema, so an unknown key or a value of the wrong type is
refused before any work starts, with the offending key named. The resolved result is saved in the
run directory as `config.yaml`.
"""

from __future__ import annotations

import functools
import math
import re
from importlib.resources import files
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from mokd.errors import ConfigError

# Package data, not a folder beside the package: a wheel installed anywhere carries its presets.
PRESETS = files("mokd") / "configs"


@dataclass(frozen=True)
class LossTerm:
    """One row of the loss-term table: a term every model may run (DESIGN.md section 2).

    head: the student head the term trains (mlp: the MLP-Head h, thead: the T-Head g).
    teacher: whose EMA teacher gives the target: own (self-distillation) or other (one term per other model).
    target: head (that teacher's logits of the same head over the global crops, every student crop against every
    other view, centred or Sinkhorn-Knopp) or search (that teacher's T-Head over the student's queries put in its
    global token map; one target per searched row, never centred).
    The switch loss.<switch> turns the term on or off for every model, modelN.term_weights.<name> for one model;
    the metrics are loss/modelI/<name> (cross terms of more than two models: loss/modelI/<name>J, J the teacher's
    model)."""

    name: str
    switch: str
    head: str
    teacher: str
    target: str
    help: str

    @property
    def cross(self) -> bool:
        """Weighed by lambda_i and, with N models, by 1 / (N - 1): one term per other model."""
        return self.teacher == "other"

    @property
    def centred(self) -> bool:
        return self.target == "head"


LOSS_TERM_TABLE = (
    LossTerm("sm", "self_mlp", "mlp", "own", "head", "L_sm: self-distillation of the MLP-Head"),
    LossTerm("st", "self_thead", "thead", "own", "head", "L_st: self-distillation of the T-Head"),
    LossTerm("cm", "cross_mlp", "mlp", "other", "head", "L_cm: MLP-Head against every other model's teacher"),
    LossTerm("ct", "cross_search", "thead", "other", "search",
             "L_ct: feature search with cross-attention in every other teacher's T-Head"),
)
LOSS_TERMS = tuple(term.name for term in LOSS_TERM_TABLE)


@dataclass(frozen=True)
class Range:
    """The values a numeric option accepts, declared once with the option and checked by `check_ranges`."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False  # low itself excluded
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE = Range(0, low_open=True)  # rates, temperatures: zero is meaningless
NON_NEGATIVE = Range(0)  # durations and counts where 0 means "off" or "all"
AT_LEAST_ONE = Range(1)  # counts and sizes where zero cannot work
UNIT = Range(0, 1)  # momenta, fractions
BELOW_ONE = Range(0, 1, high_open=True)  # drop-path rate


def option(default: Any, help: str, bounds: Optional[Range] = None) -> Any:
    """A schema field with its help text (shown by `mokd train --help`) and, for numbers, the accepted range."""
    metadata = {"help": help, "bounds": bounds}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(factory: type, help: str) -> Any:
    return field(default_factory=factory, metadata={"help": help})


@dataclass
class TemperatureConfig:
    student: float = option(0.1, "student softmax temperature tau_s", POSITIVE)
    teacher_start: float = option(0.04, "teacher temperature at step 0 (linear warm-up start)", POSITIVE)
    teacher_end: float = option(0.07, "teacher temperature after the warm-up", POSITIVE)
    warmup_epochs_self: float = option(30.0, "teacher-temperature warm-up of the self terms L_sm, L_st (official CNN: 50)",
                                       NON_NEGATIVE)
    warmup_epochs_cross: float = option(30.0, "teacher-temperature warm-up of the cross terms L_cm, L_ct", NON_NEGATIVE)
    warmup_unit: str = option("step", "the warm-up moves every step, or once per epoch (epoch: DINO's and the "
                              "official code's schedule, indexed by epoch)")


@dataclass
class OptimConfig:
    name: str = option("adamw", "optimiser of this student")
    base_lr: float = option(5e-4, "learning rate per 256 images (scaled by global batch / 256)", POSITIVE)
    min_lr: float = option(1e-5, "final learning rate of the cosine schedule", NON_NEGATIVE)
    warmup_epochs: float = option(10.0, "linear learning-rate warm-up, epochs", NON_NEGATIVE)
    weight_decay: float = option(0.04, "weight decay at step 0 (cosine schedule; none on biases and norms)",
                                 NON_NEGATIVE)
    weight_decay_end: float = option(0.4, "weight decay at the last step", NON_NEGATIVE)
    momentum: float = option(0.9, "SGD / LARS momentum", UNIT)
    clip_grad: float = option(3.0, "per-parameter gradient-norm clip; 0 disables", NON_NEGATIVE)
    freeze_last_layer_epochs: float = option(1.0, "epochs during which both heads' last layers get no update",
                                             NON_NEGATIVE)


@dataclass
class ModelConfig:
    backbone: str = option("resnet18", "timm backbone, by name; its family (ResNet or ViT) decides the other "
                           "options that apply")
    small_image: bool = option(False, "28-32 px variant: CIFAR-style ResNet stem, or ViT with 4-pixel patches")
    width: Optional[int] = option(None, "ResNet first-stage channels or ViT embedding dimension (null: timm's)",
                                  AT_LEAST_ONE)
    depth: Optional[int] = option(None, "ViT depth (null: timm's)", AT_LEAST_ONE)
    num_heads: Optional[int] = option(None, "ViT attention heads (null: timm's)", AT_LEAST_ONE)
    drop_path: float = option(0.0, "stochastic depth rate of the student (teachers never drop)", BELOW_ONE)
    trainable_last_layer_norm: bool = option(False, "train weight_g of the MLP-Head's weight-normalised last layer "
                                             "(official: false for the CNN, true for the ViT; the T-Head's is "
                                             "always trained)")
    zero_init_last_bn: bool = option(False, "ResNet: zero-initialise the last BatchNorm of each residual block "
                                     "(timm's default; the official torchvision ResNets do not)")
    thead_l2_normalise: bool = option(False, "L2-normalise this model's T-Head output (the mean of its tokens) "
                                      "before the weight-normalised last layer, as the MLP-Head does. The official "
                                      "T-Head does not: its logits scale with the norm of a LayerNorm output, about "
                                      "sqrt(D), and its terms' gradients dwarf L_sm's in the backbone "
                                      "(benchmarks/term_gradients.py)")
    thead_optim: str = option("auto", "schedules of this model's T-Head parameter group: own | other (another "
                              "model's lr and weight-decay schedules, every T-Head parameter decayed: the first ViT "
                              "among the other models, else the next model) | auto (other for a CNN with a ViT among "
                              "the other models, as in the official code; else own)")
    cross_weight: float = option(1.0, "lambda_i, weight of this model's cross terms L_cm + L_ct; with N models each "
                                 "other model's pair of terms weighs lambda_i / (N - 1)", NON_NEGATIVE)
    term_weights: Dict[str, float] = option({}, f"per-term multipliers of this model's loss, by term: "
                                            f"{' | '.join(LOSS_TERMS)} (model2.term_weights.st=0 turns L_st off for "
                                            f"this model only; the cross terms are also weighed by cross_weight; a "
                                            f"term not named weighs 1)")
    koleo_weight: float = option(0.0, "weight of the KoLeo regulariser on this student's pooled global-crop "
                                 "features (DINOv2; spreads features against dimensional collapse); 0: off",
                                 NON_NEGATIVE)
    optim: OptimConfig = section(OptimConfig, "optimiser and schedules of this student")
    temperature: TemperatureConfig = section(TemperatureConfig, "temperatures of this model's loss terms")


@dataclass
class HeadConfig:
    out_dim: int = option(65536, "K, output dimension of both heads of every model", AT_LEAST_ONE)
    mlp_hidden_dim: int = option(2048, "MLP-Head hidden width", AT_LEAST_ONE)
    mlp_bottleneck_dim: int = option(256, "MLP-Head bottleneck before the weight-normalised last layer", AT_LEAST_ONE)
    mlp_batchnorm: bool = option(False, "BatchNorm after each hidden Linear of the MLP-Head (DINO's use_bn_in_head; "
                                 "keeps the teacher from going uniform on small data)")
    thead_dim: Optional[int] = option(None, "T-Head width D, shared (queries cross between the models); null: "
                                      "the widest ViT's width (official), 384 for two CNNs", AT_LEAST_ONE)
    thead_depth: int = option(3, "T-Head transformer blocks", AT_LEAST_ONE)
    thead_heads: int = option(6, "T-Head attention heads", AT_LEAST_ONE)
    thead_mlp_ratio: float = option(4.0, "T-Head MLP ratio", POSITIVE)
    attention: str = option("sdpa", "attention implementation of the T-Head")


# loss.<switch> for every row of the table (the ablation switches), declared by the table.
LossSwitches = make_dataclass("LossSwitches", [(term.switch, bool, option(True, term.help))
                                               for term in LOSS_TERM_TABLE])


@dataclass
class LossConfig(LossSwitches):
    search_pairing: str = option("local_to_global", "local_to_global (official) | global_to_global (paper)")
    centre_momentum: float = option(0.9, "momentum m_c of the DINO centres (one per model, centred term and "
                                    "teacher)", UNIT)
    teacher_momentum: float = option(0.996, "EMA momentum at step 0 (cosine schedule to 1)", UNIT)
    kernel: str = option("auto", "implementation of the DINO cross-entropy kernel")
    centring: str = option("centre", "teacher targets of L_sm, L_st, L_cm: centre (softmax((t - c) / tau_t), the "
                           "paper) | sinkhorn_knopp (DINOv2/v3: equipartition over the global batch)")
    sinkhorn_iterations: int = option(3, "Sinkhorn-Knopp normalisation rounds (loss.centring=sinkhorn_knopp)",
                                      AT_LEAST_ONE)
    fused_terms: bool = option(False, "compute every DINO term that reads one student tensor (L_sm + L_cm, "
                               "L_st + L_ct) in one pass: one Triton kernel and one gradient on CUDA; per term "
                               "on CPU (the same numbers)")
    fused_head: bool = option(False, "fuse each student head's weight-normalised last layer with its DINO terms "
                              "over tiles of K, so the [crops*batch, K] student logits and their gradient never "
                              "exist (backward recomputes the tiles; every strategy; it groups the terms itself, so it "
                              "supersedes loss.fused_terms)")


@dataclass
class DataConfig:
    source: str = option("fashion_mnist", "where the images come from")
    root: Optional[str] = option(None, "dataset root (imagefolder: ROOT/train, ROOT/val; fashion_mnist: IDX dir)")
    global_crop_size: int = option(224, "side of the two global crops, px", AT_LEAST_ONE)
    local_crop_size: int = option(96, "side of the local crops, px", AT_LEAST_ONE)
    n_local_crops: int = option(8, "local crops per image", NON_NEGATIVE)
    global_crop_scale: list[float] = option([0.25, 1.0], "area range of global crops")
    local_crop_scale: list[float] = option([0.05, 0.25], "area range of local crops")
    blur_sigma: list[float] = option([0.1, 2.0], "Gaussian-blur radius range at 224 px; each crop scales it by "
                                     "its side / 224 (DINO's 0.1-2 px is meant for 224 px crops)")
    num_workers: int = option(2, "data-loading worker processes", NON_NEGATIVE)
    augment: str = option("workers", "where the training multi-crop augmentation runs: workers (PIL, per image, in "
                          "the data workers) | device (workers only decode and draw every crop's random parameters "
                          "from the same per-sample seed; the training device crops, resizes and colours whole "
                          "batches with them, equal to PIL's pixels on CPU; docs/data.md)")
    train_samples: int = option(0, "train on a fixed random subset of this many images (0: the whole split)",
                                NON_NEGATIVE)
    validation_samples: int = option(0, "carve this many fixed images from the training split as the validation "
                                        "split (never trained on; eval.split=validation scores on it)", NON_NEGATIVE)
    synthetic_size: int = option(256, "synthetic source: images per split", AT_LEAST_ONE)
    synthetic_image_size: int = option(32, "synthetic source: image side, px", AT_LEAST_ONE)
    synthetic_classes: int = option(10, "synthetic source: classes", AT_LEAST_ONE)
    synthetic_channels: int = option(3, "synthetic source: channels", AT_LEAST_ONE)
    shards: Optional[str] = option(None, "webdataset: training shard URLs, brace-expanded, '::' between patterns "
                                   "(/data/train-{000000..000146}.tar, or pipe:aws s3 cp s3://b/train-{...}.tar -), or the "
                                   "directory `mokd shards` wrote (its manifest lists the shards)")
    eval_shards: Optional[str] = option(None, "webdataset: held-out (val/test) shard URLs for k-NN, linear probe "
                                        "and fine-tuning (read in order, not shuffled), or their directory")
    shard_manifest: Optional[str] = option(None, "webdataset: manifest.json of the training shards (per-shard "
                                           "sample counts; default: beside local shards; needed for pipe: URLs)")
    shard_channels: int = option(3, "webdataset: channels the images are decoded to (1 for Fashion-MNIST shards)")
    shard_statistics: str = option("imagefolder", "webdataset: normalisation statistics of this source "
                                   "(imagefolder = ImageNet | fashion_mnist | synthetic)")
    shuffle_buffer: int = option(1000, "webdataset: samples in each worker's shuffle buffer (kept encoded)",
                                 AT_LEAST_ONE)
    max_corrupt_fraction: float = option(0.01, "webdataset: stop when a data worker skips more than this fraction "
                                         "of its share of an epoch as corrupt or missing", UNIT)


@dataclass
class TrainConfig:
    epochs: int = option(100, "training epochs (all schedules span them)", AT_LEAST_ONE)
    batch_size: int = option(64, "images per device per step", AT_LEAST_ONE)
    max_steps: int = option(0, "stop after this many steps in total (0: all epochs)", NON_NEGATIVE)
    seed: int = option(0, "seed of model initialisation, data order and augmentation", NON_NEGATIVE)
    precision: str = option("auto", "auto (bf16 autocast on CUDA and on CPUs with AMX-BF16 or AVX512-BF16, "
                            "else fp32; the run prints its choice) | fp32 | bf16 | fp16 (GradScaler per model)")
    device: str = option("auto", "auto | cpu | cuda")
    deterministic: bool = option(False, "deterministic algorithms (exact resume on CPU)")
    log_every: int = option(10, "steps between metric records", AT_LEAST_ONE)
    max_skipped_steps: int = option(5, "consecutive steps with a non-finite loss or gradient (each skipped on every "
                                    "rank) after which training stops with an error", AT_LEAST_ONE)
    threads: int = option(0, "intra-op CPU threads per process (0: torch's default, one per core); set 1 when "
                          "other busy processes share the cores: descheduled threads spin", NON_NEGATIVE)
    warn_feature_cosine_gap: float = option(0.25, "warn when 1 - the mean pairwise cosine of a teacher's pooled "
                                            "features falls to this fraction of its value at step 0 (the untrained "
                                            "network): features collapsing onto one direction; 0: never", NON_NEGATIVE)
    warn_feature_rank_fraction: float = option(0.5, "warn when the effective rank of a teacher's pooled features "
                                               "falls to this fraction of its value at step 0; 0: never", NON_NEGATIVE)
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
    channels_last: bool = option(False, "ResNet weights and inputs in channels_last (NHWC) memory format (on CPU "
                                 "1.3x the images/s of NCHW in fp32 and 1.4x in bf16, demo pair; the CPU presets "
                                 "turn it on). Off by default: FSDP2 refuses non-contiguous parameters")
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
    every_steps: int = option(0, "steps between checkpoints (0: at the end of every epoch)", NON_NEGATIVE)
    keep_last: int = option(3, "complete checkpoints kept", AT_LEAST_ONE)
    resume: bool = option(True, "restart from the newest complete checkpoint in the run directory")
    allow_config_change: bool = option(False, "resume even though a key that changes the schedules or the data "
                                       "order (batch, lrs, epochs, seed...) differs from the checkpoint's")
    fallback: bool = option(True, "when the newest checkpoint is unreadable or fails its checksums, resume from "
                            "the previous complete one (with a warning naming the file); false: stop")
    async_save: bool = option(False, "write checkpoints in the background (DCP async_save, staged in CPU memory): "
                              "training stalls only for the copy; COMPLETE is still written last")


@dataclass
class ParallelConfig:
    strategy: str = option("single", "how the students are distributed over processes; the multi-process "
                           "strategies run under torchrun, the DeepSpeed launcher or srun")
    zero_stage: int = option(2, "deepspeed: ZeRO stage 1 (optimiser state), 2 (+ gradients) or 3 (+ parameters)")
    backend: str = option("auto", "process-group backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo")
    reshard_after_forward: bool = option(True, "fsdp: free the gathered parameters after each block's forward "
                                         "(less memory, one more all-gather in backward)")
    timeout_minutes: float = option(30.0, "collective timeout: a rank stuck longer than this aborts the job",
                                    POSITIVE)


@dataclass
class EvalConfig:
    split: str = option("test", "held-out split that evaluation scores: test | validation (data.validation_samples "
                                "images carved from train, for tuning)")
    knn_k: int = option(20, "k-NN neighbours", AT_LEAST_ONE)
    knn_temperature: float = option(0.07, "k-NN vote temperature (votes weighted by exp(sim / T))", POSITIVE)
    batch_size: int = option(256, "feature-extraction batch", AT_LEAST_ONE)
    knn_at_end: bool = option(True, "run k-NN on both teacher backbones when training ends")
    knn_untrained: bool = option(True, "also score the untrained networks, for comparison")
    image_size: int = option(224, "evaluation image side, px (small sources keep their size)", AT_LEAST_ONE)
    max_train_samples: int = option(0, "k-NN memory bank size (0: the whole training split)", NON_NEGATIVE)
    linear_at_end: bool = option(True, "train a linear probe on both teacher backbones when training ends "
                                 "(on the features the k-NN extracted; needs knn_at_end)")
    linear_epochs: int = option(100, "linear-probe epochs over the cached (unaugmented) training features",
                                AT_LEAST_ONE)
    linear_batch_size: int = option(256, "linear-probe batch", AT_LEAST_ONE)
    linear_lr: float = option(0.1, "linear-probe base lr, scaled by linear_batch_size / 256 (SGD, momentum 0.9, "
                              "cosine, no weight decay; features standardised)", POSITIVE)
    linear_n_last_blocks: int = option(4, "ViT probe input: CLS tokens of the last n blocks, concatenated",
                                       AT_LEAST_ONE)
    linear_avgpool_patch_tokens: bool = option(False, "ViT probe input: also append the average patch token")
    finetune_epochs: int = option(30, "label-subset fine-tuning epochs (backbone + linear head)", AT_LEAST_ONE)
    finetune_batch_size: int = option(64, "label-subset fine-tuning batch", AT_LEAST_ONE)
    finetune_lr: float = option(0.01, "fine-tuning base lr, scaled by finetune_batch_size / 256 (SGD, momentum "
                                "0.9, cosine, no weight decay)", POSITIVE)
    subset_seed: int = option(0, "seed of the class-balanced label subset (same seed, same subset)", NON_NEGATIVE)
    analysis_at_end: bool = option(True, "write the analysis plots (consistency, attention distance, t-SNE) "
                                   "when training ends (needs knn_at_end)")
    analysis_points: int = option(2000, "test images per model in the t-SNE plot", AT_LEAST_ONE)
    analysis_attention_images: int = option(64, "test images for the mean attention distance", AT_LEAST_ONE)


@dataclass
class MOKDConfig:
    """A run with two models, model1 and model2; `schema_for(n)` adds model3 ... modelN (`load_config` picks the
    schema from the model sections the preset and the overrides name)."""

    run_dir: str = option("runs/default", "run directory: config, checkpoints, metrics, results")
    model1: ModelConfig = section(ModelConfig, "the first model")
    model2: ModelConfig = section(ModelConfig, "the second model")
    head: HeadConfig = section(HeadConfig, "head shapes shared by every model")
    loss: LossConfig = section(LossConfig, "loss switches and momenta")
    data: DataConfig = section(DataConfig, "training data and multi-crop")
    train: TrainConfig = section(TrainConfig, "training loop")
    perf: PerfConfig = section(PerfConfig, "speed switches (see `mokd bench throughput`)")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "checkpointing and resume")
    parallel: ParallelConfig = section(ParallelConfig, "distribution over processes: strategy, ZeRO stage")
    eval: EvalConfig = section(EvalConfig, "evaluation")

    @property
    def models(self) -> list[ModelConfig]:
        """model1 ... modelN, in order."""
        return [getattr(self, f"model{k}") for k in range(1, model_count(self) + 1)]


MIN_MODELS = 2
MODEL_SECTION = re.compile(r"model([1-9][0-9]*)")


def model_sections(names: Iterable[str]) -> list[str]:
    """The modelK names among `names` (once each), in the order of K."""
    return sorted({name for name in names if MODEL_SECTION.fullmatch(str(name))},
                  key=lambda name: int(MODEL_SECTION.fullmatch(name).group(1)))


def model_count(config: Any) -> int:
    """N: the number of modelK sections of a config object, schema class or mapping."""
    return len(model_sections([item.name for item in fields(config)] if is_dataclass(config) else config))


@functools.lru_cache(maxsize=None)
def schema_for(n_models: int) -> type:
    """The schema of a run with n_models models: MOKDConfig itself for two, else a subclass with model3 ...
    modelN (model1 ... modelN: every preset, override, run directory and metric name written for a pair keeps
    its meaning, and model K is addressed the same way everywhere)."""
    if n_models < MIN_MODELS:
        raise ConfigError(f"a run needs at least {MIN_MODELS} models (model1, model2), got {n_models}")
    if n_models == MIN_MODELS:
        return MOKDConfig
    extra = [(f"model{k}", ModelConfig, section(ModelConfig, f"model {k}"))
             for k in range(MIN_MODELS + 1, n_models + 1)]
    schema = make_dataclass(f"MOKDConfig{n_models}", extra, bases=(MOKDConfig,))
    schema.__module__ = __name__
    return schema


def __getattr__(name: str) -> type:
    """mokd.config.MOKDConfig3 and so on: the schemas for more models, by name, so their objects pickle (data
    workers, process spawns) like MOKDConfig's."""
    match = re.fullmatch(r"MOKDConfig([1-9][0-9]*)", name)
    if match and int(match.group(1)) > MIN_MODELS:
        return schema_for(int(match.group(1)))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _declared_models(layers: list[tuple[str, set[str]]]) -> int:
    """N from the top-level keys each layer (preset file or override) names: the highest K of a modelK section,
    at least 2; K without every lower number is refused, naming where it came from."""
    numbers: dict[int, str] = {}
    for origin, keys in layers:
        for key in keys:
            match = MODEL_SECTION.fullmatch(key)
            if match:
                numbers.setdefault(int(match.group(1)), origin)
    n_models = max([MIN_MODELS, *numbers])
    missing = [k for k in range(MIN_MODELS + 1, n_models + 1) if k not in numbers]
    if missing:
        top = max(numbers)
        raise ConfigError(f"{numbers[top]}: model{top} is given but model{missing[0]} is not: models are numbered "
                          f"model1 ... modelN without gaps")
    return n_models


# The values of the options whose choices the schema itself implements; the components declare the values of
# theirs with register_choices (each from its mokd.registry.Registry).
CHOICES: dict[str, tuple[str, ...]] = {
    "modelN.thead_optim": ("auto", "own", "other"),
    "modelN.temperature.warmup_unit": ("step", "epoch"),
    "loss.centring": ("centre", "sinkhorn_knopp"),
    "loss.search_pairing": ("local_to_global", "global_to_global"),
    "data.shard_statistics": ("imagefolder", "fashion_mnist", "synthetic"),
    "data.augment": ("workers", "device"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "parallel.backend": ("auto", "nccl", "gloo"),
    "perf.optimizer": ("loop", "foreach", "fused"),
    "eval.split": ("test", "validation"),
}
_REGISTERED_CHOICES: dict[str, Mapping[str, str]] = {}


def register_choices(key: str, choices: Mapping[str, str]) -> None:
    """Declares the values option `key` accepts ({name: help}; modelN.* for every model), for the component that
    implements them (a mokd.registry.Registry passes its live `helps`). Like component_check, each component
    registers when it is imported; `validate` refuses any other value and the configuration reference lists them.
    The mapping is read at every use, so names added to it later are accepted too."""
    if key in CHOICES or key in _REGISTERED_CHOICES:
        raise ValueError(f"the choices of {key} are declared twice")
    _REGISTERED_CHOICES[key] = choices


def allowed_values(key: str) -> Mapping[str, str]:
    """{value: help} of the values option `key` accepts (any modelK.* key reads modelN.*); help is empty where the
    option's own help explains the values; empty for an option that takes any value of its type."""
    key = re.sub(r"^model[1-9][0-9]*\.", "modelN.", key)
    return _REGISTERED_CHOICES.get(key) or dict.fromkeys(CHOICES.get(key, ()), "")


def _leaf_options(schema: type = MOKDConfig, prefix: str = "") -> list[tuple[str, Any, dict]]:
    """(dotted key, default, field metadata) for every leaf option of the schema."""
    rows = []
    instance = schema()
    for item in fields(schema):
        key = f"{prefix}{item.name}"
        value = getattr(instance, item.name)
        if is_dataclass(value):
            rows.extend(_leaf_options(type(value), key + "."))
        else:
            rows.append((key, value, item.metadata))
    return rows


def describe_options(schema: type = MOKDConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf option of the schema."""
    return [(key, repr(value), metadata.get("help", "")) for key, value, metadata in _leaf_options(schema, prefix)]


def choice_lines(choices: Mapping[str, str]) -> list[str]:
    """One line per help text of a choice, naming the choices it explains (consecutive names that share a help,
    such as a backbone family's, are named together): "`a`, `b`: help"."""
    grouped: list[tuple[list[str], str]] = []
    for name, meaning in choices.items():
        if grouped and grouped[-1][1] == meaning:
            grouped[-1][0].append(name)
        else:
            grouped.append(([name], meaning))
    return [f"{', '.join(f'`{name}`' for name in names)}: {meaning}" for names, meaning in grouped if meaning]


def reference_markdown() -> str:
    """The configuration reference page (docs/configuration.md), written from the schema: every option with its
    default, the values it accepts and its help text, section by section; model1 and model2 share one table."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["# Configuration reference", "",
             "Generated from the schema (`mokd/config.py`) by `mokd config --markdown`; do not edit by hand. A run's",
             "configuration is the schema's defaults, then a preset (`--preset NAME` or a YAML path), then",
             "`key=value` overrides; unknown keys and values outside the accepted range are refused before any work.",
             "A run has two models, `model1` and `model2`, or more: naming `model3` (and so on, without gaps) in a",
             "preset or an override adds a model. Every `modelK.*` takes the same options (written `modelN.*` below)."]
    shown = set()
    for item in fields(MOKDConfig):
        name = "modelN" if item.name in ("model1", "model2") else item.name
        if name in shown:
            continue
        shown.add(name)
        title = "each model" if name == "modelN" else item.metadata["help"]
        lines += ["", f"## `{name}`: {title}", "",
                  "| option | default | accepts | meaning |", "|---|---|---|---|"]
        if is_dataclass(item.default_factory):
            rows = _leaf_options(item.default_factory, f"{item.name}.")
        else:
            rows = [(item.name, item.default, item.metadata)]
        for key, value, metadata in rows:
            shown_key = key.replace("model1.", "modelN.", 1)
            allowed = allowed_values(shown_key)
            accepts = " | ".join(allowed) if allowed else (str(metadata["bounds"]) if metadata.get("bounds") else "")
            default = OmegaConf.to_yaml({"v": value}).strip()[len("v: "):].replace("\n", " ")
            meaning = "<br>".join(cell(text) for text in [metadata.get("help", ""), *choice_lines(allowed)])
            lines.append(f"| `{shown_key}` | `{cell(default)}` | {cell(accepts)} | {meaning} |")
    return "\n".join(lines) + "\n"


def list_presets() -> list[str]:
    """Presets that name a whole run (bases meant only for `inherit:` end in `_base`)."""
    names = (entry.name[:-len(".yaml")] for entry in PRESETS.iterdir() if entry.name.endswith(".yaml"))
    return sorted(name for name in names if not name.endswith("_base"))


def preset_text(name: str) -> str:
    """The YAML of one of the package's presets."""
    return (PRESETS / f"{name}.yaml").read_text()


def _preset_path(preset: str):
    """A YAML file given as a path, else the package's preset of that name (a path or a package resource)."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    named = PRESETS / f"{preset}.yaml"
    if named.is_file():
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


def _preset_layers(preset: str, chain: tuple[str, ...] = ()) -> list[tuple[str, DictConfig]]:
    """(origin, layer) of a preset, after those of the preset it names with `inherit:` (shared settings of a
    family of presets)."""
    path = _preset_path(preset)
    if str(path) in chain:
        raise ConfigError(f"preset {path}: circular inherit through {' -> '.join(chain)}")
    try:
        layer = OmegaConf.create(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"preset {where}: YAML syntax error: {problem}") from None
    parent = layer.pop(INHERIT_KEY, None)
    inherited = [] if parent is None else _preset_layers(parent, chain + (str(path),))
    return [*inherited, (f"preset {path}", layer)]


def load_config(preset: Optional[str] = None, overrides: Optional[list[str]] = None) -> MOKDConfig:
    """Schema defaults, then the preset, then `key=value` overrides; validated; returned as a typed object of the
    schema for as many models as the layers name."""
    layers = _preset_layers(preset) if preset is not None else []
    for override in overrides or []:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not of the form key=value")
        key, value = override.split("=", 1)
        layers.append((f"override {override!r}", OmegaConf.from_dotlist([f"{key}={value}"])))
    config = OmegaConf.structured(schema_for(_declared_models([(origin, set(layer)) for origin, layer in layers])))
    for origin, layer in layers:
        config = _merge(config, layer, origin)
    typed: MOKDConfig = OmegaConf.to_object(config)
    validate(typed)
    return typed


def to_yaml(config: MOKDConfig) -> str:
    """The resolved configuration as YAML, model1 ... modelN together (a subclass's model3 ... come after model2,
    not after the sections of the base)."""
    tree = OmegaConf.to_container(OmegaConf.structured(config))
    names = list(tree)
    models = model_sections(names)
    rest = [name for name in names if name not in models]
    at = names.index("model1")
    order = [*rest[:at], *models, *rest[at:]]
    return OmegaConf.to_yaml({name: tree[name] for name in order})


def save_config(config: MOKDConfig, path: Path) -> None:
    path.write_text(to_yaml(config))


def _get(config: MOKDConfig, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


ConfigCheck = Callable[[MOKDConfig], None]
_COMPONENT_CHECKS: list[ConfigCheck] = []


def component_check(check: ConfigCheck) -> ConfigCheck:
    """Registers (as a decorator) a check of a whole configuration that only a component can make: which
    backbones it builds, whether its kernels are built here. The schema imports no component, so each registers
    its own when imported, and `validate` runs every registered check after the schema's; the launch layer
    imports all of them (mokd.launch.components) before it reads a configuration."""
    _COMPONENT_CHECKS.append(check)
    return check


def check_ranges(config: Any, prefix: str = "") -> None:
    """Every number of the schema finite and inside the Range its option declares, naming the key."""
    for item in fields(config):
        key, value = f"{prefix}{item.name}", getattr(config, item.name)
        if is_dataclass(value):
            check_ranges(value, key + ".")
            continue
        for number in (value if isinstance(value, list) else [value]):
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                continue
            if not math.isfinite(number):
                raise ConfigError(f"{key}={number} must be a finite number")
            bounds = item.metadata.get("bounds")
            if bounds is not None and number not in bounds:
                raise ConfigError(f"{key}={number} must be {bounds}")


def validate(config: MOKDConfig) -> None:
    """Refuse values and combinations that cannot train, naming the key, before any model is built: the schema's
    checks, then those the components registered (component_check)."""
    check_ranges(config)
    names = [f"model{k}" for k in range(1, len(config.models) + 1)]
    for key in [*CHOICES, *_REGISTERED_CHOICES]:
        allowed = allowed_values(key)
        for concrete in ([key.replace("modelN", name, 1) for name in names] if key.startswith("modelN.") else [key]):
            if _get(config, concrete) not in allowed:
                raise ConfigError(f"{concrete}={_get(config, concrete)!r} is not one of {', '.join(allowed)}")
    for name, model in zip(names, config.models):
        for term, weight in model.term_weights.items():
            if term not in LOSS_TERMS:
                raise ConfigError(f"{name}.term_weights.{term}: no such loss term (one of {', '.join(LOSS_TERMS)})")
            if weight < 0:
                raise ConfigError(f"{name}.term_weights.{term}={weight} must be >= 0")
        for bound in ("global_crop_scale", "local_crop_scale"):
            scale = getattr(config.data, bound)
            if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
                raise ConfigError(f"data.{bound} must be [low, high] with 0 < low <= high <= 1, got {scale}")
    if config.parallel.zero_stage not in (1, 2, 3):
        raise ConfigError(f"parallel.zero_stage must be 1, 2 or 3, got {config.parallel.zero_stage}")
    for name, model in zip(names, config.models):
        if config.parallel.strategy == "deepspeed" and model.optim.name == "lars":
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
    if config.eval.split == "validation" and config.data.validation_samples == 0:
        raise ConfigError("eval.split=validation needs data.validation_samples > 0 (the images carved from train)")
    if len(config.data.blur_sigma) != 2 or not 0 < config.data.blur_sigma[0] <= config.data.blur_sigma[1]:
        raise ConfigError(f"data.blur_sigma must be [low, high] with 0 < low <= high, got {config.data.blur_sigma}")
    if config.checkpoint.async_save and config.parallel.strategy == "deepspeed":
        raise ConfigError("checkpoint.async_save=true with parallel.strategy=deepspeed: DeepSpeed writes its own "
                          "format synchronously; use single, ddp or fsdp for asynchronous checkpoints")
    for check in _COMPONENT_CHECKS:
        check(config)


def validate_shard_options(data: DataConfig) -> None:
    """The webdataset options: shards named, values in range, no option that only map-style sources honour."""
    if data.source != "webdataset":
        return
    if not data.shards:
        raise ConfigError("data.source=webdataset needs data.shards (the training shard URLs, written by `mokd shards`)")
    # Presets for the map-style sources set these; the error names the override that lets such a preset stream.
    if data.validation_samples:
        raise ConfigError(f"data.validation_samples={data.validation_samples} carves a map-style dataset: add "
                          "data.validation_samples=0 to stream shards (validation images go to their own shards, "
                          "named by data.eval_shards)")
    if data.train_samples:
        raise ConfigError(f"data.train_samples={data.train_samples} picks a subset of a map-style dataset: add "
                          "data.train_samples=0 to stream every sample of the shards (or write fewer: "
                          "mokd shards --limit N)")
    if data.shard_channels not in (1, 3):
        raise ConfigError(f"data.shard_channels must be 1 or 3, got {data.shard_channels}")

