"""ema_ on CPU (the torch._foreach_lerp_ path) against torch.lerp; the Triton path is checked under the
interpreter in test_kernels_triton_interpret.py with ``make_pairs`` and ``check_ema`` from this file."""

import pytest
import torch

from mokd.kernels import EmaPlan, ema_

SHAPES = [(64, 3, 7, 7), (64,), (1000, 256), (5,), (4097,)]


def make_pairs(dtypes, seed, device="cpu"):
    """(targets, sources) with realistic parameter shapes for every dtype, plus two views into one flat buffer
    (how DeepSpeed hands out partitions: contiguous, non-zero storage offsets). Drawn on the CPU, then moved."""
    gen = torch.Generator().manual_seed(seed)
    targets, sources = [], []
    for dtype in dtypes:
        for shape in SHAPES:
            targets.append(torch.randn(shape, generator=gen).to(device, dtype))
            sources.append(torch.randn(shape, generator=gen).to(device, dtype))
        flat_t = torch.randn(3000, generator=gen).to(device, dtype)
        flat_s = torch.randn(3000, generator=gen).to(device, dtype)
        targets += [flat_t[:1234], flat_t[1234:]]
        sources += [flat_s[1000:2234], flat_s[:1766]]
    return targets, sources


def check_ema(momentum, dtypes, seed, exact, device="cpu"):
    """ema_ equals torch.lerp(target, source, 1 - m) pair by pair; ``exact`` for the torch path, else within one
    unit in the last place of the dtype (the Triton interpreter rounds its bf16/fp16 stores differently)."""
    targets, sources = make_pairs(dtypes, seed, device)
    weight = 1.0 - momentum
    expected = [torch.lerp(t, s, weight) for t, s in zip(targets, sources)]
    sources_before = [s.clone() for s in sources]
    pointers = [t.data_ptr() for t in targets]
    ema_(targets, sources, momentum)
    assert [t.data_ptr() for t in targets] == pointers  # in place
    for t, s, s0, e in zip(targets, sources, sources_before, expected):
        assert torch.equal(s, s0)
        if exact:
            assert torch.equal(t, e)
        else:
            eps = torch.finfo(t.dtype).eps
            torch.testing.assert_close(t, e, rtol=eps, atol=eps)


@pytest.mark.parametrize("momentum", [0.996, 0.3], ids=["m0.996", "m0.3"])
def test_mixed_dtypes_float_momentum(momentum):
    check_ema(momentum, [torch.float32, torch.bfloat16, torch.float16], seed=1, exact=True)


def test_mixed_dtypes_tensor_momentum():
    check_ema(torch.tensor(0.9), [torch.float32, torch.bfloat16, torch.float16], seed=2, exact=True)


def test_non_contiguous_pairs_are_handled():
    gen = torch.Generator().manual_seed(3)
    target = torch.randn(6, 9, generator=gen).t()  # transposed: not contiguous
    source = torch.randn(9, 12, generator=gen)[:, ::2]  # strided
    expected = torch.lerp(target, source, 0.25)
    ema_([target], [source], 0.75)
    torch.testing.assert_close(target, expected, rtol=0, atol=0)


def test_centre_update():
    """c <- m c + (1 - m) mean_b t, the DINO centre update."""
    gen = torch.Generator().manual_seed(4)
    centre, teacher = torch.randn(300, generator=gen), torch.randn(8, 300, generator=gen)
    expected = 0.9 * centre + 0.1 * teacher.mean(dim=0)
    ema_([centre], [teacher.mean(dim=0)], 0.9)
    torch.testing.assert_close(centre, expected)


def test_sources_requiring_grad_and_empty_tensors():
    gen = torch.Generator().manual_seed(5)
    source = torch.randn(10, generator=gen, requires_grad=True)
    target = torch.randn(10, generator=gen)
    expected = torch.lerp(target, source.detach(), 0.5)
    ema_([target, torch.empty(0)], [source, torch.empty(0)], 0.5)
    assert torch.equal(target, expected)


@pytest.mark.parametrize(
    "targets, sources, momentum, message",
    [
        ([torch.randn(3)], [torch.randn(3), torch.randn(3)], 0.9, "1 targets but 2 sources"),
        ([torch.randn(3), torch.randn(2, 2)], [torch.randn(3), torch.randn(4)], 0.9, r"pair 1: target shape \(2, 2\)"),
        ([torch.randn(3)], [torch.randn(3).double()], 0.9, "pair 0: target is torch.float32"),
        ([torch.arange(3)], [torch.arange(3)], 0.9, "pair 0: dtype torch.int64 is not floating point"),
        ([torch.randn(3)], [torch.randn(3)], torch.tensor([0.9]), "momentum tensor must be 0-dim"),
    ],
)
def test_mismatches_raise(targets, sources, momentum, message):
    with pytest.raises(ValueError, match=message):
        ema_(targets, sources, momentum)


def test_plan_reused_across_steps_equals_repeated_lerp():
    """An EmaPlan built once and updated every step (as the trainer does) follows lerp step after step, with a
    different momentum each time, also after the sources change in place."""
    targets, sources = make_pairs([torch.float32, torch.bfloat16], seed=7)
    expected = [t.clone() for t in targets]
    plan = EmaPlan(targets, sources)
    gen = torch.Generator().manual_seed(8)
    for momentum in (0.996, 0.9, torch.tensor(0.5)):
        plan.update(momentum)
        weight = 1.0 - float(momentum)
        expected = [torch.lerp(e, s, weight) for e, s in zip(expected, sources)]
        for t, e in zip(targets, expected):
            assert torch.equal(t, e)
        for s in sources:
            s.add_(torch.randn(s.shape, generator=gen).to(s.dtype))


def test_teacher_update_equals_the_literal_formula_in_float64():
    """theta' <- m theta' + (1 - m) theta, written out in float64, over a few steps of a fp32 plan."""
    targets, sources = make_pairs([torch.float32], seed=9)
    expected = [t.double() for t in targets]
    plan = EmaPlan(targets, sources)
    for momentum in (0.996, 0.7, 0.5):
        plan.update(momentum)
        expected = [momentum * e + (1 - momentum) * s.double() for e, s in zip(expected, sources)]
    for t, e in zip(targets, expected):
        torch.testing.assert_close(t.double(), e, rtol=1e-6, atol=1e-6)
