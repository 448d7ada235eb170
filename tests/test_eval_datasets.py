"""Evaluation datasets: class folders (with a corrupt file and a name mapping), Hugging Face splits, digits, specs."""

import json
import logging

import datasets
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from mmsoftmoe_eval.datasets import _folder_classnames, build_dataset, digits_split
from mmsoftmoe_eval.features import extract_features, make_loader

COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "sea_lion": (30, 30, 200)}


def to_tensor(image: Image.Image) -> torch.Tensor:
    return pil_to_tensor(image.resize((8, 8))).float() / 255


def mean_colour(images: torch.Tensor) -> torch.Tensor:
    return images.mean(dim=(2, 3))


@pytest.fixture
def folder_root(tmp_path):
    for split, count in (("train", 3), ("val", 2)):
        for name, colour in COLOURS.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (12, 10), colour).save(tmp_path / split / name / f"{i}.jpg")
    (tmp_path / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("ignored: not an image")
    return tmp_path


def test_class_folder_with_mapping_skips_and_counts_the_corrupt_image(folder_root, caplog):
    mapping = folder_root / "names.json"
    mapping.write_text(json.dumps({"cat": "tabby cat", "dog": "golden retriever", "sea_lion": "sea lion"}))
    dataset = build_dataset(f"folder:{folder_root}:{mapping}", "train", to_tensor)
    assert dataset.classnames == ["tabby cat", "golden retriever", "sea lion"]
    assert len(dataset) == 10 and dataset.templates == ["a photo of a {}."]
    with caplog.at_level(logging.WARNING):
        features, labels = extract_features(mean_colour, make_loader(dataset, batch_size=4), desc="folder")
    assert "skipped 1 unreadable" in caplog.text and "broken.jpg" in caplog.text
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    expected = torch.tensor([COLOURS[name] for name in ("cat", "dog", "sea_lion")]).float() / 255
    torch.testing.assert_close(features, expected[labels], atol=0.02, rtol=0)  # each image has its folder's colour


def test_class_folder_names_and_errors(folder_root, tmp_path_factory):
    assert build_dataset(f"folder:{folder_root}", "val").classnames == ["cat", "dog", "sea lion"]
    keras_style = folder_root / "index.json"
    keras_style.write_text(json.dumps({"0": ["cat", "Cat"], "1": ["dog", "Dog"]}))
    with pytest.raises(ValueError, match=r"no name for class folder\(s\) \['sea_lion'\]"):
        build_dataset(f"folder:{folder_root}:{keras_style}", "val")
    with pytest.raises(FileNotFoundError, match=r"it has splits \['train', 'val'\]"):
        build_dataset(f"folder:{folder_root}", "test")
    with pytest.raises(FileNotFoundError, match="root does not exist"):
        build_dataset(f"folder:{folder_root}/missing", "train")
    (folder_root / "val" / "empty_class").mkdir()
    with pytest.raises(ValueError, match=r"\['empty_class'\].*hold no images"):
        build_dataset(f"folder:{folder_root}", "val")


def test_imagenet_wnid_folders_get_open_clip_names_and_templates():
    wnids = [f"n{i:08d}" for i in range(1000)]
    names, templates = _folder_classnames(wnids, None)
    assert names == list(open_clip.IMAGENET_CLASSNAMES) and len(templates) == 80
    assert templates[0].format("goldfish") == open_clip.OPENAI_IMAGENET_TEMPLATES[0]("goldfish")
    names, _ = _folder_classnames([f"class{i}" for i in range(1000)], None)
    assert names[0] == "class0"


@pytest.fixture
def hf_dataset():
    labels = [0, 1, 2, 1, 0, 2]
    images = [Image.new("RGB", (6, 6), (40 * label, 0, 0)) for label in labels]
    features = datasets.Features({"img": datasets.Image(), "kind": datasets.ClassLabel(names=["ant", "bee", "cow"])})
    return datasets.Dataset.from_dict({"img": images, "kind": labels}, features=features)


def test_hf_saved_dataset_dict_and_parquet(hf_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")  # keep ~/.cache untouched
    datasets.DatasetDict({"train": hf_dataset, "test": hf_dataset.select([0, 1])}).save_to_disk(tmp_path / "saved")
    test = build_dataset(f"hf:{tmp_path / 'saved'}:img:kind", "test", to_tensor)
    assert test.classnames == ["ant", "bee", "cow"] and len(test) == 2
    image, label = test[1]
    assert label == 1 and image.shape == (3, 8, 8) and image[0].mean().item() == pytest.approx(40 / 255, abs=0.01)
    with pytest.raises(ValueError, match=r"no split 'val'; it has \['train', 'test'\]"):
        build_dataset(f"hf:{tmp_path / 'saved'}:img:kind", "val")

    hf_dataset.to_parquet(str(tmp_path / "train.parquet"))
    train = build_dataset(f"hf:{tmp_path}/{{split}}.parquet:img:kind", "train")
    assert train.classnames == ["ant", "bee", "cow"]
    assert [train[i][1] for i in range(len(train))] == [0, 1, 2, 1, 0, 2]


def test_hf_errors(hf_dataset, tmp_path):
    hf_dataset.save_to_disk(tmp_path / "one")
    with pytest.raises(ValueError, match="No column 'image'"):
        build_dataset(f"hf:{tmp_path / 'one'}", "train")
    plain = hf_dataset.cast_column("kind", datasets.Value("int64"))
    plain.save_to_disk(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a ClassLabel: cast it"):
        build_dataset(f"hf:{tmp_path / 'plain'}:img:kind", "train")
    with pytest.raises(FileNotFoundError):
        build_dataset(f"hf:{tmp_path / 'nowhere'}", "train")


def test_digits_split_is_fixed_disjoint_and_complete():
    from sklearn.datasets import load_digits

    train_images, train_labels = digits_split("train")
    test_images, test_labels = digits_split("test")
    assert len(train_labels) == 1437 and len(test_labels) == 360
    again_images, again_labels = digits_split("test")
    assert np.array_equal(again_images, test_images) and np.array_equal(again_labels, test_labels)
    everything = load_digits()
    rows = sorted(map(bytes, np.concatenate([train_images, test_images]).reshape(1797, -1)))
    reference = np.round(everything.images * 255 / 16).astype(np.uint8).reshape(1797, -1)
    assert rows == sorted(map(bytes, reference))  # together they are exactly the whole set
    assert set(test_labels.tolist()) == set(range(10))
    dataset = build_dataset("digits", "test")
    image, label = dataset[0]
    assert dataset.classnames[:3] == ["zero", "one", "two"] and len(dataset.classnames) == 10
    assert image.mode == "RGB" and image.size == (8, 8) and label == test_labels[0]


def test_shapes_and_bad_specs():
    shapes = build_dataset("shapes", "test")
    assert len(shapes) == 500 and len(shapes.classnames) == 30 and shapes.templates
    with pytest.raises(ValueError, match="valid specs: digits, shapes, folder"):
        build_dataset("imagenet", "train")
    with pytest.raises(ValueError, match="Bad dataset spec 'digits:/x'"):
        build_dataset("digits:/x", "train")
    with pytest.raises(ValueError, match="'train' and 'test'"):
        build_dataset("digits", "val")


def test_class_names_and_templates_from_files_next_to_the_data_or_given(folder_root, tmp_path):
    (folder_root / "classnames.txt").write_text("tabby cat\nbeagle\nsea lion\n")
    (folder_root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\nart of the {c}.\n")
    dataset = build_dataset(f"folder:{folder_root}", "val")
    assert dataset.classnames == ["tabby cat", "beagle", "sea lion"]  # label order: sorted class folders
    assert dataset.templates == ["a photo of a {}.", "art of the {}."]  # CLIP_benchmark's {c} -> open_clip's {}
    names = tmp_path / "names.json"  # CLIP_benchmark's --custom_classname_file form: dataset name -> list
    names.write_text(json.dumps({folder_root.name: ["c", "d", "s"], "other": ["x"]}))
    given = build_dataset(f"folder:{folder_root}", "val", classnames_file=names)
    assert given.classnames == ["c", "d", "s"] and given.templates == ["a photo of a {}.", "art of the {}."]
    (tmp_path / "two.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"two.txt lists 2 class names but .* has 3 classes: give one name per class"):
        build_dataset(f"folder:{folder_root}", "val", classnames_file=tmp_path / "two.txt")
    names.write_text(json.dumps({"other": ["x"]}))
    with pytest.raises(ValueError, match=rf"has no entry '{folder_root.name}' \(it has \['other'\]\)"):
        build_dataset(f"folder:{folder_root}", "val", classnames_file=names)


def test_class_folders_without_a_split_folder_are_read_as_the_split(folder_root):
    """ImageNet's `val/<wnid>/` layout: `folder:ROOT/val` reads the class folders directly, as `folder:ROOT` does
    with split `val`; a root of split folders still needs its split."""
    via_split = build_dataset(f"folder:{folder_root}", "val", to_tensor)
    direct = build_dataset(f"folder:{folder_root / 'val'}", "test", to_tensor)  # any split name: the one split
    assert direct.classnames == via_split.classnames == ["cat", "dog", "sea lion"]
    assert len(direct) == len(via_split) == 6
    assert [label for _, label in direct] == [label for _, label in via_split]
    torch.testing.assert_close(torch.stack([image for image, _ in direct]),
                               torch.stack([image for image, _ in via_split]))
    with pytest.raises(FileNotFoundError, match=r"ROOT/<class>/<image>"):
        build_dataset(f"folder:{folder_root}", "test")  # split folders, none called test
