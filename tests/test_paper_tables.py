"""benchmarks/paper_tables.py: the grid's runs are what the paper's tables compare, the evaluation of a real
(tiny) run agrees with `mokd eval knn`, and the report's statistics are the seeds' mean and spread."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from functools import reduce
from pathlib import Path

import pytest
import torch

from literal_eval import agreement, literal_run_predictions
from mokd.config import load_config
from mokd.launch.cli import main

REPO = Path(__file__).resolve().parents[1]


def load_runner():
    spec = importlib.util.spec_from_file_location("paper_tables", REPO / "benchmarks" / "paper_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_tables"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


paper_tables = load_runner()


def test_grid_holds_each_table_and_every_run_config_is_valid() -> None:
    runs = paper_tables.grid()
    names = [run.name for run in runs]
    assert len(names) == len(set(names))
    table1 = [run for run in runs if run.variant in ("dino", "mokd", "mokd-vit-l2", "mokd-vit-sm-cm")]
    assert {(run.pair, run.variant, run.seed) for run in table1} == {
        (pair, variant, seed) for pair in ("cnn_vit", "cnn_cnn", "vit_vit") for variant in ("dino", "mokd")
        for seed in (0, 1, 2)} | {(pair, variant, seed) for seed in (0, 1, 2) for pair, variant in (
            ("cnn_vit", "mokd-vit-sm-cm"), ("cnn_vit", "mokd-vit-l2"), ("vit_vit", "mokd-vit-l2"))}
    assert runs[:len(table1)] == table1  # Table 1 is trained first
    assert {(run.pair, run.variant) for run in runs if run.variant.endswith("long")} == {
        (pair, "mokd-long") for pair in ("cnn_vit", "cnn_cnn", "vit_vit")}
    ablations = {(run.variant, run.seed) for run in runs if run.pair == "cnn_vit"
                 and run not in table1 and not run.variant.endswith("long")}
    assert ablations == {(variant, seed) for seed in (0, 1, 2) for variant in ("sm+cm", "sm+cm+st", "lam1=0", "lam1=1",
                                                                                 "lam2=0", "lam2=0.1")}
    for run in runs:
        config = load_config(paper_tables.PAIRS[run.pair], paper_tables.run_overrides(run))
        assert config.train.seed == run.seed and config.data.validation_samples > 0
        for override in paper_tables.RECIPE:  # the recipe holds for every run, DINO and MOKD alike
            key, value = override.split("=")
            assert str(reduce(getattr, key.split("."), config)).lower() == value.lower(), (run.name, key)
        # One budget for all, except the long runs' 5x schedule (with every epoch's checkpoint kept).
        long = run.variant.endswith("long")
        epochs = paper_tables.LONG_EPOCHS if long else paper_tables.EPOCHS
        assert (config.train.epochs, config.data.train_samples) == (epochs, 8000)
        assert config.checkpoint.keep_last >= config.train.epochs
        terms = (config.loss.self_mlp, config.loss.cross_mlp, config.loss.self_thead, config.loss.cross_search)
        expected = {"dino": (True, False, False, False), "sm+cm": (True, True, False, False),
                    "sm+cm+st": (True, True, True, False)}.get(run.variant.split("-")[0], (True, True, True, True))
        assert terms == expected, run.name
        # The ViTs' T-Heads normalised in the chosen row and the runs that vary it (ablation, lambda, long).
        varies_the_chosen_row = run.variant not in ("dino", "mokd", "mokd-vit-sm-cm")
        for model in (config.model1, config.model2):
            assert model.thead_l2_normalise == (varies_the_chosen_row and model.backbone.startswith("vit")), run.name
        vit_terms = {"st": 0.0, "ct": 0.0} if run.variant == "mokd-vit-sm-cm" else {}  # the ViT without its T-Head
        for which, model in ((1, config.model1), (2, config.model2)):
            want = vit_terms if which == 2 else {}
            assert {t: float(model.term_weights.get(t, 1.0)) for t in ("sm", "st", "cm", "ct")} == {
                t: want.get(t, 1.0) for t in ("sm", "st", "cm", "ct")}, run.name
        weights = (config.model1.cross_weight, config.model2.cross_weight)
        if run.pair == "cnn_vit" and run.variant.startswith("lam"):
            which, value = run.variant[3], float(run.variant.split("=")[1])
            assert weights[int(which) - 1] == value
            assert weights[2 - int(which)] == (0.1, 1.0)[2 - int(which)]


def test_evaluate_a_real_run_matches_mokd_eval_knn(tmp_path: Path, monkeypatch) -> None:
    run_dir = tmp_path / "run"
    overrides = [
        f"run_dir={run_dir}", "model1.width=8", "model2.width=4", "head.out_dim=64", "head.mlp_hidden_dim=32",
        "head.mlp_bottleneck_dim=16", "head.thead_dim=32", "head.thead_heads=2", "data.source=synthetic",
        "data.synthetic_size=96", "data.synthetic_image_size=16", "data.synthetic_channels=1",
        "data.global_crop_size=16", "data.local_crop_size=8", "data.num_workers=0", "data.train_samples=0",
        "data.validation_samples=32", "train.epochs=2", "train.batch_size=16", "eval.batch_size=32",
        "eval.image_size=16", "eval.knn_at_end=false", "eval.linear_epochs=3", "eval.max_train_samples=48",
        "checkpoint.keep_last=2",
    ]
    assert main(["train", "--preset", "demo", "--no-progress", *overrides]) == 0
    monkeypatch.setattr(paper_tables, "CURVE_TEST_IMAGES", 20)  # the synthetic test split is smaller than 2,000
    evaluation = paper_tables.evaluate(run_dir, torch.device("cpu"))
    curve = evaluation["knn_curve_test"]
    assert [point["epoch"] for point in curve] == [0, 1, 2] and [p["step"] for p in curve] == [0, 4, 8]
    assert curve[0]["knn_top1"] != curve[-1]["knn_top1"]  # the untrained networks are not the trained ones
    # the epoch between is scored on 20 test images only (top-1 in steps of 5 %), the ends on both
    assert curve[1]["test_images"] == 20 and "knn_top1_subset" not in curve[1]
    for point in (curve[0], curve[-1]):
        assert point["test_images"] > 20 and len(point["knn_top1_subset"]) == 2
    for value in curve[1]["knn_top1"] + curve[0]["knn_top1_subset"] + curve[-1]["knn_top1_subset"]:
        assert value / 5 == pytest.approx(round(value / 5), abs=1e-6)
    for split in ("test", "validation"):
        predictions, labels = literal_run_predictions(run_dir, split)
        assert evaluation[split]["prediction_consistency"] == pytest.approx(agreement(*predictions))
        for which in range(2):
            assert evaluation[split][f"model{which + 1}"]["knn_top1"] == pytest.approx(
                agreement(predictions[which], labels))
    # The same teachers scored through the CLI: the final k-NN and linear probe must be the runner's, split for split.
    for split in ("test", "validation"):
        assert main(["eval", "knn", "--run", str(run_dir), f"eval.split={split}", "eval.knn_untrained=false"]) == 0
        assert main(["eval", "linear", "--run", str(run_dir), f"eval.split={split}"]) == 0
        results = json.loads((run_dir / "results.json").read_text())
        assert results["split"] == split and results["steps"] == 8
        for which in ("model1", "model2"):
            for metric in ("knn_top1", "linear_top1"):
                assert results[which][metric] == pytest.approx(evaluation[split][which][metric], abs=1e-9), (metric, split, which)
    assert curve[-1]["knn_top1"] == [evaluation["test"][m]["knn_top1"] for m in ("model1", "model2")]


def test_report_statistics_are_mean_and_sample_std_over_seeds() -> None:
    generator = torch.Generator().manual_seed(11)
    records = []
    for variant in ("dino", "mokd"):
        for seed in (0, 1, 2):
            scores = (torch.rand(7, generator=generator) * 30 + 60).tolist()
            split = {"model1": {"knn_top1": scores[0], "linear_top1": scores[1]},
                     "model2": {"knn_top1": scores[2], "linear_top1": scores[3]},
                     "prediction_consistency": scores[4]}
            entropies = (torch.rand(4, generator=generator) * 5.0).tolist()
            records.append({"pair": "cnn_vit", "variant": variant, "seed": seed, "test": split,
                            "knn_curve_test": [{"epoch": 0, "step": 0, "knn_top1": scores[5:]}],
                            "collapse": {"uniform_entropy": 6.0, "teacher_entropy": {
                                name: value for name, value in zip(("model1/sm", "model1/st", "model2/sm", "model2/ct"),
                                                                   entropies)}}})
    summary = paper_tables.summarise(records, "test")
    for variant in ("dino", "mokd"):
        members = [r for r in records if r["variant"] == variant]
        values = [r["test"]["model2"]["linear_top1"] for r in members]
        entry = summary[f"cnn_vit/{variant}"]["model2"]["linear_top1"]
        assert entry["mean"] == pytest.approx(sum(values) / 3)
        assert entry["std"] == pytest.approx(statistics.stdev(values))
        assert summary[f"cnn_vit/{variant}"]["seeds"] == [0, 1, 2]
        untrained = [r["knn_curve_test"][0]["knn_top1"][0] for r in members]
        assert summary[f"cnn_vit/{variant}"]["model1"]["knn_untrained"]["mean"] == pytest.approx(sum(untrained) / 3)
    dino = {"mean": 70.0, "std": 0.5, "n": 3}
    assert "beats" in paper_tables.verdict(dino, {"mean": 71.0, "std": 0.4, "n": 3})
    assert "ties" in paper_tables.verdict(dino, {"mean": 70.3, "std": 0.4, "n": 3})
    assert "loses to" in paper_tables.verdict(dino, {"mean": 69.0, "std": 0.9, "n": 3})
    table = paper_tables.markdown_tables(summary, "test")
    assert "Table 1 analogue" in table and "Table 9 analogue" in table
    # The claims: each model's gain over its own untrained k-NN, and the most uniform teacher term over the seeds.
    records[-1]["collapse"]["teacher_entropy"]["model2/ct"] = 5.94  # 0.99 ln K in one seed of MOKD
    claims = {line.split(" | ")[1]: line.split(" | ") for line in paper_tables.claims_table(records).splitlines()
              if line.startswith("| cnn_vit |")}
    for variant in ("dino", "mokd"):
        members = [r for r in records if r["variant"] == variant]
        means = []
        for m in (1, 2):
            gains = [r["test"][f"model{m}"]["knn_top1"] - r["knn_curve_test"][0]["knn_top1"][m - 1] for r in members]
            assert claims[variant][2 + m] == f"{sum(gains) / 3:+.2f} ± {statistics.stdev(gains):.2f}"
            means.append(sum(gains) / 3)
        assert claims[variant][5] == ("yes" if min(means) >= 5 else "**no**")
        worst = max(max(r["collapse"]["teacher_entropy"].values()) for r in members) / 6.0
        assert claims[variant][6].strip(" |*") == f"{worst:.3f}"
    assert claims["mokd"][6].startswith("**0.990")  # at or above the ceiling: marked


def test_readme_and_results_page_quote_table1_as_the_committed_records_give_it() -> None:
    """The README's and the results page's Table 1 is the report's, over the records in the repository; each of
    its k-NN cells is recomputed here from the records themselves."""
    records = paper_tables.load_records()
    table = paper_tables.headline_table(paper_tables.summarise(records, "test"))
    rows = table.splitlines()[2:]
    assert len(rows) == 2 * len(paper_tables.PAIRS), "Table 1 lacks a pair: its DINO or chosen MOKD runs are missing"
    for page in ("README.md", "docs/results.md"):
        assert table in (REPO / page).read_text(), f"{page}: Table 1 differs from `paper_tables.py report`"
    for row in rows:
        label, model = row.split(" | ")[:2]
        pair = label.strip("| ").split(" ")[0]
        which = paper_tables.MODEL_NAMES[pair].index(model) + 1
        untrained = statistics.fmean(r["knn_curve_test"][0]["knn_top1"][which - 1] for r in records
                                     if r["pair"] == pair and r["variant"] == "dino")
        for variant, column in (("dino", 3), (paper_tables.CHOSEN_MOKD[pair], 4)):
            scores = [r["test"][f"model{which}"]["knn_top1"] for r in records
                      if r["pair"] == pair and r["variant"] == variant]
            assert len(scores) == 3, (pair, variant, "three seeds")
            mean = statistics.fmean(scores)
            assert row.split(" | ")[column] == (f"{mean:.2f} ± {statistics.stdev(scores):.2f} "
                                                f"({mean - untrained:+.1f})"), (pair, model, variant)
