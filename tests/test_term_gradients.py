"""benchmarks/term_gradients.py: the per-term gradients it measures are the parts of the model's whole loss
gradient (they add up to the gradient of L_i computed in one piece), each with its weight in the loss."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from helpers import tiny_config
from mokd.method.mokd import Centres, MOKDObjective, Temperatures
from mokd.method.models import build_models

REPO = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("term_gradients", REPO / "benchmarks" / "term_gradients.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["term_gradients"] = module
    spec.loader.exec_module(module)
    return module


def test_term_gradients_add_up_to_the_whole_loss_gradient(tmp_path):
    term_gradients = load_script()
    config = tiny_config(tmp_path, extra=["model2.koleo_weight=0.1", "model1.cross_weight=0.3",
                                          "model2.term_weights.st=0.5"])
    torch.manual_seed(0)
    students, teachers = build_models(config, in_chans=1)
    for teacher, student in zip(teachers, students):  # a teacher that differs from its student, as after training
        with torch.no_grad():
            for parameter in teacher.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
    crops = [torch.randn(8, 1, 16, 16), torch.randn(8, 1, 16, 16), torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8)]
    for model in (0, 1):
        vectors = term_gradients.term_gradient_vectors(config, students, teachers, crops, model)
        assert set(vectors) == {"sm", "st", "cm", "ct"} | ({"koleo"} if model == 1 else set())
        whole = MOKDObjective.for_config(config)(
            students, teachers, Centres(config.head.out_dim, 2), crops,
            [Temperatures(m.temperature.student, m.temperature.teacher_end, m.temperature.teacher_end)
             for m in config.models]).totals[model]
        for place, parameters in term_gradients.gradient_places(students[model]).items():
            expected = torch.cat([g.flatten() for g in torch.autograd.grad(whole, parameters, retain_graph=True)])
            summed = sum(vectors[name][place] for name in vectors)
            assert expected.norm() > 0
            torch.testing.assert_close(summed, expected, rtol=1e-3, atol=1e-5)  # fp32 sums of 4-5 parts
            for name in vectors:  # every term pulls: none is silently zero
                assert vectors[name][place].norm() > 0, (model, name, place)
        summary = term_gradients.term_gradients(config, students, teachers, [crops], model)
        assert abs(summary["sm"]["backbone_cosine_with_sm"] - 1.0) < 1e-4
