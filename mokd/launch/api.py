"""mokd from Python, for notebooks and sweeps: `mokd.train(...)` runs what `mokd train` runs, with the same
configuration layers, validation and errors (ConfigError and the other MokdError types are raised, not printed),
and returns where the run lives and what it scored.

    import mokd
    run = mokd.train(preset="demo", overrides={"train.epochs": 1})
    run.results["model1"]["knn_top1"], run.run_dir
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from mokd.config import load_config
from mokd.launch import components  # noqa: F401  (every component's configuration check)

Overrides = Union[Mapping[str, Any], Sequence[str]]


@dataclass(frozen=True)
class TrainedRun:
    run_dir: Path
    steps: int
    stopped_by_signal: bool  # saved on a stop signal: the next start with the same run_dir resumes; no evaluation
    results: dict  # RUN/results.json (k-NN, linear probe, analyses of both teachers); empty when nothing was scored


def override_list(overrides: Overrides) -> list[str]:
    """{"train.epochs": 1} or ["train.epochs=1"] -> ["train.epochs=1"] (values in YAML's spelling)."""
    if isinstance(overrides, Mapping):
        return [f"{key}={_yaml_value(value)}" for key, value in overrides.items()]
    return list(overrides)


def _yaml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def train(preset: Optional[str] = "demo", overrides: Overrides = (), progress: bool = False,
          report: Optional[Callable[[str], None]] = None) -> TrainedRun:
    """Train a pair (resuming if `run_dir` holds a run), then score it as the preset's `eval.*` options ask.
    `report` receives the lines `mokd train` prints (the run directory, the results table); None: silent."""
    from mokd.engine.trainer import Trainer
    from mokd.eval.run_evaluation import analyse_run, evaluate_run, extract_run_features, format_analysis, format_table

    say = report or (lambda line: None)
    config = load_config(preset, override_list(overrides))
    trainer = Trainer(config, show_progress=progress)
    main = trainer.world.is_main  # under torchrun every rank trains; rank 0 reports and evaluates
    if main:
        say(f"run directory: {trainer.run_dir.resolve()} ({config.parallel.strategy}, "
            f"{trainer.world.world_size} process(es))")
    trainer.train()
    if not trainer.stop_agreed and config.eval.knn_at_end:
        teachers = trainer.gathered_teachers()
        # One feature pass per model serves the k-NN, the linear probe and the analyses.
        features, _ = extract_run_features(config, teachers, trainer.device)
        say(format_table(evaluate_run(config, teachers, trainer.device, trainer.step, features=features)))
        if config.eval.analysis_at_end:
            say(format_analysis(analyse_run(config, teachers, trainer.device, trainer.step, features)))
        say(f"results: {trainer.run_dir.resolve() / 'results.json'}")
    if main and not trainer.stop_agreed:
        say(f"run directory: {trainer.run_dir.resolve()} (TensorBoard: tensorboard --logdir {trainer.run_dir})")
    results_file = trainer.run_dir / "results.json"
    results = json.loads(results_file.read_text()) if main and results_file.exists() else {}
    return TrainedRun(trainer.run_dir.resolve(), trainer.step, trainer.stop_agreed, results)
