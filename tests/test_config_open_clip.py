"""open_clip users' spellings: precision names mapped as open_clip's trainer means them, nearest-key suggestions,
settings that need another one, and open_clip's `aug_cfg` fields."""

import pytest
import torch
import yaml
from open_clip.transform import AugmentationCfg
from open_clip_train.precision import get_autocast

from mmsoftmoe_training.config import PRECISION_ALIASES, config_yaml, load_config

# What accelerate's mixed_precision values autocast to (None: no autocast).
OUR_AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("name", ["amp", "amp_bf16", "amp_bfloat16", "fp32"])
def test_open_clip_precision_names_mean_the_same_autocast(name):
    cfg = load_config(None, [f"precision={name}"])
    autocast = get_autocast(name, device_type="cpu")
    theirs = autocast.keywords["dtype"] if hasattr(autocast, "keywords") else None
    assert OUR_AUTOCAST[cfg.precision] == theirs
    assert yaml.safe_load(config_yaml(cfg))["precision"] == cfg.precision  # the resolved config names ours
    assert PRECISION_ALIASES[name] == cfg.precision


@pytest.mark.parametrize("name", ["pure_bf16", "pure_fp16"])
def test_pure_precision_is_refused_with_what_to_use(name):
    with pytest.raises(ValueError, match=rf"precision='{name}' .*no fp32 master copy.*use precision=bf16"):
        load_config(None, [f"precision={name}"])


@pytest.mark.parametrize(("override", "suggested"), [
    ("optim.lrr=1", "'optim.lr'"),
    ("lr=1", "'optim.lr'"),              # open_clip's flat name finds the sectioned key
    ("ouput_dir=x", "'output_dir'"),
    ("data.resample=true", "'data.resampled'"),
    ("precision=bf61", "'bf16'"),
    ("loss=siglp", "'siglip'"),
])
def test_unknown_keys_and_values_suggest_the_nearest(override, suggested):
    with pytest.raises(ValueError, match="did you mean") as err:
        load_config(None, [override])
    assert suggested in str(err.value) and "model.name" not in str(err.value)  # not the whole key list


def test_unknown_key_without_a_near_one_points_to_help_config():
    with pytest.raises(ValueError, match="--help-config") as err:
        load_config(None, ["zzzzqqqq=1"])
    assert "did you mean" not in str(err.value)


@pytest.mark.parametrize(("overrides", "match"), [
    (["data.resampled=true"], "set data.streaming=true"),
    (["data.train_num_samples=1000"], "set data.streaming=true"),
    (["data.aug_re_prob=0.25"], "data.aug_use_timm=true"),
    (["data.aug_ratio=[0.5,2.0]"], "data.aug_use_timm=true"),
    (["data.aug_use_timm=true", "data.aug_gray_scale_prob=0.2"], "data.aug_use_timm=false"),
    (["data.aug_color_jitter=[0.4,0.4,0.4,0.1]"], "data.aug_color_jitter_prob"),
    (["data.aug_use_timm=true", "data.aug_re_prob=1.5"], r"probability.*\[0, 1\]"),
])
def test_settings_that_need_another_one_are_errors_naming_it(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)


def test_streaming_settings_together_are_accepted():
    cfg = load_config(None, ["data.streaming=true", "data.resampled=true", "data.train_num_samples=1000"])
    assert cfg.data.train_num_samples == 1000


def test_aug_keys_make_open_clips_augmentation_cfg():
    cfg = load_config(None, ["data.aug_use_timm=true", "data.crop_scale=[0.08,1.0]", "data.aug_ratio=[0.5,2.0]",
                             "data.aug_color_jitter=[0.4,0.4,0.4,0.1]", "data.aug_re_prob=0.25",
                             "data.aug_re_count=2"])
    assert cfg.data.aug_cfg() == AugmentationCfg(scale=(0.08, 1.0), ratio=(0.5, 2.0), color_jitter=(0.4, 0.4, 0.4, 0.1),
                                                 re_prob=0.25, re_count=2, use_timm=True)
    assert load_config(None).data.aug_cfg() == AugmentationCfg()  # the defaults are open_clip's
