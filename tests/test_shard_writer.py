"""`mmsoftmoe shards`: pair files (image folder, CSV, parquet) into WebDataset shards that hold the same pairs in
the same order, skip and list unusable inputs, are byte-identical on a rerun, never half-written, never overwrite,
and train exactly like the source they came from (the map-style run on the source is the reference).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from safetensors.torch import load_file

import mmsoftmoe_cli
from mmsoftmoe.data import TarShard, list_shards, load_pairs, write_shards
from tests.test_data_pairs import GOOD, check_pairs, records, write_imagefolder
from tests.training_fixtures import shapes_image_folder, write_metadata


def write_parquet(path: Path) -> Path:
    rows = records()
    pq.write_table(pa.table({"image": [r[1] for r in rows], "caption": [r[2] for r in rows]}), path)
    return path


def write_csv(folder: Path) -> Path:
    write_imagefolder(folder, "jsonl", "text")
    lines = ["filepath\ttitle"] + [f"{r['file_name']}\t{r['text']}" for r in
                                   map(json.loads, (folder / "metadata.jsonl").read_text().splitlines())]
    (folder / "pairs.tsv").write_text("\n".join(lines) + "\n")
    return folder / "pairs.tsv"


def write_arrow(folder: Path) -> Path:
    rows = records()
    datasets.Dataset.from_dict({"jpg": [r[1] for r in rows], "txt": [r[2] for r in rows]}).save_to_disk(str(folder))
    return folder


SOURCES = {"imagefolder": lambda tmp: write_imagefolder(tmp / "images", "jsonl", "text"),
           "arrow": lambda tmp: write_arrow(tmp / "saved"),
           "tsv": lambda tmp: write_csv(tmp / "csvdata"),
           "parquet": lambda tmp: write_parquet(tmp / "pairs.parquet")}


def convert(*args: str) -> tuple[int, dict]:
    code = mmsoftmoe_cli.main(["shards", *args])
    out = Path(args[1])
    return code, json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}


@pytest.mark.parametrize("kind", SOURCES)
def test_each_input_kind_converts_to_the_same_pairs_with_skips_listed(tmp_path, kind, capsys):
    source = SOURCES[kind](tmp_path)
    code, summary = convert(str(source), str(tmp_path / "out"), "--samples-per-shard", "4")
    assert code == 0 and json.loads(capsys.readouterr().out)["samples"] == GOOD
    assert (summary["inputs"], summary["samples"], summary["shards"]) == (GOOD + 2, GOOD, ["shard-000000.tar",
                                                                                         "shard-000001.tar"])
    assert sorted(s["reason"].split(":")[0].split(" ")[0] for s in summary["skipped"]) == ["empty", "unreadable"]
    shards = load_pairs(str(tmp_path / "out/shard-{000000..000001}.tar"), cache_dir=str(tmp_path / "cache"))
    samples = [shards[i] for i in range(len(shards))]
    check_pairs(samples)  # every image still carries its own caption
    assert [s["text"] for s in samples] == [f"sample {i}" for i in range(GOOD)]  # the source's order


def test_reruns_are_byte_identical_and_out_is_never_overwritten(tmp_path, capsys):
    source = write_parquet(tmp_path / "pairs.parquet")
    assert convert(str(source), str(tmp_path / "a"))[0] == 0
    assert convert(str(source), str(tmp_path / "b"))[0] == 0
    assert (tmp_path / "a/shard-000000.tar").read_bytes() == (tmp_path / "b/shard-000000.tar").read_bytes()
    capsys.readouterr()
    assert convert(str(source), str(tmp_path / "a"))[0] == 2
    assert "is not an empty folder; choose a new output folder" in capsys.readouterr().err


def test_resize_shrinks_the_shorter_side_only_when_larger(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    Image.new("RGB", (120, 80), (200, 10, 10)).save(folder / "wide.jpg")
    Image.new("RGB", (20, 30), (10, 200, 10)).save(folder / "small.png")
    write_metadata(folder, [{"file_name": "wide.jpg", "text": "a red field"},
                            {"file_name": "small.png", "text": "a green field"}])
    assert convert(str(folder), str(tmp_path / "out"), "--resize", "40")[0] == 0
    with tarfile.open(tmp_path / "out/shard-000000.tar") as tar:
        sizes = {m.name.split(".")[1]: Image.open(tar.extractfile(m)).size for m in tar if not m.name.endswith("txt")}
    assert sizes == {"jpg": (60, 40), "png": (20, 30)}


def test_a_killed_conversion_leaves_no_shard_a_reader_would_take(tmp_path):
    def samples():
        for i in range(7):
            if i == 5:
                raise KeyboardInterrupt  # killed while the second shard is being written
            yield f"{i:04d}", {"txt": b"caption", "png": b"png"}

    with pytest.raises(KeyboardInterrupt):
        write_shards(samples(), tmp_path / "out", samples_per_shard=4)
    assert [Path(s).name for s in list_shards(str(tmp_path / "out"))] == ["shard-000000.tar"]
    assert not list((tmp_path / "out").glob("*.partial")) and not list((tmp_path / "out").glob(".*"))
    with pytest.raises(ValueError, match="must end in .tar"):
        TarShard(tmp_path / "x.tgz")


def train(tmp_path: Path, name: str, source: Path) -> dict:
    code = mmsoftmoe_cli.main(["train", "--config", "smoke", f"output_dir={tmp_path / name}", f"data.source={source}",
                               "data.num_workers=0", "eval.dataset=none", "batch_size=8", "steps=3",
                               "checkpoint_every=100", "trackers=[]"])
    assert code == 0
    return load_file(str(tmp_path / name / "final" / "open_clip_model.safetensors"))


@pytest.mark.slow
def test_shards_read_map_style_train_bit_identically_to_their_source(tmp_path):
    folder = tmp_path / "pairs"
    write_metadata(folder, shapes_image_folder(folder, 20))
    assert convert(str(folder), str(tmp_path / "shards"), "--samples-per-shard", "6")[0] == 0
    reference, from_shards = train(tmp_path, "folder", folder), train(tmp_path, "shards", tmp_path / "shards")
    assert reference.keys() == from_shards.keys()
    assert all(np.array_equal(reference[k].numpy(), from_shards[k].numpy()) for k in reference)
