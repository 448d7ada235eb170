"""Image-text pairs from files: every format read from files made here, bad samples skipped and counted, streaming
split across ranks and workers, the tokenizer path offline, and the errors a user can cause.

Each good image is a solid colour that encodes its caption's number, so a test can check that every image still
travels with its own caption (an independent reference for the pairing).
"""

from __future__ import annotations

import io
import json
import logging
import socket
import tarfile

import datasets
import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mmsoftmoe.data import (
    FORMATS,
    IterablePairDataset,
    PairDataset,
    ShapesCaptions,
    collate,
    eval_transform,
    load_pairs,
)

GOOD = 6  # good samples per file set; each set also holds one corrupt image and one empty caption


def colour_of(index: int) -> tuple[int, int, int]:
    return (30 * index + 20, 200 - 25 * index, 90)


def image_bytes(index: int, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 10), colour_of(index)).save(buffer, format=fmt)
    return buffer.getvalue()


def corrupt_bytes() -> bytes:
    return np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes()


def records() -> list[tuple[str, bytes, str]]:
    """(key, encoded image, caption): GOOD good ones, a corrupt jpg and an empty caption, interleaved."""
    rows = [(f"s{i}", image_bytes(i, "JPEG" if i % 2 else "PNG"), f"sample {i}") for i in range(GOOD)]
    rows.insert(2, ("corrupt", corrupt_bytes(), "sample 99"))
    rows.insert(5, ("blank", image_bytes(7), "   "))
    return rows


def extension(data: bytes) -> str:
    return "png" if data.startswith(b"\x89PNG") else "jpg"


def check_pairs(samples: list[dict]) -> None:
    """Every sample's image colour matches the number in its caption (jpeg: within a small tolerance)."""
    assert samples
    for sample in samples:
        index = int(sample["text"].split()[1])
        pixels = np.asarray(sample["image"]).reshape(-1, 3).mean(0)
        assert np.abs(pixels - colour_of(index)).max() < 6, sample["text"]


def check_skips(data: PairDataset | IterablePairDataset, keys: tuple = ("corrupt", "blank")) -> None:
    """One bad image and one empty caption counted, reported under their keys (file names, else row indices)."""
    assert (data.num_bad_images, data.num_empty_captions, data.num_skipped) == (1, 1, 2)
    reported = [str(key) for key, _ in data.skipped_examples]
    assert len(reported) == len(keys) and all(str(k) in r for k, r in zip(keys, reported, strict=True)), reported


def read_all(data: PairDataset | IterablePairDataset) -> list[dict]:
    return [data[i] for i in range(len(data))] if isinstance(data, PairDataset) else list(data)


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf_cache")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def write_imagefolder(folder, metadata: str, caption_column: str):
    folder.mkdir()
    rows = []
    for key, data, caption in records():
        name = f"{key}.{extension(data)}" if key != "corrupt" else "corrupt.jpg"
        (folder / name).write_bytes(data)
        rows.append({"file_name": name, caption_column: caption})
    if metadata == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        lines = [f"file_name,{caption_column}"] + [f"{r['file_name']},{r[caption_column]}" for r in rows]
        (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


def write_shards(folder, num_shards: int) -> list[str]:
    """WebDataset tar shards, records dealt round-robin; jpg and png mixed within a shard."""
    folder.mkdir()
    paths = [str(folder / f"shard-{s:03d}.tar") for s in range(num_shards)]
    tars = [tarfile.open(p, "w") for p in paths]
    for position, (key, data, caption) in enumerate(records()):
        ext = "jpg" if key == "corrupt" else extension(data)
        for name, payload in ((f"{key}.{ext}", data), (f"{key}.txt", caption.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tars[position % num_shards].addfile(info, io.BytesIO(payload))
    for tar in tars:
        tar.close()
    return paths


@pytest.mark.parametrize("metadata,caption_column", [("jsonl", "description"), ("csv", "text")])
@pytest.mark.parametrize("streaming", [False, True])
def test_imagefolder(tmp_path, cache, metadata, caption_column, streaming):
    folder = write_imagefolder(tmp_path / "images", metadata, caption_column)
    kwargs = {"caption_column": "description"} if caption_column == "description" else {}  # "text" is found
    data = load_pairs(str(folder), streaming=streaming, cache_dir=cache, **kwargs)
    samples = read_all(data)
    check_pairs(samples)
    check_skips(data)
    assert {s["text"] for s in samples} == {f"sample {i}" for i in range(GOOD)}


def test_parquet_with_hf_image_feature(tmp_path, cache):
    rows = records()
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": d, "path": None} for _, d, _ in rows], "caption": [c for _, _, c in rows]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )
    table.to_parquet(str(tmp_path / "pairs.parquet"))
    data = load_pairs(str(tmp_path / "pairs.parquet"), cache_dir=cache)
    assert len(data) == len(rows)
    samples = read_all(data)
    check_pairs(samples)
    check_skips(data, keys=(2, 5))  # no file names in this table: rows are reported by index


@pytest.mark.parametrize("as_struct", [True, False])
def test_parquet_written_by_pyarrow_with_custom_columns(tmp_path, cache, as_struct):
    rows = records()
    images = [{"bytes": d, "path": f"{k}.img"} for k, d, _ in rows] if as_struct else [d for _, d, _ in rows]
    table = pa.table({"url": [k for k, _, _ in rows], "img": images, "alt": [c for _, _, c in rows]})
    for part in range(2):
        pq.write_table(table.slice(part * 4, 4), str(tmp_path / f"part{part}.parquet"))
    data = load_pairs(str(tmp_path), "parquet", image_column="img", caption_column="alt", streaming=True)
    samples = list(data)
    check_pairs(samples)
    check_skips(data, keys=("corrupt", "blank") if as_struct else (2, 5))
    assert len(samples) == GOOD


def test_arrow_files_saved_by_datasets(tmp_path, cache):
    rows = records()
    datasets.Dataset.from_dict({"jpg": [d for _, d, _ in rows], "txt": [c for _, _, c in rows]}).save_to_disk(
        str(tmp_path / "saved")
    )
    data = load_pairs(str(tmp_path / "saved"), cache_dir=cache)  # image and caption columns found by name
    samples = read_all(data)
    check_pairs(samples)
    check_skips(data, keys=(2, 5))


@pytest.mark.parametrize("streaming", [False, True])
def test_webdataset_shards_mixing_jpg_and_png(tmp_path, cache, streaming):
    shards = write_shards(tmp_path / "shards", num_shards=2)
    data = load_pairs(str(tmp_path / "shards" / "*.tar"), streaming=streaming, cache_dir=cache)
    samples = read_all(data)
    check_pairs(samples)
    check_skips(data)
    assert {s["text"] for s in samples} == {f"sample {i}" for i in range(GOOD)}
    assert isinstance(load_pairs(shards, cache_dir=cache), PairDataset)  # a list of files works too


@pytest.mark.parametrize("num_shards", [2, 1])  # by shards; by examples (1 shard does not divide over 2 ranks)
def test_streaming_split_across_ranks_is_a_partition(tmp_path, num_shards):
    shards = write_shards(tmp_path / "shards", num_shards)
    parts = [{s["text"] for s in load_pairs(shards, streaming=True, rank=r, world_size=2)} for r in range(2)]
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    assert parts[0] | parts[1] == {f"sample {i}" for i in range(GOOD)}


def test_streaming_with_more_workers_than_shards(tmp_path):
    shards = write_shards(tmp_path / "shards", num_shards=1)
    data = load_pairs(shards, streaming=True, transform=eval_transform(8))
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=2, collate_fn=collate)
    texts = [t for batch in loader for t in batch["text"]]  # the worker without a shard must not fail
    assert sorted(texts) == [f"sample {i}" for i in range(GOOD)]


def test_map_style_keeps_batches_full_with_workers(tmp_path, cache):
    folder = write_imagefolder(tmp_path / "images", "jsonl", "caption")
    data = load_pairs(str(folder), cache_dir=cache, transform=eval_transform(8))
    loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=2, collate_fn=collate)
    batches = list(loader)
    assert [b["image"].shape[0] for b in batches] == [4, 4]  # 8 samples, 2 of them replaced, none dropped
    assert all(t.startswith("sample ") and t != "sample 99" for b in batches for t in b["text"])


def test_tokenizer_offline_and_collate(tmp_path, cache, no_network):
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    shards = write_shards(tmp_path / "shards", num_shards=1)
    data = load_pairs(shards, cache_dir=cache, transform=eval_transform(16), tokenizer=tokenizer)
    batch = collate([data[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["text"].shape == (4, 77) and batch["text"].dtype == torch.long
    first_caption = next(c for _, _, c in records())
    assert torch.equal(batch["text"][0], tokenizer([first_caption])[0])
    assert tokenizer.decode(batch["text"][0].tolist()).startswith("<start_of_text>sample 0")


def test_shapes_go_through_the_same_wrapper(no_network):
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    shapes = ShapesCaptions(6, image_size=32)
    data = PairDataset(shapes, transform=eval_transform(32), tokenizer=tokenizer)
    batch = collate([data[i] for i in range(6)])
    assert batch["image"].shape == (6, 3, 32, 32) and batch["text"].shape == (6, 77)
    assert torch.equal(batch["text"][5], tokenizer([shapes[5]["caption"]])[0])
    assert data.num_skipped == 0


def test_skips_are_logged_with_their_keys(tmp_path, cache, caplog):
    shards = write_shards(tmp_path / "shards", num_shards=1)
    with caplog.at_level(logging.WARNING, logger="mmsoftmoe.data.pairs"):
        list(load_pairs(shards, streaming=True))
    messages = [r.getMessage() for r in caplog.records if r.name == "mmsoftmoe.data.pairs"]
    assert len(messages) == 2
    assert any("corrupt" in m and "unreadable image" in m for m in messages)
    assert any("blank" in m and "empty caption" in m for m in messages)


def test_collate_drops_none_and_rejects_untransformed_images():
    sample = {"image": torch.zeros(3, 4, 4), "text": torch.ones(5, dtype=torch.long)}
    batch = collate([sample, None, sample])
    assert batch["image"].shape == (2, 3, 4, 4) and batch["text"].shape == (2, 5)
    with pytest.raises(ValueError, match="every sample"):
        collate([None, None])
    with pytest.raises(ValueError, match="transform"):
        collate([{"image": Image.new("RGB", (4, 4)), "text": "a"}])


def test_all_bad_data_raises_naming_the_source(tmp_path, cache):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(corrupt_bytes())
    (folder / "b.png").write_bytes(image_bytes(1))
    rows = [{"file_name": "a.jpg", "caption": "x"}, {"file_name": "b.png", "caption": ""}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_pairs(str(folder), cache_dir=cache)
    with pytest.raises(ValueError, match="bad.*no.*readable"):
        data[0]
    with pytest.raises(ValueError, match="bad.*readable"):
        list(load_pairs(str(folder), streaming=True))


def test_empty_sources_raise_naming_the_source(tmp_path, cache):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_pairs(str(empty), cache_dir=cache)
    pq.write_table(pa.table({"image": pa.array([], pa.binary()), "caption": pa.array([], pa.string())}),
                   str(tmp_path / "none.parquet"))
    with pytest.raises(ValueError, match="none.parquet"):
        load_pairs(str(tmp_path / "none.parquet"), cache_dir=cache)
    with tarfile.open(tmp_path / "nothing.tar", "w"):
        pass
    with pytest.raises(ValueError, match="nothing.tar"):
        list(load_pairs(str(tmp_path / "nothing.tar"), streaming=True))


def test_user_errors(tmp_path, cache):
    with pytest.raises(ValueError, match="valid formats are.*imagefolder.*webdataset"):
        load_pairs(str(tmp_path), "tfrecord")
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        load_pairs(str(tmp_path / "missing.tar"))
    with pytest.raises(FileNotFoundError, match="nomatch"):
        load_pairs(str(tmp_path / "nomatch-*.tar"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="cannot infer the format.*pass format="):
        load_pairs(str(tmp_path / "notes.txt"))
    pq.write_table(pa.table({"img": [image_bytes(0)], "alt": ["a"]}), str(tmp_path / "p.parquet"))
    with pytest.raises(ValueError, match=r"no caption column.*\['img', 'alt'\].*caption_column="):
        load_pairs(str(tmp_path / "p.parquet"), image_column="img", cache_dir=cache)
    with pytest.raises(ValueError, match="rank"):
        load_pairs(str(tmp_path / "p.parquet"), streaming=True, rank=2, world_size=2)
    assert set(FORMATS) == {"imagefolder", "parquet", "arrow", "webdataset", "csv"}
