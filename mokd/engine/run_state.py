"""What a checkpoint holds of a run, beside what the strategy writes, and how a resume puts it back.

The strategy writes the students, teachers, optimisers and GradScalers in its own format (DCP or DeepSpeed's). The
rest comes from the components that own it: the step and where the data stands (TrainData.position), the centres,
the collapse watch's step-0 baseline, every rank's RNG, the configuration and world the run was written with, and
the whole teachers that evaluation and export read (teachers.pt, written by rank 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from mokd.config import MOKDConfig, to_yaml
from mokd.engine.checkpoint import (META_FILE, RNG_DIR, TEACHERS_FILE, CheckpointError, CheckpointManager, Finish,
                                   read_checkpoint_file, save_torch)
from mokd.engine.collapse_watch import CollapseWatch
from mokd.engine.distributed import World, all_gather_objects, collective
from mokd.engine.guard import non_finite_module
from mokd.engine.resume_check import check_resume
from mokd.engine.runtime import restore_rng_state, rng_state, seed_rng_for_rank
from mokd.engine.strategies import strategy_class
from mokd.engine.strategies.base import Strategy
from mokd.engine.train_data import TrainData
from mokd.errors import NonFiniteError
from mokd.method.mokd import Centres


class RunState:
    def __init__(self, config: MOKDConfig, world: World, strategy: Strategy, centres: Centres,
                 collapse_watch: CollapseWatch, data: TrainData) -> None:
        self.config, self.world, self.strategy = config, world, strategy
        self.centres, self.collapse_watch, self.data = centres, collapse_watch, data

    def check_finite(self, step: int, newest: Optional[str]) -> None:
        """Collective: NonFiniteError (checkpoint not written) when any rank's weights or centres hold inf or NaN,
        so every kept checkpoint can be resumed."""
        modules = {}
        for number, (student, teacher) in enumerate(zip(self.strategy.networks, self.strategy.teacher_networks), 1):
            modules[f"model{number} student"] = self.strategy.local_tensors(student)
            modules[f"model{number} teacher"] = self.strategy.local_tensors(teacher)
        modules["centres"] = [self.centres.values]
        bad = next((name for name in all_gather_objects(non_finite_module(modules)) if name), None)
        if bad is not None:
            raise NonFiniteError(f"step {step}: the {bad} holds non-finite values; checkpoint step_{step:08d} was "
                                 f"not written, the newest kept one is {newest or 'none'}")

    def writer(self, step: int) -> Callable[[Path], Finish]:
        """write(directory) for CheckpointManager.save; the teachers are gathered now, on every rank. With
        checkpoint.async_save the files are written in the background from CPU copies taken now."""
        background = self.config.checkpoint.async_save
        teachers = self.strategy.teacher_state_dicts()
        if background and self.world.is_main:  # training goes on and changes the teachers in place
            teachers = [{key: value.detach().clone() for key, value in state.items()} for state in teachers]
        meta = {"step": step, "data_position": self.data.position(step),
                "centres": self.centres.values.detach().cpu().clone(), "world_size": self.world.world_size,
                "strategy": self.strategy.name, "config": to_yaml(self.config),
                "collapse_step0": dict(self.collapse_watch.baseline)}

        def write(directory: Path) -> Finish:
            writing = self.strategy.save(directory, background)
            (directory / RNG_DIR).mkdir(exist_ok=True)
            save_torch(rng_state(), directory / RNG_DIR / f"rank_{self.world.rank}.pt")
            if self.world.is_main:
                save_torch(meta, directory / META_FILE)
            if writing is None:
                if self.world.is_main:
                    save_torch(teachers, directory / TEACHERS_FILE)
                return None

            def finish() -> None:
                writing.result()
                if self.world.is_main:
                    save_torch(teachers, directory / TEACHERS_FILE)
            return finish

        return write

    def load(self, directory: Path) -> int:
        """Put the run back as checkpoint `directory` holds it (collective); returns its step. Refuses, before
        anything is loaded, a configuration the checkpoint cannot honour, another checkpoint format, or a missing
        RNG file of a rank that wrote one."""
        meta = CheckpointManager.load_meta(directory)
        check_resume(meta["config"], meta["world_size"], self.config, self.world.world_size, str(directory))
        saved_with, loading_with = strategy_class(meta["strategy"]).checkpoint_format, self.strategy.checkpoint_format
        if saved_with != loading_with:
            raise CheckpointError(f"{directory} was written by parallel.strategy={meta['strategy']} ({saved_with} "
                                  f"format) and cannot be resumed with parallel.strategy={self.strategy.name}")
        rng_file = directory / RNG_DIR / f"rank_{self.world.rank}.pt"
        if self.world.rank < meta["world_size"] and not rng_file.exists():
            raise CheckpointError(f"checkpoint file {rng_file} is missing: rank {self.world.rank} of the "
                                  f"{meta['world_size']} that wrote {directory.name} saved its RNG state there, and "
                                  f"re-seeding would make a different run")
        with collective("checkpoint load"):
            self.strategy.load(directory)
        self.centres.values.copy_(meta["centres"])
        # (checkpoints written before the key existed: measured again at the first step after the resume)
        self.collapse_watch.set_baseline(meta.get("collapse_step0", {}))
        if rng_file.exists():
            restore_rng_state(read_checkpoint_file(rng_file))
        else:  # a rank the saving run did not have (resumed on more processes)
            seed_rng_for_rank(self.config.train.seed, meta["step"], self.world.rank)
        return meta["step"]
