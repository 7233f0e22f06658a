"""The `mokd` command line: train, eval (knn, linear, finetune, analyse), export, convert-run, shards, plan, bench,
presets, config."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Optional

from mokd.config import (allowed_values, choice_lines, describe_options, list_presets, load_config, preset_text,
                         reference_markdown, to_yaml)
from mokd.errors import ConfigError, MokdError, user_message

DEFAULT_PRESET = "demo"
# The commands that read a configuration (from presets and overrides, or a run directory's config.yaml).
CONFIG_COMMANDS = ("train", "eval", "export", "plan", "bench", "config")


def preset_summary() -> str:
    lines = []
    for name in list_presets():
        first = preset_text(name).splitlines()[0].lstrip("# ").strip()
        lines.append(f"  {name:<16} {first}")
    return "\n".join(lines)


def options_summary() -> str:
    from mokd.launch import components  # noqa: F401  (the choices the components declare)

    lines = []
    for key, default, help_text in describe_options():
        lines.append(f"  {key}={default}")
        for text in [help_text, *choice_lines(allowed_values(key))]:
            lines.append(textwrap.indent(textwrap.fill(text, 88), " " * 6))
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """Computes a callable epilog only when the help is shown: the train options' choices come from the
    components, which commands that read no configuration never import."""

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _names(text: str) -> list[str]:
    """A comma-separated list argument (not nargs='+', which would swallow the key=value overrides after it)."""
    return [item for item in text.split(",") if item]


def add_run_arguments(parser: argparse.ArgumentParser, example_override: str) -> None:
    """--run DIR and key=value overrides, shared by the commands that read a finished run."""
    parser.add_argument("--run", required=True, type=Path, help="run directory (holds config.yaml, checkpoints/)")
    add_checkpoint_argument(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"overrides, e.g. {example_override}")


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None, metavar="step_N",
                        help="this checkpoint of the run (default: the newest one that verifies)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mokd", formatter_class=_formatter,
        description="MOKD: two vision models learn self-supervised together (CVPR 2023).",
        epilog="Run `mokd train --help` for every configuration option and preset.")
    # The DeepSpeed launcher passes --local_rank=N before the sub-command; the rank is read from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)
    for add_command in (_add_train, _add_eval, _add_export, _add_convert_run, _add_shards, _add_plan, _add_bench,
                        _add_presets_config):
        add_command(commands)
    return parser


def _add_train(commands) -> None:
    """`mokd train`: a run from the schema, a preset and overrides."""
    train = commands.add_parser(
        "train", formatter_class=_formatter, help="train the models together, then score every teacher with k-NN",
        description="Train two (or more: model3 ...) models together. Configuration: the schema defaults, then "
                    "--preset, then key=value "
                    "overrides (unknown keys are refused). The resolved config is saved as RUN/config.yaml; "
                    "an existing run directory resumes from its newest complete checkpoint.",
        epilog=lambda: f"presets (mokd/configs/*.yaml):\n{preset_summary()}\n\noptions (key=default):\n"
                       f"{options_summary()}")
    train.add_argument("--preset", default=DEFAULT_PRESET, help=f"preset name or YAML path (default: {DEFAULT_PRESET})")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to RUN/)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=5")


def _add_eval(commands) -> None:
    """`mokd eval knn|linear|finetune|analyse`: the protocols on a finished run."""
    evaluate = commands.add_parser("eval", formatter_class=_formatter, help="evaluate a run's teacher backbones")
    protocols = evaluate.add_subparsers(dest="protocol", required=True)
    knn = protocols.add_parser(
        "knn", formatter_class=_formatter, help="weighted k-NN (cosine, k=20, T=0.07) of every teacher",
        description="k-NN top-1 of every teacher backbone of the newest checkpoint of a run that verifies, next "
                    "to the same networks untrained; written to RUN/results.json.")
    add_run_arguments(knn, "eval.knn_k=10")

    linear = protocols.add_parser(
        "linear", formatter_class=_formatter, help="linear probe on every frozen teacher backbone",
        description="DINO's linear probe on every frozen teacher backbone (ResNet: pooled features; ViT: CLS of "
                    "the last eval.linear_n_last_blocks blocks, optionally with the average patch token). "
                    "Features are extracted once without augmentation and the epochs run over the cached "
                    "features. Top-1 merged into RUN/results.json.")
    add_run_arguments(linear, "eval.linear_epochs=50")

    tune = protocols.add_parser(
        "finetune", formatter_class=_formatter, help="fine-tune every backbone on a label subset",
        description="Fine-tune each teacher backbone with a linear head on a class-balanced subset of the "
                    "training labels (seeded by eval.subset_seed: the same subset every time), score on the "
                    "test split; merged into RUN/results.json.")
    add_run_arguments(tune, "eval.finetune_epochs=10")
    tune.add_argument("--fraction", required=True, type=float, help="label fraction, e.g. 0.01 or 0.1")

    analyse = protocols.add_parser(
        "analyse", formatter_class=_formatter, help="prediction consistency, attention distance, t-SNE plots",
        description="The paper's analyses of every teacher: prediction consistency of their k-NN predictions "
                    "(every pair) "
                    "(and against --reference-run), mean attention distance per layer, t-SNE of the features. "
                    "PNGs in RUN/analysis/, images in RUN/tensorboard, numbers in RUN/results.json.")
    add_run_arguments(analyse, "eval.analysis_points=500")
    analyse.add_argument("--reference-run", type=Path, default=None,
                         help="another run on the same data (e.g. independently trained models of similar accuracy)")


def _add_export(commands) -> None:
    """`mokd export`: one teacher backbone as a timm or detectron2 checkpoint."""
    export = commands.add_parser(
        "export", formatter_class=_formatter, help="write a teacher backbone as a timm or detectron2 checkpoint",
        description="Write teacher backbone K (1 ... N) of a run's newest checkpoint that verifies: --format timm, a "
                    "plain state dict loading with strict=True into timm.create_model(name, num_classes=0, ...) (the "
                    "small-image ResNet needs its stock conv1/maxpool replaced as in mokd/eval/export.py); "
                    "--format detectron2, a pickled detectron2 ResNet checkpoint.")
    export.add_argument("--run", required=True, type=Path, help="run directory")
    export.add_argument("--model", required=True, type=int, help="which model of the run: K of modelK (1 ... N)")
    export.add_argument("--format", required=True, choices=("timm", "detectron2"), help="checkpoint format")
    export.add_argument("--out", required=True, type=Path, help="output file")
    add_checkpoint_argument(export)


def _add_convert_run(commands) -> None:
    """`mokd convert-run`: older run directories rewritten in the safe format."""
    convert = commands.add_parser(
        "convert-run", formatter_class=_formatter, help="rewrite an older run directory's checkpoints safely",
        description="mokd reads its checkpoint files as tensors and plain values only (torch.load with "
                    "weights_only=True), so a run directory it did not write cannot run code. Run directories "
                    "written before that hold arbitrary pickles; this loads them in full once (which runs any "
                    "code they hold: only with --trust) and rewrites them, checksums included.")
    convert.add_argument("--run", required=True, type=Path, help="run directory")
    convert.add_argument("--trust", action="store_true",
                         help="you wrote this run directory (or trust whoever did): unpickling it may run code")


def _add_shards(commands) -> None:
    """`mokd shards`: WebDataset tar shards and their manifest."""
    shards = commands.add_parser(
        "shards", formatter_class=_formatter, help="write WebDataset tar shards and their manifest",
        description="Write OUT/PREFIX-NNNNNN.tar shards (image bytes as stored + class index) and OUT/manifest.json "
                    "(samples per shard), samples shuffled with --seed. Train from them with data.source=webdataset "
                    "data.shards='OUT/PREFIX-{000000..NNNNNN}.tar' (the pattern is printed).")
    shards.add_argument("--source", required=True, choices=("imagefolder", "fashion_mnist", "filelist"))
    shards.add_argument("--input", type=Path, default=None,
                        help="ImageFolder root (ROOT/<class>/<image>), file list ('PATH LABEL' lines), or the "
                             "Fashion-MNIST IDX directory (default: found as for training)")
    shards.add_argument("--split", default="train", choices=("train", "test"), help="Fashion-MNIST split")
    shards.add_argument("--out", required=True, type=Path, help="output directory (must hold no shards yet)")
    shards.add_argument("--prefix", default=None, help="shard name prefix (default: the split)")
    size = shards.add_mutually_exclusive_group(required=True)
    size.add_argument("--samples-per-shard", type=int, default=0, help="samples per shard (the last may hold fewer)")
    size.add_argument("--shards", type=int, default=0, help="number of shards (samples spread evenly)")
    shards.add_argument("--limit", type=int, default=0, help="write only this many samples (after shuffling)")
    shards.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle")


def _add_plan(commands) -> None:
    """`mokd plan`: memory per rank before a run."""
    plan = commands.add_parser(
        "plan", formatter_class=_formatter, help="memory per rank for a preset under each strategy",
        description="Estimate the memory each rank needs for a preset: parameters, gradients, optimiser state "
                    "and teachers per strategy and world size, plus activations measured from forwards of the "
                    "real networks at 2 and 4 images (under the run's autocast dtype on the chosen device type), "
                    "scaled to train.batch_size. See mokd/engine/plan.py for the formulas.")
    plan.add_argument("--preset", default=DEFAULT_PRESET, help="preset name or YAML path")
    plan.add_argument("--world-size", type=int, nargs="+", default=[2], help="ranks (several allowed)")
    plan.add_argument("--strategies", nargs="+", default=["ddp", "fsdp", "zero1", "zero2", "zero3"],
                      choices=["ddp", "fsdp", "zero1", "zero2", "zero3"], help="strategies to compare with single")
    plan.add_argument("--device-type", default="cuda", choices=["cuda", "cpu"],
                      help="where the run will train (sets the autocast dtype of train.precision=auto)")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. train.batch_size=32")


def _add_bench(commands) -> None:
    """`mokd bench throughput`: the training step profiled."""
    bench = commands.add_parser("bench", formatter_class=_formatter, help="profile the training step of a preset")
    benches = bench.add_subparsers(dest="bench", required=True)
    throughput = benches.add_parser(
        "throughput", formatter_class=_formatter, help="images/s, step breakdown, peak memory, MFU per mode",
        description="Run the full MOKD training step of preset pairs in several modes (baseline: the official "
                    "code's way; fast: every perf switch on; baseline+SWITCH: one switch alone) and print images/s, "
                    "the step's phases, peak memory, FLOPs (torch.utils.flop_counter) and MFU. See README, "
                    "'Profiling a pair'.")
    throughput.add_argument("--preset", type=_names, default=[DEFAULT_PRESET],
                            help="comma-separated preset names or YAML paths")
    throughput.add_argument("--batch", type=lambda text: [int(b) for b in _names(text)], default=[64],
                            help="comma-separated images per device per step, e.g. 64,128")
    throughput.add_argument("--modes", type=_names, default=["baseline", "fast"],
                            help="comma-separated; each baseline or fast, then any +SWITCH / -SWITCH, e.g. baseline+ema fast-compile (SWITCH: "
                                 "precision, loss_kernel, attention, ema, optimizer, channels_last, compile, "
                                 "grouped_crops, overlap_centre_reduce)")
    throughput.add_argument("--switches", choices=("added", "removed"), default=None,
                            help="also run every switch alone: added = baseline+SWITCH, removed = fast-SWITCH")
    throughput.add_argument("--inputs", choices=("device", "loader"), default="device",
                            help="device: synthetic crops already on the device (pure compute); loader: the real "
                                 "data loader (end to end)")
    throughput.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    throughput.add_argument("--no-compile", action="store_true", help="fast mode without torch.compile")
    throughput.add_argument("--warmup", type=int, default=3, help="untimed steps per mode (compilation included)")
    throughput.add_argument("--steps", type=int, default=5, help="timed steps per mode (medians reported)")
    throughput.add_argument("--interleave", choices=("auto", "on", "off"), default="auto",
                            help="alternate the modes step by step (auto: on CPU, where the load is shared)")
    throughput.add_argument("--time-budget", type=float, default=0.0, help="seconds; skip groups not started by then")
    throughput.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    throughput.add_argument("--json", type=Path, default=None, help="write the records to this JSON file")
    throughput.add_argument("--trace", type=Path, default=None, help="write a Chrome/Perfetto trace per mode here")
    throughput.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.n_local_crops=6")


def _add_presets_config(commands) -> None:
    """`mokd presets` and `mokd config`: what ships, and a resolved configuration."""
    commands.add_parser("presets", help="list the presets")
    config = commands.add_parser(
        "config", formatter_class=_formatter, help="print a resolved configuration, or the configuration reference",
        description="Print the configuration a `mokd train` with these arguments would run (YAML, validated), or "
                    "with --markdown the reference of every option (docs/configuration.md is this output).")
    config.add_argument("--preset", default=DEFAULT_PRESET, help=f"preset name or YAML path (default: {DEFAULT_PRESET})")
    config.add_argument("--markdown", action="store_true", help="print the configuration reference as Markdown")
    config.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=5")



def bench_command(args: argparse.Namespace) -> int:
    import torch

    from mokd.engine.throughput import SWITCHES, format_comparison, run_profiler

    if args.threads:
        torch.set_num_threads(args.threads)
    extra = {"added": [f"baseline+{name}" for name in SWITCHES], "removed": [f"fast-{name}" for name in SWITCHES],
             None: []}[args.switches]
    modes = list(dict.fromkeys(args.modes + extra))
    interleave = {"auto": None, "on": True, "off": False}[args.interleave]
    result = run_profiler(args.preset, args.batch, modes, device=args.device, inputs=args.inputs,
                          compile=not args.no_compile, warmup=args.warmup, steps=args.steps,
                          overrides=args.overrides, json_path=args.json, trace_dir=args.trace,
                          interleave=interleave, time_budget_s=args.time_budget)
    print(format_comparison(result))
    return 0


def train_command(preset: str, overrides: list[str], show_progress: bool) -> int:
    from mokd.launch.api import train

    train(preset, overrides, progress=show_progress, report=lambda line: print(line, flush=True))
    return 0


def eval_command(args: argparse.Namespace) -> int:
    from mokd.eval import run_evaluation

    run, overrides, checkpoint = args.run, args.overrides, args.checkpoint
    if args.protocol == "knn":
        print(run_evaluation.format_table(run_evaluation.evaluate_knn_command(run, overrides, checkpoint)))
    elif args.protocol == "linear":
        print(run_evaluation.format_table(run_evaluation.evaluate_linear_command(run, overrides, checkpoint)))
    elif args.protocol == "finetune":
        results = run_evaluation.evaluate_finetune_command(run, args.fraction, overrides, checkpoint)
        print(run_evaluation.format_table(results))
    else:
        results = run_evaluation.analyse_command(run, args.reference_run, overrides, checkpoint)
        print(run_evaluation.format_analysis(results))
    return 0


def export_command(run_dir: Path, model: int, fmt: str, out: Path, checkpoint: Optional[str] = None) -> int:
    from mokd.eval.export import export_backbone
    from mokd.eval.run_evaluation import load_run

    config, teachers, step = load_run(run_dir, checkpoint=checkpoint)
    if not 1 <= model <= len(config.models):
        raise ConfigError(f"--model {model}: {run_dir} has models 1 ... {len(config.models)}")
    model_config = config.models[model - 1]
    path = export_backbone(teachers[model - 1].backbone.net, model_config, out, fmt)
    print(f"model{model} ({model_config.backbone}) teacher backbone after {step} steps -> {path} ({fmt})")
    return 0


def convert_run_command(run_dir: Path, trust: bool) -> int:
    from mokd.engine.checkpoint import convert_run

    for line in convert_run(run_dir, trust):
        print(line)
    return 0


def shards_command(args: argparse.Namespace) -> int:
    from mokd.data.shard_writer import write_shards_from

    manifest = write_shards_from(args.source, args.out, args.prefix or args.split, args.input, args.split,
                                 samples_per_shard=args.samples_per_shard, shards=args.shards, seed=args.seed,
                                 limit=args.limit)
    print(f"{manifest['samples']} samples in {len(manifest['shards'])} shards: {manifest['pattern']}")
    return 0


def plan_command(args: argparse.Namespace) -> int:
    from mokd.engine.plan import activation_bytes, estimate, format_plan, input_channels

    base = load_config(args.preset, args.overrides)
    channels = input_channels(base.data)
    activations = activation_bytes(base, channels, args.device_type)
    plans = []
    for strategy in ["single", *args.strategies]:
        for world_size in ([1] if strategy == "single" else args.world_size):
            zero = strategy.startswith("zero")
            overrides = [*args.overrides, f"parallel.strategy={'deepspeed' if zero else strategy}",
                         *( [f"parallel.zero_stage={strategy[-1]}"] if zero else [])]
            config = load_config(args.preset, overrides)
            plans.append(estimate(config, world_size, channels, activations))
    first = plans[0]
    print(f"{args.preset}: parameters per student {', '.join(f'{p / 1e6:.1f} M' for p in first['parameters'])}; "
          f"batch {first['batch_per_rank']} per rank; activations measured under {args.device_type}'s autocast "
          f"dtype: {activations[0] / 2**20:.0f} MiB fixed + {activations[1] / 2**20:.1f} MiB per image")
    print(format_plan(plans))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in CONFIG_COMMANDS:
            from mokd.launch import components  # noqa: F401  (every component's configuration check)
        if args.command == "train":
            return train_command(args.preset, args.overrides, not args.no_progress)
        if args.command == "eval":
            return eval_command(args)
        if args.command == "export":
            return export_command(args.run, args.model, args.format, args.out, args.checkpoint)
        if args.command == "convert-run":
            return convert_run_command(args.run, args.trust)
        if args.command == "plan":
            return plan_command(args)
        if args.command == "shards":
            return shards_command(args)

        if args.command == "bench":
            return bench_command(args)
        if args.command == "config":
            print(reference_markdown() if args.markdown else to_yaml(load_config(args.preset, args.overrides)), end="")
            return 0
        print(preset_summary())
        return 0
    except (MokdError, OSError) as error:  # the user's to fix; anything else is a bug and keeps its traceback
        print(f"mokd: error: {user_message(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mokd: interrupted twice: stopped at once, nothing saved since the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
