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
    TarShard,
    collate,
    decode_image,
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
    for s, path in enumerate(paths):
        with TarShard(path) as shard:
            for key, data, caption in records()[s::num_shards]:
                shard.write(key, {"jpg" if key == "corrupt" else extension(data): data, "txt": caption.encode()})
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
    with TarShard(tmp_path / "nothing.tar"):
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


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_16_bit_greyscale_is_scaled_not_clipped():
    values = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16)
    png = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(png)).mode == "I;16"
    # By hand: v * 255 / 65535 = v / 257, rounded: 0, 1, 3.89 -> 4, 127.5 -> 128 (half to even), 255.
    expected = [0, 1, 4, 128, 255]
    rgb = np.asarray(decode_image(png))
    assert rgb.shape == (1, 5, 3) and rgb[0, :, 0].tolist() == expected and (rgb[..., 0] == rgb[..., 2]).all()
    tiff32 = encode(Image.fromarray(values.astype(np.int32)), "TIFF")  # mode "I": 32-bit integers
    assert np.asarray(decode_image(tiff32))[0, :, 1].tolist() == expected
    with pytest.raises(ValueError, match="beyond 16 bits"):
        decode_image(Image.fromarray(np.array([[70000]], dtype=np.int32)))


def test_float_images_in_0_1_are_scaled_others_refused():
    floats = np.array([[0.0, 0.5, 0.2, 1.0]], dtype=np.float32)
    tiff = encode(Image.fromarray(floats), "TIFF")
    assert np.asarray(decode_image(tiff))[0, :, 0].tolist() == [0, 128, 51, 255]  # round(255 v): 127.5 -> 128
    with pytest.raises(ValueError, match=r"float image with values in \[0, 3\], not \[0, 1\]"):
        decode_image(encode(Image.fromarray(floats * 3), "TIFF"))


def test_very_large_images_are_bounded(tmp_path, cache):
    big = Image.new("RGB", (2400, 1600), (200, 40, 40))
    jpeg = decode_image(encode(big, "JPEG"), max_pixels=300_000)  # 3.84 MP: decoded at 1/4 scale, 0.24 MP
    assert jpeg.size == (600, 400) and np.abs(np.asarray(jpeg).astype(int) - (200, 40, 40)).max() < 4
    with pytest.raises(ValueError, match="2400x1600 = 3840000 pixels is more than max_pixels=300000"):
        decode_image(encode(big, "PNG"), max_pixels=300_000)  # no reduced decode for PNG: refused before decoding
    rows = [{"image": encode(big, "PNG"), "caption": "big"}, {"image": image_bytes(1), "caption": "sample 1"}]
    data = PairDataset(rows, max_pixels=300_000)
    assert data[0]["text"] == "sample 1" and data.num_bad_images == 1  # skipped and counted


def test_eval_reads_images_with_the_same_decoder(tmp_path, monkeypatch):
    from mmsoftmoe_eval.images import open_rgb

    png16 = encode(Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)), "PNG")
    assert np.array_equal(np.asarray(open_rgb(png16)), np.asarray(decode_image(png16)))
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    jpeg = encode(Image.fromarray(noise), "JPEG")
    assert open_rgb(jpeg[:len(jpeg) // 2]) is None  # truncated file: skipped, not raised
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 100x100 image is now past twice PIL's bomb limit
    assert open_rgb(encode(Image.new("L", (100, 100)), "PNG")) is None


def write_csv(folder, name: str, sep: str, columns: tuple[str, str], indices: range) -> None:
    """open_clip's CSV layout: a header, one image path (relative to the file's folder) and caption per row."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = [sep.join(columns)]
    for i in indices:
        (folder / "img" / f"{i}.png").write_bytes(image_bytes(i))
        lines.append(sep.join([f"img/{i}.png", f"sample {i}, with a comma"]))
    (folder / name).write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("streaming", [False, True])
def test_csv_and_tsv_in_the_open_clip_layout(tmp_path, cache, monkeypatch, streaming):
    write_csv(tmp_path / "a", "pairs.tsv", "\t", ("filepath", "title"), range(0, 3))
    write_csv(tmp_path / "b", "more.tsv", "\t", ("filepath", "title"), range(3, 5))
    write_csv(tmp_path / "c", "pairs.csv", ";", ("path", "alt"), range(5, 6))
    monkeypatch.chdir(tmp_path / "c")  # paths resolve against each file's folder, not the working directory
    tsvs = [str(tmp_path / "a" / "pairs.tsv"), str(tmp_path / "b" / "more.tsv")]
    samples = read_all(load_pairs(tsvs, cache_dir=cache, streaming=streaming))  # csv, tab, filepath/title: inferred
    check_pairs([{**s, "text": s["text"].replace(",", "")} for s in samples])
    assert sorted(s["text"] for s in samples) == [f"sample {i}, with a comma" for i in range(5)]
    data = load_pairs(str(tmp_path / "c" / "pairs.csv"), image_column="path", caption_column="alt",
                      csv_separator=";", cache_dir=cache, streaming=streaming)
    assert [s["text"] for s in read_all(data)] == ["sample 5, with a comma"]
    with pytest.raises(ValueError, match=r"pairs.csv has no image column 'filepath'; its columns are \['path;alt'\] "
                                         r"\(separator ','\).*csv_separator"):
        load_pairs(str(tmp_path / "c" / "pairs.csv"), cache_dir=cache)
    typed = load_pairs(tsvs[1], csv_separator="\\t", cache_dir=cache)  # "\t" as typed on a command line
    assert len(read_all(typed)) == 2
    with pytest.raises(ValueError, match="csv_separator must be one character"):
        load_pairs(tsvs[1], csv_separator="::", cache_dir=cache)
