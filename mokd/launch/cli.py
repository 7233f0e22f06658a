"""The `mokd` command line: train, eval, presets."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Optional

from mokd.config import PRESET_DIR, ConfigError, describe_options, list_presets, load_config
from mokd.engine.checkpoint import CheckpointError

DEFAULT_PRESET = "demo"


def preset_summary() -> str:
    lines = []
    for name in list_presets():
        first = (PRESET_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ").strip()
        lines.append(f"  {name:<16} {first}")
    return "\n".join(lines)


def options_summary() -> str:
    lines = []
    for key, default, help_text in describe_options():
        lines.append(f"  {key}={default}")
        lines.append(textwrap.indent(textwrap.fill(help_text, 88), " " * 6))
    return "\n".join(lines)


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mokd", formatter_class=_formatter,
        description="MOKD: two vision models learn self-supervised together (CVPR 2023).",
        epilog="Run `mokd train --help` for every configuration option and preset.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train", formatter_class=_formatter, help="train a pair, then score both teachers with k-NN",
        description="Train a model pair. Configuration: the schema defaults, then --preset, then key=value "
                    "overrides (unknown keys are refused). The resolved config is saved as RUN/config.yaml; "
                    "an existing run directory resumes from its newest complete checkpoint.",
        epilog=f"presets (configs/*.yaml):\n{preset_summary()}\n\noptions (key=default):\n{options_summary()}")
    train.add_argument("--preset", default=DEFAULT_PRESET, help=f"preset name or YAML path (default: {DEFAULT_PRESET})")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to RUN/)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=5")

    evaluate = commands.add_parser("eval", formatter_class=_formatter, help="evaluate a run's teacher backbones")
    protocols = evaluate.add_subparsers(dest="protocol", required=True)
    knn = protocols.add_parser(
        "knn", formatter_class=_formatter, help="weighted k-NN (cosine, k=20, T=0.07) of both teachers",
        description="k-NN top-1 of both teacher backbones of the newest complete checkpoint of a run, next to "
                    "the same networks untrained; written to RUN/results.json.")
    knn.add_argument("--run", required=True, type=Path, help="run directory (holds config.yaml, checkpoints/)")
    knn.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. eval.knn_k=10")

    commands.add_parser("presets", help="list the presets")
    return parser


def train_command(preset: str, overrides: list[str], show_progress: bool) -> int:
    from mokd.engine.trainer import Trainer
    from mokd.eval.run_knn import evaluate_run, format_table

    config = load_config(preset, overrides)
    trainer = Trainer(config, show_progress=show_progress)
    print(f"run directory: {trainer.run_dir.resolve()}", flush=True)
    trainer.train()
    if config.eval.knn_at_end:
        results = evaluate_run(config, trainer.teachers, trainer.device, trainer.step)
        print(format_table(results))
        print(f"results: {trainer.run_dir.resolve() / 'results.json'}")
    print(f"run directory: {trainer.run_dir.resolve()} (TensorBoard: tensorboard --logdir {trainer.run_dir})")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return train_command(args.preset, args.overrides, not args.no_progress)
        if args.command == "eval":
            from mokd.eval.run_knn import evaluate_knn_command, format_table

            print(format_table(evaluate_knn_command(args.run, args.overrides)))
            return 0
        print(preset_summary())
        return 0
    except (ConfigError, FileNotFoundError, CheckpointError) as error:
        print(f"mokd: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
