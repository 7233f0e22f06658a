"""The six centres over two real gloo ranks, with the centres' all-reduce overlapped (async) and not: each rank
holds half of the batch, and the centres must move as one process over the whole batch would, by DINO's update
written out here in float64: c <- m c + (1 - m) * (mean over the batch's teacher rows of the teacher logits).

The two ranks are started as a ddp run is (the Trainer with parallel.strategy=ddp joins the process group), and
that start must print no FutureWarning. (loss.centring=sinkhorn_knopp moves no centre: its sums go through
all_reduce_sum, checked over two ranks in test_recipe.py.)
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from helpers import tiny_config

MOMENTUM = 0.9
CENTRES, K, BATCH, TEACHER_VIEWS, STUDENT_CROPS = 6, 48, 8, 2, 4  # BATCH images in all, half on each rank
SKIPPED = 4  # a term that did not run this step (rows 0): its centre must stay where it was
OVERLAP = (True, False)


def _rank(rank: int, port: int, run_dir: Path, start: torch.Tensor, teacher: torch.Tensor,
          student: torch.Tensor, out: dict) -> None:
    # Everything this rank prints to stderr (warnings included) goes to a file the test reads.
    log = open(run_dir.parent / f"rank{rank}.stderr", "w")
    os.dup2(log.fileno(), 2)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    from mokd.engine.distributed import CentreSync
    from mokd.engine.trainer import Trainer
    from mokd.kernels import dino_cross_entropy
    from mokd.method.mokd import Centres

    Trainer(tiny_config(run_dir, extra=["parallel.strategy=ddp", f"train.batch_size={BATCH // 2}",
                                        "checkpoint.enabled=false"]), show_progress=False)
    half = BATCH // 2
    mine = slice(rank * half, (rank + 1) * half)
    for overlap in OVERLAP:
        centres = Centres(K)
        centres.values.copy_(start)
        # As the objective reports them: each term's teacher column sums from the loss kernel, and its rows.
        sums, rows = torch.zeros(CENTRES, K), torch.zeros(CENTRES)
        for row in range(CENTRES):
            if row == SKIPPED:
                continue
            result = dino_cross_entropy(student[row][:, mine].reshape(-1, K), teacher[row][:, mine].reshape(-1, K),
                                        centres.values[row], 0.1, 0.04, half)
            sums[row], rows[row] = result.teacher_column_sum, TEACHER_VIEWS * half
        centres.update(*CentreSync(sums, rows, async_op=overlap).wait(), MOMENTUM)
        out[(rank, overlap)] = centres.values.clone()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Both ranks' centres after one update in each mode, both ranks' stderr, and the inputs."""
    torch.manual_seed(11)
    start = torch.randn(CENTRES, K)
    teacher = torch.randn(CENTRES, TEACHER_VIEWS, BATCH, K) * 2 + torch.randn(CENTRES, 1, 1, K)
    student = torch.randn(CENTRES, STUDENT_CROPS, BATCH, K)
    run_dir = tmp_path_factory.mktemp("centre_sync") / "run"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(port, run_dir, start, teacher, student, out), nprocs=2, join=True)
        centres = dict(out)
    stderr = [(run_dir.parent / f"rank{rank}.stderr").read_text() for rank in (0, 1)]
    return centres, stderr, start, teacher


@pytest.mark.parametrize("overlap", OVERLAP)
def test_centre_update_over_two_ranks_equals_one_process_over_the_whole_batch(two_ranks, overlap):
    centres, _, start, teacher = two_ranks
    start, teacher = start.double(), teacher.double()
    expected = start.clone()
    for row in range(CENTRES):
        if row != SKIPPED:
            batch_mean = teacher[row].sum(dim=(0, 1)) / (TEACHER_VIEWS * BATCH)
            expected[row] = MOMENTUM * start[row] + (1 - MOMENTUM) * batch_mean
    for rank in (0, 1):
        torch.testing.assert_close(centres[(rank, overlap)].double(), expected, rtol=1e-5, atol=1e-6,
                                   msg=lambda detail: f"rank {rank}, overlap={overlap}: {detail}")


def test_centre_ranks_ddp_start_prints_no_future_warning(two_ranks):
    _, stderr, _, _ = two_ranks
    for rank, text in enumerate(stderr):
        assert "FutureWarning" not in text, f"rank {rank} stderr:\n{text}"
