"""The paper's claims at a scale this machine affords: independent DINO versus MOKD on Fashion-MNIST for a CNN-ViT,
a larger-smaller CNN-CNN and a ViT-ViT pair (Table 1), the loss ablation (Table 7), the cross-distillation weights
(Table 8) and the prediction consistency of the two models (Table 9).

    python benchmarks/paper_tables.py run [--jobs 2] [--only SUBSTRING ...] [--max-runs N]
    python benchmarks/paper_tables.py report

`run` trains and evaluates the grid, one process per run (`--jobs` at a time, one thread each), in priority order:
Table 1 with every seed first, then the ablation and lambda runs seed by seed. A run whose record exists is
skipped, and a run that was killed resumes from its newest epoch checkpoint, so the grid can span sessions.
Each run writes one record, benchmarks/results/paper_tables/records/NAME.json: its resolved config, seed, wall
time, and per model the k-NN and linear-probe top-1 on the Fashion-MNIST test split and on a validation split
carved from train (5,000 images, never trained on), the k-NN after every epoch, and the two models' prediction
consistency. Hyper-parameters are chosen on the validation numbers only; the tables quote the test numbers.

`report` turns the records into tables (mean +- standard deviation over seeds; markdown and JSON) and plots, next to
the k-NN of the raw pixels at the same evaluation crop (the reference every learned feature should approach).
The records of the grid before the small-scale recipe (RECIPE below) are kept in results/paper_tables/
v1_before_recipe/ for comparison, those of the six-epoch budget in v2_six_epochs/, those of the twelve-epoch
budget before the ResNets took the demo's recipe in v3_resnet_default_init/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

from mokd.config import LOSS_TERM_TABLE

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "paper_tables"
RECORDS = RESULTS / "records"
RUNS = REPO / "runs" / "paper_tables"

# One training budget for every run, DINO and MOKD alike: EPOCHS epochs over a fixed 8,000-image subset of the
# training split (125 steps of 64 per epoch), minus the 5,000 validation images, which no run trains on. Twelve
# epochs (1,500 steps): the budget at which DINO lifts both models of the CNN-ViT pair by at least +5 k-NN points
# over their untrained selves on the validation split (ResNet +5.1, ViT +14.1; recipe_search's 12-epoch runs); at
# six the ResNet gained +2.7. The six-epoch records are kept in results/paper_tables/v2_six_epochs/.
EPOCHS = 12
BUDGET = [
    "data.train_samples=8000", f"train.epochs={EPOCHS}", "train.batch_size=64", "data.validation_samples=5000",
    "data.num_workers=1", "checkpoint.every_steps=0", f"checkpoint.keep_last={EPOCHS}",
    "eval.max_train_samples=5000", "eval.knn_at_end=false", "eval.linear_at_end=false",
    "eval.analysis_at_end=false", "eval.linear_epochs=100", "train.log_every=25",
]

PAIRS = {  # pair kind -> preset (model1 is the larger or stronger model, with the smaller lambda)
    "cnn_vit": "demo_cnn_vit",  # ResNet-18 width 8 + ViT dim 64, depth 4
    "cnn_cnn": "demo",  # ResNet-18 width 16 + ResNet-18 width 8
    "vit_vit": "demo_vit_vit",  # ViT dim 96 + ViT dim 64, depth 4 both
}

# The small-scale recipe, chosen on the validation split only (benchmarks/recipe_search.py, CNN-ViT under DINO and
# MOKD, records and report.md in results/recipe_search/), the same for DINO and MOKD: BatchNorm in the MLP-Heads
# and Sinkhorn-Knopp targets for every model; KoLeo on the ViTs only (it took the ResNet from 69 to 58-62 k-NN,
# and the ViT from 58 to 61 only together with Sinkhorn-Knopp).
RECIPE = ["head.mlp_batchnorm=true", "loss.centring=sinkhorn_knopp"]
# Per pair, on top of the recipe: the ViTs' KoLeo, and the ResNets trained as in the demo (mokd/configs/demo.yaml,
# chosen on the validation split: docs/results.md, "a demo in which both models learn"): SGD at lr 0.1, the last
# BatchNorm of each residual block zero-initialised and a slower teacher (momentum 0.998). With the default
# initialisation and lr 0.5 (the v3 records) the larger ResNet of the CNN-CNN pair started at 74 k-NN, within 6
# points of the raw pixels (79.7), so no method could lift it by 5, and MOKD's T-Head teachers ended uniform there.
# The ViTs keep the presets' AdamW base lr 2e-3: with KoLeo and Sinkhorn-Knopp it beat the 5e-4 chosen before the
# recipe (v1_before_recipe/tuning.json): ViT 62.6 vs 61.2 k-NN.
VIT_MODELS = {"cnn_vit": (2,), "cnn_cnn": (), "vit_vit": (1, 2)}  # which models of each pair are ViTs
VIT_KOLEO = "koleo_weight=0.1"
RESNET_AS_IN_DEMO = ["zero_init_last_bn=true", "optim.base_lr=0.1"]
TUNED = {
    "cnn_vit": [*(f"model1.{setting}" for setting in RESNET_AS_IN_DEMO), "loss.teacher_momentum=0.998"],
    "cnn_cnn": [],  # the demo preset is this recipe
    "vit_vit": [],
}
for pair, vits in VIT_MODELS.items():
    TUNED[pair] = [*(f"model{m}.{VIT_KOLEO}" for m in vits), *TUNED[pair]]

# Loss configurations: which of L_sm, L_cm, L_st, L_ct each model minimises. "dino" trains each model alone
# (L_sm only: no gradient or target crosses between the models), i.e. independent DINO of both models.
def only(*names: str) -> list[str]:
    """The loss switches that keep just these terms of the loss-term table, for every model."""
    return [f"loss.{term.switch}=false" for term in LOSS_TERM_TABLE if term.name not in names]


LOSSES = {"dino": only("sm"), "sm+cm": only("sm", "cm"), "sm+cm+st": only("sm", "cm", "st"), "sm+ct": only("sm", "ct"),
          "sm+st": only("sm", "st"), "mokd": only(*(term.name for term in LOSS_TERM_TABLE))}

# The ViT of the CNN-ViT pair learns less under MOKD than under DINO at this scale because of its T-Head terms
# (recipe_search.py, vit3-* records: validation, 3 epochs, seeds 0 and 1; ViT k-NN DINO 62.6 / 62.6, MOKD 56.3 /
# 57.6, the ViT on L_sm + L_cm 61.7 / 64.2 with the ResNet at 71.5 / 74.5 against DINO's 65.1 / 69.6). Table 1
# therefore has a second MOKD row for that pair: the ResNet on all four terms, the ViT on L_sm and L_cm.
VIT_WITHOUT_THEAD_TERMS = [f"model2.term_weights.{term.name}=0" for term in LOSS_TERM_TABLE if term.head == "thead"]
# The T-Head's terms send 6-7 times L_sm's gradient into the ViT's last block at step 0 and 8-32 times later,
# orthogonal to it (benchmarks/term_gradients.py, results/term_gradients/): the official T-Head's logits are a LayerNorm
# output's mean, the MLP-Head's a unit vector's. Normalising both models' T-Heads (seed 0, validation: results/
# paper_tables/thead_l2_both_models/) lifted the ViT of the CNN-ViT pair by 5.4 k-NN points and cost its ResNet 1.4,
# and cost both ResNets of the CNN-CNN pair 3.7-4.4: a third MOKD row normalises the ViTs' T-Heads only.
TABLE1_VARIANTS = {"cnn_vit": ("dino", "mokd", "mokd-vit-l2", "mokd-vit-sm-cm"), "cnn_cnn": ("dino", "mokd"),
                   "vit_vit": ("dino", "mokd", "mokd-vit-l2")}
VARIANT_OVERRIDES = {**LOSSES, "mokd-vit-sm-cm": [*LOSSES["mokd"], *VIT_WITHOUT_THEAD_TERMS]}
# The MOKD row each pair is judged by (chosen on the validation split, seed 0: docs/results.md): the ViTs' T-Heads
# normalised where the pair has a ViT, the paper's MOKD for two ResNets (for which the two are the same runs).
CHOSEN_MOKD = {pair: "mokd-vit-l2" if vits else "mokd" for pair, vits in VIT_MODELS.items()}


def vit_theads_normalised(pair: str) -> list[str]:
    return [f"model{m}.thead_l2_normalise=true" for m in VIT_MODELS[pair]]


def variant_overrides(pair: str, variant: str) -> list[str]:
    if variant == "mokd-vit-l2":
        return [*LOSSES["mokd"], *vit_theads_normalised(pair)]
    return VARIANT_OVERRIDES[variant]


# Table 8: the presets' weights are lambda_1 = 0.1 (the stronger model) and lambda_2 = 1.0; each row varies one.
LAMBDAS = {"lam1=0": ["model1.cross_weight=0.0"], "lam1=1": ["model1.cross_weight=1.0"],
           "lam2=0": ["model2.cross_weight=0.0"], "lam2=0.1": ["model2.cross_weight=0.1"]}

# Where the curves go when the budget grows: one MOKD run per pair kind at 5x the epochs (seed 0), every epoch's
# checkpoint kept for its k-NN curve.
LONG_EPOCHS = 5 * EPOCHS
LONG = [f"train.epochs={LONG_EPOCHS}", f"checkpoint.keep_last={LONG_EPOCHS}"]

SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class RunSpec:
    pair: str
    variant: str  # a LOSSES key, or a LAMBDAS key (MOKD with that weight)
    seed: int
    overrides: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        return f"{self.pair}-{self.variant}-s{self.seed}"


def grid() -> list[RunSpec]:
    """Every run, in the order they are trained: Table 1's DINO and MOKD rows for all seeds, its second MOKD row of
    the CNN-ViT pair, the ablation and lambda runs seed by seed, then the long runs. The ablation, lambda and long
    runs vary the chosen MOKD row (CHOSEN_MOKD: the ViTs' T-Heads normalised)."""
    def ablations(seed: int) -> list[RunSpec]:
        chosen = vit_theads_normalised("cnn_vit")
        return ([RunSpec("cnn_vit", variant, seed, (*LOSSES[variant], *chosen)) for variant in ("sm+cm", "sm+cm+st")]
                + [RunSpec("cnn_vit", variant, seed, (*overrides, *chosen)) for variant, overrides in LAMBDAS.items()])

    def table1(variants: tuple[str, ...]) -> list[RunSpec]:
        return [RunSpec(pair, variant, seed, tuple(variant_overrides(pair, variant)))
                for seed in SEEDS for pair in PAIRS for variant in TABLE1_VARIANTS[pair] if variant in variants]

    runs = table1(("dino", "mokd", "mokd-vit-l2")) + table1(("mokd-vit-sm-cm",))
    runs += ablations(0) + ablations(1) + ablations(2)
    return runs + [RunSpec(pair, "mokd-long", 0, (*variant_overrides(pair, CHOSEN_MOKD[pair]), *LONG))
                   for pair in PAIRS]


def train_arguments(spec: RunSpec) -> list[str]:
    return ["train", "--preset", PAIRS[spec.pair], "--no-progress", *run_overrides(spec), f"run_dir={RUNS / spec.name}"]


def run_overrides(spec: RunSpec) -> list[str]:
    return [*BUDGET, *RECIPE, *TUNED[spec.pair], *spec.overrides, f"train.seed={spec.seed}"]


# ---- one run: train, then evaluate every epoch checkpoint ------------------------------------------------------
def run_one(spec: RunSpec) -> dict:
    """Train `spec` (resuming a killed attempt) and evaluate it; returns the record (also written to disk)."""
    import torch

    from mokd.launch.cli import main as mokd_main

    run_dir = RUNS / spec.name
    resumed = (run_dir / "checkpoints").exists()
    started = time.perf_counter()
    if mokd_main(train_arguments(spec)) != 0:
        raise RuntimeError(f"training {spec.name} failed")
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    evaluation = evaluate(run_dir, torch.device("cpu"))
    record = {
        "name": spec.name, "pair": spec.pair, "variant": spec.variant, "seed": spec.seed,
        "preset": PAIRS[spec.pair], "overrides": run_overrides(spec),
        "config": (run_dir / "config.yaml").read_text(),
        "train_wall_seconds": train_seconds, "resumed_from_checkpoint": resumed,
        "eval_wall_seconds": time.perf_counter() - started, "torch_threads": torch.get_num_threads(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": "CPU, 2 cores (shared by --jobs runs)",
        "collapse": collapse_monitors(run_dir), **evaluation,
    }
    RECORDS.mkdir(parents=True, exist_ok=True)
    temporary = RECORDS / f"{spec.name}.json.tmp"
    temporary.write_text(json.dumps(record, indent=1) + "\n")
    temporary.rename(RECORDS / f"{spec.name}.json")  # a record exists only once it is whole
    return record


def collapse_monitors(run_dir: Path) -> dict:
    """At the last logged step: each term's teacher entropy, against ln K (a uniform teacher: collapse), and each
    teacher's pooled-feature mean pairwise cosine and effective rank (dimensional collapse), next to their values
    for the untrained teacher at step 0."""
    import math

    from mokd.config import load_config

    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])

    def monitor(prefix: str) -> dict:
        return {key[len(prefix):]: value for key, value in last.items() if key.startswith(prefix)}

    return {"step": last["step"], "uniform_entropy": math.log(load_config(str(run_dir / "config.yaml")).head.out_dim),
            "teacher_entropy": monitor("collapse/teacher_entropy/"),
            "feature_cosine": monitor("collapse/feature_cosine/"), "feature_rank": monitor("collapse/feature_rank/"),
            "feature_cosine_step0": monitor("collapse/feature_cosine_step0/"),
            "feature_rank_step0": monitor("collapse/feature_rank_step0/")}


# The k-NN curve's epochs between the first and the last are scored on a fixed subset of the test split: the bank
# and the 10,000 test images made each epoch's point cost 15,000 backbone passes per model (a fifth of a run's wall
# time went to evaluation). Step 0 and the last epoch are scored on both the subset and the whole split, so every
# record shows how far the subset's number is from the whole split's.
CURVE_TEST_IMAGES = 2000


def evaluate(run_dir: Path, device) -> dict:
    """k-NN of both teachers at step 0 and after every epoch (the test split; the epochs in between on its
    CURVE_TEST_IMAGES subset), and at the end k-NN, linear probe and prediction consistency on both the test and
    the validation split."""
    from mokd.config import load_config
    from mokd.data import EvalTransform, build_eval_loader, data_statistics, limit_size, num_classes
    from mokd.engine.checkpoint import CheckpointManager, load_teachers_file
    from mokd.eval.analysis import prediction_consistency
    from mokd.eval.linear import extract_eval_features
    from mokd.eval.run_evaluation import (ModelFeatures, eval_dataset, knn_predictions, knn_top1_of, linear_top1_of,
                                          untrained_networks)
    from mokd.method.models import build_models

    config = load_config(str(run_dir / "config.yaml"), [f"run_dir={run_dir}"])
    splits = {split: load_config(str(run_dir / "config.yaml"), [f"run_dir={run_dir}", f"eval.split={split}"])
              for split in ("test", "validation")}
    train_set = eval_dataset(config, "train")
    mean, std = data_statistics(config.data, train_set.channels)
    transform = EvalTransform(min(config.eval.image_size, config.data.global_crop_size), mean, std,
                              train_set.channels)
    loader = partial(build_eval_loader, transform=transform, batch_size=config.eval.batch_size, num_workers=0)
    loaders = {"bank": loader(limit_size(train_set, config.eval.max_train_samples, config.train.seed))}
    loaders.update({split: loader(eval_dataset(split_config, "test")) for split, split_config in splits.items()})
    loaders["curve"] = loader(limit_size(eval_dataset(splits["test"], "test"), CURVE_TEST_IMAGES, 0))  # one subset for every run
    classes = num_classes(train_set)

    def features_of(teachers, split_names) -> list[dict]:
        found = []
        for teacher in teachers:
            extract = partial(extract_eval_features, teacher.backbone, device=device,
                              n_last_blocks=config.eval.linear_n_last_blocks,
                              avgpool_patch_tokens=config.eval.linear_avgpool_patch_tokens)
            bank = extract(loaders["bank"])
            found.append({split: ModelFeatures(bank, extract(loaders[split])) for split in split_names})
        return found

    knn_top1 = partial(knn_top1_of, config, classes=classes)

    def curve_point(epoch: int, step: int, features: list[dict]) -> dict:
        subset = [knn_top1(f["curve"]) for f in features]
        if "test" not in features[0]:
            return {"epoch": epoch, "step": step, "knn_top1": subset, "test_images": CURVE_TEST_IMAGES}
        whole = [knn_top1(f["test"]) for f in features]
        return {"epoch": epoch, "step": step, "knn_top1": whole, "test_images": len(loaders["test"].dataset),
                "knn_top1_subset": subset}

    untrained = features_of(untrained_networks(config, train_set.channels, device), ["test", "curve"])
    curve = [curve_point(0, 0, untrained)]
    checkpoints = CheckpointManager(run_dir, config.checkpoint.keep_last).complete()
    if not checkpoints:
        raise FileNotFoundError(f"no complete checkpoint under {run_dir / 'checkpoints'}")
    final: dict = {}
    for checkpoint in checkpoints:
        meta = CheckpointManager.load_meta(checkpoint)
        step, epoch = meta["step"], meta["data_position"]["epoch"]
        _, teachers = build_models(config, train_set.channels)
        for teacher, state in zip(teachers, load_teachers_file(checkpoint)):
            teacher.load_state_dict(state)
            teacher.to(device)
        is_last = checkpoint == checkpoints[-1]
        features = features_of(teachers, ["test", "validation", "curve"] if is_last else ["curve"])
        curve.append(curve_point(epoch, step, features))
        if is_last:
            final["steps"] = step
            for split, split_config in splits.items():
                predictions = [knn_predictions(split_config, f[split], classes) for f in features]
                final[split] = {f"model{which + 1}": {
                    "knn_top1": 100.0 * (predictions[which] == features[which][split].test.labels).float().mean().item(),
                    "linear_top1": linear_top1_of(split_config, features[which][split], classes)} for which in range(2)}
                final[split]["prediction_consistency"] = prediction_consistency(*predictions)
    final["knn_curve_test"] = curve
    return final


def raw_pixel_knn() -> dict[str, float]:
    """k-NN top-1 of the raw (normalised) pixels of the evaluation crop, on the test and the validation split,
    with the grid's bank, k and T: what a feature must beat to have learned anything. Cached in RESULTS."""
    cache = RESULTS / "raw_pixels.json"
    if cache.exists():
        return json.loads(cache.read_text())
    import torch

    from mokd.config import load_config
    from mokd.data import EvalTransform, build_eval_loader, data_statistics, limit_size, num_classes
    from mokd.eval.knn import knn_predict
    from mokd.eval.run_evaluation import eval_dataset

    def pixels(loader) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = zip(*loader)
        return torch.nn.functional.normalize(torch.cat(images).flatten(1), dim=1), torch.cat(labels)

    scores = {}
    for split in ("test", "validation"):
        config = load_config(PAIRS["cnn_cnn"], [*BUDGET, f"eval.split={split}"])
        train_set = eval_dataset(config, "train")
        mean, std = data_statistics(config.data, train_set.channels)
        transform = EvalTransform(min(config.eval.image_size, config.data.global_crop_size), mean, std,
                                  train_set.channels)
        bank = pixels(build_eval_loader(limit_size(train_set, config.eval.max_train_samples, config.train.seed),
                                        transform, config.eval.batch_size, 0))
        held_out = pixels(build_eval_loader(eval_dataset(config, "test"), transform, config.eval.batch_size, 0))
        predicted = knn_predict(*bank, held_out[0], num_classes(train_set), config.eval.knn_k,
                                config.eval.knn_temperature)
        scores[split] = 100.0 * (predicted == held_out[1]).float().mean().item()
    RESULTS.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(scores, indent=1) + "\n")
    return scores


# ---- the grid ---------------------------------------------------------------------------------------------------
def record_path(spec: RunSpec) -> Path:
    return RECORDS / f"{spec.name}.json"


def take_lock(spec: RunSpec) -> bool:
    """RUNS/NAME.lock holds the pid training NAME: a second runner (another session, a restarted grid) skips a
    run whose process is alive and takes over a lock whose process is gone."""
    lock = RUNS / f"{spec.name}.lock"
    try:
        holder = int(lock.read_text())
        os.kill(holder, 0)
        return False  # alive: trained elsewhere
    except (FileNotFoundError, ValueError, ProcessLookupError):
        lock.write_text(str(os.getpid()))
        return True


def launch(spec: RunSpec, threads: int) -> tuple[str, int, float]:
    """One run in its own process (so each has its own thread budget and a crash costs only that run)."""
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                       PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    RUNS.mkdir(parents=True, exist_ok=True)
    if record_path(spec).exists() or not take_lock(spec):
        return spec.name, 0, 0.0
    log = RUNS / f"{spec.name}.log"
    started = time.perf_counter()
    with log.open("a") as out:
        child = subprocess.Popen([sys.executable, __file__, "one", spec.name], stdout=out, stderr=subprocess.STDOUT,
                                 env=environment, cwd=REPO)
        (RUNS / f"{spec.name}.lock").write_text(str(child.pid))
        code = child.wait()
    (RUNS / f"{spec.name}.lock").unlink(missing_ok=True)
    return spec.name, code, time.perf_counter() - started


def run_grid(jobs: int, only: list[str], max_runs: Optional[int]) -> int:
    pending = [spec for spec in grid() if not record_path(spec).exists()
               and (not only or any(part in spec.name for part in only))]
    pending = pending[:max_runs] if max_runs else pending
    print(f"{len(pending)} runs to do ({jobs} at a time); records in {RECORDS}", flush=True)
    failures = 0
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for name, code, seconds in pool.map(partial(launch, threads=1), pending):
            failures += code != 0
            outcome = "done" if code == 0 else f"FAILED (exit {code}, see {RUNS / name}.log)"
            print(f"{name}: {outcome} in {seconds / 60:.1f} min" if seconds else f"{name}: trained elsewhere",
                  flush=True)
    return 1 if failures else 0


# ---- the report -------------------------------------------------------------------------------------------------
def load_records() -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(RECORDS.glob("*.json"))]


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def cell(summary: Optional[dict]) -> str:
    if summary is None:
        return "–"
    spread = f" ± {summary['std']:.2f}" if summary["n"] > 1 else ""
    return f"{summary['mean']:.2f}{spread} (n={summary['n']})"


def summarise(records: list[dict], split: str) -> dict:
    """(pair, variant) -> per model and metric, mean and std over seeds; also the prediction consistency."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["pair"], record["variant"]), []).append(record)
    summary = {}
    for (pair, variant), members in groups.items():
        entry = {f"model{m}": {metric: mean_std([r[split][f"model{m}"][metric] for r in members])
                               for metric in ("knn_top1", "linear_top1")} for m in (1, 2)}
        for m in (1, 2):  # the curve's first point: the same networks before training (test split)
            entry[f"model{m}"]["knn_untrained"] = mean_std([r["knn_curve_test"][0]["knn_top1"][m - 1]
                                                            for r in members])
        entry["prediction_consistency"] = mean_std([r[split]["prediction_consistency"] for r in members])
        entry["seeds"] = sorted(r["seed"] for r in members)
        summary[f"{pair}/{variant}"] = entry
    return summary


MODEL_NAMES = {"cnn_vit": ("ResNet-18 w8", "ViT d64"), "cnn_cnn": ("ResNet-18 w16", "ResNet-18 w8"),
               "vit_vit": ("ViT d96", "ViT d64")}


def verdict(dino: dict, mokd: dict) -> str:
    """Does MOKD beat DINO by more than the seed spread (the larger of the two standard deviations)?"""
    gain = mokd["mean"] - dino["mean"]
    spread = max(dino["std"], mokd["std"])
    if min(dino["n"], mokd["n"]) < 2:
        return f"{gain:+.2f} (one seed: no spread yet)"
    word = "beats" if gain > spread else ("loses to" if gain < -spread else "ties")
    return f"{gain:+.2f}, MOKD {word} DINO (spread {spread:.2f})"


def scores_row(entry: Optional[dict]) -> str:
    """The k-NN and linear cells of model1 then model2, closing a markdown row ("–" where the runs are missing)."""
    return " | ".join(cell(entry[f"model{m}"][metric]) if entry else "–"
                      for m in (1, 2) for metric in ("knn_top1", "linear_top1")) + " |"


def markdown_tables(summary: dict, split: str, raw_pixels: Optional[dict] = None) -> str:
    lines = [f"Numbers: top-1 % on the Fashion-MNIST {split} split, mean ± std over seeds (n = seeds).", ""]
    if raw_pixels:
        lines += [f"Reference: k-NN on the raw pixels at the same evaluation crop (same bank, k, T): "
                  f"{raw_pixels[split]:.2f}.", ""]
    lines += ["### Table 1 analogue: independent DINO vs MOKD", "",
              "| pair | model | metric | untrained | DINO | MOKD | MOKD − DINO |", "|---|---|---|---|---|---|---|"]
    for pair, variant in [(pair, variant) for pair in PAIRS for variant in TABLE1_VARIANTS[pair][1:]]:
        dino, mokd = summary.get(f"{pair}/dino"), summary.get(f"{pair}/{variant}")
        label = pair if variant == "mokd" else f"{pair} ({variant})"
        for which in (1, 2):
            for metric in ("knn_top1", "linear_top1"):
                cells = [cell(s[f"model{which}"][metric]) if s else "–" for s in (dino, mokd)]
                judged = verdict(dino[f"model{which}"][metric], mokd[f"model{which}"][metric]) if dino and mokd else "–"
                untrained = cell(dino[f"model{which}"]["knn_untrained"]) if dino and metric == "knn_top1" else ""
                lines.append(f"| {label} | {MODEL_NAMES[pair][which - 1]} | {metric.replace('_top1', '')} | "
                             f"{untrained} | {cells[0]} | {cells[1]} | {judged} |")
    lines += ["", "### Table 7 analogue (CNN–ViT): loss ablation", "",
              "| losses | ResNet k-NN | ResNet linear | ViT k-NN | ViT linear |", "|---|---|---|---|---|"]
    for variant, label in (("dino", "L_sm"), ("sm+cm", "L_sm + L_cm"), ("sm+cm+st", "L_sm + L_cm + L_st"),
                           (CHOSEN_MOKD["cnn_vit"], "L_sm + L_cm + L_st + L_ct")):
        lines.append(f"| {label} | " + scores_row(summary.get(f"cnn_vit/{variant}")))
    lines += ["", "### Table 8 analogue (CNN–ViT): cross-distillation weights", "",
              "| λ1 (ResNet) | λ2 (ViT) | ResNet k-NN | ResNet linear | ViT k-NN | ViT linear |",
              "|---|---|---|---|---|---|"]
    for variant, weights in (("lam1=0", ("0", "1")), (CHOSEN_MOKD["cnn_vit"], ("0.1", "1")), ("lam1=1", ("1", "1")),
                             ("lam2=0", ("0.1", "0")), ("lam2=0.1", ("0.1", "0.1"))):
        lines.append(f"| {weights[0]} | {weights[1]} | " + scores_row(summary.get(f"cnn_vit/{variant}")))
    lines += ["", f"### Long runs: MOKD at {LONG_EPOCHS} epochs (5x the budget), seed 0, against the {EPOCHS}-epoch grid", "",
              "| pair | run | model1 k-NN | model1 linear | model2 k-NN | model2 linear |", "|---|---|---|---|---|---|"]
    for pair in PAIRS:
        for variant, label in ((CHOSEN_MOKD[pair], f"{EPOCHS} epochs (Table 1)"), ("mokd-long", f"{LONG_EPOCHS} epochs")):
            lines.append(f"| {pair} | {label} | " + scores_row(summary.get(f"{pair}/{variant}")))
    lines += ["", "### Table 9 analogue: prediction consistency of the two models (same k-NN class, %)", "",
              "| pair | two DINO models | two MOKD models |", "|---|---|---|"]
    for pair in PAIRS:
        lines.append(f"| {pair} | " + " | ".join(
            cell(summary[key]["prediction_consistency"]) if key in summary else "–"
            for key in (f"{pair}/dino", f"{pair}/{CHOSEN_MOKD[pair]}")) + " |")
    return "\n".join(lines) + "\n"


def headline_table(summary: dict) -> str:
    """Table 1 as the README quotes it: per model, k-NN top-1 (test split, mean ± std over seeds) untrained, under
    DINO and under the pair's chosen MOKD row (CHOSEN_MOKD), each with its gain over the untrained network, and the
    verdict against the larger of the two spreads."""
    lines = ["| pair | model | untrained | DINO (gain) | MOKD (gain) | MOKD − DINO |", "|---|---|---|---|---|---|"]
    for pair, variant in CHOSEN_MOKD.items():
        dino, mokd = summary.get(f"{pair}/dino"), summary.get(f"{pair}/{variant}")
        if not (dino and mokd):
            continue
        for which in (1, 2):
            untrained = dino[f"model{which}"]["knn_untrained"]["mean"]
            scores = [entry[f"model{which}"]["knn_top1"] for entry in (dino, mokd)]
            cells = [f"{s['mean']:.2f} ± {s['std']:.2f} ({s['mean'] - untrained:+.1f})" for s in scores]
            label = pair if variant == "mokd" else f"{pair} ({variant})"
            lines.append(f"| {label} | {MODEL_NAMES[pair][which - 1]} | {untrained:.2f} | {cells[0]} | {cells[1]} | "
                         f"{verdict(*scores)} |")
    return "\n".join(lines) + "\n"


GAIN_FLOOR = 5.0  # the k-NN points over its untrained self that every model must gain (Table 1)
UNIFORM_CEILING = 0.98  # a teacher term at this fraction of ln K or above teaches (almost) nothing


def claims_table(records: list[dict]) -> str:
    """Per Table 1 row: each model's k-NN gain over its own untrained network (test split, mean +- std over seeds),
    whether every model gains at least GAIN_FLOOR, and the largest final teacher entropy of any term in any seed as
    a fraction of ln K."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["pair"], record["variant"]), []).append(record)
    lines = [f"### Does every model learn? k-NN gain over its untrained self (test split), and the most uniform "
             f"teacher term", "", f"| pair | run | seeds | {' | '.join(f'model{m} gain' for m in (1, 2))} | every "
             f"gain ≥ +{GAIN_FLOOR:g} | largest teacher entropy / ln K (< {UNIFORM_CEILING}) |",
             "|---|---|---|---|---|---|---|"]
    for pair in PAIRS:
        for variant in TABLE1_VARIANTS[pair]:
            members = groups.get((pair, variant), [])
            if not members:
                continue
            gains = [mean_std([r["test"][f"model{m}"]["knn_top1"] - r["knn_curve_test"][0]["knn_top1"][m - 1]
                               for r in members]) for m in (1, 2)]
            worst = max(value / r["collapse"]["uniform_entropy"] for r in members
                        for value in r["collapse"]["teacher_entropy"].values())
            learns = "yes" if min(g["mean"] for g in gains) >= GAIN_FLOOR else "**no**"
            uniform = f"{worst:.3f}" if worst < UNIFORM_CEILING else f"**{worst:.3f}**"
            lines.append(f"| {pair} | {variant} | {len(members)} | "
                         + " | ".join(f"{g['mean']:+.2f} ± {g['std']:.2f}" for g in gains)
                         + f" | {learns} | {uniform} |")
    return "\n".join(lines) + "\n"


def collapse_table(records: list[dict]) -> str:
    """Mean teacher entropy per loss term at the last step, per pair and loss configuration: ln K means the
    teacher's targets are uniform (that term teaches nothing)."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(f"{record['pair']}/{record['variant']}", []).append(record["collapse"])
    terms = [f"model{m}/{t}" for m in (1, 2) for t in ("sm", "cm", "st", "ct")]
    features = [("feature_cosine", f"model{m}") for m in (1, 2)] + [("feature_rank", f"model{m}") for m in (1, 2)]
    columns = terms + [f"{model} {'cos' if kind == 'feature_cosine' else 'rank'}" for kind, model in features]
    uniform = records[0]["collapse"]["uniform_entropy"]
    lines = [f"### Collapse monitors at the last step (mean over seeds): teacher entropy per term (ln K = {uniform:.2f} "
             "is a uniform teacher), and each teacher's pooled features: mean pairwise cosine (1: one direction) "
             "and effective rank (1: one direction)", "",
             "| run | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, monitors in sorted(groups.items()):
        cells = []
        for kind, key in [("teacher_entropy", term) for term in terms] + features:
            values = [m[kind][key] for m in monitors if key in m.get(kind, {})]
            cells.append(f"{statistics.fmean(values):.2f}" if values else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], summary: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, metric in zip(axes, ("knn_top1", "linear_top1")):
        labels, positions = [], []
        for index, pair in enumerate(PAIRS):
            for which in (1, 2):
                position = index * 2.6 + (which - 1) * 1.1
                labels.append(f"{pair}\n{MODEL_NAMES[pair][which - 1]}")
                positions.append(position)
                for offset, (variant, colour) in enumerate((("dino", "tab:gray"), (CHOSEN_MOKD[pair], "tab:blue"))):
                    entry = summary.get(f"{pair}/{variant}")
                    if entry:
                        s = entry[f"model{which}"][metric]
                        axis.bar(position + (offset - 0.5) * 0.45, s["mean"], 0.45, yerr=s["std"], capsize=3,
                                 color=colour, label=("DINO", "MOKD")[offset] if (index, which) == (0, 1) else None)
                untrained = summary.get(f"{pair}/dino")
                if metric == "knn_top1" and untrained:  # the same networks before training
                    axis.hlines(untrained[f"model{which}"]["knn_untrained"]["mean"], position - 0.45,
                                position + 0.45, colors="black", linestyles="dotted",
                                label="untrained" if (index, which) == (0, 1) else None)
        axis.set_xticks(positions, labels, fontsize=6)
        axis.set_ylabel(f"{metric.replace('_top1', '')} top-1 (%)")
        axis.set_ylim(bottom=50)
        axis.legend()
    figure.suptitle("Independent DINO vs MOKD (the chosen row per pair), Fashion-MNIST test split (mean ± std over seeds)")
    figure.tight_layout()
    files.append(RESULTS / "table1_bars.png")
    figure.savefig(files[-1], dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(1, len(PAIRS), figsize=(5 * len(PAIRS), 3.8), squeeze=False)
    for axis, pair in zip(axes[0], PAIRS):
        for variant, style in (("dino", "--"), (CHOSEN_MOKD[pair], "-")):
            for which, colour in ((1, "tab:red"), (2, "tab:blue")):
                curves = [r["knn_curve_test"] for r in records if r["pair"] == pair and r["variant"] == variant]
                if not curves:
                    continue
                epochs = [point["epoch"] for point in curves[0]]
                values = [[c[i]["knn_top1"][which - 1] for c in curves] for i in range(len(epochs))]
                means = [statistics.fmean(v) for v in values]
                spreads = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
                axis.errorbar(epochs, means, yerr=spreads, linestyle=style, color=colour, capsize=2,
                              label=f"{variant} {MODEL_NAMES[pair][which - 1]}")
        axis.set_title(pair)
        axis.set_xlabel("epoch")
        axis.set_ylabel("k-NN top-1 (%)")
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    figure.tight_layout()
    files.append(RESULTS / "knn_curves.png")
    figure.savefig(files[-1], dpi=120)
    plt.close(figure)
    return files


def report() -> int:
    records = load_records()
    if not records:
        print(f"no records under {RECORDS}: run `python benchmarks/paper_tables.py run` first")
        return 1
    summaries = {split: summarise(records, split) for split in ("test", "validation")}
    raw_pixels = raw_pixel_knn()
    (RESULTS / "summary.json").write_text(json.dumps({
        "budget": BUDGET, "recipe": RECIPE, "pairs": PAIRS, "runs": len(records), "summary": summaries,
        "raw_pixel_knn_top1": raw_pixels,
        "train_wall_minutes_median": statistics.median(r["train_wall_seconds"] for r in records) / 60}, indent=1) + "\n")
    text = "\n".join(["# MOKD vs independent DINO at small scale (Fashion-MNIST, CPU)", "",
                      f"Budget per run: {' '.join(BUDGET)}.", "", f"Recipe: {' '.join(RECIPE)}.", "",
                      "## Test split", "", "### Table 1 (k-NN; the chosen MOKD row per pair)", "",
                      headline_table(summaries["test"]), claims_table(records),
                      markdown_tables(summaries["test"], "test", raw_pixels),
                      collapse_table(records), "## Validation split (tuning only)", "",
                      markdown_tables(summaries["validation"], "validation", raw_pixels)])
    (RESULTS / "tables.md").write_text(text)
    files = plot(records, summaries["test"])
    print(text)
    print("written:", RESULTS / "tables.md", RESULTS / "summary.json", *files)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train and evaluate the runs without a record")
    run.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    run.add_argument("--only", nargs="*", default=[], help="only runs whose name contains one of these")
    run.add_argument("--max-runs", type=int, default=None, help="stop after starting this many runs")
    commands.add_parser("report", help="tables, JSON and plots from the records")
    one = commands.add_parser("one", help="train and evaluate one run by name (what `run` starts per run)")
    one.add_argument("name", choices=[spec.name for spec in grid()])
    args = parser.parse_args(argv)
    if args.command == "run":
        return run_grid(args.jobs, args.only, args.max_runs)
    if args.command == "one":
        record = run_one(next(spec for spec in grid() if spec.name == args.name))
        print(json.dumps({key: record[key] for key in ("name", "test", "validation")}, indent=1))
        return 0
    return report()


if __name__ == "__main__":
    sys.exit(main())
