"""The trainer: the story of a MOKD step, from crops to teachers and centres, on any strategy.

    crops -> students and teachers (no grad) forward -> the DINO terms + searches -> start the centre all-reduce
    -> one backward of L_1 + ... + L_N -> per model: clip, freeze last layers (first epoch), optimiser step
    -> shard-local EMA of the teachers -> move the centres with the global batch's statistics

How the students are wrapped, synchronised and checkpointed is the strategy's business (engine/strategies); what
else a checkpoint holds, RunState's (engine/run_state.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch

from mokd.config import MOKDConfig, save_config
from mokd.engine.checkpoint import CheckpointError, CheckpointManager
from mokd.engine.collapse_watch import CollapseWatch
from mokd.engine.distributed import CentreSync, World, all_reduce_sum, broadcast_object, collective, init_world
from mokd.engine.guard import StepJudge
from mokd.engine.metrics import MetricsLogger
from mokd.engine.optim import build_optimizer
from mokd.engine.perf import apply_perf
from mokd.engine.run_lock import RunLock, check_run_directory
from mokd.engine.run_state import RunState
from mokd.engine.runtime import autocast, autocast_dtype, describe_precision, resolve_device, set_determinism
from mokd.engine.step_log import StepLog, feature_monitors
from mokd.engine.strategies import build_strategy
from mokd.engine.train_data import TrainData
from mokd.errors import MokdError, user_message
from mokd.method.mokd import Centres, MOKDObjective, StepLosses, Temperatures, untimed
from mokd.method.models import build_models, build_network, thead_schedule_source
from mokd.method.network import Network
from mokd.method.schedules import ModelSchedules


class Trainer:
    """A run: its components (data, models and their strategy, objective, schedules, centres, step judge, log,
    run state for checkpoints), built and checked before anything is written, then `train()`."""

    def __init__(self, config: MOKDConfig, show_progress: bool = True) -> None:
        self.config = config
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        self.run_dir = Path(config.run_dir)
        self.world: World = init_world(resolve_device(config.train.device), config.parallel)
        self.device = self.world.device
        self.checkpoints = CheckpointManager(self.run_dir, config.checkpoint.keep_last)
        # Everything that can refuse the run (values, device, data, the directory) is checked before the run
        # directory is created or changed; config.yaml is written only once the checkpoint (if any) has loaded.
        check_run_directory(self.run_dir)
        set_determinism(config.train.seed, config.train.deterministic)
        self.amp_dtype = autocast_dtype(config.train.precision, self.device)
        if self.world.is_main:
            print(describe_precision(config.train.precision, self.device), flush=True)

        self.data = TrainData.build(config, self.world.rank, self.world.world_size)
        self.steps_per_epoch = self.data.steps_per_epoch
        self.total_steps = config.train.epochs * self.steps_per_epoch
        self.last_step = min(self.total_steps, config.train.max_steps or self.total_steps)

        models = config.models
        students, teachers = build_models(config, self.data.dataset.channels)
        self.centres = Centres(config.head.out_dim, len(models)).to(self.device)
        self.objective = MOKDObjective.for_config(config)
        if self.world.distributed:
            self.objective.reduce_sum = all_reduce_sum
        # A T-Head may follow another model's lr and weight-decay schedules (thead_optim): its own parameter group.
        thead_sources = [thead_schedule_source(config, which) for which in range(len(models))]
        global_batch = config.train.batch_size * self.world.world_size
        self.schedules = [ModelSchedules(model, config.loss, self.total_steps, self.steps_per_epoch, global_batch,
                                         thead_optim=None if source is None else models[source].optim)
                          for model, source in zip(models, thead_sources)]
        self.strategy = build_strategy(config, self.world, self.amp_dtype)
        self.strategy.setup(tuple(apply_perf(s.to(self.device), config.perf) for s in students),
                            tuple(apply_perf(t.to(self.device), config.perf) for t in teachers),
                            lambda network, which: build_optimizer(network, models[which].optim, config.perf.optimizer,
                                                                   thead_schedule=thead_sources[which] is not None))

        self.phase = untimed  # the step's phase hook; a profiler installs a timer with set_phase_hook
        self.judge = StepJudge(config.train.max_skipped_steps, self.device, report=self.world.is_main)
        self.scaler_skipped = [False] * len(models)  # per model: did its fp16 GradScaler skip the last step
        self.collapse_watch = CollapseWatch(config.head.out_dim, config.train.warn_feature_cosine_gap,
                                            config.train.warn_feature_rank_fraction,
                                            config.train.warn_entropy_fraction)
        self.state = RunState(config, self.world, self.strategy, self.centres, self.collapse_watch, self.data)
        self.step = 0
        self.lock = RunLock(self.run_dir)
        self.open_run()
        self.metrics = (MetricsLogger(self.run_dir, self.last_step, self.step, show_progress)
                        if self.world.is_main else None)
        self.step_log = StepLog(self.schedules, self.collapse_watch, self.metrics, self.device)

    @property
    def collapse_step0(self) -> dict[str, float]:
        """The feature monitors of the untrained teachers (the first step of the run), the collapse warnings'
        reference; kept in every checkpoint. {} until measured."""
        return self.collapse_watch.baseline

    @property
    def stop_agreed(self) -> Optional[str]:
        """The stop signal every rank has seen, at a step boundary (None: no stop)."""
        return self.judge.stop_agreed

    def open_run(self) -> None:
        """Collective: claim the run directory (rank 0: writable, locked), resume from the newest checkpoint that
        verifies and fits the requested config, and only then write config.yaml. Nothing is written on refusal."""
        problem = None
        if self.world.is_main:
            try:
                self.lock.acquire()
            except (MokdError, OSError) as error:
                problem = error
        message = broadcast_object(None if problem is None else user_message(problem))
        if problem is not None:
            raise problem
        if message is not None:
            raise MokdError(f"rank 0 could not open {self.run_dir}: {message}")
        try:
            latest = self.checkpoints.latest()
            if latest is not None and not self.config.checkpoint.resume:
                raise CheckpointError(f"{self.run_dir} already holds checkpoints (newest {latest.name}) and "
                                      f"checkpoint.resume=false: choose a new run_dir, or remove "
                                      f"{self.checkpoints.directory}")
            loaded = self.checkpoints.resume(self.load, self.config.checkpoint.fallback, self.world.is_main)
            if self.world.is_main:
                save_config(self.config, self.run_dir / "config.yaml")
                if loaded is not None:
                    print(f"mokd: resuming from {loaded.name} ({self.run_dir})", flush=True)
        except BaseException:
            self.lock.release()
            raise

    @property
    def student_networks(self) -> tuple[Network, ...]:
        """The student modules, model1 ... modelN (sharded or wrapped as the strategy keeps them)."""
        return self.strategy.networks

    @property
    def teacher_networks(self) -> tuple[Network, ...]:
        return self.strategy.teacher_networks

    @property
    def optimizers(self) -> list:
        return self.strategy.optimizers

    # ---- the step -------------------------------------------------------------------------------
    def set_phase_hook(self, phase) -> None:
        """phase(name) -> context manager, wrapped around each part of the step (here and in the objective)."""
        self.phase = phase
        self.objective.phase = phase

    def temperatures(self, step: int) -> list[Temperatures]:
        return [Temperatures(s.student_temperature, float(s.teacher_temperature_self[step]),
                             float(s.teacher_temperature_cross[step])) for s in self.schedules]

    def train_step(self, batch) -> tuple[StepLosses, list[torch.Tensor]]:
        """One step on a batch of the training loader: crop tensors, or (data.augment=device) decoded images."""
        step, strategy, phase = self.step, self.strategy, self.phase
        models = range(len(self.schedules))
        frozen = [step < schedule.freeze_last_layer_steps for schedule in self.schedules]
        with phase("data"):
            crops = self.data.to_crops(batch, self.device)

        # Every student and teacher forward, the searches and every model's loss L_i.
        with autocast(self.device, self.amp_dtype), collective("forward (batch-norm statistics, parameter gathers)"):
            losses = self.objective(strategy.students, strategy.teachers, self.centres, crops, self.temperatures(step))
        with phase("centres"):  # one flat all-reduce of the centres' statistics; in flight during backward
            centre_sync = CentreSync(losses.centre_sums, losses.centre_rows, self.config.perf.overlap_centre_reduce)
        with phase("backward"), collective("backward (gradient reduction)"):
            strategy.backward(losses.totals)

        # Per model: schedules, gradient norm and clipping; then one verdict for all (finite? stop?); the steps.
        with phase("optimizer"):
            grad_norms = []
            for which, (schedule, model) in enumerate(zip(self.schedules, self.config.models)):
                strategy.set_schedule(which, schedule.group_values(step), frozen[which])
                grad_norms.append(strategy.prepare_gradients(which, model.optim.clip_grad, frozen[which]))
            skip = self.judge.skip(step + 1, self.judged_values(losses, grad_norms))
            for which in models:
                after_step, self.scaler_skipped[which] = strategy.apply_gradients(which, skip)
                grad_norms[which] = after_step if grad_norms[which] is None else grad_norms[which]

        # The teachers follow their students (EMA), the centres the teachers' batch statistics.
        with torch.no_grad():
            if not skip:
                with phase("ema"):
                    strategy.update_teachers([float(schedule.teacher_momentum[step]) for schedule in self.schedules])
            with phase("centres"), collective("centre all-reduce"):
                centre_statistics = centre_sync.wait()
                if not skip:
                    self.centres.update(*centre_statistics, self.config.loss.centre_momentum)
        self.step += 1
        return losses, grad_norms

    def judged_values(self, losses: StepLosses, grad_norms: list[Optional[torch.Tensor]]) -> dict:
        """What must be finite for a step to count: every loss term, and the gradient norm of every model without
        an fp16 GradScaler (a scaler skips such steps itself and lowers its scale)."""
        values = dict(losses.terms)
        for which, norm in enumerate(grad_norms):
            if norm is not None and not self.strategy.scalers[which].is_enabled():
                values[f"model{which + 1}/grad_norm"] = norm
        return values

    # ---- the loop -------------------------------------------------------------------------------
    def train(self) -> None:
        """Train to the last step, or until a stop signal (then save and return: `stop_agreed` names it).
        The run directory's lock is released at the end, however the loop ends."""
        self.judge.stop.install()
        try:
            self.loop()
            self.checkpoints.wait()
        except BaseException:
            self.checkpoints.wait(raise_errors=False)  # a checkpoint in flight is finished, not cut off
            raise
        finally:
            self.judge.stop.uninstall()
            if self.metrics is not None:
                self.metrics.close()
            self.lock.release()

    def loop(self) -> None:
        epoch = self.step // self.steps_per_epoch
        window_start, window_images, data_wait = time.perf_counter(), 0, 0.0
        first_step = self.step + 1
        while self.step < self.last_step:
            self.data.sampler.set_epoch(epoch)
            self.data.sampler.set_start_batch(self.step - epoch * self.steps_per_epoch)
            fetch_start = time.perf_counter()
            for batch, labels in self.data.loader:
                data_wait += time.perf_counter() - fetch_start
                losses, grad_norms = self.train_step(batch)
                if not self.collapse_step0:  # this step's teachers were the untrained networks (a fresh run)
                    self.collapse_watch.set_baseline(feature_monitors(losses, reduce=True))
                window_images += len(labels) * self.world.world_size
                if self.step == first_step:  # optimiser state exists from the first step on
                    self.record_memory()
                if self.metrics is not None:
                    self.metrics.advance()
                if self.step % self.config.train.log_every == 0 or self.step == self.last_step:
                    elapsed = time.perf_counter() - window_start
                    self.step_log.record(self.step, losses, grad_norms, self.judge.guard.skipped_steps,
                                         self.scaler_skipped, window_images / elapsed, data_wait / elapsed,
                                         self.data.loader)
                    window_start, window_images, data_wait = time.perf_counter(), 0, 0.0
                if self.should_checkpoint() or (self.stop_agreed and self.config.checkpoint.enabled):
                    self.save()
                if self.stop_agreed or self.step >= self.last_step:
                    break
                fetch_start = time.perf_counter()
            if self.stop_agreed:
                self.report_stop()
                return
            epoch += 1

    def report_stop(self) -> None:
        if not self.world.is_main:
            return
        if self.config.checkpoint.enabled:
            print(f"mokd: saved step_{self.step:08d} on {self.stop_agreed}; run the same command again to resume",
                  flush=True)
        else:
            print(f"mokd: stopped at step {self.step} on {self.stop_agreed} (checkpoint.enabled=false: nothing "
                  f"saved)", flush=True)

    def record_memory(self) -> None:
        """RUN/memory.json: the bytes of parameters, teachers and optimiser state each rank really holds
        (compare with `mokd plan`); collective."""
        report = self.strategy.memory_report()
        reports = [report]
        if self.world.distributed:
            reports = [None] * self.world.world_size
            torch.distributed.all_gather_object(reports, report)
        if self.world.is_main:
            (self.run_dir / "memory.json").write_text(json.dumps(
                {"strategy": self.strategy.name, "world_size": self.world.world_size, "per_rank": reports}, indent=1))

    def should_checkpoint(self) -> bool:
        if not self.config.checkpoint.enabled:
            return False
        every = self.config.checkpoint.every_steps
        end_of_epoch = self.step % self.steps_per_epoch == 0
        return self.step == self.last_step or (every > 0 and self.step % every == 0) or (every == 0 and end_of_epoch)

    # ---- checkpoints ----------------------------------------------------------------------------
    def save(self) -> Path:
        """Collective: a checkpoint of the run at this step (RunState; the strategy writes the models)."""
        with collective("checkpoint"):
            self.state.check_finite(self.step, getattr(self.checkpoints.latest(), "name", None))
            return self.checkpoints.save(self.step, self.state.writer(self.step), self.world.is_main)

    def load(self, directory: Path) -> None:
        self.step = self.state.load(directory)

    def gathered_teachers(self) -> tuple[Network, ...] | None:
        """Every teacher as plain, whole networks on this rank's device (rank 0; None elsewhere): what the
        end-of-training evaluation scores. Collective (sharded teachers are gathered)."""
        states = self.strategy.teacher_state_dicts()
        if not self.world.is_main:
            return None
        networks = []
        for which, state in enumerate(states):
            network = build_network(self.config, which, self.data.dataset.channels, student=False)
            network.load_state_dict(state)
            networks.append(network.to(self.device).eval())
        return tuple(networks)
