"""Map-style training batches (`StepSampler` through `build_train_loader`): the split across processes, no pair twice
in a batch, a batch larger than the dataset refused, and skipped samples counted once each across worker processes
and resumed runs.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmsoftmoe.data import PairDataset, count_skipped, eval_transform
from mmsoftmoe_training.data import StepSampler, build_train_loader


def global_rows(sampler_args: dict, world: int, step: int) -> list[tuple[int, int]]:
    """The global batch of `step` as `world` processes see it: their micro-batches, rank by rank, concatenated."""
    rows = []
    for rank in range(world):
        sampler = StepSampler(**sampler_args, rank=rank, world_size=world, start_step=step, total_steps=step + 1)
        rows.extend(row for micro in sampler for row in micro)
    return rows


@pytest.mark.parametrize("world,accum", [(2, 1), (4, 3), (3, 2)])
def test_processes_slices_concatenated_equal_the_one_process_batch(world, accum):
    args = dict(num_samples=50, global_batch=12, grad_accum_steps=accum, seed=4)
    for step in (0, 3, 4, 9):  # 4 steps per epoch: steps in epochs 0, 1 and 2
        assert global_rows(args, world, step) == global_rows(args, 1, step), step


def test_a_global_batch_never_holds_a_pair_twice():
    sampler = StepSampler(10, 4, 1, rank=0, world_size=1, seed=1, start_step=0, total_steps=10)
    for step in range(10):  # 2 steps per epoch; the last 2 samples of each permutation are left out
        epoch, first = divmod(step, 2)
        expected = np.random.default_rng([1, epoch]).permutation(10)[4 * first:4 * first + 4]
        assert sampler.step_indices(step) == [(int(i), epoch) for i in expected]


def test_a_batch_larger_than_the_dataset_is_refused_unless_allowed():
    with pytest.raises(ValueError, match=r"batch_size=8 is larger than the dataset \(6 samples\).*"
                                         r"data.allow_repeats_in_batch=true"):
        StepSampler(6, 8, 1, rank=0, world_size=1, seed=0, start_step=0, total_steps=1)
    sampler = StepSampler(6, 8, 1, rank=0, world_size=1, seed=0, start_step=0, total_steps=1, allow_repeats=True)
    indices = [i for i, _ in sampler.step_indices(0)]
    assert sorted(set(indices)) == list(range(6)) and len(indices) == 8


def encoded(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 0, 0)).save(buffer, "PNG")
    return buffer.getvalue()


def rows_with_bad_samples() -> list[dict]:
    """12 rows; rows 4 and 5 (neighbours: a replacement search meets 5 again) hold broken images, row 9 no caption."""
    rows = [{"image": encoded(10 * i), "caption": f"sample {i}", "__key__": f"k{i}"} for i in range(12)]
    rows[4]["image"] = rows[5]["image"] = b"broken"
    rows[9]["caption"] = " "
    return rows


@pytest.mark.parametrize("workers", [0, 2])
def test_skips_are_counted_once_each_across_workers_and_resumes(tmp_path, workers):
    log = tmp_path / "skipped_samples.jsonl"
    data = PairDataset(rows_with_bad_samples(), transform=eval_transform(8), skip_log=log)
    run = dict(global_batch=4, grad_accum_steps=1, rank=0, world_size=1, seed=0, total_steps=6,
               num_workers=workers, pin_memory=False)
    batches = list(build_train_loader(data, start_step=0, **run))  # two epochs: each bad sample met twice or more
    assert len(batches) == 6 and all(b["image"].shape[0] == 4 for b in batches)
    assert count_skipped(log) == 3
    assert {json.loads(line)["key"] for line in log.read_text().splitlines()} == {"k4", "k5", "k9"}
    list(build_train_loader(data, start_step=3, **run))  # a resumed run appends to the same log
    assert count_skipped(log) == 3
    if workers == 0:
        assert (data.num_bad_images, data.num_empty_captions) == (2, 1)


def test_run_config_reaches_the_readers(tmp_path):
    from mmsoftmoe_training.config import DataConfig
    from mmsoftmoe_training.data import build_pair_dataset

    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.png")
    (tmp_path / "pairs.csv").write_text("path|alt\nimg/a.png|a black square\n")
    preprocess = {"size": 8, "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic",
                  "resize_mode": "shortest"}
    cfg = DataConfig(source=str(tmp_path / "pairs.csv"), image_column="path", caption_column="alt", csv_separator="|")
    data = build_pair_dataset(cfg, preprocess, tokenizer=None, rank=0, world_size=1)
    assert len(data) == 1 and data[0]["text"] == "a black square" and data[0]["image"].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="streaming=true reads WebDataset shards, not data.format='csv'"):
        build_pair_dataset(DataConfig(source=str(tmp_path / "pairs.csv"), format="csv", streaming=True), preprocess,
                           tokenizer=None, rank=0, world_size=1)
    with pytest.raises(ValueError, match=r"uncompressed WebDataset .tar shards.*pairs.csv.*data.streaming=false"):
        build_pair_dataset(DataConfig(source=str(tmp_path / "pairs.csv"), streaming=True), preprocess,
                           tokenizer=None, rank=0, world_size=1)


@pytest.mark.slow
def test_trainer_state_counts_distinct_skips_with_workers_and_resume(tmp_path):
    import mmsoftmoe_training.main as train_main
    from mmsoftmoe_training.config import load_config
    from tests.training_fixtures import shapes_image_folder, write_metadata

    folder = tmp_path / "pairs"
    rows = shapes_image_folder(folder, 14)
    for name in ("bad1.jpg", "bad2.jpg"):  # neighbours: the replacement search meets the second one twice
        (folder / name).write_bytes(b"not a jpeg")
        rows.insert(3, {"file_name": name, "text": "a broken file"})
    write_metadata(folder, rows)

    def run(steps: int, *extra: str, source: Path = folder) -> dict:
        cfg = load_config(Path(train_main.__file__).parents[1] / "configs" / "smoke.yaml", [
            f"output_dir={tmp_path / 'run'}", f"data.source={source}", "data.caption_column=text",
            "data.num_workers=2", "eval.dataset=none", "batch_size=8", f"steps={steps}", "checkpoint_every=2",
            *extra])
        train_main.fit(cfg)
        return json.loads((tmp_path / "run/final/trainer_state.json").read_text())

    assert run(4)["data_skipped"] == 2  # 2 epochs of 16: each bad image met twice or more, in two workers
    assert run(6)["data_skipped"] == 2  # resumed at step 4: the count carries over, not restarted
    good = tmp_path / "good"
    good.mkdir()
    for row in rows[:3] + rows[5:]:
        (good / row["file_name"]).write_bytes((folder / row["file_name"]).read_bytes())
    write_metadata(good, rows[:3] + rows[5:])
    assert run(2, "resume=none", source=good)["data_skipped"] == 0  # a fresh start forgets the old run's skips


@pytest.mark.slow
def test_loader_bench_layouts_hold_the_same_pairs_and_its_report_is_consistent(tmp_path):
    from benchmarks import loader_bench
    from mmsoftmoe.data import ShardStream, load_pairs

    shards, folder = loader_bench.write_data(tmp_path / "data", samples=10, shards=3, side=16)
    def pixels(image: Image.Image) -> torch.Tensor:
        return torch.as_tensor(np.array(image))

    streamed = next(iter(ShardStream(shards, transform=pixels).batches(micro_batch=10, num_workers=0, seed=0)))
    mapped = load_pairs(str(folder), transform=pixels, cache_dir=str(tmp_path / "cache"))
    by_caption = {t: i.numpy().tobytes() for t, i in zip(streamed["text"], streamed["image"], strict=True)}
    assert by_caption == {s["text"]: s["image"].numpy().tobytes() for s in (mapped[i] for i in range(10))}

    result = loader_bench.main(["--model", "SoftMoE-Micro-4-32", "--batch", "4", "--samples", "12", "--shards", "2",
                                "--image-px", "16", "--batches", "2", "--workers", "0,1", "--step-samples-per-s",
                                "50", "--out", str(tmp_path / "bench.json")])
    assert [(r["path"], r["workers"]) for r in result["rows"]] == [
        ("webdataset stream", 0), ("webdataset stream", 1), ("image folder", 0), ("image folder", 1)]
    assert all(r["vs_step"] == pytest.approx(r["samples_per_s"] / 50) for r in result["rows"])
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == result["rows"]
