"""Step profiler of a model pair: images/s, the step broken into phases, peak memory, FLOPs and MFU, per mode.

It drives the trainer's own `train_step` (same objective, optimisers, EMA and centre code as training); only the
phase hook is swapped for a timer. A *mode* is a setting of the `perf` section plus train.precision, loss.kernel
and head.attention:

  * baseline: the official code's way: fp16 autocast with one GradScaler per model, the literal DINO loss loop,
    DINO's per-tensor EMA loop, torch's per-tensor optimiser loop, explicit attention, NCHW, one backbone pass
    per crop, no compilation, centre all-reduce after the EMA;
  * fast: everything switched on, with per-device choices (see `mode_settings`, OFF_ON_CPU);
  * defaults: nothing changed: the step exactly as `mokd train` runs the preset and overrides.

Any mode may end in `@key=value` settings of its own (`defaults@train.precision=fp32` against `defaults`: what
`mokd train` gains from its automatic precision on this machine, measured in one run).

A *switch* is a named group of keys. `baseline+SWITCH` is the baseline with that one group optimised (the gain
of one optimisation alone); `fast-SWITCH` is fast with that group back at its baseline value (what fast loses
without it).

Timing. Each measured step runs `PhaseTimer` around its phases. On CUDA the timer synchronises the device at every
phase boundary (otherwise a phase would only time its kernel launches), which serialises the host and the device;
the unsynchronised step time (one synchronisation per step) is measured on separate steps and is what images/s
is computed from. On CPU the phases are wall-clock. The phases are exclusive (the feature search is not counted
again inside the losses); what the step spends outside every phase (schedule look-ups, Python glue) is the
residual, reported as a share of the step.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from mokd.config import load_config
from mokd.engine.runtime import peak_extra_bytes, resolve_device
from mokd.engine.trainer import Trainer
from mokd.errors import ConfigError
from mokd.method.mokd import untimed

PHASES = ("data", "teacher_forward", "student_forward", "search", "losses", "backward", "optimizer", "ema",
          "centres")

BASELINE: dict[str, Any] = {
    "train.precision": "fp16", "loss.kernel": "reference", "head.attention": "math",
    "perf.fused_attention": False, "perf.fused_ema": False, "perf.optimizer": "loop",
    "perf.channels_last": False, "perf.compile": False, "perf.grouped_crops": False,
    "perf.overlap_centre_reduce": False,
}
# Each switch: the keys it moves from their baseline value to their fast value.
SWITCHES: dict[str, tuple[str, ...]] = {
    "precision": ("train.precision",),
    "loss_kernel": ("loss.kernel",),
    "attention": ("head.attention", "perf.fused_attention"),
    "ema": ("perf.fused_ema",),
    "optimizer": ("perf.optimizer",),
    "channels_last": ("perf.channels_last",),
    "compile": ("perf.compile",),
    "grouped_crops": ("perf.grouped_crops",),
    "overlap_centre_reduce": ("perf.overlap_centre_reduce",),
}


# Switches the fast mode leaves off on CPU. compile: inductor's C++ compilation of both networks takes minutes on
# 2 cores (a demo-pair compile had not finished after 8 minutes of wall time on the loaded test machine).
# channels_last stays on: with bf16 it measured 1.26x and 1.54x the images/s of NCHW on the demo pair (README
# "Profiling a pair", benchmarks/results/throughput_cpu_switches.json).
OFF_ON_CPU = ("compile",)


def optimised_settings(device: torch.device) -> dict[str, Any]:
    """Every key at its optimised value on this kind of device (bf16 autocast needs no GradScaler; on CUDA the
    loss and EMA run as Triton kernels and the optimisers as single fused kernels)."""
    return {
        "train.precision": "bf16", "loss.kernel": "auto", "head.attention": "sdpa",
        "perf.fused_attention": True, "perf.fused_ema": True,
        "perf.optimizer": "fused" if device.type == "cuda" else "foreach",
        "perf.channels_last": True, "perf.compile": True, "perf.grouped_crops": True,
        "perf.overlap_centre_reduce": True,
    }


def mode_settings(mode: str, device: torch.device, compile: bool) -> dict[str, Any]:
    """A mode is `baseline`, `fast` or `defaults`, then any number of `+SWITCH` (that switch at its optimised
    value) or `-SWITCH` (at its baseline value): `baseline+ema` is the gain of the fused EMA alone, `fast-ema` the
    loss of dropping it from fast. fast is every switch optimised except OFF_ON_CPU on CPU and, with
    compile=False, the compilation; defaults changes no key. Then any number of `@key=value` (strings, as on the
    command line)."""
    switches, *assignments = mode.split("@")
    base, *changes = switches.replace("-", " -").replace("+", " +").split()
    optimised = optimised_settings(device)
    if base == "baseline":
        settings = dict(BASELINE)
    elif base == "defaults":
        settings = {}
    elif base == "fast":
        settings = dict(optimised)
        off = [*(OFF_ON_CPU if device.type == "cpu" else ()), *(() if compile else ("compile",))]
        for switch in off:
            settings.update({key: BASELINE[key] for key in SWITCHES[switch]})
    else:
        raise ConfigError(f"mode {mode!r} must start with baseline, fast or defaults")
    for change in changes:
        switch = change[1:]
        if switch not in SWITCHES:
            raise ConfigError(f"mode {mode!r}: unknown switch {switch!r}; switches: {', '.join(SWITCHES)}")
        source = optimised if change[0] == "+" else BASELINE
        settings.update({key: source[key] for key in SWITCHES[switch]})
    for assignment in assignments:
        key, equals, value = assignment.partition("=")
        if not equals or not key:
            raise ConfigError(f"mode {mode!r}: {assignment!r} is not key=value")
        settings[key] = value
    return settings


class PhaseTimer:
    """Exclusive wall time per named phase; nested phases are subtracted from the phase around them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = defaultdict(float)
        self._children: list[float] = []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        self._children.append(0.0)
        try:
            yield
        finally:
            self._sync()
            elapsed = time.perf_counter() - start
            self.totals[name] += elapsed - self._children.pop()
            if self._children:
                self._children[-1] += elapsed


@dataclass
class Run:
    """One (pair, mode, batch) being measured: its trainer, its batches and what was measured so far."""

    preset: str
    mode: str
    batch: int
    settings: dict[str, Any]
    trainer: Trainer
    batches: Iterator[list[torch.Tensor]]
    step_s: list[float] = field(default_factory=list)
    unsync_step_s: list[float] = field(default_factory=list)
    phases_s: list[dict[str, float]] = field(default_factory=list)
    flops: int = 0
    peak_memory_bytes: int = 0
    setup_s: float = 0.0


def _format(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def build_run(preset: str, mode: str, batch: int, device: torch.device, inputs: str, compile: bool,
              overrides: list[str], run_dir: Path) -> Run:
    settings = mode_settings(mode, device, compile)
    # The user's overrides apply on top of every mode (e.g. train.precision=fp32 to try fp32 in place of bf16).
    settings.update({key: value for key, value in (item.split("=", 1) for item in overrides) if key in settings})
    mode_keys = [f"{key}={_format(value)}" for key, value in settings.items()]
    harness = [f"run_dir={run_dir / f'{preset}_{mode}_{batch}'}", f"train.batch_size={batch}",
               f"train.device={device.type}", "checkpoint.enabled=false", "train.log_every=1000000",
               "eval.knn_at_end=false"]
    if inputs == "device":
        # The loader is never iterated: one batch of (lazily generated) synthetic images, so one step per epoch
        # and enough epochs for the schedules to cover every step.
        harness += ["data.source=synthetic", f"data.synthetic_size={batch}", "data.num_workers=0",
                    "train.epochs=1000", "train.max_steps=0"]
    config = load_config(preset, mode_keys + overrides + harness)
    start = time.perf_counter()
    trainer = Trainer(config, show_progress=False)
    channels = trainer.data.dataset.channels
    if inputs == "device":
        batches = _device_batches(config, batch, channels, device)
    else:
        batches = _loader_batches(trainer)
    return Run(preset, mode, batch, settings, trainer, batches, setup_s=time.perf_counter() - start)


def _device_batches(config, batch: int, channels: int, device: torch.device) -> Iterator[list[torch.Tensor]]:
    """The same random crops every step, already on the device: pure compute, no data wait."""
    generator = torch.Generator().manual_seed(0)
    sizes = [config.data.global_crop_size] * 2 + [config.data.local_crop_size] * config.data.n_local_crops
    crops = [torch.randn(batch, channels, size, size, generator=generator).to(device) for size in sizes]
    while True:
        yield crops


def _loader_batches(trainer: Trainer) -> Iterator[list[torch.Tensor]]:
    """The trainer's real loader (workers, augmentation, collation), epoch after epoch."""
    epoch = 0
    while True:
        trainer.data.sampler.set_epoch(epoch)
        for crops, _ in trainer.data.loader:
            yield crops
        epoch += 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(run: Run, timer: Optional[PhaseTimer]) -> float:
    """One training step (data fetch included), its wall time; with a timer, its phases too."""
    trainer = run.trainer
    trainer.set_phase_hook(timer.phase if timer is not None else untimed)
    _sync(trainer.device)
    start = time.perf_counter()
    if timer is not None:
        with timer.phase("data"):
            crops = next(run.batches)
    else:
        crops = next(run.batches)
    trainer.train_step(crops)
    _sync(trainer.device)
    return time.perf_counter() - start


def count_flops(run: Run) -> int:
    """FLOPs of one whole step (forwards, backward, optimiser), counted by torch's FlopCounterMode on eager
    execution (compiled graphs would bypass the counter; the FLOPs are the model's either way)."""
    stance = torch.compiler.set_stance("force_eager") if run.trainer.config.perf.compile else contextlib.nullcontext()
    with stance, FlopCounterMode(display=False) as counter:
        timed_step(run, None)
    return counter.get_total_flops()


def state_bytes(trainer: Trainer) -> int:
    """Bytes of everything a step starts with: students, teachers, optimiser states, centres (unique storages)."""
    networks = trainer.student_networks + trainer.teacher_networks
    tensors = [t for network in networks for t in network.state_dict().values()]
    tensors += [v for opt in trainer.optimizers for state in opt.state.values() for v in state.values()
                if isinstance(v, torch.Tensor)]
    tensors.append(trainer.centres.values)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def measure_peak_memory(run: Run) -> int:
    """CUDA: the allocator's peak over the timed steps (read later). CPU: state bytes + the most the step holds
    beyond them, replayed from torch.profiler's memory timeline on one extra step (RSS cannot be split by mode)."""
    trainer = run.trainer
    if trainer.device.type == "cuda":
        return torch.cuda.max_memory_allocated(trainer.device)
    crops = next(run.batches)
    trainer.set_phase_hook(untimed)
    return state_bytes(trainer) + peak_extra_bytes(lambda: trainer.train_step(crops), trainer.device)


def matmul_flops_per_second(device: torch.device) -> tuple[float, str]:
    """Measured peak: the best of a few large square matmuls (bf16 on CUDA, fp32 on CPU) in this process."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        for _ in range(10 if device.type == "cuda" else 2):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - start) / (10 if device.type == "cuda" else 2))
    return 2 * n ** 3 / best, f"measured {str(dtype).removeprefix('torch.')} matmul {n}x{n}"


def export_trace(run: Run, path: Path, steps: int = 2) -> None:
    """A torch.profiler Chrome/Perfetto trace of a few steps (open in ui.perfetto.dev or chrome://tracing)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.trainer.device.type == "cuda" else [])
    timer = PhaseTimer(run.trainer.device)

    @contextlib.contextmanager
    def labelled(name: str) -> Iterator[None]:  # phases show up as named ranges in the trace
        with record_function(f"phase/{name}"), timer.phase(name):
            yield

    with profile(activities=activities) as profiler:
        for _ in range(steps):
            run.trainer.set_phase_hook(labelled)
            with labelled("data"):
                crops = next(run.batches)
            run.trainer.train_step(crops)
            _sync(run.trainer.device)
    path.parent.mkdir(parents=True, exist_ok=True)
    profiler.export_chrome_trace(str(path))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def summarise(run: Run, peak_flops: float) -> dict[str, Any]:
    """The median step (by its phase-timed wall time) with its own phases, so that the parts shown add up to the
    step shown; images/s from the median unsynchronised step (CPU: the same steps)."""
    median_index = sorted(range(len(run.step_s)), key=run.step_s.__getitem__)[(len(run.step_s) - 1) // 2]
    step, phases_s = run.step_s[median_index], run.phases_s[median_index]
    unsync = statistics.median(run.unsync_step_s) if run.unsync_step_s else step
    phases = {name: phases_s.get(name, 0.0) for name in PHASES}
    return {
        "preset": run.preset, "mode": run.mode, "batch": run.batch, "settings": run.settings,
        "images_per_second": run.batch / unsync, "step_ms": unsync * 1e3, "profiled_step_ms": step * 1e3,
        "phases_ms": {name: value * 1e3 for name, value in phases.items()},
        "residual_fraction": (step - sum(phases.values())) / step,
        "residual_fraction_max": max((s - sum(p.values())) / s for s, p in zip(run.step_s, run.phases_s)),
        "peak_memory_bytes": run.peak_memory_bytes, "flops_per_step": run.flops,
        "mfu": run.flops / unsync / peak_flops if peak_flops else None,
        "steps": len(run.step_s), "setup_s": run.setup_s,
    }


def profile_runs(runs: list[Run], warmup: int, steps: int) -> None:
    """Warm up every run, then take turns step after step, in a rotating order (a change of load on a shared machine
    hits every mode alike): a phase-timed step, then an unsynchronised one (CUDA only; on CPU they are the same)."""
    for run in runs:
        run.flops = count_flops(run)  # an eager step: also the first warm-up step
        for _ in range(max(warmup - 1, 0)):
            timed_step(run, None)
        if run.trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.trainer.device)
    for index in range(steps):
        # Rotated every round: on a shared CPU the place in the round biased the time (measured: the first of 8
        # identical settings ran about 20 % slower than the last).
        for run in runs[index % len(runs):] + runs[:index % len(runs)]:
            timer = PhaseTimer(run.trainer.device)
            run.step_s.append(timed_step(run, timer))
            run.phases_s.append(dict(timer.totals))
            if run.trainer.device.type == "cuda":
                run.unsync_step_s.append(timed_step(run, None))
    for run in runs:
        run.peak_memory_bytes = measure_peak_memory(run)


def environment(device: torch.device, peak_flops: float, peak_source: str) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device), "device_type": device.type,
        "torch": torch.__version__, "python": platform.python_version(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "peak_flops": peak_flops, "peak_flops_source": peak_source,
    }


def run_profiler(presets: list[str], batches: list[int], modes: list[str], *, device: str = "auto",
                 inputs: str = "device", compile: bool = True, warmup: int = 3, steps: int = 5,
                 overrides: Optional[list[str]] = None, json_path: Optional[Path] = None,
                 trace_dir: Optional[Path] = None, interleave: Optional[bool] = None,
                 time_budget_s: float = 0.0, log=print) -> dict[str, Any]:
    """Profile every (preset, batch) in every mode; returns {"environment": ..., "records": [...]}.

    interleave (default: on CPU) keeps every mode's trainer alive and alternates steps between them; otherwise
    modes run one after another and each is freed before the next (CUDA: so peak memory is the mode's own).
    time_budget_s > 0 skips the (preset, batch) groups not started within the budget (noted in the output).
    """
    if inputs not in ("device", "loader"):
        raise ConfigError(f"inputs must be 'device' (synthetic crops on the device) or 'loader', got {inputs!r}")
    torch_device = resolve_device(device)
    interleave = torch_device.type == "cpu" if interleave is None else interleave
    peak_flops, peak_source = matmul_flops_per_second(torch_device)
    result: dict[str, Any] = {"environment": environment(torch_device, peak_flops, peak_source), "records": [],
                              "skipped": []}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mokd-throughput-") as scratch:
        for preset in presets:
            for batch in batches:
                if time_budget_s and time.perf_counter() - started > time_budget_s:
                    result["skipped"].append({"preset": preset, "batch": batch, "why": "time budget"})
                    log(f"skipped {preset} batch {batch}: over the {time_budget_s:.0f} s budget")
                    continue
                groups = [modes] if interleave else [[mode] for mode in modes]
                for group in groups:
                    runs = [build_run(preset, mode, batch, torch_device, inputs, compile, list(overrides or []),
                                      Path(scratch)) for mode in group]
                    profile_runs(runs, warmup, steps)
                    for run in runs:
                        record = summarise(run, peak_flops)
                        result["records"].append(record)
                        log(format_record(record))
                        if trace_dir is not None:
                            export_trace(run, trace_dir / f"{preset}_{run.mode}_b{batch}.json")
                    del runs
                    if torch_device.type == "cuda":
                        torch.cuda.empty_cache()
                if json_path is not None:  # after every group, so a run cut short keeps what it measured
                    write_json(result, json_path)
    # Measured again at the end: on a shared machine the better of the two is nearer the hardware's rate.
    peak_flops = max(peak_flops, matmul_flops_per_second(torch_device)[0])
    for record in result["records"]:
        record["mfu"] = record["flops_per_step"] / (record["step_ms"] * 1e-3) / peak_flops
    result["environment"]["peak_flops"] = peak_flops
    result["environment"]["wall_s"] = time.perf_counter() - started
    result["environment"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if json_path is not None:
        write_json(result, json_path)
    return result


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))


def format_record(record: dict[str, Any]) -> str:
    """One mode's block: throughput line, then the phases with their share of the step."""
    step = record["profiled_step_ms"]
    mfu = f"{100 * record['mfu']:.1f} %" if record["mfu"] is not None else "n/a"
    lines = [f"{record['preset']} batch {record['batch']} {record['mode']}: {record['images_per_second']:.4g} img/s, "
             f"step {record['step_ms']:.1f} ms (phase-timed {step:.1f} ms), peak {record['peak_memory_bytes'] / 2**20:.0f} MiB, "
             f"{record['flops_per_step'] / 1e9:.2f} GFLOP/step, MFU {mfu}"]
    for name, ms in record["phases_ms"].items():
        lines.append(f"    {name:<16} {ms:9.2f} ms {100 * ms / step:5.1f} %")
    lines.append(f"    {'residual':<16} {step * record['residual_fraction']:9.2f} ms {100 * record['residual_fraction']:5.1f} %")
    return "\n".join(lines)


def format_comparison(result: dict[str, Any]) -> str:
    """Every mode against the baseline of the same preset and batch (or, without one, the first mode run)."""
    rows = [f"{'preset':<14} {'batch':>5} {'mode':<30} {'img/s':>9} {'x base':>7} {'peak MiB':>9} {'x base':>7} "
            f"{'MFU %':>6} {'resid %':>7}"]
    records = result["records"]
    for record in records:
        same = [r for r in records if r["preset"] == record["preset"] and r["batch"] == record["batch"]]
        base = next((r for r in same if r["mode"] == "baseline"), same[0])
        speed = f"{record['images_per_second'] / base['images_per_second']:.2f}"
        memory = f"{record['peak_memory_bytes'] / base['peak_memory_bytes']:.2f}"
        mfu = f"{100 * record['mfu']:.2f}" if record["mfu"] is not None else "-"
        rows.append(f"{record['preset']:<14} {record['batch']:>5} {record['mode']:<30} "
                    f"{record['images_per_second']:>9.4g} {speed:>7} {record['peak_memory_bytes'] / 2**20:>9.0f} "
                    f"{memory:>7} {mfu:>6} {100 * record['residual_fraction']:>7.1f}")
    environment = result["environment"]
    rows.append(f"device: {environment['device']}; torch {environment['torch']}; load average "
                f"{environment['load_average']}; MFU against {environment['peak_flops'] / 1e12:.2f} TFLOP/s "
                f"({environment['peak_flops_source']})")
    return "\n".join(rows)
