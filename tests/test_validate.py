"""Held-out validation (open_clip's `--val-data`) against a hand computation: the per-batch contrastive loss
averaged over samples, and retrieval ranks from open_clip's own `get_clip_metrics` on the whole set."""

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip_train.train import get_clip_metrics
from torch.utils.data import DataLoader

import mmsoftmoe_training.main as train_main
from mmsoftmoe.data import PairDataset, ShapesCaptions, collate, transforms_from_preprocess_cfg
from mmsoftmoe.models.clip import load_clip, preprocess_config
from mmsoftmoe_training.config import load_config
from mmsoftmoe_training.logger import read_metrics
from mmsoftmoe_training.loop import build_loss
from mmsoftmoe_training.model import build_model
from mmsoftmoe_training.validate import build_val_loader, validation_metrics
from tests.test_data_pairs import write_csv


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, tokenizer, _ = build_model(load_config(None))
    _, eval_tf = transforms_from_preprocess_cfg(preprocess_config(model))
    pairs = PairDataset(ShapesCaptions(20, image_size=32, seed=5), transform=eval_tf, tokenizer=tokenizer)
    return model, DataLoader(pairs, batch_size=8, collate_fn=collate)  # batches of 8, 8, 4


def test_loss_and_retrieval_equal_a_hand_computation(setup):
    model, loader = setup
    model.train()
    metrics = validation_metrics(model, loader, build_loss("clip", local_loss=True, gather_with_grad=True, rank=0,
                                                           world_size=1))
    assert model.training  # the mode is restored

    model.eval()
    weighted, images, texts = 0.0, [], []
    with torch.no_grad():
        for batch in loader:  # open_clip_train's evaluate, written out
            out = model(batch["image"], batch["text"])
            logits = out["logit_scale"] * out["image_features"] @ out["text_features"].t()
            labels = torch.arange(len(logits))
            weighted += (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)).item() / 2 * len(logits)
            images.append(out["image_features"])
            texts.append(out["text_features"])
    assert metrics["val/contrastive_loss"] == pytest.approx(weighted / 20, rel=1e-5)
    assert metrics["val/num_samples"] == 20
    theirs = get_clip_metrics(torch.cat(images), torch.cat(texts), out["logit_scale"])
    for name, value in theirs.items():
        direction, _, stat = name.rpartition("_R@") if "_R@" in name else (name, None, None)
        key = f"val/{direction}_recall@{stat}" if stat else f"val/{name}"
        assert metrics[key] == pytest.approx(float(value), abs=1e-9), key
    assert 0 < metrics["val/image_to_text_recall@1"] < metrics["val/image_to_text_recall@10"] <= 1


def test_one_batch_is_open_clips_loss_on_the_whole_set(setup):
    model, loader = setup
    whole = DataLoader(loader.dataset, batch_size=20, collate_fn=collate)
    loss_fn = open_clip.ClipLoss()
    metrics = validation_metrics(model, whole, loss_fn)
    model.eval()
    batch = next(iter(whole))
    with torch.no_grad():
        out = model(batch["image"], batch["text"])
        expected = loss_fn(out["image_features"], out["text_features"], out["logit_scale"]).item()
    assert metrics["val/contrastive_loss"] == pytest.approx(expected, rel=1e-6)


def test_an_empty_loader_is_an_error_naming_the_key(setup):
    model, _ = setup
    with pytest.raises(ValueError, match="data.val_source"):
        validation_metrics(model, [], open_clip.ClipLoss())


def test_val_loader_reads_data_val_source_in_equal_shares(setup, tmp_path):
    model, _ = setup
    write_csv(tmp_path, "val.tsv", "\t", ("filepath", "title"), range(5))
    data = load_config(None, [f"data.val_source={tmp_path / 'val.tsv'}", f"data.cache_dir={tmp_path / 'cache'}"]).data
    tokenizer = open_clip.SimpleTokenizer(context_length=32)
    shares = [build_val_loader(data, preprocess_config(model), tokenizer, batch_size=2, rank=r, world_size=2)
              for r in range(2)]
    texts = [[row.tolist() for batch in loader for row in batch["text"]] for loader in shares]
    assert [len(t) for t in texts] == [2, 2]  # 5 pairs over 2 processes: 2 each, the last left out
    expected = tokenizer([f"sample {i}, with a comma" for i in range(4)]).tolist()
    assert texts[0] + texts[1] == expected
    assert next(iter(shares[0]))["image"].shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="set data.val_source"):
        build_val_loader(load_config(None).data, preprocess_config(model), tokenizer, batch_size=2, rank=0,
                         world_size=1)


@pytest.mark.slow
def test_a_run_validates_every_val_every_steps_and_at_the_end(tmp_path):
    write_csv(tmp_path, "val.tsv", "\t", ("filepath", "title"), range(6))
    out = tmp_path / "run"
    cfg = load_config("smoke", ["smoke=true", f"output_dir={out}", "eval.dataset=none", "data.num_workers=0",
                                "batch_size=16", "trackers=[]", "steps=4", "val_every=2",
                                f"data.val_source={tmp_path / 'val.tsv'}", f"data.cache_dir={tmp_path / 'cache'}"])
    train_main.fit(cfg)
    rows = [r for r in read_metrics(out) if "val/contrastive_loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    # The end's numbers are those of the saved model, validated here on its own.
    model, tokenizer, config = load_clip(out / "final")
    loader = build_val_loader(cfg.data, config["preprocess_cfg"], tokenizer, batch_size=16, rank=0, world_size=1)
    expected = validation_metrics(model, loader, build_loss("clip", local_loss=True, gather_with_grad=True, rank=0,
                                                            world_size=1))
    assert expected["val/num_samples"] == 6
    assert {k: v for k, v in rows[-1].items() if k.startswith("val/")} == pytest.approx(expected, abs=1e-5)
