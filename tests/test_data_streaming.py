"""The training stream of WebDataset shards (`ShardStream` through `build_train_loader`): endless, split across
processes and workers, shards shuffled per epoch or resampled, a seeded shuffle window, bad samples replaced without
shifting positions, and a resume that equals the uninterrupted stream sample for sample while reading little.

Sample n of the generated shards is a solid colour that encodes n and carries the caption "sample n", so the
expected stream can be written down from the seeded permutations alone (the independent reference).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmsoftmoe.data import ShardStream, count_skipped, shard_writer, train_transform
from mmsoftmoe.data.shards import _ShardReader
from mmsoftmoe_training.data import build_train_loader

SHARD_SIZE = 4


def colour(n: int) -> tuple[int, int, int]:
    return (5 * n % 256, 255 - 3 * n % 256, 60)


def write_shards(folder: Path, num_shards: int, bad: tuple[int, ...] = (), first: int = 0) -> list[str]:
    """`num_shards` tars of SHARD_SIZE samples, sample `first + n` in shard n // SHARD_SIZE; samples in `bad` are
    corrupt."""
    def samples():
        for n in range(first, first + num_shards * SHARD_SIZE):
            buffer = io.BytesIO()
            Image.new("RGB", (12, 12), colour(n)).save(buffer, "PNG")
            image = b"not an image" if n in bad else buffer.getvalue()
            yield f"s{n:04d}", {"png": image, "txt": f"sample {n}".encode()}

    return shard_writer.write_shards(samples(), folder, SHARD_SIZE, pattern="shard-{:03d}.tar")


def loader(shards: list[str], *, batch: int, steps: int, start_step: int = 0, workers: int = 0, rank: int = 0,
           world: int = 1, accum: int = 1, seed: int = 0, **stream_kwargs):
    stream = ShardStream(shards, transform=train_transform(8, scale=(0.3, 1.0)), rank=rank, world_size=world,
                         **stream_kwargs)
    return build_train_loader(stream, global_batch=batch, grad_accum_steps=accum, rank=rank, world_size=world,
                              seed=seed, start_step=start_step, total_steps=steps, num_workers=workers,
                              pin_memory=False)


def take(batches, count: int) -> list[dict]:
    return [next(batches) for _ in range(count)]


def numbers(batch: dict) -> list[int]:
    return [int(text.split()[1]) for text in batch["text"]]


def test_a_stream_outlasts_its_data_one_shard_permutation_per_epoch(tmp_path):
    shards = write_shards(tmp_path, 3)  # 12 samples; 10 steps of 4 read them 3.3 times
    got = [numbers(b) for b in take(loader(shards, batch=4, steps=10, seed=7), 10)]
    for epoch in range(3):
        order = np.random.default_rng([7, epoch]).permutation(3)
        expected = [[s * SHARD_SIZE + i for i in range(SHARD_SIZE)] for s in order]
        assert got[3 * epoch:3 * epoch + 3] == expected, epoch
    assert got[9] == [s * SHARD_SIZE + i for s in np.random.default_rng([7, 3]).permutation(3)[:1]
                      for i in range(SHARD_SIZE)]


def test_images_travel_with_their_captions(tmp_path):
    shards = write_shards(tmp_path, 2)
    stream = ShardStream(shards, shuffle_buffer=3, transform=lambda im: torch.as_tensor(np.array(im)))
    for batch in take(iter(stream.batches(micro_batch=2, num_workers=0, seed=0)), 4):
        for pixels_HWC, n in zip(batch["image"], numbers(batch), strict=True):
            assert pixels_HWC[3, 3].tolist() == list(colour(n))


def test_shuffle_buffer_permutes_within_each_window(tmp_path):
    shards = write_shards(tmp_path, 5)  # 20 samples in shard order 0..19
    got = [n for b in take(loader(shards, batch=5, steps=4, seed=3, shuffle_buffer=5), 4) for n in numbers(b)]
    expected = [5 * w + j for w in range(4) for j in np.random.default_rng([3, 0, w]).permutation(5)]
    epoch_order = np.random.default_rng([3, 0]).permutation(5)
    stream_order = [s * SHARD_SIZE + i for s in epoch_order for i in range(SHARD_SIZE)]
    assert got == [stream_order[p] for p in expected]
    assert got != stream_order[:20]  # the window really reorders


def test_resampled_shards_are_drawn_with_replacement_deterministically(tmp_path):
    shards = write_shards(tmp_path, 3)
    draws = np.random.default_rng([11, 0]).integers(3, size=6)  # stream 0 of the only process and worker
    assert len(set(draws.tolist())) < 6  # the reference itself repeats shards: with replacement
    got = [numbers(b) for b in take(loader(shards, batch=4, steps=6, seed=11, resampled=True), 6)]
    assert got == [[s * SHARD_SIZE + i for i in range(SHARD_SIZE)] for s in draws]
    again = [numbers(b) for b in take(loader(shards, batch=4, steps=6, seed=11, resampled=True), 6)]
    other = [numbers(b) for b in take(loader(shards, batch=4, steps=6, seed=12, resampled=True), 6)]
    assert again == got and other != got


def test_fewer_shards_than_readers_is_an_error_naming_the_counts(tmp_path):
    shards = write_shards(tmp_path, 3)
    with pytest.raises(ValueError, match=r"3 shard\(s\) for 2 process\(es\) x 2 data worker\(s\) = 4 readers.*"
                                         r"data.num_workers.*data.resampled=true"):
        loader(shards, batch=4, steps=2, workers=2, world=2)
    loader(shards, batch=4, steps=2, workers=2, world=2, resampled=True)  # drawn with replacement: allowed


def test_processes_and_workers_read_disjoint_shards(tmp_path):
    shards = write_shards(tmp_path, 4)
    seen = []
    for rank in range(2):
        # 4 micro-batches of 2 per process: 2 from each of its workers, one epoch of each worker's single shard.
        batches = take(loader(shards, batch=4, steps=4, workers=2, rank=rank, world=2, seed=5), 4)
        seen.append({n for b in batches for n in numbers(b)})
    assert len(seen[0]) == len(seen[1]) == 8 and seen[0] | seen[1] == set(range(16))


def expected_with_replacements(order: list[int], bad: set[int], batch: int, batches: int) -> list[list[int]]:
    """The replacement rule written out: a bad slot takes the next good sample after its batch, in order."""
    out = []
    for b in range(batches):
        slots, spare = order[b * batch:(b + 1) * batch], (b + 1) * batch
        row = []
        for n in slots:
            if n in bad:
                while order[spare] in bad:
                    spare += 1
                n, spare = order[spare], spare + 1
            row.append(n)
        out.append(row)
    return out


def test_bad_samples_are_replaced_by_look_ahead_and_counted_once(tmp_path):
    shards = write_shards(tmp_path, 2, bad=(1, 2))
    log = tmp_path / "skipped.jsonl"
    got = [numbers(b) for b in take(loader(shards, batch=4, steps=4, seed=1, skip_log=log), 4)]
    order = [s * SHARD_SIZE + i for e in range(4) for s in np.random.default_rng([1, e]).permutation(2)
             for i in range(SHARD_SIZE)]
    assert got == expected_with_replacements(order, {1, 2}, batch=4, batches=4)
    assert count_skipped(log) == 2  # met in two epochs and in look-ahead, counted once each


def test_stream_skips_are_counted_once_across_workers(tmp_path):
    shards = write_shards(tmp_path, 2, bad=(1, 2, 6))
    log = tmp_path / "skipped.jsonl"
    take(loader(shards, batch=2, steps=8, workers=2, skip_log=log), 8)  # each worker reads its shard twice
    assert count_skipped(log) == 3


@pytest.mark.parametrize("workers,accum,batch,start_step", [
    (0, 1, 4, 2),  # resumes at stream position 8: a shard boundary, inside a shuffle window
    (0, 1, 2, 3),  # position 6: mid-shard, a window boundary
    (2, 2, 4, 3),  # two workers, two micro-batches per step: micro-batch 6 = stream 0's position 3, mid-shard
    (2, 1, 2, 5),  # micro-batch 5 comes from stream 1: the resumed loader's worker 0 must serve stream 1
])
def test_resume_equals_the_uninterrupted_stream(tmp_path, workers, accum, batch, start_step):
    shards = write_shards(tmp_path, 6, bad=(5,))
    kwargs = dict(batch=batch, steps=8, workers=workers, accum=accum, seed=2, shuffle_buffer=6)
    full = take(loader(shards, **kwargs), 8 * accum)
    resumed = take(loader(shards, start_step=start_step, **kwargs), (8 - start_step) * accum)
    for a, b in zip(full[start_step * accum:], resumed, strict=True):
        assert a["text"] == b["text"]
        assert torch.equal(a["image"], b["image"])  # augmentation included


def test_resume_reads_one_window_not_the_samples_consumed(tmp_path, monkeypatch):
    shards = write_shards(tmp_path, 8)  # 32 samples
    reads = []
    real = _ShardReader.read

    def counted(self, shard, sample):
        reads.append(sample[0])
        return real(self, shard, sample)

    monkeypatch.setattr(_ShardReader, "read", counted)
    take(loader(shards, batch=2, steps=20, start_step=13, shuffle_buffer=6), 1)  # position 26, in window 4
    assert len(reads) == 6  # window 4 (positions 24..29) only, not the 26 samples before it


@pytest.mark.slow
def test_a_streaming_training_run_outlasts_its_data(tmp_path):
    import mmsoftmoe_training.main as train_main
    from mmsoftmoe_training.config import load_config

    write_shards(tmp_path / "shards", 2)  # 8 pairs; 5 steps of 4 read them 2.5 times
    cfg = load_config(Path(train_main.__file__).parents[1] / "configs" / "smoke.yaml", [
        f"output_dir={tmp_path / 'run'}", f"data.source={tmp_path / 'shards'}/*.tar", "data.streaming=true",
        "data.num_workers=0", "eval.dataset=none", "batch_size=4", "steps=5", "checkpoint_every=100", "trackers=[]"])
    train_main.fit(cfg)
    assert (tmp_path / "run/final/trainer_state.json").is_file()


def test_skip_log_lines_are_distinct_across_workers_epochs_and_resumes(tmp_path):
    shards = write_shards(tmp_path, 2, bad=(1, 2, 6))
    log = tmp_path / "skipped.jsonl"
    take(loader(shards, batch=2, steps=8, workers=2, skip_log=log), 8)  # each worker meets its bad samples twice
    take(loader(shards, batch=2, steps=8, start_step=3, workers=2, skip_log=log), 5)  # a resume meets them again
    lines = log.read_text().splitlines()
    assert len(lines) == len(set(lines)) == count_skipped(log) == 3


def test_a_truncated_shard_is_reported_once_and_its_cut_sample_as_truncated(tmp_path, caplog):
    shards = write_shards(tmp_path, 2)
    whole = Path(shards[1]).read_bytes()
    Path(shards[1]).write_bytes(whole[:3 * 2048 + 700])  # samples of 4 blocks of 512 bytes: cut in sample 7
    log = tmp_path / "skipped.jsonl"
    with caplog.at_level("WARNING"):
        got = [n for b in take(loader(shards, batch=3, steps=6, seed=4, skip_log=log), 6) for n in numbers(b)]
    assert set(got) == set(range(7)) - {7}  # three epochs: samples 4..6 of the cut shard are read, 7 never
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert entries == [{"source": shards[1], "key": "s0007", "reason": entries[0]["reason"]}]
    assert entries[0]["reason"].startswith("truncated shard")
    assert sum("truncated" in r.getMessage() for r in caplog.records) == 1
