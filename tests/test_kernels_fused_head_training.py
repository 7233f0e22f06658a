"""Training with loss.fused_head=true and loss.fused_terms=true reproduces the per-term path: the losses of every
step and the students' and teachers' weights after a few steps, in one process (also loss.fused_terms alone), and
under ddp, fsdp and ZeRO-3 with 2 gloo ranks (against one process with the same global batch, as
tests/test_distributed.py compares every strategy). And the strategies' BatchNorm conversion."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_config
from mokd.engine.trainer import Trainer
from test_distributed import (CLIPPED, COMMON, SINKHORN, STEPS, UNCLIPPED, assert_same_losses, assert_same_teachers,
                              launch, per_rank, step_losses)

FUSED = ["loss.fused_head=true", "loss.fused_terms=true"]
# The last layers train from the first step, so that the fused head's weight gradient is part of the comparison.
TRAINED_LAST_LAYERS = ["model1.optim.freeze_last_layer_epochs=0", "model2.optim.freeze_last_layer_epochs=0"]


# The biases of the Linear layers that feed a BatchNorm (head.mlp_batchnorm) have a zero gradient in exact
# arithmetic (the normalisation removes them): what they get is rounding noise, which the optimiser's normalised
# step turns into lr-sized moves of either sign (measured 2e-5 apart between the two paths, for values of 1e-5).
# Every other student parameter is compared.
PRE_BATCHNORM_BIASES = ("mlp_head.mlp.0.bias", "mlp_head.mlp.3.bias")


def train_single(run_dir, extra):
    trainer = Trainer(tiny_config(run_dir, extra=COMMON + CLIPPED + TRAINED_LAST_LAYERS + extra), show_progress=False)
    trainer.train()
    students = [{k: v.detach().clone() for k, v in net.state_dict().items() if k not in PRE_BATCHNORM_BIASES}
                for net in trainer.strategy.networks]
    return step_losses(run_dir), students, trainer.strategy.teacher_state_dicts()


@pytest.mark.parametrize("fused", [FUSED, ["loss.fused_terms=true"]], ids=["fused_head", "fused_terms_only"])
def test_fused_head_training_matches_per_term_path_single(tmp_path, fused):
    weighted = ["model1.cross_weight=0.5", "model2.term_weights={st: 0.7}"]  # lambda and a term weight != 1
    losses, students, teachers = train_single(tmp_path / "default", weighted)
    fused_losses, fused_students, fused_teachers = train_single(tmp_path / "fused", weighted + fused)
    assert_same_losses(fused_losses, losses, range(1, STEPS + 1))
    assert_same_teachers(fused_students, students)
    assert_same_teachers(fused_teachers, teachers)
    # The weights moved: a comparison of untrained models would prove nothing.
    initial = Trainer(tiny_config(tmp_path / "initial", extra=COMMON + CLIPPED), show_progress=False)
    for model, (network, trained) in enumerate(zip(initial.strategy.networks, students)):
        for key in ("mlp_head.last_layer.weight_v", "thead.last_layer.weight_v", "thead.last_layer.weight_g"):
            assert not torch.equal(network.state_dict()[key], trained[key]), (model, key)


@pytest.mark.parametrize("strategy, extra", [
    (["parallel.strategy=ddp"], SINKHORN + CLIPPED),
    (["parallel.strategy=fsdp"], CLIPPED),
    (["parallel.strategy=deepspeed", "parallel.zero_stage=3"], UNCLIPPED),
], ids=["ddp", "fsdp", "zero3"])
def test_fused_head_training_two_ranks_matches_one_process(tmp_path, strategy, extra):
    """2 ranks of 4 images, fused, against one process of 8 images on the per-term path (ddp with Sinkhorn-Knopp
    targets, normalised over both ranks). FSDP2 units and ZeRO-3 gather parameters around module forwards: the
    heads' last-layer weights reach the fused head through them."""
    reference_dir = tmp_path / "single"
    reference = Trainer(tiny_config(reference_dir, extra=COMMON + extra + TRAINED_LAST_LAYERS), show_progress=False)
    reference.train()
    run_dir = tmp_path / "run"
    report = launch(tmp_path / "out", run_dir, per_rank([*strategy, *extra, *TRAINED_LAST_LAYERS, *FUSED]))
    assert report["world_size"] == 2 and report["step"] == STEPS
    assert_same_losses(step_losses(run_dir), step_losses(reference_dir), range(1, STEPS + 1))
    assert_same_teachers(torch.load(tmp_path / "out" / "teachers.pt"), reference.strategy.teacher_state_dicts())


def test_fused_head_strategies_batchnorm_sync_under_nccl_global_under_gloo():
    """The strategies' BatchNorm conversion: SyncBatchNorm when the backend is NCCL, GlobalBatchNorm otherwise.
    (Only the construction is checked here: SyncBatchNorm's forward needs CUDA and NCCL.)"""
    from mokd.engine.batchnorm import GlobalBatchNorm
    from mokd.engine.strategies.base import convert_batchnorm
    from mokd.method.heads import MLPHead

    for backend, kind in (("nccl", torch.nn.SyncBatchNorm), ("gloo", GlobalBatchNorm)):
        head = MLPHead(8, 16, 12, 4, trainable_norm=True, batchnorm=True)
        before = [m.running_mean.clone() for m in head.modules() if isinstance(m, torch.nn.BatchNorm1d)]
        assert convert_batchnorm(head, backend) is head
        norms = [m for m in head.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert len(norms) == 2 and all(type(m) is kind for m in norms), backend
        assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before))
