"""WebDataset shards end to end: real JPEG/PNG files written into real tar shards by the writer, read back by
the real loader with real DataLoader worker processes for 2 ranks x 2 workers, a real torchrun of two gloo
processes, and the trainer and evaluation reading shards.

Most shards here carry a unique id per sample as the class index (written through a file list), so the labels
of the batches say exactly which samples were seen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mokd.config import ConfigError, load_config
from mokd.data import MultiCropTransform, ShardDataError, build_shard_loader, dataset_for
from mokd.data.shard_writer import write_shards_from
from mokd.data.shards import MANIFEST_NAME, expand_shard_urls, shard_sample_counts
from mokd.launch.cli import main as cli_main
from tests.helpers import tiny_config

REPO = Path(__file__).resolve().parent.parent
BATCH, RANKS, WORKERS = 4, 2, 2


def _image(seed: int, size: int = 24) -> Image.Image:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)[None, :, None] * rng.uniform(0.2, 1.0, size=3)
    pixels = np.clip(ramp + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _id_shards(root: Path, count: int, per_shard: int, garbage_ids: tuple[int, ...] = ()) -> Path:
    """`count` JPEGs whose label is their id (ids in garbage_ids hold garbage bytes), written into shards."""
    images = root / "images"
    images.mkdir(parents=True)
    lines = []
    for sample in range(count):
        path = images / f"{sample}.jpg"
        if sample in garbage_ids:
            path.write_bytes(b"this is not a JPEG" * 10)
        else:
            _image(sample).save(path, quality=90)
        lines.append(f"{path} {sample}")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    out = root / "shards"
    write_shards_from("filelist", out, "train", root / "list.txt", samples_per_shard=per_shard, seed=3)
    return out


def _pattern(out: Path) -> str:
    return json.loads((out / MANIFEST_NAME).read_text())["pattern"]


def _transform() -> MultiCropTransform:
    return MultiCropTransform(8, 4, 1, (0.4, 1.0), (0.1, 0.4), (0.5,) * 3, (0.25,) * 3, 3)


def _loader(out: Path, rank: int, workers: int = WORKERS, pattern: str | None = None, manifest: str | None = None,
            max_corrupt_fraction: float = 0.5, shuffle_buffer: int = 5):
    urls = expand_shard_urls(pattern or _pattern(out))
    counts = shard_sample_counts(urls, manifest)
    return build_shard_loader(urls, counts, _transform(), 3, BATCH, seed=7, num_workers=workers, rank=rank,
                              world_size=RANKS, shuffle_buffer=shuffle_buffer, max_corrupt_fraction=max_corrupt_fraction)


def _epoch(loader, epoch: int, start: int = 0) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    loader.set_epoch(epoch)
    loader.set_start_batch(start)
    return list(loader)


def _ids(batches) -> list[int]:
    return [int(label) for _, labels in batches for label in labels]


# ---------------------------------------------------------------------------------------------- writer


def test_writer_keeps_bytes_and_class_indices_and_writes_the_manifest(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    sources = {}
    for label, name in enumerate(("ant", "bee", "cat")):
        (tree / name).mkdir(parents=True)
        for number in range(3 + label):
            path = tree / name / f"{number}.{'png' if number == 0 else 'jpg'}"
            _image(100 * label + number).save(path)
            sources[path.read_bytes()] = (label, path.suffix[1:])
    manifest = write_shards_from("imagefolder", tmp_path / "out", "train", tree, shards=4, seed=0)
    assert [entry["samples"] for entry in manifest["shards"]] == [3, 3, 3, 3]
    assert manifest["samples"] == 12 and manifest["classes"] == ["ant", "bee", "cat"]
    assert expand_shard_urls(manifest["pattern"]) == [str(tmp_path / "out" / f"train-{n:06d}.tar") for n in range(4)]
    stored = []
    for url in expand_shard_urls(manifest["pattern"]):
        with tarfile.open(url) as archive:
            members = {member.name: archive.extractfile(member).read() for member in archive}
        keys = sorted({name.split(".")[0] for name in members})
        for key in keys:
            image_name = next(name for name in members if name.startswith(key + ".") and not name.endswith(".cls"))
            stored.append((members[image_name], int(members[key + ".cls"]), image_name.split(".")[1]))
    assert sorted(stored) == sorted((data, label, ext) for data, (label, ext) in sources.items())  # byte for byte
    assert [label for _, label, _ in stored] != sorted(label for _, label, _ in stored)  # shuffled, not by class
    with pytest.raises(FileExistsError, match="already holds shards"):
        write_shards_from("imagefolder", tmp_path / "out", "train", tree, shards=4)


# ---------------------------------------------------------------------------------------------- training loader


@pytest.mark.parametrize("count", [48, 50])
def test_two_ranks_two_workers_see_every_sample_at_most_once_with_equal_batches(tmp_path: Path, count: int) -> None:
    out = _id_shards(tmp_path, count, per_shard=6)
    expected_batches = count // (RANKS * BATCH)
    orders = []
    for epoch in (0, 1):
        seen_by_rank = []
        for rank in range(RANKS):
            loader = _loader(out, rank)
            batches = _epoch(loader, epoch)
            assert len(loader) == expected_batches and len(batches) == expected_batches
            assert all(crops[0].shape == (BATCH, 3, 8, 8) and len(crops) == 3 for crops, _ in batches)
            seen_by_rank.append(_ids(batches))
        seen = Counter(seen_by_rank[0] + seen_by_rank[1])
        assert max(seen.values()) == 1 and sum(seen.values()) == expected_batches * RANKS * BATCH
        assert set(seen) <= set(range(count))
        if count % (RANKS * BATCH) == 0:
            assert sorted(seen) == list(range(count))  # every sample exactly once
        orders.append(seen_by_rank[0])
    assert orders[0] != orders[1]  # the shard order and the buffer are reshuffled per epoch


def test_corrupt_sample_and_truncated_shard_are_skipped_and_counted(tmp_path: Path) -> None:
    garbage = 5
    out = _id_shards(tmp_path, 48, per_shard=6, garbage_ids=(garbage,))
    urls = expand_shard_urls(_pattern(out))
    labels_of = []
    for url in urls:
        with tarfile.open(url) as archive:
            labels_of.append([int(archive.extractfile(m).read()) for m in archive if m.name.endswith(".cls")])
    victim = next(n for n, labels in enumerate(labels_of) if garbage not in labels)
    with tarfile.open(urls[victim]) as archive:  # cut the shard in the middle of its third image
        third_image = [m for m in archive if m.name.endswith(".jpg")][2]
    os.truncate(urls[victim], third_image.offset_data + third_image.size // 2)
    lost = set(labels_of[victim][2:])
    usable = set(range(48)) - lost - {garbage}

    seen, stats = [], Counter()
    for rank in range(RANKS):
        loader = _loader(out, rank)
        batches = _epoch(loader, 0)
        assert len(batches) == len(loader) == 48 // (RANKS * BATCH)  # short workers refill from their share
        seen += _ids(batches)
        stats.update(loader.statistics())
    assert set(seen) == usable  # every usable sample, nothing else
    assert len(seen) == 48
    # The truncated shard yields its two whole samples and a third without image (corrupt); 3 are missing.
    assert stats["data/samples_corrupt"] == 2 and stats["data/samples_missing"] == len(lost) - 1
    assert stats["data/samples_read"] == 48 - (len(lost) - 1)


def test_corrupt_fraction_past_the_limit_stops_naming_the_shard(tmp_path: Path) -> None:
    out = _id_shards(tmp_path, 32, per_shard=4, garbage_ids=(0, 1, 2))
    for rank in range(RANKS):
        loader = _loader(out, rank, max_corrupt_fraction=0.0)
        try:
            _epoch(loader, 0)
        except ShardDataError as error:
            assert "max_corrupt_fraction=0.0" in str(error) and "undecodable .jpg" in str(error)
            assert "shard train-00000" in str(error)
            return
    pytest.fail("three garbage samples with max_corrupt_fraction=0 did not stop the loader")


def test_too_few_shards_for_ranks_times_workers_fails_at_start(tmp_path: Path) -> None:
    out = _id_shards(tmp_path, 24, per_shard=8)  # 3 shards
    with pytest.raises(ValueError, match=r"3 shards, fewer than 2 ranks x 2 workers = 4"):
        _loader(out, 0)
    assert len(_loader(out, 0, workers=1)) == 3  # 2 ranks x 1 worker is fine


def test_resume_from_a_batch_yields_exactly_the_rest_of_the_epoch(tmp_path: Path) -> None:
    out = _id_shards(tmp_path, 48, per_shard=6, garbage_ids=(11,))
    for start in (3, 4):
        full = _epoch(_loader(out, 1), 2)
        resumed_loader = _loader(out, 1)
        resumed = _epoch(resumed_loader, 2, start)
        assert len(resumed) == len(full) - start
        for (crops, labels), (crops_again, labels_again) in zip(full[start:], resumed):
            assert torch.equal(labels, labels_again)
            assert all(torch.equal(a, b) for a, b in zip(crops, crops_again))
        resumed_loader.set_epoch(2)  # the start batch applies once
        assert len(list(resumed_loader)) == len(full)


def test_pipe_urls_read_like_local_paths(tmp_path: Path) -> None:
    out = _id_shards(tmp_path, 32, per_shard=4)
    local = _epoch(_loader(out, 0, workers=0), 0)
    pipe_pattern = "pipe:cat " + _pattern(out)
    with pytest.raises(ValueError, match="data.shard_manifest"):
        _loader(out, 0, workers=0, pattern=pipe_pattern)
    piped = _epoch(_loader(out, 0, workers=0, pattern=pipe_pattern, manifest=str(out / MANIFEST_NAME)), 0)
    assert [labels.tolist() for _, labels in piped] == [labels.tolist() for _, labels in local]


def test_two_torchrun_processes_get_equal_disjoint_batches(tmp_path: Path) -> None:
    out = _id_shards(tmp_path, 40, per_shard=5)
    result = tmp_path / "ranks.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "tests" / "shard_ranks_check.py"), str(result), "data.source=webdataset",
               f"data.shards={_pattern(out)}", "data.num_workers=2", "data.global_crop_size=8",
               "data.local_crop_size=4", "data.n_local_crops=1", f"train.batch_size={BATCH}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks = json.loads(result.read_text())
    assert [entry["batches"] for entry in ranks] == [5, 5] and [entry["length"] for entry in ranks] == [5, 5]
    assert sorted(ranks[0]["labels"] + ranks[1]["labels"]) == list(range(40))


# ---------------------------------------------------------------------------------------------- config, trainer, evaluation


def test_webdataset_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs data.shards"):
        load_config(None, ["data.source=webdataset"])
    with pytest.raises(ConfigError, match="mokd shards --limit"):
        load_config(None, ["data.source=webdataset", "data.shards=x.tar", "data.train_samples=10"])
    # A preset made for a map-style source: the error names the override that lets it stream.
    with pytest.raises(ConfigError, match="add data.train_samples=0 to stream"):
        load_config("demo", ["data.source=webdataset", "data.shards=x.tar"])
    assert load_config("demo", ["data.source=webdataset", "data.shards=x.tar", "data.train_samples=0"]).data.shards
    with pytest.raises(ConfigError, match="data.shard_statistics"):
        load_config(None, ["data.source=webdataset", "data.shards=x.tar", "data.shard_statistics=imagenet"])


def test_trainer_and_evaluation_read_fashion_mnist_shards_from_the_cli(tmp_path: Path) -> None:
    from mokd.engine.trainer import Trainer
    from mokd.eval.run_evaluation import eval_loaders

    for split, limit in (("train", 96), ("test", 40)):
        assert cli_main(["shards", "--source", "fashion_mnist", "--split", split, "--out", str(tmp_path / split),
                         "--samples-per-shard", "24", "--limit", str(limit)]) == 0
    # The directories `mokd shards` wrote stand for their shards (as their manifests list them).
    assert expand_shard_urls(str(tmp_path / "train")) == expand_shard_urls(f"{tmp_path}/train/train-{{000000..000003}}.tar")
    config = tiny_config(tmp_path / "run", extra=[
        "data.source=webdataset", f"data.shards={tmp_path}/train", f"data.eval_shards={tmp_path}/test",
        "data.shard_channels=1",
        "data.shard_statistics=fashion_mnist", "data.shuffle_buffer=16", "train.max_steps=3"])
    trainer = Trainer(config, show_progress=False)
    assert trainer.steps_per_epoch == 96 // 8
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["data/samples_corrupt"] == 0 and records[-1]["data/samples_read"] > 0

    test_set = dataset_for(config.data, "test", 0)
    assert len(test_set) == 40 and test_set.classes[0] == "T-shirt/top" and test_set.channels == 1
    image, label = test_set[3]
    assert image.mode == "L" and image.size == (28, 28) and label == test_set.targets[3]
    with tarfile.open(tmp_path / "test" / "test-000000.tar") as archive:  # stored order, no shuffling
        stored = [int(archive.extractfile(m).read()) for m in archive if m.name.endswith(".cls")]
    assert test_set.targets[:24] == stored
    bank_loader, test_loader, classes = eval_loaders(config)
    images, labels = next(iter(test_loader))
    assert classes == 10 and images.shape[1:] == (1, 16, 16) and labels.tolist() == test_set.targets[:16]


def test_trainer_resumed_mid_epoch_on_shards_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    from mokd.engine.trainer import Trainer

    write_shards_from("fashion_mnist", tmp_path / "train", "train", split="test", shards=8, limit=48)
    extra = ["data.source=webdataset", f"data.shards={tmp_path}/train/train-{{000000..000007}}.tar",
             "data.shard_channels=1", "data.shard_statistics=fashion_mnist", "data.shuffle_buffer=8",
             "data.num_workers=2", "train.deterministic=true", "checkpoint.keep_last=1"]

    def losses(run: Path) -> dict:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss/")} for r in records}

    Trainer(tiny_config(tmp_path / "whole", extra=extra + ["train.max_steps=8"]), show_progress=False).train()
    Trainer(tiny_config(tmp_path / "split", extra=extra + ["train.max_steps=3"]), show_progress=False).train()
    resumed = Trainer(tiny_config(tmp_path / "split", extra=extra + ["train.max_steps=8"]), show_progress=False)
    assert resumed.step == 3 and resumed.steps_per_epoch == 6  # resumes inside epoch 0, runs into epoch 1
    resumed.train()
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    assert sorted(losses(tmp_path / "whole")) == list(range(1, 9))
