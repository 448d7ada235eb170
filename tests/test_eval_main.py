"""`mmsoftmoe eval` end to end on a tiny untrained checkpoint, checked against the evaluators run on features computed
by an independent path; the dispatch picture against a hand-run forward; user errors."""

import json
import logging
import re

import open_clip
import pytest
import torch
from accelerate.state import AcceleratorState

import mmsoftmoe_cli
from mmsoftmoe.checkpoint import write_manifest
from mmsoftmoe.data import ShapesCaptions
from mmsoftmoe.models.clip import build_clip, image_tower, load_clip, resolve_clip_config, save_clip
from mmsoftmoe_eval.datasets import SHAPES_SPLITS, DigitsDataset
from mmsoftmoe_eval.fewshot import evaluate_fewshot
from mmsoftmoe_eval.linear_probe import evaluate_linear_probe
from mmsoftmoe_eval.main import TASKS, main, parse_tasks, run_evaluation
from mmsoftmoe_eval.plots import dispatch_maps
from mmsoftmoe_eval.retrieval import retrieval_metrics
from mmsoftmoe_eval.zero_shot import zero_shot_metrics

MODEL = "SoftMoE-Micro-4-32"
SHOTS = (1, 5, 10)
CAPTIONS = 3


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # each CLI call makes an Accelerator


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model, _ = build_clip(MODEL)
    return save_clip(model, resolve_clip_config(MODEL), tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def cli_out(checkpoint, tmp_path_factory):
    AcceleratorState._reset_state(True)
    out = tmp_path_factory.mktemp("eval")
    argv = ["--checkpoint", str(checkpoint), "--dataset", "digits", "shapes", "--out", str(out),
            "--tasks", "zeroshot,retrieval,fewshot,linprobe", "--shots", ",".join(map(str, SHOTS)), "--seeds", "2",
            "--captions-per-image", str(CAPTIONS), "--batch-size", "128"]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def results(cli_out):
    return json.loads((cli_out / "results.json").read_text())


@pytest.fixture(scope="module")
def loaded(checkpoint):
    model, tokenizer, config = load_clip(checkpoint)
    cfg = config["preprocess_cfg"]
    # open_clip's own builder, not the mmsoftmoe.data wrapper the CLI uses.
    transform = open_clip.image_transform(cfg["size"], is_train=False, mean=cfg["mean"], std=cfg["std"])
    return model, tokenizer, transform


def encode_all(encode, images, batch_size=100):
    with torch.inference_mode():
        return torch.cat([encode(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def digits_features(model, transform, split):
    """Pre-logits (timm trunk output) and CLIP embeddings by a plain loop, without eval.features."""
    dataset = DigitsDataset(split, transform)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    pre_logits = encode_all(model.visual.trunk, images)
    return pre_logits, encode_all(model.visual.head, pre_logits), torch.as_tensor(dataset.labels), dataset


@pytest.mark.slow
def test_report_has_clip_benchmark_keys_and_sane_values(results, cli_out):
    assert set(results) == {"digits", "shapes"}
    assert set(results["digits"]) == {"zeroshot", "fewshot", "linprobe", "seconds", "num_samples"}  # no retrieval
    assert set(results["shapes"]) == {"zeroshot", "retrieval", "fewshot", "linprobe", "seconds", "num_samples"}
    assert results["digits"]["num_samples"] == {"zeroshot": 360, "fewshot": 360, "linprobe": 360}  # the test split
    assert set(results["shapes"]["num_samples"].values()) == {SHAPES_SPLITS["test"][0]}
    for result in results.values():
        for task in ("zeroshot", "linprobe"):
            metrics = result[task]
            assert {"acc1", "acc5", "mean_per_class_recall"} <= set(metrics)
            assert 0.0 <= metrics["acc1"] <= metrics["acc5"] <= 1.0
        assert set(result["fewshot"]) == {f"{k}shot" for k in SHOTS}
        for entry in result["fewshot"].values():
            assert len(entry["acc1_per_seed"]) == 2 and 0.0 <= entry["acc1"] <= 1.0
        assert set(result["seconds"]) == {"features", *(set(result) - {"seconds", "num_samples"})}
    # An untrained tower still separates digits better than chance (0.1) with a linear probe.
    assert results["digits"]["linprobe"]["acc1"] > 0.2
    retrieval = results["shapes"]["retrieval"]
    for direction in ("image", "text"):
        recalls = [retrieval[f"{direction}_retrieval_recall@{k}"] for k in (1, 5, 10)]
        assert recalls == sorted(recalls) and 0.0 <= recalls[0] and recalls[-1] <= 1.0
    table = (cli_out / "results.md").read_text()
    assert "| shapes / retrieval | image_retrieval_recall@5 |" in table
    for png in ("fewshot.png", "dispatch_digits.png", "dispatch_shapes.png"):
        assert (cli_out / png).stat().st_size > 1000
    assert any((cli_out / "features").iterdir())


@pytest.mark.slow
def test_digits_metrics_equal_evaluators_on_independent_features(results, loaded):
    model, tokenizer, transform = loaded
    train_pre, train_emb, train_y, _ = digits_features(model, transform, "train")
    test_pre, test_emb, test_y, dataset = digits_features(model, transform, "test")
    fewshot = evaluate_fewshot(train_pre, train_y, test_pre, test_y, shots=SHOTS, num_seeds=2)
    for key, entry in fewshot.items():
        assert results["digits"]["fewshot"][key]["acc1"] == pytest.approx(entry["acc1"], abs=1e-9)
    linprobe = evaluate_linear_probe(train_emb, train_y, test_emb, test_y, num_classes=10)
    # L-BFGS turns the ~1e-7 feature differences of another batch grouping (multi-threaded GEMMs) into a few
    # flipped test predictions, so the probe agrees to within 4 of the 360 test images, not to float precision.
    assert results["digits"]["linprobe"]["acc1"] == pytest.approx(linprobe["acc1"], abs=4 / 360 + 1e-6)
    with torch.inference_mode():
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, dataset.classnames, dataset.templates,
                                                          device="cpu", use_tqdm=False)
    zeroshot = zero_shot_metrics(test_emb, test_y, classifier)
    assert results["digits"]["zeroshot"] == pytest.approx(zeroshot, abs=1e-6)


@pytest.mark.slow
def test_shapes_retrieval_equals_direct_computation(results, loaded):
    model, tokenizer, transform = loaded
    num_samples, seed = SHAPES_SPLITS["test"]
    shapes = ShapesCaptions(num_samples, seed=seed, transform=transform)
    images = torch.stack([shapes[i]["image"] for i in range(len(shapes))])
    captions = [shapes.captions(i, CAPTIONS) for i in range(len(shapes))]
    assert all(caption[0] == shapes[i]["caption"] for i, caption in enumerate(captions[:20]))
    text_features = encode_all(model.encode_text, tokenizer([c for group in captions for c in group]))
    text_to_image = torch.arange(len(shapes)).repeat_interleave(CAPTIONS)
    expected = retrieval_metrics(encode_all(model.encode_image, images), text_features, text_to_image)
    assert results["shapes"]["retrieval"] == pytest.approx(expected, abs=1e-6)


def test_dispatch_maps_equal_a_hand_run_forward(loaded):
    model, _, transform = loaded
    tower = image_tower(model)
    dataset = DigitsDataset("test", transform)
    images = torch.stack([dataset[i][0] for i in range(3)])
    slots = [0, 7, 15]
    maps = dispatch_maps(tower, images, slots)
    assert maps.shape == (3, 3, 8, 8)
    torch.testing.assert_close(maps.sum((2, 3)), torch.ones(3, 3))  # no class token: patches hold all the weight
    with torch.inference_mode():
        x = tower.norm_pre(tower._pos_embed(tower.patch_embed(images)))
        for block in tower.blocks[:-1]:
            x = block(x)
        last = tower.blocks[-1]
        x = x + last.ls1(last.attn(last.norm1(x)))
        dispatch_bms, _ = last.mlp.routing_weights(last.norm2(x))
    torch.testing.assert_close(maps, dispatch_bms[:, :, slots].transpose(1, 2).reshape(3, 3, 8, 8))


@pytest.mark.slow
def test_training_time_calls_never_read_a_stale_cache(results, loaded, tmp_path):
    model, tokenizer, transform = loaded
    call = dict(dataset="shapes", tasks="zeroshot", preprocess=transform, cache_dir=tmp_path)
    first = run_evaluation(model, tokenizer, **call)["shapes"]["zeroshot"]
    assert first == pytest.approx(results["shapes"]["zeroshot"], abs=1e-6)
    assert not any(tmp_path.iterdir())  # no model_key: nothing cached
    with torch.no_grad():
        model.visual.head.proj.weight.mul_(-1)  # "a training step"
    try:
        second = run_evaluation(model, tokenizer, **call)["shapes"]["zeroshot"]
    finally:
        with torch.no_grad():
            model.visual.head.proj.weight.mul_(-1)
    assert second != first


@pytest.mark.slow
def test_cached_second_run_gives_the_same_numbers(checkpoint, cli_out, results, caplog):
    out = cli_out / "rerun"
    argv = ["--checkpoint", str(checkpoint), "--dataset", "digits", "--tasks", "fewshot", "--shots", "1,5,10",
            "--seeds", "2", "--out", str(out), "--cache-dir", str(cli_out / "features")]
    with caplog.at_level(logging.INFO, logger="mmsoftmoe_eval.features"):
        assert main(argv) == 0
    assert caplog.text.count("cached features") == 2  # train and test
    rerun = json.loads((out / "results.json").read_text())["digits"]["fewshot"]
    assert rerun == results["digits"]["fewshot"]


def test_parse_tasks_orders_and_rejects_unknown_names():
    assert parse_tasks("linprobe, zeroshot") == ("zeroshot", "linprobe")
    with pytest.raises(ValueError, match="valid tasks: " + ", ".join(TASKS)):
        parse_tasks("zeroshot,knn")


def _corrupt(checkpoint, tmp_path, edit):
    folder = tmp_path / "bad_ckpt"
    folder.mkdir()
    for file in checkpoint.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "open_clip_config.json").read_text())
    edit(config["model_cfg"])
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    write_manifest(folder)  # a folder that verifies, whose config describes another model
    return folder


def _empty_class(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        (tmp_path / "ds" / split / "empty").mkdir(parents=True)
        (tmp_path / "ds" / split / "cat").mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / "ds" / split / "cat" / "a.png")
    return f"folder:{tmp_path / 'ds'}"


@pytest.mark.parametrize(("case", "message"), [
    ("unknown_task", r"Unknown task\(s\) \['knn'\]; valid tasks: zeroshot, retrieval"),
    ("missing_dataset", r"No split folder .*nowhere/test \(the root does not exist\)"),
    ("empty_class", r"Class folder\(s\) \['empty'\] .* hold no images"),
    ("too_many_shots", r"500 shots need 500 training examples per class, but '\w+' has only \d+"),
    ("other_tower", r"does not match its config .*missing \['visual.trunk.blocks.2.mlp.fc1"),
    ("other_width", r"does not match its config .*open_clip_config.json: size mismatch for text_projection"),
    ("missing_checkpoint", r"[Cc]heckpoint .*nothing does not exist"),
])
def test_user_errors_print_one_clear_line(case, message, checkpoint, tmp_path, capsys):
    ckpt, dataset, extra = checkpoint, "digits", ["--tasks", "zeroshot"]
    if case == "unknown_task":
        extra = ["--tasks", "zeroshot,knn"]
    elif case == "missing_dataset":
        dataset = f"folder:{tmp_path / 'nowhere'}"
    elif case == "empty_class":
        dataset = _empty_class(tmp_path)
    elif case == "too_many_shots":
        extra = ["--tasks", "fewshot", "--shots", "1,500"]
    elif case == "other_tower":
        dense = "dense_vit_micro_patch4_32"
        ckpt = _corrupt(checkpoint, tmp_path, lambda c: c["vision_cfg"].update(timm_model_name=dense))
    elif case == "other_width":
        ckpt = _corrupt(checkpoint, tmp_path, lambda c: c.update(embed_dim=32))
    elif case == "missing_checkpoint":
        ckpt = tmp_path / "nothing"
    argv = ["--checkpoint", str(ckpt), "--dataset", dataset, "--out", str(tmp_path / "out"), "--no-cache", *extra]
    assert mmsoftmoe_cli.main(["eval", *argv]) == 2  # the command's one error contract
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    assert re.search(message, err[-1]), err[-1]


@pytest.mark.slow
def test_suite_cli_writes_the_table_and_clip_benchmark_files(checkpoint, results, tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text("- dataset: digits\n  tasks: zeroshot\n- dataset: shapes\n  tasks: [zeroshot, retrieval]\n")
    out = tmp_path / "out"
    argv = ["--checkpoint", str(checkpoint), "--suite", str(suite), "--out", str(out), "--no-cache",
            "--captions-per-image", str(CAPTIONS), "--batch-size", "128"]
    assert main(argv) == 0
    table = (out / "suite.csv").read_text().splitlines()
    assert table[0] == "dataset,zero-shot top-1,image->text R@1,text->image R@1"
    zeroshot = [results[name]["zeroshot"]["acc1"] for name in ("digits", "shapes")]
    assert float(table[-1].split(",")[1]) == pytest.approx(sum(zeroshot) / 2, abs=1e-6)  # same numbers as --dataset
    record = json.loads((out / "shapes" / "clip_benchmark" / "shapes_zeroshot_retrieval.json").read_text())
    assert record["metrics"] == pytest.approx(results["shapes"]["retrieval"], abs=1e-6)
    assert record["pretrained"] == str(checkpoint.resolve()) and record["model"] == "softmoe_vit_micro_patch4_32_e16"
    assert record["checkpoint_hash"] and record["dataset"] == "shapes" and record["language"] == "en"
