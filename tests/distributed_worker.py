"""One rank of a multi-process test run, launched by tests/test_distributed.py through torchrun (gloo, CPU).

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT_DIR key=value ...

Trains the tiny test pair with the given overrides (run_dir, parallel.strategy, ...), then writes on rank 0:
  OUT_DIR/teachers.pt   every teacher's full weights after training
  OUT_DIR/report.json   the collectives a teacher EMA update issued (must be none) and, as a positive control,
                        the ones the centre all-reduce issued; each rank's memory report; under fsdp, whether a
                        student's sharding units hold sharded parameters right after a forward
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import tiny_config  # noqa: E402

from mokd.engine.distributed import CentreSync  # noqa: E402
from mokd.engine.trainer import Trainer  # noqa: E402


def collectives_issued(fn) -> list[str]:
    """Names of the c10d collectives the profiler records while fn runs."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [event.name for event in prof.events() if event.name.startswith("c10d::")]


def units_sharded_after_forward(trainer: Trainer) -> Optional[bool]:
    """fsdp only: whether the first student's sharding units (residual blocks, MLP-Head) hold their sharded
    DTensor parameters right after a forward (parallel.reshard_after_forward) or the gathered plain tensors."""
    if trainer.config.parallel.strategy != "fsdp":
        return None
    student = trainer.student_networks[0]
    side = trainer.config.data.global_crop_size
    student([torch.randn(2, student.backbone.in_chans, side, side)] * 2)
    units = [module for module in student.modules() if isinstance(module, FSDPModule) and module is not student]
    (sharded,) = {isinstance(p, DTensor) for unit in units for p in unit.parameters()}
    return sharded


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    config = tiny_config(Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("run_dir="))),
                         extra=[o for o in overrides if not o.startswith("run_dir=")])
    trainer = Trainer(config, show_progress=False)
    trainer.train()
    teachers = trainer.strategy.teacher_state_dicts()
    ema = collectives_issued(lambda: trainer.strategy.update_teachers([0.99] * len(config.models)))
    centres = trainer.centres.values
    control = collectives_issued(lambda: CentreSync(centres, torch.ones(centres.shape[0]), async_op=False).wait())
    memory = [None] * trainer.world.world_size
    dist.all_gather_object(memory, trainer.strategy.memory_report())
    sharded_after_forward = units_sharded_after_forward(trainer)  # last: it leaves a forward without backward
    if trainer.world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(teachers, out / "teachers.pt")
        report = {"ema_collectives": ema, "control_collectives": control, "memory": memory,
                  "world_size": trainer.world.world_size, "step": trainer.step,
                  "units_sharded_after_forward": sharded_after_forward}
        (out / "report.json").write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    # Leave without running C++ static destructors: after torch.profiler has run on a CPU-only machine with a CUDA
    # build, the interpreter's teardown sometimes aborts ("terminate called without an active exception", SIGABRT,
    # seen on a loaded machine under zero3 and fsdp, after the collectives were counted); the work is done here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
