"""How hard each loss term pulls on a model's backbone: the gradient every term of one model's loss sends into its
last backbone block (and into the whole backbone), at step 0 and at a run's checkpoints, as JSON.

    python benchmarks/term_gradients.py RUN_DIR [--model 2] [--batches 4] [--every 4] [--out FILE] [KEY=VALUE ...]

For each checkpoint (and the untrained networks of step 0) and each term of the model's loss (L_sm, L_st, L_cm,
L_ct, with its weight in the loss: lambda for the cross terms), one backward of that term alone on the same
training batches; per term, the gradient's norm in the last backbone block and in the whole backbone, and its
cosine with L_sm's gradient there (the term DINO alone would send). A term that outweighs L_sm and points away from
it drags the backbone somewhere DINO would not go.

A checkpoint keeps the teachers' weights in one file (the students' are in the strategy's own format), so at a
checkpoint the teachers' weights stand in for the students' as well (the student differs from its EMA teacher by
the EMA's lag); at step 0 they are equal by construction. The centred targets use Sinkhorn-Knopp as in the grid's
recipe (with loss.centring=centre the centres start from zero here). fp32, one thread. KEY=VALUE overrides the
run's config (e.g. a head option without parameters, to see its effect on the same weights).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch


def gradient_of(loss: torch.Tensor, parameters: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, parameters, allow_unused=True, retain_graph=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, parameters)])


def gradient_places(student) -> dict[str, list[torch.nn.Parameter]]:
    """Where gradients are measured: the backbone's last block (its last sharding unit) and the whole backbone."""
    backbone = student.backbone
    return {"last_block": list(backbone.sharding_units()[-1].parameters()),
            "backbone": [p for p in backbone.parameters() if p.requires_grad]}


def term_gradient_vectors(config, students, teachers, crops: list[torch.Tensor], model: int) -> dict:
    """{term: {place: the gradient that term (with its weight in the loss) sends there}} for `model` (0-based), one
    objective per term with every other term of the model weighted 0; KoLeo as one more term where it is on."""
    from mokd.method.mokd import Centres, MOKDObjective, Temperatures

    objective = MOKDObjective.for_config(config)
    terms = [item.name for item in objective.active_terms(model)]
    temperatures = [Temperatures(m.temperature.student, m.temperature.teacher_end, m.temperature.teacher_end)
                    for m in config.models]
    centres = Centres(config.head.out_dim, len(config.models))
    places = gradient_places(students[model])
    koleo = list(objective.koleo_weights)
    vectors = {}
    for name in terms + (["koleo"] if koleo[model] > 0 else []):
        weights = [dict(m.term_weights) for m in config.models]
        weights[model] = {**weights[model], **{other: 0.0 for other in terms if other != name}}
        alone = MOKDObjective(config.loss, objective.cross_weights,
                              [w if (i != model or name == "koleo") else 0.0 for i, w in enumerate(koleo)], weights)
        loss = alone(students, teachers, centres, crops, temperatures).totals[model]
        vectors[name] = {place: gradient_of(loss, parameters) for place, parameters in places.items()}
    return vectors


def term_gradients(config, students, teachers, batches: list, model: int) -> dict:
    """Per term of `model`'s loss (0-based model), the mean over batches of its gradient norm in the last backbone
    block and in the backbone, and the mean cosine of its gradient with L_sm's there."""
    per_batch = [term_gradient_vectors(config, students, teachers, crops, model) for crops in batches]
    result = {}
    for name in per_batch[0]:
        result[name] = {}
        for place in per_batch[0][name]:
            mine = [vectors[name][place] for vectors in per_batch]
            dino = [vectors["sm"][place] for vectors in per_batch]
            result[name][f"{place}_norm"] = sum(g.norm().item() for g in mine) / len(mine)
            result[name][f"{place}_cosine_with_sm"] = sum(
                torch.nn.functional.cosine_similarity(a, b, dim=0).item() for a, b in zip(mine, dino)) / len(mine)
    return result


def measure(run_dir: Path, model: int, n_batches: int, every: int, overrides: list[str]) -> dict:
    from mokd.config import load_config
    from mokd.engine.checkpoint import CheckpointManager, load_teachers_file
    from mokd.engine.train_data import TrainData
    from mokd.method.models import build_models

    config = load_config(str(run_dir / "config.yaml"), [f"run_dir={run_dir}", "data.num_workers=0",
                                                        "loss.fused_terms=false", "loss.fused_head=false",
                                                        *overrides])
    torch.manual_seed(config.train.seed)
    data = TrainData.build(config)
    batches = []
    for batch in data.loader:
        batches.append(data.to_crops(batch[0], torch.device("cpu")))
        if len(batches) == n_batches:
            break
    checkpoints = CheckpointManager(run_dir, config.checkpoint.keep_last).complete()
    chosen: list[Optional[Path]] = [None, *checkpoints[every - 1::every]]
    if checkpoints and checkpoints[-1] not in chosen:
        chosen.append(checkpoints[-1])
    points = []
    for checkpoint in chosen:
        students, teachers = build_models(config, data.dataset.channels)
        step = 0
        if checkpoint is not None:
            step = CheckpointManager.load_meta(checkpoint)["step"]
            for student, teacher, state in zip(students, teachers, load_teachers_file(checkpoint)):
                teacher.load_state_dict(state)
                student.load_state_dict(state)
        for network in (*students, *teachers):
            network.train()  # as in a training step: BatchNorm on batch statistics
        gradients = term_gradients(config, students, teachers, batches, model - 1)
        points.append({"step": step, "terms": gradients})
        print(json.dumps({"step": step, **{name: round(values["last_block_norm"], 5)
                                           for name, values in gradients.items()}}), file=sys.stderr, flush=True)
    return {"run_dir": str(run_dir), "overrides": overrides, "model": f"model{model}", "backbone": config.models[model - 1].backbone,
            "batches": n_batches, "batch_size": config.train.batch_size, "points": points}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--model", type=int, default=2, help="which model's loss terms (1-based)")
    parser.add_argument("--batches", type=int, default=4, help="training batches averaged over")
    parser.add_argument("--every", type=int, default=4, help="every Nth epoch checkpoint (the last always)")
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_intermixed_args(argv)
    torch.set_num_threads(1)
    result = measure(args.run_dir, args.model, args.batches, args.every, args.overrides)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
