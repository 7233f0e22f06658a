"""Downstream check of data.augment=device: the demo trained with the PIL path (workers) and with the device path,
the same seeds, then both teachers' k-NN on the test split. The device path passes where, for each model, the
difference of the two modes' means is within the larger of their standard deviations over seeds.

    python benchmarks/augmentation_downstream.py --seeds 0 1 --json benchmarks/results/augmentation_downstream.json
    python benchmarks/augmentation_downstream.py --seeds 0 1 --json OUT.json -- head.mlp_batchnorm=true ...

Runs go to --runs/augment_{mode}_s{seed} (one thread each, one after another); a finished run (results.json
present) is read, not trained again. Overrides after `--` apply to every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("workers", "device")


def run(run_dir: Path, mode: str, seed: int, overrides: list[str]) -> dict:
    if not (run_dir / "results.json").exists():
        started = time.perf_counter()
        command = [sys.executable, "-m", "mokd.launch.cli", "train", "--preset", "demo", "--no-progress",
                   f"train.seed={seed}", f"data.augment={mode}", "train.threads=1", *overrides, f"run_dir={run_dir}"]
        environment = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(run_dir.with_suffix(".log"), "w") as log:
            subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=REPO, check=True)
        print(f"{run_dir.name}: {time.perf_counter() - started:.0f} s", flush=True)
    results = json.loads((run_dir / "results.json").read_text())
    return {"seed": seed, "mode": mode, **{f"model{i}": {"untrained": results[f"model{i}"]["knn_top1_untrained"],
                                                        "knn": results[f"model{i}"]["knn_top1"]} for i in (1, 2)}}


def summary(records: list[dict]) -> dict:
    table = {}
    for model in ("model1", "model2"):
        spread = {mode: [r[model]["knn"] for r in records if r["mode"] == mode] for mode in MODES}
        stats = {mode: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0}
                 for mode, v in spread.items()}
        difference = stats["device"]["mean"] - stats["workers"]["mean"]
        larger_std = max(s["std"] for s in stats.values())
        table[model] = {**stats, "difference": difference, "larger_std": larger_std,
                        "within_spread": abs(difference) <= larger_std}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--runs", type=Path, default=REPO / "runs")
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*", help="key=value for every run (after --)")
    args = parser.parse_args()
    args.runs.mkdir(parents=True, exist_ok=True)
    records = [run(args.runs / f"augment_{mode}_s{seed}", mode, seed, args.overrides)
               for seed in args.seeds for mode in MODES]
    result = {"preset": "demo", "overrides": ["train.threads=1", *args.overrides], "split": "test",
              "runs": records, "summary": summary(records)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
