"""Faults of multi-process runs, simulated on this machine with real launchers: torchrun restarting a run whose
rank was killed, two torchrun agents rendezvousing like two nodes, a hung (SIGSTOPped) rank, and the SLURM
template's USR1 trap and requeue with a stub `srun` that really launches the tasks."""

from __future__ import annotations

import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from fault_helpers import REPO, Run, checkpoint_steps, logged_steps, wait_for_step, write_preset

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
# ddp, deterministic: two runs of the same world size agree bit for bit. A one-minute collective timeout: on a
# loaded machine a restarted group can fail to connect, and must then fail fast for torchrun to try again.
ELASTIC = ["parallel.strategy=ddp", "train.batch_size=4", "train.deterministic=true", "train.max_steps=8",
           "checkpoint.every_steps=2", "checkpoint.keep_last=2", "data.synthetic_size=64", "parallel.timeout_minutes=1"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(out: Path, run_dir: Path, logs: Path, launcher: list[str]) -> Run:
    command = [sys.executable, "-m", "torch.distributed.run", *launcher, str(WORKER), str(out), f"run_dir={run_dir}",
               *ELASTIC]
    return Run(command, logs)


def teachers(out: Path) -> list[dict]:
    return torch.load(out / "teachers.pt", weights_only=False)


def assert_bit_identical(mine: list[dict], reference: list[dict]) -> None:
    for state, expected in zip(mine, reference):
        for key, value in expected.items():
            assert torch.equal(state[key], value), key


def workers_of(run: Run, count: int, timeout: float = 120) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = [p for p in psutil.Process(run.pid).children() if "python" in p.name()]
        if len(children) == count:
            return children
        time.sleep(0.1)
    raise AssertionError(f"torchrun did not start {count} workers:\n{run.output()}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    """One torchrun agent, 2 processes, uninterrupted."""
    base = tmp_path_factory.mktemp("reference")
    run = torchrun(base / "out", base / "run", base / "logs",
                   ["--nproc_per_node", "2", "--master_port", str(free_port())])
    code, out, err = run.wait(600)
    assert code == 0, out + err
    return teachers(base / "out")


def test_torchrun_restarts_a_killed_rank_and_the_run_ends_bit_identical(tmp_path, reference):
    run_dir = tmp_path / "run"
    run = torchrun(tmp_path / "out", run_dir, tmp_path / "logs",
                   ["--nnodes", "1", "--nproc_per_node", "2", "--max-restarts", "3", "--master_port",
                    str(free_port())])
    victim = workers_of(run, 2)[1]
    deadline = time.monotonic() + 300
    while not checkpoint_steps(run_dir) or checkpoint_steps(run_dir)[-1] < 2:
        assert time.monotonic() < deadline and run.process.poll() is None, run.output()
        time.sleep(0.02)
    victim.kill()  # kill -9 of one rank mid-run
    code, out, err = run.wait(600)
    assert code == 0, out + err
    assert out.count("resuming from step_") >= 1  # the restarted group resumed, not started over
    assert logged_steps(run_dir)[-1] == 8
    assert_bit_identical(teachers(tmp_path / "out"), reference)


def test_two_torchrun_agents_like_two_nodes_equal_one_agent_with_two_processes(tmp_path, reference):
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [torchrun(tmp_path / "out", tmp_path / "run", tmp_path / f"logs{rank}",
                       ["--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                        "--rdzv_endpoint", endpoint, "--rdzv_id", "two-nodes"]) for rank in (0, 1)]
    for agent in agents:
        code, out, err = agent.wait(600)
        assert code == 0, out + err
    assert checkpoint_steps(tmp_path / "run") == [6, 8]
    assert_bit_identical(teachers(tmp_path / "out"), reference)


def test_a_hung_rank_makes_the_others_exit_within_the_timeout_naming_the_collective(tmp_path):
    preset = write_preset(tmp_path / "tiny.yaml", ["parallel.strategy=ddp", "train.batch_size=4",
                                                   "train.max_steps=500", "parallel.timeout_minutes=0.1"])
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "mokd.launch.cli", "train", "--preset", str(preset), "--no-progress",
               f"run_dir={run_dir}"]
    run = Run(command, tmp_path / "logs")
    workers = workers_of(run, 2)
    wait_for_step(run, run_dir, 3)
    hung, other = workers[1], workers[0]
    hung.suspend()  # SIGSTOP
    stopped = time.monotonic()
    try:
        other.wait(timeout=120)
        waited = time.monotonic() - stopped
    finally:
        hung.kill()
    code, out, err = run.wait(120)
    assert code != 0
    assert waited < 6 + 60  # parallel.timeout_minutes=0.1 is 6 s; the default 30 minutes would hang the test
    assert "collective '" in out + err and "another rank is hung or dead" in out + err


def test_slurm_template_forwards_usr1_saves_and_requeues(tmp_path):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    record = tmp_path / "scontrol.log"
    (stubs / "scontrol").write_text(f"""#!/usr/bin/env bash
# scontrol stand-in: the allocation is this machine; requeue requests are recorded.
case "$1" in
  show) echo 127.0.0.1 ;;
  requeue) echo "requeue $2" >> {record} ;;
esac
""")
    (stubs / "srun").write_text("""#!/usr/bin/env bash
# srun stand-in that really launches: SLURM_NTASKS tasks of the command with SLURM_PROCID / SLURM_LOCALID set,
# forwarding USR1 and TERM to every task as srun does, and exiting with the first failing task's status.
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((task = 0; task < SLURM_NTASKS; task++)); do
  SLURM_PROCID=$task SLURM_LOCALID=$task "$@" &
  pids+=($!)
done
forward() { kill -"$1" "${pids[@]}" 2>/dev/null || true; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
status=0
for pid in "${pids[@]}"; do
  while true; do
    code=0; wait "$pid" || code=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  [ "$code" = 0 ] || [ "$status" != 0 ] || status=$code
done
exit "$status"
""")
    (stubs / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')  # the venv's, as `module load` would
    for name in ("scontrol", "srun", "python"):
        (stubs / name).chmod((stubs / name).stat().st_mode | stat.S_IEXEC)
    preset = write_preset(tmp_path / "tiny.yaml", ["parallel.strategy=ddp", "train.batch_size=4",
                                                   "train.max_steps=500", "data.synthetic_size=800"])
    run_dir = tmp_path / "run"
    env_extra = {"PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
                 "SLURM_JOB_NODELIST": "node001", "SLURM_NTASKS": "2", "SLURM_CPUS_PER_TASK": "1",
                 "MASTER_PORT": str(free_port())}
    command = ["env", *(f"{k}={v}" for k, v in env_extra.items()), "bash", str(REPO / "scripts" / "slurm.sbatch"),
               "--preset", str(preset), f"run_dir={run_dir}"]
    batch = Run(command, tmp_path / "logs")
    wait_for_step(batch, run_dir, 3)
    batch.process.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 does
    code, out, err = batch.wait(300)
    step = logged_steps(run_dir)[-1]
    assert code == 0, out + err
    assert f"saved step_{step:08d} on SIGUSR1" in out and checkpoint_steps(run_dir) == [step]
    assert record.read_text() == "requeue 4242\n"
