"""Run configs: typed parsing, base inheritance, smoke overrides, rejection of bad keys; every shipped config runs."""

from pathlib import Path

import pytest

import mmsoftmoe_training.main as train_main
from mmsoftmoe_training.config import load_config, valid_keys

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_overrides_are_typed():
    cfg = load_config(None, ["optim.lr=2e-3", "steps=7", "data.crop_scale=[0.08, 1.0]", "model.text_model=none",
                             "trackers=[]", "optim.grad_clip=null", "model.lock_text=true"])
    assert cfg.optim.lr == 2e-3 and cfg.steps == 7 and cfg.data.crop_scale == (0.08, 1.0)
    assert cfg.model.text_model is None and cfg.trackers == [] and cfg.optim.grad_clip is None
    assert cfg.model.lock_text is True


@pytest.mark.parametrize(("override", "match"), [
    ("optim.lrr=1", "unknown config key 'optim.lrr' \\(did you mean 'optim.lr'"),
    ("steps=ten", "steps: expected int"),
    ("loss=triplet", r"loss='triplet' is not valid; choices: \['clip', 'siglip'\]"),
    ("optim.schedule=linear", "optim.schedule"),
    ("model.lock_image=maybe", "expected true/false"),
    ("steps", "not key=value"),
])
def test_bad_keys_and_values_are_rejected_with_the_valid_choices(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_batch_must_split_over_accumulation():
    with pytest.raises(ValueError, match="batch_size=10 is not divisible by grad_accum_steps=3"):
        load_config(None, ["batch_size=10", "grad_accum_steps=3"])


def test_base_chain_and_smoke_precedence(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("steps: 100\noptim:\n  lr: 0.1\nsmoke:\n  steps: 2\n  batch_size: 4\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\noptim:\n  lr: 0.2\nsmoke:\n  batch_size: 8\n")
    cfg = load_config(child)
    assert (cfg.steps, cfg.optim.lr, cfg.batch_size) == (100, 0.2, 64)
    cfg = load_config(child, ["smoke=true"])
    assert (cfg.steps, cfg.batch_size) == (2, 8)
    cfg = load_config(child, ["smoke=true", "steps=3"])  # the command line wins over smoke
    assert cfg.steps == 3
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_every_key_is_documented_in_the_dataclasses():
    assert "optim.lr" in valid_keys() and "eval.every" in valid_keys() and "model" not in valid_keys()


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_runs_at_smoke_size(path, tmp_path):
    cfg = load_config(path, ["smoke=true", f"output_dir={tmp_path}", "eval.dataset=none", "trackers=[]",
                             "data.num_workers=0"])
    assert cfg.steps <= 10
    train_main.fit(cfg)
    assert (tmp_path / "final" / "open_clip_model.safetensors").is_file()
