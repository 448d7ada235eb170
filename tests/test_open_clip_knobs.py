"""open_clip's training knobs with open_clip's meaning: FLIP patch dropout, partial tower locking, the augmentation
config, the epoch size of a streaming source, and where map-style sources are cached."""

import dataclasses
import logging
import random

import datasets
import open_clip
import pytest
import torch
from open_clip.transform import AugmentationCfg, image_transform
from timm.layers import PatchDropout

import mmsoftmoe_training.main as train_main
from mmsoftmoe.data import ShapesCaptions
from mmsoftmoe.models.clip import image_tower, preprocess_config
from mmsoftmoe_training.config import load_config
from mmsoftmoe_training.data import build_pair_dataset
from mmsoftmoe_training.loop import TrainState
from mmsoftmoe_training.model import build_model
from tests.test_data_pairs import write_csv


def _model(*overrides: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(load_config(None, list(overrides)))[0]


def _trunk_tokens(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Image embeddings and the number of tokens each trunk block received."""
    seen = []
    hooks = [block.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
             for block in image_tower(model).blocks]
    try:
        return model.encode_image(images), seen
    finally:
        for hook in hooks:
            hook.remove()


def test_patch_dropout_drops_patches_in_training_only():
    plain, flip = _model(), _model("model.patch_dropout=0.5")
    assert isinstance(image_tower(flip).patch_drop, PatchDropout) and image_tower(flip).patch_drop.prob == 0.5
    images = torch.randn(4, 3, 32, 32)
    patches = image_tower(plain).patch_embed.num_patches  # 64 (4x4 patches of a 32x32 image), no class token
    plain.train(), flip.train()
    ref, plain_tokens = _trunk_tokens(plain, images)
    dropped, flip_tokens = _trunk_tokens(flip, images)
    assert set(plain_tokens) == {patches} and set(flip_tokens) == {patches // 2}  # every block, Soft MoE ones too
    assert torch.isfinite(dropped).all() and not torch.allclose(dropped, ref)
    plain.eval(), flip.eval()  # after training mode: evaluation sees every patch, so outputs are equal
    torch.testing.assert_close(_trunk_tokens(flip, images)[0], _trunk_tokens(plain, images)[0], rtol=0, atol=0)


def test_patch_dropout_zero_equals_no_dropout_in_training_mode():
    plain, zero = _model(), _model("model.patch_dropout=0")
    plain.train(), zero.train()
    images = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(zero.encode_image(images), plain.encode_image(images), rtol=0, atol=0)


def test_patch_dropout_stays_out_of_the_saved_model_config(tmp_path):
    cfg = load_config(None, ["model.patch_dropout=0.5"])
    _, _, model_cfg = build_model(cfg)
    assert "patch_dropout" not in model_cfg["vision_cfg"]  # final/ and exports build without it


def _trainable(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("groups", [0, 1, 3])
def test_image_locking_leaves_open_clips_groups_trainable(groups):
    ours = _model("model.lock_image=true", f"model.lock_image_unlocked_groups={groups}")
    theirs = _model()
    theirs.lock_image_tower(unlocked_groups=groups)
    assert _trainable(ours) == _trainable(theirs)
    blocks = {n for n in _trainable(ours) if n.startswith("visual.trunk.blocks.")}
    assert bool(blocks) == (groups > 0)  # the last groups are the last blocks (and the norm), trainable


@pytest.mark.parametrize("layers", [0, 1, 2])
def test_text_locking_leaves_open_clips_layers_trainable(layers):
    ours = _model("model.lock_text=true", f"model.lock_text_unlocked_layers={layers}")
    theirs = _model()
    theirs.lock_text_tower(unlocked_layers=layers)
    assert _trainable(ours) == _trainable(theirs)
    # open_clip's groups, last first: (ln_final, text_projection), then the blocks from the last
    assert ("text_projection" in _trainable(ours), "transformer.resblocks.1.mlp.c_fc.weight" in _trainable(ours)) \
        == (layers >= 1, layers >= 2)


def test_unlocked_groups_need_the_lock():
    with pytest.raises(ValueError, match="set model.lock_image=true"):
        load_config(None, ["model.lock_image_unlocked_groups=2"])


def seed_all(seed: int) -> None:
    random.seed(seed)  # timm's crop and erasing draw from `random`, torchvision's from torch
    torch.manual_seed(seed)


def test_augmentation_config_gives_open_clips_timm_pipeline():
    cfg = load_config(None, ["data.aug_use_timm=true", "data.aug_re_prob=0.5", "data.aug_ratio=[0.5,2.0]",
                             "data.aug_color_jitter=[0.4,0.4,0.4,0.1]", "data.crop_scale=[0.5,1.0]",
                             "data.num_samples=4"])
    model, tokenizer, _ = build_model(cfg)
    preprocess = preprocess_config(model)
    ours = build_pair_dataset(cfg.data, preprocess, tokenizer, rank=0, world_size=1)
    size = preprocess["size"] if isinstance(preprocess["size"], int) else preprocess["size"][0]
    theirs = image_transform(size, is_train=True, mean=preprocess["mean"], std=preprocess["std"],
                             aug_cfg=AugmentationCfg(scale=(0.5, 1.0), ratio=(0.5, 2.0), re_prob=0.5,
                                                     color_jitter=(0.4, 0.4, 0.4, 0.1), use_timm=True))
    raw = ShapesCaptions(4, image_size=size, seed=cfg.data.image_seed)[1]["image"]
    seed_all(3)
    got = ours[1]["image"]
    seed_all(3)
    torch.testing.assert_close(got, theirs(raw), rtol=0, atol=0)
    seed_all(3)
    plain = build_pair_dataset(dataclasses.replace(cfg.data, aug_use_timm=False, aug_re_prob=None, aug_ratio=None,
                                                   aug_color_jitter=None), preprocess, tokenizer, 0, 1)[1]["image"]
    assert not torch.equal(plain, got)  # the augmentation did something


def test_streaming_epoch_size_is_in_the_start_up_summary(caplog):
    cfg = load_config(None, ["data.streaming=true", "data.train_num_samples=1600", "steps=100", "batch_size=32"])
    model = _model()

    class Accel:  # the two attributes the summary reads
        num_processes = 1
        device = torch.device("cpu")

    with caplog.at_level(logging.INFO, logger="mmsoftmoe.train"):
        train_main.log_summary(cfg, Accel(), model, iter([]), TrainState())
    assert "1600 samples per epoch (data.train_num_samples), 2 epochs in 100 steps" in caplog.text


def test_map_style_sources_are_cached_in_data_cache_dir(tmp_path, monkeypatch):
    write_csv(tmp_path / "src", "pairs.csv", ",", ("filepath", "title"), range(3))
    default = tmp_path / "default_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", default)
    cfg = load_config(None, [f"data.source={tmp_path / 'src' / 'pairs.csv'}", f"data.cache_dir={tmp_path / 'mine'}"])
    tokenizer = open_clip.SimpleTokenizer(context_length=32)
    pairs = build_pair_dataset(cfg.data, preprocess_config(_model()), tokenizer, rank=0, world_size=1)
    assert len(pairs) == 3
    assert list((tmp_path / "mine").rglob("*.arrow"))
    assert not default.exists() or not list(default.rglob("*.arrow"))
