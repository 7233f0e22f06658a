"""Checkpoint stall per save, synchronous against asynchronous (checkpoint.async_save), on CPU.

    python benchmarks/checkpoint_stall.py --preset demo --preset r101_vit_b --saves 3 \
        --json benchmarks/results/checkpoint_stall_cpu.json

The stall is what training waits for: the time `Trainer.save()` takes to return. Synchronous saves write and
checksum every file before returning; asynchronous ones return after the CPU copy (DCP staging and the teachers'
clone) and finish in the background, whose duration is reported as well (the next save waits for it). Networks of
the preset are built as for training (synthetic data stands in for the dataset, no step is taken); the
optimisers' state is created by one step on zero gradients, so the checkpoint holds what a real one holds.
Medians over --saves saves; timings vary with the machine's load and disk.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mokd.config import load_config  # noqa: E402
from mokd.engine.trainer import Trainer  # noqa: E402

SYNTHETIC = ["data.source=synthetic", "data.synthetic_size=64", "data.num_workers=0", "train.batch_size=8",
             "eval.knn_at_end=false", "checkpoint.keep_last=1"]


def build(preset: str, run_dir: Path, background: bool) -> Trainer:
    config = load_config(preset, [f"run_dir={run_dir}", *SYNTHETIC, f"checkpoint.async_save={str(background).lower()}"])
    trainer = Trainer(config, show_progress=False)
    for network, optimizer in zip(trainer.strategy.networks, trainer.optimizers):
        for parameter in network.parameters():
            parameter.grad = torch.zeros_like(parameter)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return trainer


def measure(preset: str, background: bool, saves: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        trainer = build(preset, Path(scratch) / "run", background)
        stalls, completions = [], []
        for save in range(saves):
            trainer.step = save + 1
            start = time.perf_counter()
            trainer.save()
            stalls.append(time.perf_counter() - start)
            trainer.checkpoints.wait()
            completions.append(time.perf_counter() - start)
        trainer.lock.release()
        size = sum(f.stat().st_size for f in trainer.checkpoints.latest().rglob("*") if f.is_file())
    parameters = sum(p.numel() for network in trainer.strategy.networks for p in network.parameters())
    return {"preset": preset, "mode": "async" if background else "sync", "saves": saves,
            "student_parameters": parameters, "checkpoint_bytes": size,
            "stall_s_median": statistics.median(stalls), "complete_s_median": statistics.median(completions),
            "stall_s": stalls, "complete_s": completions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", action="append", default=None, help="preset (repeatable; default demo)")
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    records = []
    for preset in args.preset or ["demo"]:
        for background in (False, True):
            record = measure(preset, background, args.saves)
            records.append(record)
            print(f"{preset:<12} {record['mode']:<5} {record['checkpoint_bytes'] / 2**20:8.1f} MiB  stall "
                  f"{record['stall_s_median']:7.3f} s  complete {record['complete_s_median']:7.3f} s", flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": "cpu", "threads": args.threads, "records": records}, indent=1))


if __name__ == "__main__":
    main()
