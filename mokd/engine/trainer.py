"""The trainer: the story of a MOKD step, from crops to teachers and centres, on any strategy.

    crops -> students and teachers (no grad) forward -> the DINO terms + searches -> start the centre all-reduce
    -> one backward of L_1 + ... + L_N -> per model: clip, freeze last layers (first epoch), optimiser step
    -> shard-local EMA of the teachers -> move the centres with the global batch's statistics

How the students are wrapped, synchronised and checkpointed is the strategy's business (engine/strategies).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch

from mokd.config import MOKDConfig, save_config, to_yaml
from mokd.data import (build_train_loader, dataset_for, limit_size, loader_statistics, shard_train_loader,
                       train_augmentation)
from mokd.engine.collapse_watch import CollapseWatch, step0_name
from mokd.engine.checkpoint import (META_FILE, RNG_DIR, TEACHERS_FILE, CheckpointError, CheckpointManager, Finish,
                                   read_checkpoint_file, save_torch)
from mokd.engine.distributed import (CentreSync, World, all_gather_objects, all_reduce_mean, all_reduce_sum, any_rank,
                                     broadcast_object, collective, init_world)
from mokd.engine.guard import StepGuard, non_finite_flags, non_finite_module
from mokd.engine.metrics import MetricsLogger
from mokd.engine.optim import build_optimizer
from mokd.engine.perf import apply_perf
from mokd.engine.resume_check import check_resume
from mokd.engine.run_lock import RunLock, check_run_directory
from mokd.engine.runtime import (autocast, autocast_dtype, describe_precision, peak_memory_bytes, resolve_device,
                                 restore_rng_state, rng_state, seed_rng_for_rank, set_determinism)
from mokd.engine.strategies import build_strategy
from mokd.errors import DataError, MokdError, NonFiniteError, user_message
from mokd.method.mokd import Centres, MOKDObjective, StepLosses, Temperatures, untimed
from mokd.method.monitors import feature_statistics
from mokd.method.network import Network
from mokd.method.models import build_models, build_network, thead_schedule_source
from mokd.method.schedules import ModelSchedules
from mokd.signals import StopRequest


def build_train_data(config: MOKDConfig, rank: int = 0, world_size: int = 1):
    """The training dataset, its loader, the loader's position (set_epoch, set_start_batch, len: the
    ResumableBatchSampler, or for shards the ShardLoader itself), and the step that turns a loader batch into crop
    tensors on the device (data.augment=device augments there)."""
    data = config.data
    dataset = dataset_for(data, "train", config.train.seed)
    if data.source != "webdataset":  # shards are never indexed for training: the manifest has the counts
        dataset = limit_size(dataset, data.train_samples, config.train.seed)
    augmentation = train_augmentation(data, dataset.channels)
    if data.source == "webdataset":
        loader = shard_train_loader(data, augmentation.transform, config.train.batch_size, config.train.seed, rank,
                                    world_size, augmentation.collate)
        return dataset, loader, loader, augmentation.to_device
    loader, sampler = build_train_loader(dataset, augmentation.transform, config.train.batch_size, config.train.seed,
                                         data.num_workers, rank=rank, world_size=world_size,
                                         collate=augmentation.collate)
    return dataset, loader, sampler, augmentation.to_device


FEATURE_MONITOR_TAGS = {"mean_cosine": "feature_cosine", "effective_rank": "feature_rank"}


class Trainer:
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

        self.dataset, self.loader, self.sampler, self.batch_to_crops = build_train_data(config, self.world.rank,
                                                                                        self.world.world_size)
        self.steps_per_epoch = len(self.sampler)
        if self.steps_per_epoch == 0:
            raise DataError(f"train.batch_size={config.train.batch_size} is larger than the {len(self.dataset)} "
                             f"training images of data.source={config.data.source}: no full batch per epoch")
        self.total_steps = config.train.epochs * self.steps_per_epoch
        self.last_step = min(self.total_steps, config.train.max_steps or self.total_steps)

        students, teachers = build_models(config, self.dataset.channels)
        model_configs = config.models
        self.centres = Centres(config.head.out_dim, len(model_configs)).to(self.device)
        self.objective = MOKDObjective.for_config(config)
        if self.world.distributed:
            self.objective.reduce_sum = all_reduce_sum
        self.strategy = build_strategy(config, self.world, self.amp_dtype)
        thead_sources = [thead_schedule_source(config, i) for i in range(len(model_configs))]
        self.strategy.setup(tuple(apply_perf(s.to(self.device), config.perf) for s in students),
                            tuple(apply_perf(t.to(self.device), config.perf) for t in teachers),
                            lambda network, i: build_optimizer(network, model_configs[i].optim, config.perf.optimizer,
                                                               thead_schedule=thead_sources[i] is not None))
        global_batch = config.train.batch_size * self.world.world_size
        self.schedules = [ModelSchedules(model, config.loss, self.total_steps, self.steps_per_epoch, global_batch,
                                         thead_optim=None if thead_sources[i] is None
                                         else model_configs[thead_sources[i]].optim)
                          for i, model in enumerate(model_configs)]

        self.phase = untimed  # the step's phase hook; a profiler installs a timer with set_phase_hook
        self.guard = StepGuard(config.train.max_skipped_steps, report=self.world.is_main)
        self.stop = StopRequest()
        self.stop_agreed: Optional[str] = None  # the stop signal every rank has seen, at a step boundary
        self.scaler_skipped = [False] * len(model_configs)

        self.step = 0
        self.collapse_watch = CollapseWatch(config.head.out_dim, config.train.warn_feature_cosine_gap,
                                            config.train.warn_feature_rank_fraction,
                                            config.train.warn_entropy_fraction)
        self.lock = RunLock(self.run_dir)
        self.open_run()
        self.metrics = (MetricsLogger(self.run_dir, self.last_step, self.step, show_progress)
                        if self.world.is_main else None)

    @property
    def collapse_step0(self) -> dict[str, float]:
        """The feature monitors of the untrained teachers (the first step of the run), the collapse warnings'
        reference; kept in every checkpoint. {} until measured."""
        return self.collapse_watch.baseline

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
    def students(self) -> tuple:
        """The student modules (sharded or wrapped as the strategy keeps them)."""
        return self.strategy.networks

    @property
    def teachers(self) -> tuple:
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
        return list(Temperatures(s.student_temperature, float(s.teacher_temperature_self[step]),
                                  float(s.teacher_temperature_cross[step])) for s in self.schedules)

    def train_step(self, crops) -> tuple[StepLosses, list[torch.Tensor]]:
        """One step on a batch of the training loader: crop tensors, or (data.augment=device) decoded images."""
        step, strategy, phase = self.step, self.strategy, self.phase
        frozen = [step < schedule.freeze_last_layer_steps for schedule in self.schedules]
        with phase("data"):
            crops = self.batch_to_crops(crops, self.device)

        with autocast(self.device, self.amp_dtype), collective("forward (batch-norm statistics, parameter gathers)"):
            losses = self.objective(strategy.students, strategy.teachers, self.centres, crops, self.temperatures(step))
        with phase("centres"):  # one flat all-reduce of the centres' statistics; in flight during backward
            centre_sync = CentreSync(losses.centre_sums, losses.centre_rows, self.config.perf.overlap_centre_reduce)
        with phase("backward"), collective("backward (gradient reduction)"):
            strategy.backward(losses.totals)
        with phase("optimizer"):
            grad_norms = []
            for i, (schedule, model) in enumerate(zip(self.schedules, self.config.models)):
                strategy.set_schedule(i, schedule.group_values(step), frozen[i])
                grad_norms.append(strategy.prepare_gradients(i, model.optim.clip_grad, frozen[i]))
            skip = self.judge_step(losses, grad_norms)
            for i in range(len(self.schedules)):
                after_step, self.scaler_skipped[i] = strategy.apply_gradients(i, skip)
                grad_norms[i] = after_step if grad_norms[i] is None else grad_norms[i]

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

    def judge_step(self, losses: StepLosses, grad_norms: list[Optional[torch.Tensor]]) -> bool:
        """One all-reduce per step of the non-finite flags of every loss term and gradient norm, with this rank's
        stop request: True when the step must change nothing (on every rank). Gradient norms of a model with an
        fp16 GradScaler are left to the scaler, which skips such steps itself and lowers its scale."""
        names = list(losses.terms)
        values = list(losses.terms.values())
        for i, norm in enumerate(grad_norms):
            if norm is not None and not self.strategy.scalers[i].is_enabled():
                names.append(f"model{i + 1}/grad_norm")
                values.append(norm)
        flags = torch.cat([non_finite_flags(values).to(self.device),
                           torch.tensor([float(self.stop.requested)], device=self.device)])
        with collective("step-boundary flags all-reduce"):
            agreed = any_rank(flags).cpu()
        if agreed[-1] > 0 and self.stop_agreed is None:
            self.stop_agreed = next(name for name in all_gather_objects(self.stop.signal_name) if name)
        return self.guard.judge(self.step + 1, names, agreed[:-1]) is not None

    # ---- the loop -------------------------------------------------------------------------------
    def train(self) -> None:
        """Train to the last step, or until a stop signal (then save and return: `stop_agreed` names it).
        The run directory's lock is released at the end, however the loop ends."""
        self.stop.install()
        try:
            self.loop()
            self.checkpoints.wait()
        except BaseException:
            self.checkpoints.wait(raise_errors=False)  # a checkpoint in flight is finished, not cut off
            raise
        finally:
            self.stop.uninstall()
            if self.metrics is not None:
                self.metrics.close()
            self.lock.release()

    def loop(self) -> None:
        epoch = self.step // self.steps_per_epoch
        window_start, window_images, data_wait = time.perf_counter(), 0, 0.0
        first_step = self.step + 1
        while self.step < self.last_step:
            self.sampler.set_epoch(epoch)
            self.sampler.set_start_batch(self.step - epoch * self.steps_per_epoch)
            fetch_start = time.perf_counter()
            for batch, labels in self.loader:
                data_wait += time.perf_counter() - fetch_start
                losses, grad_norms = self.train_step(batch)
                if not self.collapse_step0:  # this step's teachers were the untrained networks (a fresh run)
                    self.collapse_watch.set_baseline(self.feature_monitors(losses, reduce=True))
                window_images += len(labels) * self.world.world_size
                if self.step == first_step:  # optimiser state exists from the first step on
                    self.record_memory()
                if self.metrics is not None:
                    self.metrics.advance()
                if self.step % self.config.train.log_every == 0 or self.step == self.last_step:
                    elapsed = time.perf_counter() - window_start
                    self.log(losses, grad_norms, window_images / elapsed, data_wait / elapsed)
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

    def log(self, losses: StepLosses, grad_norms: list[torch.Tensor], images_per_second: float,
            data_wait_share: float) -> None:
        """Every rank takes part (the losses are averaged over ranks); rank 0 writes."""
        step = self.step - 1  # the values belong to the step just taken
        averaged = {f"loss/{name}": value for name, value in losses.terms.items()}
        for which, total in enumerate(losses.totals, start=1):
            averaged[f"loss/model{which}/total"] = total
        averaged.update({f"collapse/teacher_entropy/{name}": v for name, v in losses.teacher_entropy.items()})
        averaged.update({f"collapse/kl_teacher_student/{name}": v for name, v in losses.kl_teacher_student.items()})
        averaged.update(self.feature_monitors(losses, reduce=False))  # computed only for the logged steps
        with collective("metrics all-reduce"):
            scalars = {name: value.item() for name, value in all_reduce_mean(averaged).items()}
        scalars.update({step0_name(name): value for name, value in self.collapse_step0.items()})
        for which, (schedule, norm) in enumerate(zip(self.schedules, grad_norms), start=1):
            scalars[f"schedule/model{which}/lr"] = float(schedule.lr[step])
            scalars[f"schedule/model{which}/weight_decay"] = float(schedule.weight_decay[step])
            scalars[f"schedule/model{which}/thead_lr"] = float(schedule.thead_lr[step])
            scalars[f"schedule/model{which}/thead_weight_decay"] = float(schedule.thead_weight_decay[step])
            scalars[f"schedule/model{which}/teacher_momentum"] = float(schedule.teacher_momentum[step])
            scalars[f"schedule/model{which}/teacher_temperature_self"] = float(schedule.teacher_temperature_self[step])
            scalars[f"schedule/model{which}/teacher_temperature_cross"] = float(schedule.teacher_temperature_cross[step])
            scalars[f"grad_norm/model{which}"] = float(norm)
        scalars["guard/skipped_steps"] = float(self.guard.skipped_steps)
        for which, skipped in enumerate(self.scaler_skipped, start=1):
            scalars[f"guard/scaler_skipped/model{which}"] = float(skipped)  # the logged step, by the GradScaler
        scalars["perf/images_per_second"] = images_per_second
        scalars["perf/data_wait_share"] = data_wait_share
        scalars["perf/peak_memory_bytes"] = float(peak_memory_bytes(self.device))
        scalars.update(loader_statistics(self.loader))
        if self.metrics is not None:
            self.metrics.log(self.step, scalars)
            for line in self.collapse_watch.check(self.step, scalars):
                self.metrics.write_line(line)

    def feature_monitors(self, losses: StepLosses, reduce: bool) -> dict:
        """Mean pairwise cosine and effective rank of each teacher's pooled global-crop features, by metric name:
        this rank's tensors, or (reduce: collective) floats averaged over the ranks."""
        monitors = {f"collapse/{FEATURE_MONITOR_TAGS[statistic]}/model{which}": value
                    for which, pooled in enumerate(losses.teacher_pooled, start=1)
                    for statistic, value in feature_statistics(pooled).items()}
        if not reduce:
            return monitors
        with collective("feature monitors all-reduce"):
            return {name: value.item() for name, value in all_reduce_mean(monitors).items()}

    # ---- checkpoints ----------------------------------------------------------------------------
    def save(self) -> Path:
        """Collective: students, teachers and optimisers through the strategy, the rest here. Weights that are not
        all finite are never written (NonFiniteError), so every kept checkpoint can be resumed.
        With checkpoint.async_save the files are written in the background from CPU copies taken now."""
        with collective("checkpoint"):
            self.check_finite_weights()
            return self.checkpoints.save(self.step, self.checkpoint_writer(), self.world.is_main)

    def check_finite_weights(self) -> None:
        modules = {}
        for which, (student, teacher) in enumerate(zip(self.strategy.networks, self.strategy.teacher_networks), 1):
            modules[f"model{which} student"] = self.strategy.local_tensors(student)
            modules[f"model{which} teacher"] = self.strategy.local_tensors(teacher)
        modules["centres"] = [self.centres.values]
        bad = next((name for name in all_gather_objects(non_finite_module(modules)) if name), None)
        if bad is not None:
            raise NonFiniteError(f"step {self.step}: the {bad} holds non-finite values; checkpoint "
                                 f"step_{self.step:08d} was not written, the newest kept one is "
                                 f"{getattr(self.checkpoints.latest(), 'name', 'none')}")

    def checkpoint_writer(self):
        """write(directory) for CheckpointManager.save: the teachers are gathered here, on every rank."""
        background = self.config.checkpoint.async_save
        teachers = self.strategy.teacher_state_dicts()
        if background and self.world.is_main:  # training goes on and changes the teachers in place
            teachers = [{key: value.detach().clone() for key, value in state.items()} for state in teachers]

        def write(directory: Path) -> Finish:
            writing = self.strategy.save(directory, background)
            (directory / RNG_DIR).mkdir(exist_ok=True)
            save_torch(rng_state(), directory / RNG_DIR / f"rank_{self.world.rank}.pt")
            if self.world.is_main:
                save_torch({
                    "step": self.step,
                    "data_position": {"epoch": self.step // self.steps_per_epoch,
                                      "batch_in_epoch": self.step % self.steps_per_epoch},
                    "centres": self.centres.values.detach().cpu(),
                    "world_size": self.world.world_size,
                    "strategy": self.strategy.name,
                    "config": to_yaml(self.config),
                    "collapse_step0": dict(self.collapse_step0),
                }, directory / META_FILE)
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

    def load(self, directory: Path) -> None:
        meta = CheckpointManager.load_meta(directory)
        check_resume(meta["config"], meta["world_size"], self.config, self.world.world_size, str(directory))
        saved_with = "deepspeed" if meta["strategy"] == "deepspeed" else "dcp"
        loading_with = "deepspeed" if self.strategy.name == "deepspeed" else "dcp"
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
        self.step = meta["step"]

    def teacher_networks(self) -> tuple[Network, ...] | None:
        """Every teacher as plain, whole networks on this rank's device (rank 0; None elsewhere): what the
        end-of-training evaluation scores. Collective (sharded teachers are gathered)."""
        states = self.strategy.teacher_state_dicts()
        if not self.world.is_main:
            return None
        networks = []
        for which, state in enumerate(states):
            network = build_network(self.config, which, self.dataset.channels, student=False)
            network.load_state_dict(state)
            networks.append(network.to(self.device).eval())
        return tuple(networks)
