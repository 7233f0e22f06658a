"""Real multi-process training on CPU: torchrun, gloo, 2 processes, real DDP, FSDP2 and DeepSpeed ZeRO-1/2/3.

Every strategy with 2 ranks of 4 images is compared with one process of 8 images (the same global batch, so
the same images, crops, schedules and, through GlobalBatchNorm, the same BatchNorm statistics): the losses of
each step (averaged over ranks) and the teachers' weights after 3 steps must agree to fp32 reduction-order
noise (losses rtol 1e-4; weights atol 2e-5, rtol 1e-4). DeepSpeed clips the global gradient norm and freezes
the last layers through a zero learning rate (see engine/strategies/deepspeed.py), so the per-stage comparisons run
with clipping and freezing off on both sides, and one ZeRO-2 run keeps both on against a one-process reference
whose clipping is a global-norm clip written here; the others keep DINO's per-parameter clipping, tightened to
0.05 so that it acts, and the first-epoch freeze (all STEPS steps lie in the first epoch). Every run has
BatchNorm in the MLP-Heads (head.mlp_batchnorm: their GlobalBatchNorm must see the global batch too), and the ddp
run takes Sinkhorn-Knopp targets, whose normalisations must sum over both ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import TINY_RESNET, model_overrides, tiny_config
from mokd.config import save_config
from mokd.engine.plan import estimate
from mokd.engine.trainer import Trainer
from mokd.method.models import build_models

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
REPO = WORKER.parent.parent
STEPS = 3
CLIPPED = ["model1.optim.clip_grad=0.05", "model2.optim.clip_grad=0.05"]
UNCLIPPED = ["model1.optim.clip_grad=0", "model2.optim.clip_grad=0",
             "model1.optim.freeze_last_layer_epochs=0", "model2.optim.freeze_last_layer_epochs=0"]
COMMON = [f"train.max_steps={STEPS}", "checkpoint.every_steps=1", "checkpoint.keep_last=5", "train.log_every=1",
          "head.mlp_batchnorm=true"]
SINKHORN = ["loss.centring=sinkhorn_knopp"]
# A third model (N = 3: the tiny ResNet, the tiny ViT and a narrower ResNet), with its own clipping switches.
THREE = [*model_overrides("model3", [*TINY_RESNET[:-1], "width=4"]), "model3.optim.warmup_epochs=1"]
THREE_CLIPPED = [*THREE, "model3.optim.clip_grad=0.05"]
THREE_UNCLIPPED = [*THREE, "model3.optim.clip_grad=0", "model3.optim.freeze_last_layer_epochs=0"]
# The one-process runs every strategy must reproduce, by name: their overrides on top of COMMON.
REFERENCES = {"clipped": CLIPPED, "unclipped": UNCLIPPED, "clipped_sinkhorn": CLIPPED + SINKHORN,
              "three_clipped": CLIPPED + THREE_CLIPPED, "three_unclipped": UNCLIPPED + THREE_UNCLIPPED,
              "three_clipped_sinkhorn": CLIPPED + THREE_CLIPPED + SINKHORN}
# Clipped, and the ViT on SGD with a learning rate large enough (from step 1) that the size of the clipped step
# shows in the next losses (AdamW would divide the clipping factor out again; the tiny ResNet, at such a rate,
# amplifies fp32 reduction-order noise past the tolerance within three steps).
LOUD_CLIPPED = [*CLIPPED, "model2.optim.name=sgd", "model2.optim.base_lr=10", "model1.optim.warmup_epochs=0",
                "model2.optim.warmup_epochs=0"]


def launch(out: Path, run_dir: Path, overrides: list[str], processes: int = 2) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(29600 + os.getpid() % 300), str(WORKER), str(out), f"run_dir={run_dir}",
               *overrides]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return json.loads((out / "report.json").read_text())


def step_losses(run_dir: Path) -> dict[int, dict[str, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss/")} for r in records}


def assert_same_losses(mine: dict, reference: dict, steps) -> None:
    for step in steps:
        assert mine[step].keys() == reference[step].keys()
        for name, value in reference[step].items():
            assert mine[step][name] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, name)


def assert_same_teachers(mine: list[dict], reference: list[dict]) -> None:
    for which, (state, expected) in enumerate(zip(mine, reference)):
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(state[key].float(), value.float(), rtol=1e-4, atol=2e-5,
                                       msg=f"teacher {which + 1} {key}")


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One process, 8 images per step: the runs every strategy must reproduce (with and without clipping; two
    models and three)."""
    runs = {}
    for name, extra in REFERENCES.items():
        run_dir = tmp_path_factory.mktemp(f"single_{name}")
        trainer = Trainer(tiny_config(run_dir, extra=COMMON + extra), show_progress=False)
        trainer.train()
        runs[name] = (run_dir, step_losses(run_dir), trainer.strategy.teacher_state_dicts())
    return runs


def step_metric(run_dir: Path, name: str) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[name] for r in records}


@torch.no_grad()
def global_norm_clip_(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Scale all of a model's gradients together by max_norm / (their joint norm + 1e-6) when that is below one,
    as DeepSpeed's gradient_clipping does; return the joint norm before clipping."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    if max_norm > 0 and norm + 1e-6 > max_norm:
        for g in grads:
            g.mul_(float(max_norm / (norm + 1e-6)))
    return norm.float()


@pytest.fixture(scope="module")
def global_clip_reference(tmp_path_factory):
    """One process, 8 images per step, each student's joint gradient norm clipped to 0.05, last layers frozen."""
    run_dir = tmp_path_factory.mktemp("single_global_clip")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("mokd.engine.strategies.base.clip_gradients_", global_norm_clip_)
        trainer = Trainer(tiny_config(run_dir, extra=COMMON + LOUD_CLIPPED), show_progress=False)
        trainer.train()
    return run_dir, trainer.strategy.teacher_state_dicts()


def per_rank(extra: list[str]) -> list[str]:
    return ["train.batch_size=4", *COMMON, *extra]


DDP, FSDP = ["parallel.strategy=ddp"], ["parallel.strategy=fsdp"]
ZERO = {stage: ["parallel.strategy=deepspeed", f"parallel.zero_stage={stage}"] for stage in (1, 2, 3)}


@pytest.mark.parametrize("strategy, extra, reference", [
    ("ddp", DDP, "clipped_sinkhorn"), ("fsdp", FSDP, "clipped"), ("zero1", ZERO[1], "unclipped"),
    ("zero2", ZERO[2], "unclipped"), ("zero3", ZERO[3], "unclipped"),
    # N = 3 models
    ("three_ddp", DDP, "three_clipped_sinkhorn"), ("three_fsdp", FSDP, "three_clipped"),
    ("three_zero3", ZERO[3], "three_unclipped"),
])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, references, strategy, extra,
                                                                    reference):
    reference_dir, reference_losses, reference_teachers = references[reference]
    clip = REFERENCES[reference]
    run_dir = tmp_path / "run"
    report = launch(tmp_path / "out", run_dir, per_rank(extra + clip))
    assert len(reference_teachers) == (3 if strategy.startswith("three") else 2)
    assert report["world_size"] == 2 and report["step"] == STEPS
    assert report["units_sharded_after_forward"] == (True if strategy.endswith("fsdp") else None)  # reshard by default
    assert_same_losses(step_losses(run_dir), reference_losses, range(1, STEPS + 1))
    assert_same_teachers(torch.load(tmp_path / "out" / "teachers.pt"), reference_teachers)
    # The EMA of sharded teachers touches local shards only; the centre all-reduce shows the count works.
    assert report["ema_collectives"] == []
    assert any("allreduce" in name for name in report["control_collectives"])

    # What each rank really holds agrees with `mokd plan`'s estimate for this strategy and world size.
    config = tiny_config(run_dir, extra=per_rank(extra + clip))
    plan = estimate(config, 2, 1)["rows"]
    for rank_memory in report["memory"]:
        for measured, planned in (("student_parameter_bytes", "student parameters"),
                                  ("teacher_parameter_bytes", "teacher parameters"),
                                  ("optimizer_state_bytes", "optimiser state")):
            assert rank_memory[measured] == pytest.approx(plan[planned], rel=0.05), (measured, rank_memory)

    # Save, then resume: drop the last checkpoint and run step 3 again from step 2's.
    shutil.rmtree(run_dir / "checkpoints" / f"step_{STEPS:08d}")
    launch(tmp_path / "resumed", run_dir, per_rank(extra + clip))
    assert_same_losses(step_losses(run_dir), reference_losses, range(1, STEPS + 1))
    assert_same_teachers(torch.load(tmp_path / "resumed" / "teachers.pt"), reference_teachers)


def test_zero2_with_clipping_and_the_last_layer_freeze_matches_one_process(tmp_path, global_clip_reference):
    reference_dir, reference_teachers = global_clip_reference
    run_dir = tmp_path / "run"
    launch(tmp_path / "out", run_dir, per_rank(["parallel.strategy=deepspeed", "parallel.zero_stage=2", *LOUD_CLIPPED]))
    assert_same_losses(step_losses(run_dir), step_losses(reference_dir), range(1, STEPS + 1))
    teachers = torch.load(tmp_path / "out" / "teachers.pt")
    assert_same_teachers(teachers, reference_teachers)
    # Clipping acts at every step: the joint norms DeepSpeed measured before clipping are far above 0.05 (and
    # equal the reference's).
    for which in (1, 2):
        norms = step_metric(run_dir, f"grad_norm/model{which}")
        reference_norms = step_metric(reference_dir, f"grad_norm/model{which}")
        for step in range(1, STEPS + 1):
            assert norms[step] > 10 * 0.05
            assert norms[step] == pytest.approx(reference_norms[step], rel=1e-4)
    # The freeze acts: the teachers' last layers (EMAs of the students') are still the initial ones, while the
    # rest moved.
    _, initial = build_models(tiny_config(run_dir, extra=COMMON + LOUD_CLIPPED), in_chans=1)
    for state, teacher in zip(teachers, initial):
        initial_state = teacher.state_dict()
        last_layers = [key for key in initial_state if ".last_layer." in key]
        assert len(last_layers) == 4  # direction and norm of both heads' weight-normalised layers
        assert all(torch.equal(state[key], initial_state[key]) for key in last_layers)
        assert not torch.equal(state["mlp_head.mlp.0.weight"], initial_state["mlp_head.mlp.0.weight"])


def test_fsdp_without_reshard_after_forward_keeps_units_gathered_and_trains_the_same(tmp_path, references):
    _, reference_losses, reference_teachers = references["clipped"]
    report = launch(tmp_path / "out", tmp_path / "run",
                    per_rank(["parallel.strategy=fsdp", "parallel.reshard_after_forward=false", *CLIPPED]))
    assert report["units_sharded_after_forward"] is False
    assert_same_losses(step_losses(tmp_path / "run"), reference_losses, range(1, STEPS + 1))
    assert_same_teachers(torch.load(tmp_path / "out" / "teachers.pt"), reference_teachers)


def test_dcp_checkpoint_reshards_between_one_and_two_processes(tmp_path, references):
    reference_dir, reference_losses, reference_teachers = references["clipped"]

    # Saved by 1 process (single, 8 images), resumed by 2 (fsdp, 4 images each).
    one = tmp_path / "from_one"
    shutil.copytree(reference_dir, one)
    shutil.rmtree(one / "checkpoints" / f"step_{STEPS:08d}")
    launch(tmp_path / "out_two", one, per_rank(["parallel.strategy=fsdp", *CLIPPED]))
    assert_same_losses(step_losses(one), reference_losses, range(1, STEPS + 1))
    assert_same_teachers(torch.load(tmp_path / "out_two" / "teachers.pt"), reference_teachers)

    # Saved by 2 processes (fsdp), resumed by 1 (single, 8 images).
    two = tmp_path / "from_two"
    launch(tmp_path / "out_fsdp", two, per_rank(["parallel.strategy=fsdp", f"train.max_steps={STEPS - 1}", *CLIPPED]))
    resumed = Trainer(tiny_config(two, extra=COMMON + CLIPPED), show_progress=False)
    assert resumed.step == STEPS - 1
    resumed.train()
    assert_same_losses(step_losses(two), reference_losses, range(1, STEPS + 1))
    assert_same_teachers(resumed.strategy.teacher_state_dicts(), reference_teachers)


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_mokd_train_runs_unchanged_under_both_launchers(tmp_path, launcher):
    """The `mokd train` command line itself, 2 processes: torchrun with FSDP2, the DeepSpeed launcher (which
    passes --local_rank) with ZeRO-3. Each rank trains; rank 0 logs every step and writes memory.json."""
    preset = tmp_path / "tiny.yaml"
    strategy = ["parallel.strategy=fsdp"] if launcher == "torchrun" else ["parallel.strategy=deepspeed",
                                                                          "parallel.zero_stage=3"]
    save_config(tiny_config(tmp_path / "unused", extra=["train.batch_size=4", "train.max_steps=2", *strategy]), preset)
    port = str(29900 + os.getpid() % 90)
    runner = (["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port] if launcher == "torchrun"
              else ["-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", port])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    run_dir = tmp_path / "run"
    module = ["-m", "mokd.launch.cli"] if launcher == "torchrun" else ["--module", "mokd.launch.cli"]
    command = [sys.executable, *runner, *module, "train", "--preset", str(preset), "--no-progress",
               f"run_dir={run_dir}"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, f"{launcher} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    assert sorted(step_losses(run_dir)) == [1, 2]
    memory = json.loads((run_dir / "memory.json").read_text())
    assert memory["world_size"] == 2 and len(memory["per_rank"]) == 2
    assert (run_dir / "checkpoints" / "step_00000002" / "COMPLETE").exists()
