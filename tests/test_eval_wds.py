"""``wds:ROOT`` datasets (CLIP_benchmark's layout) scored by our evaluators against CLIP_benchmark's own code.

A tiny wds dataset is generated with ``mmsoftmoe.data.TarShard``; CLIP_benchmark (``clip_benchmark.metrics``, a
test-only extra) scores the same untrained model on a loader built here from the tar files by a separate reader,
with amp off.
CLIP_benchmark 1.6.2's top-k helper fails under NumPy 2 (``float()`` of a 1-element array); the test swaps in the
same formula with ``.item()``, everything else is its code as installed.
"""

import io
import json
import tarfile

import open_clip
import pytest
import torch
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
from PIL import Image
from torch.utils.data import DataLoader

from mmsoftmoe.data import TarShard
from mmsoftmoe.models.clip import build_clip, preprocess_config
from mmsoftmoe_eval.datasets import build_dataset
from mmsoftmoe_eval.fewshot import evaluate_fewshot
from mmsoftmoe_eval.main import run_evaluation

MODEL = "SoftMoE-Micro-4-32"
CLASSES = ["red square", "green square", "blue square", "red disc", "green disc", "blue disc"]
TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}."]
COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]


def _picture(label: int, index: int) -> bytes:
    """A coloured square or disc on a noisy background, PNG-encoded."""
    generator = torch.Generator().manual_seed(1000 * label + index)
    pixels = (torch.rand(32, 32, 3, generator=generator) * 60).to(torch.uint8)
    y, x = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    mask = ((y - 16) ** 2 + (x - 16) ** 2 < 100) if label >= 3 else ((y - 16).abs() < 9) & ((x - 16).abs() < 9)
    pixels[mask] = torch.tensor(COLOURS[label % 3], dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def write_wds(root, split, samples, num_shards, retrieval=False):
    """samples: (png bytes, label or list of captions); round-robin over ``num_shards`` tar files."""
    (root / split).mkdir(parents=True)
    (root / split / "nshards.txt").write_text(f"{num_shards}\n")
    for shard in range(num_shards):
        with TarShard(root / split / f"{shard}.tar") as tar:
            for i in range(shard, len(samples), num_shards):
                image, target = samples[i]
                label = {"txt": "\n".join(target).encode()} if retrieval else {"cls": f"{target}\n".encode()}
                tar.write(f"s{i:05d}", {"png": image, **label})


@pytest.fixture(scope="module")
def classification_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds_shapes")
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    write_wds(root, "test", [(_picture(i % 6, i), i % 6) for i in range(36)], num_shards=2)
    write_wds(root, "train", [(_picture(i % 6, 100 + i), i % 6) for i in range(6 * 14)], num_shards=3)
    return root


@pytest.fixture(scope="module")
def retrieval_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds_captions")
    (root / "dataset_type.txt").write_text("retrieval\n")
    # Distinct captions: exact score ties, which torch.topk breaks arbitrarily, count for the query in eval.retrieval.
    samples = [(_picture(i % 6, i), [f"a {CLASSES[i % 6]}, number {i}", f"picture {i} of a {CLASSES[i % 6]}"])
               for i in range(20)]
    write_wds(root, "test", samples, num_shards=2, retrieval=True)
    return root, samples


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    clip, tokenizer = build_clip(MODEL)
    cfg = preprocess_config(clip)
    transform = open_clip.image_transform(cfg["size"], is_train=False, mean=cfg["mean"], std=cfg["std"])
    return clip.eval(), tokenizer, transform


def read_tars(root, split):
    """An independent reader: every member of every shard, grouped by the name before the first dot."""
    samples = {}
    shards = int((root / split / "nshards.txt").read_text())
    for shard in range(shards):
        with tarfile.open(root / split / f"{shard}.tar") as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault((shard, key), {})[ext] = tar.extractfile(member).read()
    return list(samples.values())


class _Classification(torch.utils.data.Dataset):
    def __init__(self, root, split, transform):
        self.samples, self.transform, self.classes = read_tars(root, split), transform, CLASSES

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        image = Image.open(io.BytesIO(self.samples[i]["png"])).convert("RGB")
        return self.transform(image), int(self.samples[i]["cls"])


class _Captions(_Classification):
    def __getitem__(self, i):
        image = Image.open(io.BytesIO(self.samples[i]["png"])).convert("RGB")
        return self.transform(image), self.samples[i]["txt"].decode().splitlines()


def _accuracy(output, target, topk=(1,)):
    """CLIP_benchmark's ``accuracy`` with ``.item()`` where it calls ``float()`` on a 1-element array (NumPy 2)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def test_zero_shot_equals_clip_benchmark(classification_root, model, tmp_path, monkeypatch):
    monkeypatch.setattr(zeroshot_classification, "accuracy", _accuracy)
    clip, tokenizer, transform = model
    ours = run_evaluation(clip, tokenizer, dataset=f"wds:{classification_root}", tasks="zeroshot",
                          preprocess=transform, batch_size=8, out_dir=tmp_path)
    loader = DataLoader(_Classification(classification_root, "test", transform), batch_size=7)
    theirs = zeroshot_classification.evaluate(clip, loader, tokenizer, CLASSES, TEMPLATES, device="cpu", amp=False)
    assert ours[f"wds:{classification_root}"]["zeroshot"] == pytest.approx(theirs, abs=1e-6)
    record = json.loads(next((tmp_path / "clip_benchmark").glob("*_zeroshot_classification.json")).read_text())
    assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(record)
    assert record["task"] == "zeroshot_classification" and record["metrics"] == pytest.approx(theirs, abs=1e-6)
    assert "seconds" not in record["metrics"] and record["seconds"] >= 0
    assert record["num_samples"] == 36 == ours[f"wds:{classification_root}"]["num_samples"]["zeroshot"]  # all read


def test_retrieval_equals_clip_benchmark(retrieval_root, model):
    root, _ = retrieval_root
    clip, tokenizer, transform = model
    ours = run_evaluation(clip, tokenizer, dataset=f"wds:{root}", tasks="zeroshot,retrieval", preprocess=transform,
                          batch_size=8)[f"wds:{root}"]
    assert set(ours) == {"retrieval", "seconds", "num_samples"}  # no labels: zero-shot is skipped
    assert ours["num_samples"] == {"retrieval": len(_Captions(root, "test", transform))}
    loader = DataLoader(_Captions(root, "test", transform), batch_size=6,
                        collate_fn=lambda batch: (torch.stack([b[0] for b in batch]), [b[1] for b in batch]))
    theirs = zeroshot_retrieval.evaluate(clip, loader, tokenizer, device="cpu", amp=False, recall_k_list=[1, 5, 10])
    assert ours["retrieval"] == pytest.approx(theirs, abs=1e-6)


def test_fewshot_on_wds_equals_the_probe_on_plain_features(classification_root, model):
    clip, tokenizer, transform = model
    ours = run_evaluation(clip, tokenizer, dataset=f"wds:{classification_root}", tasks="fewshot", shots=(1, 2),
                          num_seeds=2, preprocess=transform)[f"wds:{classification_root}"]["fewshot"]

    def pre_logits(split):
        data = _Classification(classification_root, split, transform)
        images = torch.stack([data[i][0] for i in range(len(data))])
        with torch.inference_mode():
            return clip.visual.trunk(images), torch.tensor([data[i][1] for i in range(len(data))])

    expected = evaluate_fewshot(*pre_logits("train"), *pre_logits("test"), shots=(1, 2), num_seeds=2)
    for key, entry in expected.items():
        assert ours[key]["acc1"] == pytest.approx(entry["acc1"], abs=1e-9)


def test_wds_reads_names_templates_and_labels_in_shard_order(classification_root):
    dataset = build_dataset(f"wds:{classification_root}", "test")
    assert dataset.classnames == CLASSES and dataset.templates == ["a photo of a {}.", "a drawing of a {}."]
    expected = [int(sample["cls"]) for sample in read_tars(classification_root, "test")]
    assert [dataset[i][1] for i in range(len(dataset))] == expected
    assert len(dataset) == 36


@pytest.mark.parametrize(("case", "message"), [
    ("no_nshards", r"needs ROOT/<split>/nshards.txt"),
    ("no_label", r"sample 's00001' lacks an image .* or its \.cls"),
    ("no_classnames", r"classnames.txt: a wds classification dataset needs one class name per line"),
])
def test_wds_errors_name_the_problem(case, message, tmp_path):
    root = tmp_path / "ds"
    write_wds(root, "test", [(_picture(0, 0), 0), (_picture(1, 1), 1)], num_shards=1)
    (root / "classnames.txt").write_text("a\nb\n")
    if case == "no_nshards":
        (root / "test" / "nshards.txt").unlink()
    elif case == "no_label":
        with TarShard(root / "test" / "0.tar") as tar:
            tar.write("s00001", {"png": _picture(1, 1)})
    else:
        (root / "classnames.txt").unlink()
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        build_dataset(f"wds:{root}", "test")


def test_clip_benchmark_template_file_keys_match_wds_folder_names(tmp_path):
    root = tmp_path / "wds_toy"
    write_wds(root, "test", [(_picture(0, 0), 0), (_picture(1, 1), 1)], num_shards=1)
    (root / "classnames.txt").write_text("a\nb\n")
    templates = tmp_path / "en_zeroshot_classification_templates.json"  # CLIP_benchmark's file: name -> list
    templates.write_text(json.dumps({"imagenet1k": ["a photo of a {c}."], "toy": ["itap of a {c}."]}))
    dataset = build_dataset(f"wds:{root}", "test", templates_file=templates)
    assert dataset.templates == ["itap of a {}."] and dataset.classnames == ["a", "b"]
